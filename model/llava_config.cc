#include "model/llava_config.h"

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <tuple>

#include <nlohmann/json.hpp>

namespace vtw {
namespace {

using nlohmann::json;

// Reads an optional field with a default; a present field of the wrong type is an error.
template <typename T>
Status Read(const json& obj, const char* key, T* out, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return Status::Ok();
  try {
    *out = it->get<T>();
  } catch (const json::exception&) {
    return InvalidArgument(where + ": field '" + key + "' has the wrong type (" +
                           it->dump() + ")");
  }
  return Status::Ok();
}

// A JSON number as an int: an integer, or a float with an integral value (64.0), within int's
// range. false for anything else (a bare static_cast of 1e300 or 2^40 would be undefined or wrap).
bool JsonToInt(const json& v, int* out) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int>::max())) return false;
    *out = static_cast<int>(u);
    return true;
  }
  if (v.is_number_integer()) {
    const int64_t i = v.get<int64_t>();
    if (i < std::numeric_limits<int>::min() || i > std::numeric_limits<int>::max()) return false;
    *out = static_cast<int>(i);
    return true;
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (!std::isfinite(d) || d != std::trunc(d) || d < std::numeric_limits<int>::min() ||
        d > std::numeric_limits<int>::max()) {
      return false;
    }
    *out = static_cast<int>(d);
    return true;
  }
  return false;
}

template <>
Status Read<int>(const json& obj, const char* key, int* out, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return Status::Ok();
  if (!JsonToInt(*it, out)) {
    return InvalidArgument(where + ": field '" + key + "' is not an integer in int range (" +
                           it->dump() + ")");
  }
  return Status::Ok();
}

// Upper bounds far above any real checkpoint that keep every derived size (patches, q/kv widths,
// image tokens) within int and reject nonsense before anything is allocated from it.
constexpr int kMaxWidth = 1 << 20;           // hidden, intermediate and head sizes
constexpr int kMaxLayers = 4096;
constexpr int kMaxVocab = 1 << 24;           // the tokenizer's own limit
constexpr int kMaxPositions = 1 << 26;
constexpr int kMaxImageSize = 16384;         // preprocessor_config.json's limit too

Status RequireInRange(int value, int max, const char* key, const std::string& where) {
  if (value <= 0) {
    return InvalidArgument(where + ": '" + key + "' must be positive, got " +
                           std::to_string(value));
  }
  if (value > max) {
    return InvalidArgument(where + ": '" + key + "' = " + std::to_string(value) +
                           " is implausibly large (the limit is " + std::to_string(max) + ")");
  }
  return Status::Ok();
}

Status ParseVision(const json& j, const std::string& where, VisionConfig* v) {
  std::string model_type = "clip_vision_model";
  VTW_RETURN_IF_ERROR(Read(j, "model_type", &model_type, where));
  if (model_type != "clip_vision_model") {
    return InvalidArgument(where + ": vision_config.model_type '" + model_type +
                           "' is not supported (only clip_vision_model)");
  }
  VTW_RETURN_IF_ERROR(Read(j, "hidden_size", &v->hidden_size, where));
  VTW_RETURN_IF_ERROR(Read(j, "intermediate_size", &v->intermediate_size, where));
  VTW_RETURN_IF_ERROR(Read(j, "num_hidden_layers", &v->num_hidden_layers, where));
  VTW_RETURN_IF_ERROR(Read(j, "num_attention_heads", &v->num_attention_heads, where));
  VTW_RETURN_IF_ERROR(Read(j, "num_channels", &v->num_channels, where));
  VTW_RETURN_IF_ERROR(Read(j, "image_size", &v->image_size, where));
  VTW_RETURN_IF_ERROR(Read(j, "patch_size", &v->patch_size, where));
  VTW_RETURN_IF_ERROR(Read(j, "hidden_act", &v->hidden_act, where));
  VTW_RETURN_IF_ERROR(Read(j, "layer_norm_eps", &v->layer_norm_eps, where));
  for (auto [key, val, max] : {std::tuple{"vision_config.hidden_size", v->hidden_size, kMaxWidth},
                               {"vision_config.intermediate_size", v->intermediate_size, kMaxWidth},
                               {"vision_config.num_hidden_layers", v->num_hidden_layers, kMaxLayers},
                               {"vision_config.num_attention_heads", v->num_attention_heads,
                                kMaxWidth},
                               {"vision_config.image_size", v->image_size, kMaxImageSize},
                               {"vision_config.patch_size", v->patch_size, kMaxImageSize}}) {
    VTW_RETURN_IF_ERROR(RequireInRange(val, max, key, where));
  }
  if (v->hidden_act != "quick_gelu" && v->hidden_act != "gelu") {
    return InvalidArgument(where + ": vision_config.hidden_act '" + v->hidden_act +
                           "' is not supported (quick_gelu or gelu)");
  }
  if (v->num_channels != 3) {
    return InvalidArgument(where + ": vision_config.num_channels must be 3");
  }
  if (v->hidden_size % v->num_attention_heads != 0) {
    return InvalidArgument(where + ": vision hidden_size is not divisible by num_attention_heads");
  }
  if (v->image_size % v->patch_size != 0) {
    return InvalidArgument(where + ": vision image_size is not a multiple of patch_size");
  }
  return Status::Ok();
}

