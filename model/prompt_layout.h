// PromptLayout: a tokenized prompt with its `<image>` placeholder expanded into the image's
// rows, as LLaVA merges them: the placeholder becomes num_image_tokens consecutive positions
// carrying the projector's rows; position ids are 0..L-1 over the expanded sequence.
// Plain data; thread-compatible.
#pragma once

#include <cstdint>
#include <vector>

#include "model/forward_batch.h"
#include "model/status.h"

namespace vtw {

struct PromptLayout {
  std::vector<int64_t> token_ids;  // [L] expanded; image rows carry the image token id
  std::vector<TokenKind> kinds;    // [L]
  int64_t num_image_tokens = 0;    // image rows in the prompt (0 or the model's count)
  int64_t image_start = -1;        // first image row, -1 when the prompt has no image

  int64_t size() const { return static_cast<int64_t>(token_ids.size()); }
  int64_t num_text_tokens() const { return size() - num_image_tokens; }
};

// Expands `ids` (one `image_token_id` per image). `num_images` is how many images the request
// carries (0 or 1). InvalidArgument with an actionable message when the number of placeholders
// differs from `num_images`, or when the expanded prompt exceeds `max_length` positions.
StatusOr<PromptLayout> ExpandPrompt(const std::vector<int32_t>& ids, int32_t image_token_id,
                                    int num_images, int64_t num_image_tokens, int64_t max_length);

}  // namespace vtw
