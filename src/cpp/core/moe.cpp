#include "moe.hpp"

#include <string>

#include "dtype.hpp"
#include "error.hpp"

namespace ferrum {

bool run_moe_layer(ExpertStack& w13, ExpertStack& w2, const MoeLayerCall& c) {
  for (auto [t, name] : {std::pair<const void*, const char*>{c.x, "x"}, {c.topk_ids, "topk_ids"},
                         {c.topk_weights, "topk_weights"}, {c.gate_up, "gate_up"}, {c.act, "act"},
                         {c.down, "down"}, {c.out, "out"}}) {
    if (t == nullptr) throw Error(FM_ERROR_INVALID_ARGUMENT, std::string("moe_layer: ") + name + " is missing");
  }
  const bool pair_routing = c.block_size == 0;
  if (!pair_routing && (c.sorted_token_ids == nullptr || c.expert_ids == nullptr ||
                        c.num_tokens_post_padded == nullptr)) {
    throw Error(FM_ERROR_INVALID_ARGUMENT, "moe_layer: a routing block needs align's three output buffers");
  }
  expect_rank(*c.topk_ids, 2, {"moe_layer", "topk_ids"});
  expect_rank(*c.topk_weights, 2, {"moe_layer", "topk_weights"});
  expect_dim(*c.topk_weights, 0, c.topk_ids->dim(0), {"moe_layer", "topk_weights"}, "topk_ids' rows");
  expect_dim(*c.topk_weights, 1, c.topk_ids->dim(1), {"moe_layer", "topk_weights"}, "topk_ids' columns");
  expect_compact(*c.topk_weights, {"moe_layer", "topk_weights"});
  const int64_t pairs = c.topk_ids->dim(0) * c.topk_ids->dim(1);  // an imported tensor's: fits int64
  // The second GEMM is pair-indexed: its "tokens" are the pairs, top_k 1.
  const auto weights_by_pair = c.topk_weights->view({pairs, 1});
  const auto ids_by_pair = c.topk_ids->view({pairs, 1});
  const Tensor* first_weights = c.weights_on_input ? c.topk_weights : nullptr;
  const Tensor* second_weights = c.weights_on_input ? nullptr : weights_by_pair.get();
  Backend& backend = *w13.backend();
  // The plugin may apply the activation in w13's epilogue (ABI 1.3): act
  // then needs no pass of its own over gate_up.
  const ExpertStack::Gated gated{FM_ACTIVATION_SILU, c.act};
  bool activated = false;
  if (pair_routing && c.layer_call && backend.has_moe_layer() && w2.backend() == w13.backend()) {
    // The whole layer in one plugin call (ABI 1.4), checked first exactly as
    // the steps check their arguments (the same refusals, the same messages);
    // a plugin that declines queued nothing.
    w13.check_routed_pairs(*c.x, *c.topk_ids, c.num_experts, c.expert_map, first_weights, c.gate_up, &gated);
    w2.check_routed_pairs(*c.act, *ids_by_pair, c.num_experts, c.expert_map, second_weights, c.down);
    backend.check_moe_sum(*c.down, *c.topk_ids, c.num_experts, c.expert_map, *c.out);
    // What one call needs beyond the steps' checks (plugin.h): a float32 down,
    // stacks of one expert count, and scratch that no input shares (the steps
    // are ordered so that some may). Elsewhere the steps run.
    const bool one_call = c.down->dtype() == kFloat32 && w13.spec().num_experts == w2.spec().num_experts &&
                          !overlaps(*c.down, *c.x) && !overlaps(*c.down, *c.topk_weights) &&
                          !overlaps(*c.act, *c.topk_weights) && !overlaps(*c.out, *c.act);
    const Backend::LayerArgs layer{c.x,          c.topk_ids, c.topk_weights, c.weights_on_input,
                                   c.num_experts, c.expert_map, FM_ACTIVATION_SILU, c.act, c.down, c.out};
    if (one_call && backend.moe_layer(w13, w2, layer, c.stream)) return true;
  }
  if (pair_routing) {
    try {
      activated = w13.gemm_routed_pairs(*c.x, *c.topk_ids, c.num_experts, c.expert_map, first_weights, c.gate_up,
                                        c.stream, &gated);
    } catch (const Error& e) {
      // A plugin without pair routing (ABI 1.1, or 1.2 that refuses it:
      // plugins.md) queued nothing: the caller aligns instead. A refusal by a
      // later step is an error, not a reason to run the steps again.
      if (e.code() == FM_ERROR_UNSUPPORTED) return false;
      throw;
    }
  } else {
    backend.moe_align_block_size(*c.topk_ids, c.num_experts, c.block_size, c.expert_map, *c.sorted_token_ids,
                                 *c.expert_ids, *c.num_tokens_post_padded, c.stream);
    activated = w13.gemm_routed(*c.x, *c.sorted_token_ids, *c.expert_ids, *c.num_tokens_post_padded, c.block_size,
                                c.topk_ids->dim(1), first_weights, c.gate_up, c.stream, &gated);
  }
  if (!activated) backend.gated_activation(*c.gate_up, *c.act, c.stream);
  if (pair_routing) {
    w2.gemm_routed_pairs(*c.act, *ids_by_pair, c.num_experts, c.expert_map, second_weights, c.down, c.stream);
  } else {
    w2.gemm_routed(*c.act, *c.sorted_token_ids, *c.expert_ids, *c.num_tokens_post_padded, c.block_size, 1,
                   second_weights, c.down, c.stream);
  }
  backend.moe_sum(*c.down, *c.topk_ids, c.num_experts, c.expert_map, *c.out, c.stream);
  return true;
}

}  // namespace ferrum