Status ParseText(const json& j, const std::string& where, TextConfig* t) {
  std::string model_type = "llama";
  VTW_RETURN_IF_ERROR(Read(j, "model_type", &model_type, where));
  if (model_type != "llama") {
    return InvalidArgument(where + ": text_config.model_type '" + model_type +
                           "' is not supported (only llama)");
  }
  VTW_RETURN_IF_ERROR(Read(j, "vocab_size", &t->vocab_size, where));
  VTW_RETURN_IF_ERROR(Read(j, "hidden_size", &t->hidden_size, where));
  VTW_RETURN_IF_ERROR(Read(j, "intermediate_size", &t->intermediate_size, where));
  VTW_RETURN_IF_ERROR(Read(j, "num_hidden_layers", &t->num_hidden_layers, where));
  VTW_RETURN_IF_ERROR(Read(j, "num_attention_heads", &t->num_attention_heads, where));
  t->num_key_value_heads = t->num_attention_heads;
  VTW_RETURN_IF_ERROR(Read(j, "num_key_value_heads", &t->num_key_value_heads, where));
  VTW_RETURN_IF_ERROR(RequireInRange(t->num_attention_heads, kMaxWidth,
                                     "text_config.num_attention_heads", where));
  t->head_dim = t->hidden_size / t->num_attention_heads;
  VTW_RETURN_IF_ERROR(Read(j, "head_dim", &t->head_dim, where));
  VTW_RETURN_IF_ERROR(Read(j, "max_position_embeddings", &t->max_position_embeddings, where));
  VTW_RETURN_IF_ERROR(Read(j, "rms_norm_eps", &t->rms_norm_eps, where));
  VTW_RETURN_IF_ERROR(Read(j, "rope_theta", &t->rope_theta, where));
  VTW_RETURN_IF_ERROR(Read(j, "tie_word_embeddings", &t->tie_word_embeddings, where));
  VTW_RETURN_IF_ERROR(Read(j, "bos_token_id", &t->bos_token_id, where));
  // A list of EOS ids (newer HF configs) keeps the default; the tokenizer's EOS is what stops.
  if (j.contains("eos_token_id") && j["eos_token_id"].is_number_integer()) {
    VTW_RETURN_IF_ERROR(Read(j, "eos_token_id", &t->eos_token_id, where));
  }
  for (auto [key, val, max] :
       {std::tuple{"text_config.vocab_size", t->vocab_size, kMaxVocab},
        {"text_config.hidden_size", t->hidden_size, kMaxWidth},
        {"text_config.intermediate_size", t->intermediate_size, kMaxWidth},
        {"text_config.num_hidden_layers", t->num_hidden_layers, kMaxLayers},
        {"text_config.num_key_value_heads", t->num_key_value_heads, kMaxWidth},
        {"text_config.head_dim", t->head_dim, kMaxWidth},
        {"text_config.max_position_embeddings", t->max_position_embeddings, kMaxPositions}}) {
    VTW_RETURN_IF_ERROR(RequireInRange(val, max, key, where));
  }
  if (int64_t{t->num_attention_heads} * t->head_dim > kMaxWidth) {
    return InvalidArgument(where + ": num_attention_heads * head_dim = " +
                           std::to_string(int64_t{t->num_attention_heads} * t->head_dim) +
                           " is implausibly large (the limit is " + std::to_string(kMaxWidth) +
                           ")");
  }
  if (t->num_attention_heads % t->num_key_value_heads != 0) {
    return InvalidArgument(where + ": num_attention_heads (" +
                           std::to_string(t->num_attention_heads) +
                           ") is not a multiple of num_key_value_heads (" +
                           std::to_string(t->num_key_value_heads) + ")");
  }
  if (t->head_dim % 2 != 0) return InvalidArgument(where + ": head_dim must be even for RoPE");
  std::string act = "silu";
  VTW_RETURN_IF_ERROR(Read(j, "hidden_act", &act, where));
  if (act != "silu") {
    return InvalidArgument(where + ": text_config.hidden_act '" + act +
                           "' is not supported (only silu)");
  }
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    return InvalidArgument(where + ": text_config.rope_scaling " + j["rope_scaling"].dump() +
                           " is not supported (only null)");
  }
  for (const char* flag : {"attention_bias", "mlp_bias"}) {
    bool value = false;
    VTW_RETURN_IF_ERROR(Read(j, flag, &value, where));
    if (value) {
      return InvalidArgument(where + ": text_config." + flag + " = true is not supported");
    }
  }
  int pretraining_tp = 1;
  VTW_RETURN_IF_ERROR(Read(j, "pretraining_tp", &pretraining_tp, where));
  if (pretraining_tp != 1) {
    return InvalidArgument(where + ": text_config.pretraining_tp != 1 is not supported");
  }
  return Status::Ok();
}

}  // namespace

