// The trained model as a Hugging Face LlavaForConditionalGeneration directory: config.json,
// model.safetensors (fp32 or bf16), the tokenizer files, preprocessor_config.json,
// processor_config.json and generation_config.json, plus the tensors a checkpoint holds that
// the runtime never uses (initialised as HF would). Not thread-safe (writes files).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include "model/llava_config.h"
#include "model/llava_weights.h"
#include "model/status.h"

namespace vtw::tools {

// Tensors a checkpoint holds that the runtime never uses (post_layernorm, vision layers past
// the feature layer), initialised as HF would (deterministically from `seed`).
std::map<std::string, at::Tensor> UnusedTensors(const LlavaConfig& config, uint64_t seed,
                                                double init_std);

// Writes `j` (indented) to `path`.
Status WriteJson(const std::filesystem::path& path, const nlohmann::json& j);

// Writes the model directory `out_dir` (created if needed); the tokenizer files are copied from
// `tokenizer_dir` unless it is `out_dir`.
Status WriteModelDirectory(const std::string& out_dir, bool bf16, const LlavaConfig& config,
                           LlavaWeights& weights,
                           const std::map<std::string, at::Tensor>& unused,
                           const std::string& tokenizer_dir, int sp_vocab);

}  // namespace vtw::tools
