// Withdrawal: what the withdrawal layer K means, written once. Everything in the system that
// depends on K asks this file (or the cost model), never re-derives it.
//
// K is a 0-based decoder layer: before layer K runs, a sequence's image rows leave the batch
// (VTW). K = 0: the text never sees the image. K = num_layers: no withdrawal ("VTW off"; this is
// the only spelling of off, in requests, summaries, metrics and vtw.json alike). The kept rows
// keep their original position ids, and the KV cache of layers >= K holds text entries only.
//
// Exactly three places know about withdrawal:
//   - the gather in the forward: model/batch_rows.h (BatchRows::WithdrawImageRows);
//   - the policy: this file (what K means, which prompts allow it, what a cache holds per
//     layer) and vtw/vtw_settings.h (which K a request gets: calibrated default, task profile,
//     explicit layer, off);
//   - the cost model: vtw/compute_model.h (FLOPs and KV bytes with and without withdrawal).
// Pure functions; thread-safe.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "model/prompt_layout.h"
#include "model/status.h"

namespace vtw {

// K for "no withdrawal" in a model of `num_layers` decoder layers.
constexpr int WithdrawalOff(int num_layers) { return num_layers; }

// Whether withdrawal at K removes anything from a prompt with `num_image_tokens` image rows.
constexpr bool WithdrawsImage(int withdraw_layer, int num_layers, int64_t num_image_tokens) {
  return withdraw_layer < num_layers && num_image_tokens > 0;
}

// Decoder layers that process (and cache) image rows: layers 0 .. K-1.
constexpr int LayersWithImageRows(int withdraw_layer, int num_layers) {
  return std::clamp(withdraw_layer, 0, num_layers);
}

// KV-cache entries at `layer` of a sequence that has computed `num_text` text and `num_image`
// image rows: all of them below K, the text rows only from K on.
constexpr int64_t KvEntriesAtLayer(int layer, int withdraw_layer, int64_t num_text,
                                   int64_t num_image) {
  return layer < withdraw_layer ? num_text + num_image : num_text;
}

// Per-layer KV-cache capacity (entries) of `layout` plus `max_new_tokens` generated tokens.
std::vector<int64_t> KvCapacityPerLayer(const PromptLayout& layout, int withdraw_layer,
                                        int num_layers, int64_t max_new_tokens);

// InvalidArgument (a message for the user) unless K is in [0, num_layers].
Status CheckWithdrawLayerRange(int withdraw_layer, int num_layers);

// InvalidArgument (a message for the user) unless K is in [0, num_layers] and, when withdrawal
// applies, the prompt does not end with image tokens (its last row gives the first logits and
// would be withdrawn).
Status CheckWithdrawLayer(const PromptLayout& layout, int withdraw_layer, int num_layers);

}  // namespace vtw