int LlavaConfig::vision_layers_used() const {
  int n = vision.num_hidden_layers;
  // hidden_states has n + 1 entries: [0] = embeddings, [i] = after layer i - 1.
  return vision_feature_layer >= 0 ? vision_feature_layer : n + 1 + vision_feature_layer;
}

int LlavaConfig::num_image_tokens() const {
  return vision.num_patches() + (vision_feature_select_strategy == "full" ? 1 : 0);
}

StatusOr<LlavaConfig> ParseLlavaConfig(const nlohmann::json& j, const std::string& where) {
  if (!j.is_object()) return InvalidArgument(where + ": config is not a JSON object");
  LlavaConfig c;
  std::string model_type;
  VTW_RETURN_IF_ERROR(Read(j, "model_type", &model_type, where));
  if (model_type != "llava") {
    std::string arch = j.contains("architectures") ? j["architectures"].dump() : "none";
    return InvalidArgument(where + ": model_type '" + model_type + "' (architectures " + arch +
                           ") is not supported: only HF LlavaForConditionalGeneration (model_type "
                           "\"llava\") checkpoints are");
  }
  if (j.contains("vision_config") && j["vision_config"].is_object()) {
    VTW_RETURN_IF_ERROR(ParseVision(j["vision_config"], where, &c.vision));
  }
  if (j.contains("text_config") && j["text_config"].is_object()) {
    VTW_RETURN_IF_ERROR(ParseText(j["text_config"], where, &c.text));
  } else {
    VTW_RETURN_IF_ERROR(ParseText(json::object(), where, &c.text));
  }
  VTW_RETURN_IF_ERROR(Read(j, "image_token_index", &c.image_token_index, where));
  if (j.contains("vision_feature_layer") && j["vision_feature_layer"].is_array()) {
    return InvalidArgument(where + ": a list vision_feature_layer " +
                           j["vision_feature_layer"].dump() + " is not supported");
  }
  VTW_RETURN_IF_ERROR(Read(j, "vision_feature_layer", &c.vision_feature_layer, where));
  VTW_RETURN_IF_ERROR(
      Read(j, "vision_feature_select_strategy", &c.vision_feature_select_strategy, where));
  VTW_RETURN_IF_ERROR(Read(j, "projector_hidden_act", &c.projector_hidden_act, where));
  bool tie = c.text.tie_word_embeddings;
  VTW_RETURN_IF_ERROR(Read(j, "tie_word_embeddings", &tie, where));
  if (!(j.contains("text_config") && j["text_config"].contains("tie_word_embeddings"))) {
    c.text.tie_word_embeddings = tie;
  }
  if (c.vision_feature_select_strategy != "default" &&
      c.vision_feature_select_strategy != "full") {
    return InvalidArgument(where + ": vision_feature_select_strategy '" +
                           c.vision_feature_select_strategy +
                           "' is not supported (default or full)");
  }
  if (c.projector_hidden_act != "gelu") {
    return InvalidArgument(where + ": projector_hidden_act '" + c.projector_hidden_act +
                           "' is not supported (only gelu)");
  }
  int used = c.vision_layers_used();
  if (used < 0 || used > c.vision.num_hidden_layers) {
    return InvalidArgument(where + ": vision_feature_layer " +
                           std::to_string(c.vision_feature_layer) + " is out of range for " +
                           std::to_string(c.vision.num_hidden_layers) + " vision layers");
  }
  if (c.image_token_index < 0) {
    return InvalidArgument(where + ": image_token_index must be >= 0");
  }
  return c;
}

