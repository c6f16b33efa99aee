// The CPU stack layout: GPTQ codes regrouped at load so every kernel streams
// them in the order it consumes them. The codes stay packed (4 or 8 bits);
// nothing is dequantized at load.
//
// Columns come in blocks of 64 (four 16-column panels, padded with zero
// codes and zero scales). Along K the codes are reordered group by group
// (act-order's g_idx sorts rows by group) and each group is padded to a
// multiple of 8 rows with zero activations, so a group always starts at a
// 32-bit word and a k-group (8 rows) never straddles two groups. Groups are
// cut into units of at most 128 rows: a unit is the span over which a kernel
// accumulates before it applies that group's scales (a few KiB of codes per
// 64 columns, which stays in L1).
//
// codes   uint32 [expert][block][kgroup][panel (4)][word (bits / 4)][lane (16)]
//         4-bit word, nibble i holds row 8 * kgroup + kNibbleRow[i] of the
//         lane's column: rows 0, 2, 4, 6 in the low half and 1, 3, 5, 7 in the
//         high half, so (word >> 4t) & 0x000F000F is the pair (2t, 2t + 1) in
//         two 16-bit halves, the operand order of a bf16 pair dot product.
//         8-bit word j, byte t holds row 8 * kgroup + 4j + t.
// scales  [expert][block][group][64], in the stack's dtype (2 or 4 bytes)
// zeros   uint8 [expert][block][group][64], asymmetric stacks only
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "convert.hpp"
#include "ferrum_moe/plugin.h"

namespace ferrum::cpu {

inline constexpr int kLanes = 16;       // columns per panel: one 64-byte line of 32-bit words
inline constexpr int kPanels = 4;       // panels per block
inline constexpr int kBlockCols = kLanes * kPanels;
inline constexpr int kKGroup = 8;       // rows per k-group
inline constexpr int kUnitKGroups = 16; // k-groups per unit at most (128 rows)
inline constexpr int kNibbleRow[8] = {0, 2, 4, 6, 1, 3, 5, 7};

// Rows [kg_begin * 8, kg_end * 8) of the packed K, all in one group.
struct Unit {
  int32_t kg_begin, kg_end, group;
};

// Memory aligned for streaming: 64-byte lines, and 2 MiB huge pages where the
// kernel grants them (fewer TLB misses while a stack streams).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t bytes);
  AlignedBuffer(AlignedBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr, o.bytes_ = 0; }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer();
  template <class T>
  T* as() const { return static_cast<T*>(p_); }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

struct PackedWeights {
  int64_t experts = 0, k = 0, n = 0, bits = 0, group_size = 0, groups = 0;
  int64_t blocks = 0;    // ceil(n / 64)
  int64_t kgroups = 0;   // packed rows / 8 (the largest expert's)
  int64_t words = 0;     // 32-bit words per lane per k-group: bits / 4
  Float scale_kind = Float::f32;
  AlignedBuffer codes, scales, zeros;  // zeros: empty when symmetric
  // Units of expert e: units[unit_begin[e] .. unit_begin[e + 1]).
  std::vector<Unit> units;
  std::vector<int32_t> unit_begin;
  // Source row of each packed row, [expert][kgroups * 8], -1 for padding;
  // empty when the packed order is K's own (padding only past the last row).
  std::vector<int32_t> source_row;

  int64_t kpad() const { return kgroups * kKGroup; }
  // Words of one block of one expert, and of one k-group of a block.
  int64_t kgroup_words() const { return kPanels * words * kLanes; }
  int64_t block_words() const { return kgroups * kgroup_words(); }
  const uint32_t* block_codes(int64_t e, int64_t b) const { return codes.as<uint32_t>() + (e * blocks + b) * block_words(); }
  int64_t scale_bytes() const { return scale_kind == Float::f32 ? 4 : 2; }
  // Scales (and zeros) of group g of block b of expert e: 64 entries.
  const void* block_scales(int64_t e, int64_t b, int64_t g) const {
    return scales.as<char>() + ((e * blocks + b) * groups + g) * kBlockCols * scale_bytes();
  }
  const uint8_t* block_zeros(int64_t e, int64_t b, int64_t g) const {
    return zeros.bytes() == 0 ? nullptr : zeros.as<uint8_t>() + ((e * blocks + b) * groups + g) * kBlockCols;
  }
  // The zero point of a symmetric stack.
  float symmetric_zero() const { return float(1 << (bits - 1)); }
  int64_t resident_bytes() const;
};

// Regroups a stack's GPTQ tensors (plugin.h's FmStackCreateArgs) into the layout.
PackedWeights pack_weights(const FmStackCreateArgs& a);

}  // namespace ferrum::cpu
