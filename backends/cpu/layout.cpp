#include "layout.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "ferrum_moe/plugin.hpp"

namespace ferrum::cpu {

namespace {

constexpr size_t kHugePage = size_t(1) << 21;

const void* tensor_data(const DLTensor* t) { return plugin::data_start(*t); }

// A GPTQ 4-bit word (row r of 8 in nibble r) in the layout's order: rows 0, 2,
// 4, 6 in the low half, 1, 3, 5, 7 in the high half (layout.hpp).
uint32_t pair_nibbles(uint32_t x) {
  uint32_t even = x & 0x0F0F0F0Fu, odd = (x >> 4) & 0x0F0F0F0Fu;
  even = (even | (even >> 4)) & 0x00FF00FFu;
  odd = (odd | (odd >> 4)) & 0x00FF00FFu;
  return ((even | (even >> 8)) & 0xFFFFu) | ((odd | (odd >> 8)) << 16);
}

}  // namespace

AlignedBuffer::AlignedBuffer(size_t bytes) : bytes_(bytes) {
  if (bytes == 0) return;
  const size_t align = bytes >= kHugePage ? kHugePage : 64;
  p_ = std::aligned_alloc(align, (bytes + align - 1) / align * align);
  if (p_ == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Advice only: where transparent huge pages are off, nothing changes.
  if (align == kHugePage) madvise(p_, (bytes + align - 1) / align * align, MADV_HUGEPAGE);
#endif
}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& o) noexcept {
  if (this != &o) {
    std::free(p_);
    p_ = o.p_, bytes_ = o.bytes_;
    o.p_ = nullptr, o.bytes_ = 0;
  }
  return *this;
}

AlignedBuffer::~AlignedBuffer() { std::free(p_); }

int64_t PackedWeights::resident_bytes() const {
  return int64_t(codes.bytes() + scales.bytes() + zeros.bytes() + units.size() * sizeof(Unit) +
                 unit_begin.size() * sizeof(int32_t) + source_row.size() * sizeof(int32_t));
}

PackedWeights pack_weights(const FmStackCreateArgs& a) {
  PackedWeights w;
  w.experts = a.num_experts;
  w.k = a.k;
  w.n = a.n_per_expert;
  w.bits = a.bits;
  w.group_size = a.group_size;
  w.groups = a.group_size == -1 ? 1 : (a.k + a.group_size - 1) / a.group_size;
  w.blocks = (w.n + kBlockCols - 1) / kBlockCols;
  w.words = w.bits / 4;
  w.scale_kind = float_kind(a.scales->dtype);
  const int64_t E = w.experts, K = w.k, N = w.n, G = w.groups;
  const int64_t per_word = 32 / w.bits;
  const int64_t packed_k = (K + per_word - 1) / per_word;  // GPTQ words per column
  const auto* qw = static_cast<const uint32_t*>(tensor_data(a.qweight));
  const auto* gi = a.g_idx != nullptr ? static_cast<const int32_t*>(tensor_data(a.g_idx)) : nullptr;
  auto natural_group = [&](int64_t k) { return a.group_size == -1 ? 0 : int32_t(k / a.group_size); };

  // Row order. A g_idx that only restates k / group_size changes nothing.
  bool natural = true;
  for (int64_t i = 0; gi != nullptr && natural && i < E * K; ++i) natural = gi[i] == natural_group(i % K);
  const bool identity = natural && (a.group_size == -1 || a.group_size % kKGroup == 0);

  std::vector<int64_t> group_kg(size_t(E * (G + 1)));  // first k-group of each group, per expert
  if (identity) {
    for (int64_t e = 0; e < E; ++e)
      for (int64_t g = 0; g <= G; ++g)
        group_kg[size_t(e * (G + 1) + g)] = (std::min(g * (a.group_size == -1 ? K : a.group_size), K) + kKGroup - 1) / kKGroup;
    w.kgroups = (K + kKGroup - 1) / kKGroup;
  } else {
    std::vector<int64_t> count(static_cast<size_t>(G));
    for (int64_t e = 0; e < E; ++e) {
      std::fill(count.begin(), count.end(), 0);
      for (int64_t k = 0; k < K; ++k) ++count[size_t(gi != nullptr ? gi[e * K + k] : natural_group(k))];
      int64_t* first = &group_kg[size_t(e * (G + 1))];
      first[0] = 0;
      for (int64_t g = 0; g < G; ++g) first[g + 1] = first[g] + (count[size_t(g)] + kKGroup - 1) / kKGroup;
      w.kgroups = std::max(w.kgroups, first[G]);
    }
    w.source_row.assign(size_t(E * w.kpad()), -1);
    std::vector<int64_t> next(static_cast<size_t>(G));
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t g = 0; g < G; ++g) next[size_t(g)] = group_kg[size_t(e * (G + 1) + g)] * kKGroup;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = gi != nullptr ? gi[e * K + k] : natural_group(k);
        w.source_row[size_t(e * w.kpad() + next[size_t(g)]++)] = int32_t(k);
      }
    }
  }
  w.unit_begin.push_back(0);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t lo = group_kg[size_t(e * (G + 1) + g)], hi = group_kg[size_t(e * (G + 1) + g + 1)];
      for (int64_t u = lo; u < hi; u += kUnitKGroups)
        w.units.push_back({int32_t(u), int32_t(std::min(u + kUnitKGroups, hi)), int32_t(g)});
    }
    w.unit_begin.push_back(int32_t(w.units.size()));
  }

  // Codes. The code of source row r of column c, for the general order.
  auto code = [&](int64_t e, int64_t r, int64_t c) -> uint32_t {
    return (qw[(e * packed_k + r / per_word) * N + c] >> (w.bits * (r % per_word))) & ((1u << w.bits) - 1u);
  };
  w.codes = AlignedBuffer(size_t(E * w.blocks * w.block_words()) * 4);
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t b = 0; b < w.blocks; ++b) {
      auto* out = const_cast<uint32_t*>(w.block_codes(e, b));
      const int64_t c0 = b * kBlockCols, valid = std::min<int64_t>(kBlockCols, N - c0);
      for (int64_t kg = 0; kg < w.kgroups; ++kg) {
        // One k-group of the block, [panel][word][lane]: with 4-bit codes (one
        // word) simply the block's 64 columns in order.
        uint32_t* dst = out + kg * w.kgroup_words();
        if (identity && w.bits == 4 && valid == kBlockCols && kg < packed_k) {
          const uint32_t* src = qw + (e * packed_k + kg) * N + c0;  // the common case, vectorized
          for (int64_t j = 0; j < kBlockCols; ++j) dst[j] = pair_nibbles(src[j]);
          continue;
        }
        for (int64_t word = 0; word < w.words; ++word) {
          for (int64_t j = 0; j < kBlockCols; ++j) {
            const int64_t c = c0 + j;
            uint32_t v = 0;
            if (j >= valid) {
            } else if (identity && w.bits == 4) {
              v = kg < packed_k ? pair_nibbles(qw[(e * packed_k + kg) * N + c]) : 0u;
            } else if (identity) {
              const int64_t src = kg * 2 + word;
              v = src < packed_k ? qw[(e * packed_k + src) * N + c] : 0u;
            } else {
              for (int i = 0; i < per_word; ++i) {
                const int64_t row = kg * kKGroup + (w.bits == 4 ? kNibbleRow[i] : 4 * word + i);
                const int32_t src = w.source_row[size_t(e * w.kpad() + row)];
                if (src >= 0) v |= code(e, src, c) << (w.bits * i);
              }
            }
            dst[((j / kLanes) * w.words + word) * kLanes + j % kLanes] = v;
          }
        }
      }
    }
  }

  // Scales (and zeros): [expert][block][group][64], zero past the last column.
  const size_t sb = size_t(w.scale_bytes());
  w.scales = AlignedBuffer(size_t(E * w.blocks * G * kBlockCols) * sb);
  if (a.zeros != nullptr) w.zeros = AlignedBuffer(size_t(E * w.blocks * G * kBlockCols));
  const auto* s_src = static_cast<const char*>(tensor_data(a.scales));
  const auto* z_src = a.zeros != nullptr ? static_cast<const uint8_t*>(tensor_data(a.zeros)) : nullptr;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t b = 0; b < w.blocks; ++b) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t c0 = b * kBlockCols, valid = std::min<int64_t>(kBlockCols, N - c0);
        auto* s = static_cast<char*>(const_cast<void*>(w.block_scales(e, b, g)));
        std::memcpy(s, s_src + ((e * G + g) * N + c0) * int64_t(sb), size_t(valid) * sb);
        std::memset(s + valid * int64_t(sb), 0, size_t(kBlockCols - valid) * sb);
        if (z_src != nullptr) {
          auto* z = const_cast<uint8_t*>(w.block_zeros(e, b, g));
          std::memcpy(z, z_src + (e * G + g) * N + c0, size_t(valid));
          std::memset(z + valid, 0, size_t(kBlockCols - valid));
        }
      }
    }
  }
  return w;
}

}  // namespace ferrum::cpu
