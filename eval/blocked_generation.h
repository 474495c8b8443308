// GenerateBlocked: the information-migration check of the VTW paper. The image tokens stay in
// every layer, but in layers < K the text tokens (question and generated tokens) cannot attend to
// them; from layer K on they can. If accuracy holds with the text blind to the image in the
// first layers, the image's information reached the text there. Reads the model only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "model/prompt_layout.h"
#include "model/status.h"
#include "server/model_bundle.h"

namespace vtw::tools {

// Greedy generation with text->image attention blocked in layers < `block_layers` (the
// kBlockTextToImage mode): prefill of the rows up to the end of the image with a KV cache, a
// second cache whose layers < block_layers hold no image entries, then the text rows and the
// generated tokens on it. Stops at EOS (not included in the text) or after max_new_tokens.
struct BlockedGeneration {
  std::vector<int32_t> token_ids;
  std::string text;
  at::Tensor first_logits;  // [V] fp32, last prompt position
};
StatusOr<BlockedGeneration> GenerateBlocked(const ModelBundle& bundle, const PromptLayout& layout,
                                            const at::Tensor& image_features, int block_layers,
                                            int max_new_tokens);

}  // namespace vtw::tools
