// LlavaConfig: the geometry of an HF `LlavaForConditionalGeneration` checkpoint (config.json),
// with Hugging Face's defaults for missing fields. Plain value types; thread-compatible.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json_fwd.hpp>

#include "model/status.h"

namespace vtw {

// CLIP vision tower (CLIPVisionConfig). Defaults are LLaVA's (CLIP ViT-L/14-336) when the
// config omits vision_config, as HF's LlavaConfig does.
struct VisionConfig {
  int hidden_size = 1024;
  int intermediate_size = 4096;
  int num_hidden_layers = 24;
  int num_attention_heads = 16;
  int num_channels = 3;
  int image_size = 336;
  int patch_size = 14;
  std::string hidden_act = "quick_gelu";  // quick_gelu | gelu
  double layer_norm_eps = 1e-5;

  int head_dim() const { return hidden_size / num_attention_heads; }
  int num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
};

// Llama decoder (LlamaConfig).
struct TextConfig {
  int vocab_size = 32000;
  int hidden_size = 4096;
  int intermediate_size = 11008;
  int num_hidden_layers = 32;
  int num_attention_heads = 32;
  int num_key_value_heads = 32;
  int head_dim = 128;
  int max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  int bos_token_id = 1;
  int eos_token_id = 2;

  int q_size() const { return num_attention_heads * head_dim; }
  int kv_size() const { return num_key_value_heads * head_dim; }
};

struct LlavaConfig {
  VisionConfig vision;
  TextConfig text;
  int image_token_index = 32000;
  int vision_feature_layer = -2;                // index into the tower's hidden_states
  std::string vision_feature_select_strategy = "default";  // default (drop CLS) | full
  std::string projector_hidden_act = "gelu";
  std::string name;                             // directory name, for logs and ModelInfo

  // Number of encoder layers that must run to produce the selected hidden state.
  int vision_layers_used() const;
  // Image tokens that one image expands to in the decoder input.
  int num_image_tokens() const;
};

// Parses `json` (the content of config.json); `source` names the file in error messages.
// Unsupported architectures or options are an InvalidArgument that names them.
StatusOr<LlavaConfig> ParseLlavaConfig(const nlohmann::json& json, const std::string& source);

// Parses `text` (config.json's content; `source` names it in messages): InvalidArgument
// "<source>: not valid JSON" for text that is not JSON, else as ParseLlavaConfig. LoadLlavaConfig
// reads the file and calls this.
StatusOr<LlavaConfig> ParseLlavaConfigText(std::string_view text, const std::string& source);

// Reads and parses `path` (a config.json).
StatusOr<LlavaConfig> LoadLlavaConfig(const std::string& path);

// Serialises `config` as an HF-loadable LlavaForConditionalGeneration config.json.
nlohmann::json LlavaConfigToJson(const LlavaConfig& config);

}  // namespace vtw
