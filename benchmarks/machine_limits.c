/* The machine's limits for benchmarks/bench_cpu.py, measured in the same run
 * as everything it compares: how fast all threads together stream-read a
 * buffer far larger than the caches (the memory roof), and the peak rate of
 * the widest float32 FMA and bf16 dot-product instructions (the compute roofs).
 *
 * Built by the benchmark with the system C compiler (-O3 -march=native
 * -fopenmp) and loaded with ctypes; not part of the library. Buffers are
 * 2 MiB-aligned and advised to use huge pages, as the CPU backend's weights
 * are. Each thread sums its own contiguous slice into four vector
 * accumulators, prefetching `ahead` bytes ahead (0: the hardware prefetchers
 * alone); the benchmark keeps the best. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

uint64_t ml_sink;

void* ml_alloc(size_t bytes) {
  const size_t huge = (size_t)1 << 21;
  bytes = (bytes + huge - 1) / huge * huge;
  void* p = aligned_alloc(huge, bytes);
  if (p == NULL) return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, bytes, MADV_HUGEPAGE);
#endif
  /* Distinct contents: pages of equal bytes can be merged (by the host of a
   * virtual machine too) into a few physical pages that then read from cache. */
  uint64_t x = 0x9E3779B97F4A7C15u;
  for (size_t i = 0; i < bytes / 8; ++i) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    ((uint64_t*)p)[i] = x;
  }
  return p;
}

void ml_free(void* p) { free(p); }

typedef uint64_t words64 __attribute__((vector_size(64), aligned(64)));

static uint64_t sum_slice(const uint64_t* p, size_t n, size_t ahead) {
  const words64* v = (const words64*)p;
  words64 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
  for (size_t i = 0; i < n / 8; i += 4) {
    if (ahead) {
      __builtin_prefetch((const char*)(v + i) + ahead, 0, 3);
      __builtin_prefetch((const char*)(v + i) + ahead + 128, 0, 3);
    }
    s0 += v[i], s1 += v[i + 1], s2 += v[i + 2], s3 += v[i + 3];
  }
  const words64 s = s0 + s1 + s2 + s3;
  uint64_t total = 0;
  for (int j = 0; j < 8; ++j) total += s[j];
  return total;
}

/* Seconds for `threads` threads to read `bytes` (a multiple of 256 * threads) of p once. */
double ml_read(const void* p, size_t bytes, int threads, size_t ahead) {
  const double t = now();
#pragma omp parallel num_threads(threads)
  {
    const size_t words = bytes / 8 / (size_t)omp_get_num_threads();
    const uint64_t s = sum_slice((const uint64_t*)p + words * (size_t)omp_get_thread_num(), words, ahead);
#pragma omp atomic
    ml_sink += s;
  }
  return now() - t;
}

/* FLOP/s of `threads` threads each running independent register-only
 * instructions: kind 0 float32 FMA, kind 1 bf16 pair dot product (0 where the
 * CPU lacks it). 12 accumulators (distinct, or the compiler merges them) cover
 * latency x throughput on current cores. */
#define REPEAT12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
double ml_peak_flops(int threads, int kind) {
  const long steps = 50000000;
#if defined(__AVX512F__)
  const double lanes = 16;
#else
  const double lanes = 8;
#endif
#if !defined(__AVX512BF16__)
  if (kind == 1) return 0;
#endif
  const double t = now();
#pragma omp parallel num_threads(threads)
  {
    float s = 0;
#if defined(__AVX512F__)
#define DECL(j) __m512 c##j = _mm512_set1_ps((float)j);
#define ADD(j) + _mm512_reduce_add_ps(c##j)
    REPEAT12(DECL)
    if (kind == 1) {
#if defined(__AVX512BF16__)
      __m512bh a = (__m512bh)_mm512_set1_epi32(0), b = a;
#define DOT(j) c##j = _mm512_dpbf16_ps(c##j, a, b);
      for (long i = 0; i < steps; ++i) {
        REPEAT12(DOT)
        __asm__ volatile("" : "+v"(a));
      }
#endif
    } else {
      __m512 a = _mm512_setzero_ps(), b = a;
#define FMA(j) c##j = _mm512_fmadd_ps(a, b, c##j);
      for (long i = 0; i < steps; ++i) {
        REPEAT12(FMA)
        __asm__ volatile("" : "+v"(a));
      }
    }
#else
#define DECL(j) __m256 c##j = _mm256_set1_ps((float)j);
#define ADD(j) + c##j[0]
    REPEAT12(DECL)
    __m256 a = _mm256_setzero_ps(), b = a;
#define FMA(j) c##j = _mm256_fmadd_ps(a, b, c##j);
    for (long i = 0; i < steps; ++i) {
      REPEAT12(FMA)
      __asm__ volatile("" : "+x"(a));
    }
#endif
    s = 0 REPEAT12(ADD);
#pragma omp atomic
    ml_sink += (uint64_t)s;
  }
  const double per_step = kind == 1 ? 64 : 2 * lanes;
  return (double)steps * 12 * threads * per_step / (now() - t);
}
