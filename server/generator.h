// GenerateOne: runs one request to completion on the calling thread (prefill, optionally in
// chunks, then one decode step per token) with withdrawal at a chosen layer: the single-sequence
// reference that the batching engine (server/engine.h) must match token for token, and the
// runner behind `vtw generate`, `vtw eval` and the tests. Not the server's hot path.
// Thread-safety: reentrant; the model is only read.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "model/llava_model.h"
#include "model/prompt_layout.h"
#include "model/sampler.h"
#include "model/tokenizer.h"
#include "vtw/compute_model.h"

namespace vtw {

struct GenerateOptions {
  SamplingParams sampling;
  StopParams stop;
  int withdraw_layer = -1;          // required: K in [0, layers]; WithdrawalOff(layers) = none
  bool record_step_logits = false;  // keep the logits of every step (step 0 = prefill)
  int prefill_chunk = 0;            // > 0: prefill in chunks of this many tokens
};

struct GenerateResult {
  std::vector<int32_t> token_ids;  // generated ids (EOS included when it ended the text)
  std::string text;                // decoded text (empty without a tokenizer)
  FinishReason finish_reason = FinishReason::kNone;
  std::vector<at::Tensor> step_logits;  // [V] fp32 per step when recorded
  at::Tensor first_logits;              // [V] fp32 logits of the first generated step
  Flops prefill_flops, decode_flops;    // decoder + lm_head
  int64_t vision_flops = 0;
  int64_t kv_cache_bytes = 0;  // held at the end
  int64_t kv_cache_bytes_without_vtw = 0;
  double prefill_seconds = 0, decode_seconds = 0;

  // Vision + prefill + decode.
  Flops total_flops() const;
};

// Runs `layout` (image rows take `image_features`, [num_image_tokens, Ht], undefined when the
// prompt has no image) to completion. `tokenizer` may be null: then no text and no stop strings.
// InvalidArgument: K outside [0, layers] or a prompt that cannot be withdrawn
// (vtw/withdrawal.h), bad sampling parameters, an empty prompt, prompt + max_new_tokens over
// the context length.
StatusOr<GenerateResult> GenerateOne(const LlavaModel& model, const Tokenizer* tokenizer,
                                     const PromptLayout& layout, const at::Tensor& image_features,
                                     const GenerateOptions& options);

}  // namespace vtw
