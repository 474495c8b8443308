#include "model/prompt_layout.h"

#include <string>

namespace vtw {

StatusOr<PromptLayout> ExpandPrompt(const std::vector<int32_t>& ids, int32_t image_token_id,
                                    int num_images, int64_t num_image_tokens, int64_t max_length) {
  int placeholders = 0;
  for (int32_t id : ids) placeholders += id == image_token_id;
  if (num_images > 1) {
    return InvalidArgument("only one image per request is supported, got " +
                           std::to_string(num_images));
  }
  if (placeholders != num_images) {
    if (num_images == 0) {
      return InvalidArgument("the prompt contains " + std::to_string(placeholders) +
                             " <image> placeholder(s) but no image was sent: send an image or "
                             "remove <image> from the prompt");
    }
    return InvalidArgument("the prompt must contain exactly one <image> placeholder for the "
                           "image, found " + std::to_string(placeholders));
  }
  PromptLayout layout;
  const int64_t length = static_cast<int64_t>(ids.size()) + num_images * (num_image_tokens - 1);
  if (length > max_length) {
    return InvalidArgument("the prompt is " + std::to_string(length) +
                           " tokens long (with the image's " + std::to_string(num_image_tokens) +
                           " tokens), over the model's context length of " +
                           std::to_string(max_length) + ": shorten the prompt");
  }
  layout.token_ids.reserve(length);
  layout.kinds.reserve(length);
  for (int32_t id : ids) {
    if (id == image_token_id) {
      layout.image_start = static_cast<int64_t>(layout.token_ids.size());
      layout.num_image_tokens = num_image_tokens;
      for (int64_t i = 0; i < num_image_tokens; ++i) {
        layout.token_ids.push_back(id);
        layout.kinds.push_back(TokenKind::kImage);
      }
    } else {
      layout.token_ids.push_back(id);
      layout.kinds.push_back(TokenKind::kText);
    }
  }
  return layout;
}

}  // namespace vtw
