// GenerateOne: runs one request to completion on the calling thread (prefill, then one decode
// step per token) with withdrawal at a chosen layer. Used by the `vtw` command-line tools
// (generate, eval, calibrate) and by tests as the single-sequence reference the batched server
// must match. Not for the server's hot path (that is the engine's continuous batching).
// Thread-safety: reentrant; the model is only read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "model/llava_model.h"
#include "model/prompt_layout.h"
#include "model/sampler.h"
#include "model/tokenizer.h"
#include "vtw/compute_model.h"

namespace vtw {

struct GenerateOptions {
  SamplingParams sampling;
  StopParams stop;
  int withdraw_layer = 1 << 30;     // K; >= layer count means VTW off
  bool record_step_logits = false;  // keep the logits of every step (step 0 = prefill)
  int prefill_chunk = 0;            // > 0: prefill in chunks of this many tokens
};

struct GenerateResult {
  std::vector<int32_t> token_ids;        // generated ids (EOS included when it ended the text)
  std::string text;                      // decoded text (empty without a tokenizer)
  FinishReason finish_reason = FinishReason::kNone;
  std::vector<at::Tensor> step_logits;   // [V] fp32 per step when recorded
  at::Tensor first_logits;               // [V] fp32 logits of the first generated step
  Flops prefill_flops, decode_flops;     // decoder + lm_head
  int64_t vision_flops = 0;
  int64_t kv_cache_bytes = 0;            // held at the end
  int64_t kv_cache_bytes_without_vtw = 0;
  double prefill_seconds = 0, decode_seconds = 0;
};

// Validates that withdrawal at `withdraw_layer` can apply to `layout`: the prompt must not end
// with image tokens (the last prompt row gives the first logits and would be withdrawn).
Status CheckWithdrawable(const PromptLayout& layout, int withdraw_layer, int num_layers);

// Runs `layout` (image rows take `image_features`, [num_image_tokens, Ht], undefined when the
// prompt has no image) to completion. `tokenizer` may be null: then no text and no stop strings.
StatusOr<GenerateResult> GenerateOne(const LlavaModel& model, const Tokenizer* tokenizer,
                                     const PromptLayout& layout, const at::Tensor& image_features,
                                     const GenerateOptions& options);

}  // namespace vtw
