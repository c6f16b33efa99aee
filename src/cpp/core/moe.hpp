// One MoE layer call's backend steps, in order, without returning to Python
// between them: align (or pair routing for one token) -> w13 GEMM -> gated
// activation -> w2 GEMM with the router weight -> top-k sum; or, under pair
// routing, the whole layer in one plugin call where the plugin offers one
// (ABI 1.4, plugin.h: FmMoeLayerArgs) and takes this call. The caller
// (ferrum_moe.moe) has imported and checked the arrays, chosen the routing
// block and sized the buffers; every step checks its own arguments as when
// called alone.
#pragma once

#include <cstdint>

#include "backend.hpp"

namespace ferrum {

struct MoeLayerCall {
  const Tensor* x = nullptr;            // [num_tokens, hidden]
  Tensor* topk_ids = nullptr;           // [num_tokens, top_k], compact
  Tensor* topk_weights = nullptr;       // float32 [num_tokens, top_k], compact
  const Tensor* expert_map = nullptr;   // int32 [num_experts] or null
  int64_t num_experts = 0;              // global expert count (topk_ids' bound)
  bool weights_on_input = false;        // scale the first GEMM's output, not the second's
  // The routing block; 0: pair routing (each pair its own block, no align).
  int64_t block_size = 0;
  Tensor* sorted_token_ids = nullptr;   // align's outputs, when block_size > 0
  Tensor* expert_ids = nullptr;
  Tensor* num_tokens_post_padded = nullptr;
  Tensor* gate_up = nullptr;            // [pairs, 2 * inter]
  Tensor* act = nullptr;                // [pairs, inter]
  Tensor* down = nullptr;               // [pairs, hidden], float32
  Tensor* out = nullptr;                // [num_tokens, hidden]
  void* stream = nullptr;
  // Under pair routing, offer the plugin the whole layer in one call (ABI
  // 1.4); false keeps the steps (FERRUM_MOE_LAYER_CALL=0, ferrum_moe.moe).
  bool layer_call = true;
};

// False, with nothing queued, where the call asks for pair routing and the
// backend refuses it as unsupported (the caller then aligns). Otherwise throws
// ferrum::Error naming the step and argument at the first refusal (the steps
// before it have then been queued), or answers true.
bool run_moe_layer(ExpertStack& w13, ExpertStack& w2, const MoeLayerCall& call);

}  // namespace ferrum
