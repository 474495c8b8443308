// ModelBundle: everything a model directory holds, loaded and cross-checked: the LLaVA model,
// its tokenizer, image preprocessing and calibrated VTW settings; plus PreparePrompt, which turns
// a user's (image bytes, prompt) into a validated prompt layout and pixel tensor. Immutable after
// Load; PreparePrompt is thread-safe (gRPC threads call it while the engine runs the model).
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include <ATen/core/Tensor.h>

#include "model/image_processor.h"
#include "model/llava_model.h"
#include "model/prompt_layout.h"
#include "model/tokenizer.h"
#include "vtw/vtw_settings.h"

namespace vtw {

struct ModelBundle {
  std::string dir;
  std::unique_ptr<LlavaModel> model;
  std::unique_ptr<Tokenizer> tokenizer;
  ImageProcessorConfig image_config;
  VtwSettings vtw;

  // Loads DIR/{config.json, *.safetensors, tokenizer.model, tokenizer_config.json,
  // preprocessor_config.json, vtw.json}. Every error names the file at fault.
  static StatusOr<std::unique_ptr<ModelBundle>> Load(const std::string& dir, at::ScalarType dtype);
};

struct PreparedPrompt {
  PromptLayout layout;
  at::Tensor pixel_values;  // [1, 3, S, S] fp32, undefined without an image
  int64_t image_width = 0, image_height = 0;
};

// The prompt's token layout: `prompt` wrapped in the chat template (unless `raw`), tokenized, its
// <image> placeholder expanded. InvalidArgument: empty prompt, <image> in a templated prompt,
// wrong number of placeholders for `has_image`, prompt + max_new_tokens over the context length.
StatusOr<PromptLayout> BuildPromptLayout(const ModelBundle& bundle, const std::string& prompt,
                                         bool raw, bool has_image, int max_new_tokens);

// Builds the prompt: `prompt` is wrapped in the chat template unless `raw` (then it must carry
// its own <image> placeholder when there is an image). Errors (InvalidArgument): empty prompt,
// wrong number of <image> placeholders, undecodable or oversized image, prompt over the context
// length (`max_new_tokens` included).
StatusOr<PreparedPrompt> PreparePrompt(const ModelBundle& bundle, std::string_view image_bytes,
                                       const std::string& prompt, bool raw, int max_new_tokens,
                                       const ImageLimits& limits);

// The shipped model directory: $VTW_MODEL if set, else the first of <exe>/../models/vtw-shapes,
// <exe>/../share/vtw-serve/models/vtw-shapes and the source tree's models/vtw-shapes that exists.
std::string DefaultModelDir();

}  // namespace vtw
