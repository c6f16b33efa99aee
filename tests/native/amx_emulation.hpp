// The AMX tile instructions backends/cpu/kernels_amx.cpp uses, in plain C++
// (tiles of 16 rows x 64 bytes, the only shape that file configures), so its
// addressing can be checked on machines without AMX (amx_check.cpp). Force-
// included ahead of each source: <immintrin.h> first, then its tile macros
// replaced. tdpbf16ps: C[m][n] += A[m][2k] B[k][2n] + A[m][2k+1] B[k][2n+1].
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>
struct EmuTile { alignas(64) unsigned char b[16][64]; };
static thread_local EmuTile emu_t[8];
inline float emu_bf(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline void emu_load(int t, const void* base, long stride) {
  for (int r = 0; r < 16; ++r) std::memcpy(emu_t[t].b[r], static_cast<const char*>(base) + r * stride, 64);
}
inline void emu_store(int t, void* base, long stride) {
  for (int r = 0; r < 16; ++r) std::memcpy(static_cast<char*>(base) + r * stride, emu_t[t].b[r], 64);
}
inline void emu_dp(int c, int a, int b) {
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s; std::memcpy(&s, &emu_t[c].b[m][4 * n], 4);
      for (int k = 0; k < 16; ++k) {
        uint16_t a0, a1, b0, b1;
        std::memcpy(&a0, &emu_t[a].b[m][4 * k], 2); std::memcpy(&a1, &emu_t[a].b[m][4 * k + 2], 2);
        std::memcpy(&b0, &emu_t[b].b[k][4 * n], 2); std::memcpy(&b1, &emu_t[b].b[k][4 * n + 2], 2);
        s += emu_bf(a0) * emu_bf(b0) + emu_bf(a1) * emu_bf(b1);
      }
      std::memcpy(&emu_t[c].b[m][4 * n], &s, 4);
    }
}
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#undef _tile_loadconfig
#undef _tile_release
#define _tile_loadd(t, base, stride) emu_load(t, base, stride)
#define _tile_stored(t, base, stride) emu_store(t, base, stride)
#define _tile_zero(t) std::memset(emu_t[t].b, 0, sizeof(emu_t[t].b))
#define _tile_dpbf16ps(c, a, b) emu_dp(c, a, b)
#define _tile_loadconfig(p) ((void)(p))
#define _tile_release() ((void)0)
