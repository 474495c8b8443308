#include "server/model_bundle.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>

#include <ATen/ATen.h>

namespace vtw {

StatusOr<std::unique_ptr<ModelBundle>> ModelBundle::Load(const std::string& dir,
                                                         at::ScalarType dtype) {
  if (!std::filesystem::is_directory(dir)) {
    return NotFound("model directory '" + dir + "' does not exist");
  }
  auto bundle = std::make_unique<ModelBundle>();
  bundle->dir = dir;
  VTW_ASSIGN_OR_RETURN(bundle->model, LlavaModel::Load(dir, dtype));
  VTW_ASSIGN_OR_RETURN(bundle->tokenizer, Tokenizer::Load(dir));
  VTW_ASSIGN_OR_RETURN(bundle->image_config,
                       LoadImageProcessorConfig(dir + "/preprocessor_config.json"));
  VTW_ASSIGN_OR_RETURN(bundle->vtw, LoadVtwSettings(dir, bundle->model->num_layers()));
  const LlavaConfig& config = bundle->model->config();
  const ImageProcessorConfig& ic = bundle->image_config;
  if (ic.crop_height != config.vision.image_size || ic.crop_width != config.vision.image_size) {
    return InvalidArgument(dir + "/preprocessor_config.json: crop size " +
                           std::to_string(ic.crop_height) + "x" + std::to_string(ic.crop_width) +
                           " does not match the vision tower's image_size " +
                           std::to_string(config.vision.image_size));
  }
  if (bundle->tokenizer->image_token_id() != config.image_token_index) {
    return InvalidArgument(dir + ": the tokenizer's <image> id (" +
                           std::to_string(bundle->tokenizer->image_token_id()) +
                           ") differs from config.json image_token_index (" +
                           std::to_string(config.image_token_index) + ")");
  }
  if (bundle->tokenizer->vocab_size() > config.text.vocab_size) {
    return InvalidArgument(dir + ": the tokenizer has " +
                           std::to_string(bundle->tokenizer->vocab_size()) +
                           " tokens, more than the model's vocab_size " +
                           std::to_string(config.text.vocab_size));
  }
  return bundle;
}

StatusOr<PromptLayout> BuildPromptLayout(const ModelBundle& bundle, const std::string& prompt,
                                         bool raw, bool has_image, int max_new_tokens) {
  if (prompt.empty()) return InvalidArgument("the prompt is empty");
  const LlavaConfig& config = bundle.model->config();
  if (!raw && CountOccurrences(prompt, "<image>") > 0) {
    return InvalidArgument("the prompt contains <image>: the server places the image itself; "
                           "send the question only");
  }
  const std::string text = raw ? prompt : ApplyLlavaChatTemplate(prompt, has_image);
  std::vector<int32_t> ids = bundle.tokenizer->Encode(text, bundle.tokenizer->add_bos_token());
  const int64_t max_len = config.text.max_position_embeddings;
  VTW_ASSIGN_OR_RETURN(PromptLayout layout,
                       ExpandPrompt(ids, config.image_token_index, has_image ? 1 : 0,
                                    config.num_image_tokens(), max_len));
  if (layout.size() + max_new_tokens > max_len) {
    return InvalidArgument("the prompt is " + std::to_string(layout.size()) +
                           " tokens and max_new_tokens is " + std::to_string(max_new_tokens) +
                           ": together over the model's context length of " +
                           std::to_string(max_len));
  }
  return layout;
}

StatusOr<PreparedPrompt> PreparePrompt(const ModelBundle& bundle, std::string_view image_bytes,
                                       const std::string& prompt, bool raw, int max_new_tokens,
                                       const ImageLimits& limits) {
  const bool has_image = !image_bytes.empty();
  VTW_ASSIGN_OR_RETURN(PromptLayout layout,
                       BuildPromptLayout(bundle, prompt, raw, has_image, max_new_tokens));
  PreparedPrompt prepared;
  prepared.layout = std::move(layout);
  if (has_image) {
    StatusOr<cv::Mat> decoded = DecodeImage(image_bytes, limits);
    if (!decoded.ok()) {
      return Status(decoded.status().code(), "invalid image: " + decoded.status().message());
    }
    const cv::Mat& rgb = *decoded;
    prepared.image_width = rgb.cols;
    prepared.image_height = rgb.rows;
    VTW_ASSIGN_OR_RETURN(std::vector<float> chw, PreprocessImage(rgb, bundle.image_config));
    const int64_t h = bundle.image_config.crop_height, w = bundle.image_config.crop_width;
    prepared.pixel_values = at::tensor(chw, at::kFloat).view({1, 3, h, w});
  }
  return prepared;
}

std::string DefaultModelDir() {
  if (const char* env = std::getenv("VTW_MODEL"); env && *env) return env;
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  std::vector<fs::path> candidates;
  if (!ec) {
    candidates.push_back(exe.parent_path() / "../models/vtw-shapes");
    candidates.push_back(exe.parent_path() / "../share/vtw-serve/models/vtw-shapes");
  }
  candidates.push_back(fs::path(VTW_SOURCE_DIR) / "models/vtw-shapes");
  for (const auto& c : candidates) {
    if (fs::exists(c / "config.json", ec)) return fs::weakly_canonical(c, ec).string();
  }
  return (fs::path(VTW_SOURCE_DIR) / "models/vtw-shapes").string();
}

}  // namespace vtw
