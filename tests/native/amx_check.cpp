// The AMX bf16 tile kernel against the AVX512-BF16 one on the same packed
// weights and activations, with the tile instructions emulated in C++
// (amx_emulation.hpp): run by tests/test_cpu_kernels.py where the CPU has
// AVX512-BF16 and a C++ compiler is present. Prints one line per expert and
// "ok", or "FAILED" (exit status 1).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kernels.hpp"

using namespace ferrum::cpu;

namespace {

struct Case {
  int experts, k, n, group_size, m;
  bool asymmetric;
};

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t(u >> 16);
}

}  // namespace

int main() {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uniform(-1, 1);
  // Two 16-row slabs and one, units of 128 and 32 rows, one group over K, and
  // a last unit of 72 rows (not a multiple of 32: the AVX512-BF16 fallback).
  const Case cases[] = {{2, 256, 200, 128, 40, false}, {1, 4096, 256, 128, 150, true}, {3, 320, 64, 32, 17, true},
                        {1, 512, 128, -1, 33, false}, {1, 200, 64, 128, 20, false}};
  int failures = 0;
  for (const Case& c : cases) {
    const int groups = c.group_size == -1 ? 1 : (c.k + c.group_size - 1) / c.group_size;
    std::vector<int32_t> qweight(size_t(c.experts) * ((c.k + 7) / 8) * c.n);
    for (auto& v : qweight) v = int32_t(rng());
    std::vector<uint16_t> scales(size_t(c.experts) * groups * c.n), x(size_t(c.m) * c.k);
    for (auto& v : scales) v = to_bf16(0.01f + 0.02f * std::abs(uniform(rng)));
    for (auto& v : x) v = to_bf16(uniform(rng));
    std::vector<uint8_t> zeros(scales.size());
    for (auto& v : zeros) v = uint8_t(rng() % 16);
    int64_t q_shape[3] = {c.experts, (c.k + 7) / 8, c.n}, s_shape[3] = {c.experts, groups, c.n};
    DLTensor q{qweight.data(), {kDLCPU, 0}, 3, {kDLInt, 32, 1}, q_shape, nullptr, 0};
    DLTensor s{scales.data(), {kDLCPU, 0}, 3, {kDLBfloat, 16, 1}, s_shape, nullptr, 0};
    DLTensor z{zeros.data(), {kDLCPU, 0}, 3, {kDLUInt, 8, 1}, s_shape, nullptr, 0};
    FmStackCreateArgs args{};
    args.dtype = {kDLBfloat, 16, 1};
    args.num_experts = c.experts;
    args.k = c.k;
    args.n_per_expert = c.n;
    args.bits = 4;
    args.group_size = c.group_size;
    args.qweight = &q;
    args.scales = &s;
    args.zeros = c.asymmetric ? &z : nullptr;
    const PackedWeights w = pack_weights(args);
    for (int e = 0; e < c.experts; ++e) {
      const int64_t units = w.unit_begin[size_t(e) + 1] - w.unit_begin[size_t(e)];
      std::vector<uint16_t> a(size_t((c.m + 15) / 16 * 16) * w.kpad(), 0);  // rows padded to 16, as the driver does
      std::vector<float> xs(size_t(c.m) * units);
      std::vector<int64_t> rows(size_t(c.m));
      for (int i = 0; i < c.m; ++i) rows[size_t(i)] = i;
      avx512bf16::pack_bf16(PackArgs{&w, e, x.data(), Float::bf16, c.k, rows.data(), c.m, a.data(), xs.data()});
      const int64_t blocks = std::min<int64_t>(w.blocks, kMaxItemBlocks);
      std::vector<float> want(size_t(c.m * blocks * kBlockCols)), got(want.size());
      alignas(64) static char scratch[kTileScratchBytes];
      TileArgs t{&w, e, a.data(), xs.data(), c.m, 0, blocks, want.data(), scratch};
      avx512bf16::tile_bf16(t);
      t.acc = got.data();
      amx::tile_bf16(t);
      double worst = 0, largest = 0;
      for (size_t i = 0; i < want.size(); ++i) {
        worst = std::max(worst, double(std::abs(want[i] - got[i])));
        largest = std::max(largest, double(std::abs(want[i])));
      }
      std::printf("K %d N %d group %d M %d asym %d expert %d: max |amx - avx512bf16| %.3g of max %.3g\n", c.k, c.n,
                  c.group_size, c.m, int(c.asymmetric), e, worst, largest);
      failures += !(worst <= 1e-5 * largest);  // float32 summation order only
    }
  }
  std::printf(failures != 0 ? "FAILED\n" : "ok\n");
  return failures != 0;
}