StatusOr<LlavaConfig> ParseLlavaConfigText(std::string_view text, const std::string& source) {
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return InvalidArgument(source + ": not valid JSON");
  return ParseLlavaConfig(j, source);
}

StatusOr<LlavaConfig> LoadLlavaConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound("cannot read model config " + path + " (does the model directory exist?)");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return InvalidArgument(path + ": read error");
  VTW_ASSIGN_OR_RETURN(LlavaConfig c, ParseLlavaConfigText(text, path));
  c.name = std::filesystem::path(path).parent_path().filename().string();
  return c;
}

json LlavaConfigToJson(const LlavaConfig& c) {
  json vision = {{"model_type", "clip_vision_model"},
                 {"hidden_size", c.vision.hidden_size},
                 {"intermediate_size", c.vision.intermediate_size},
                 {"num_hidden_layers", c.vision.num_hidden_layers},
                 {"num_attention_heads", c.vision.num_attention_heads},
                 {"num_channels", c.vision.num_channels},
                 {"image_size", c.vision.image_size},
                 {"patch_size", c.vision.patch_size},
                 {"hidden_act", c.vision.hidden_act},
                 {"layer_norm_eps", c.vision.layer_norm_eps},
                 {"projection_dim", c.text.hidden_size}};
  json text = {{"model_type", "llama"},
               {"architectures", {"LlamaForCausalLM"}},
               {"vocab_size", c.text.vocab_size},
               {"hidden_size", c.text.hidden_size},
               {"intermediate_size", c.text.intermediate_size},
               {"num_hidden_layers", c.text.num_hidden_layers},
               {"num_attention_heads", c.text.num_attention_heads},
               {"num_key_value_heads", c.text.num_key_value_heads},
               {"head_dim", c.text.head_dim},
               {"max_position_embeddings", c.text.max_position_embeddings},
               {"rms_norm_eps", c.text.rms_norm_eps},
               {"rope_theta", c.text.rope_theta},
               {"hidden_act", "silu"},
               {"tie_word_embeddings", c.text.tie_word_embeddings},
               {"bos_token_id", c.text.bos_token_id},
               {"eos_token_id", c.text.eos_token_id},
               {"attention_bias", false},
               {"mlp_bias", false},
               {"rope_scaling", nullptr}};
  return json{{"architectures", {"LlavaForConditionalGeneration"}},
              {"model_type", "llava"},
              {"image_token_index", c.image_token_index},
              {"image_seq_length", c.num_image_tokens()},
              {"projector_hidden_act", c.projector_hidden_act},
              {"vision_feature_layer", c.vision_feature_layer},
              {"vision_feature_select_strategy", c.vision_feature_select_strategy},
              {"tie_word_embeddings", c.text.tie_word_embeddings},
              {"torch_dtype", "float32"},
              {"vision_config", vision},
              {"text_config", text}};
}

}  // namespace vtw
