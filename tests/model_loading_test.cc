// Loading HF LLaVA checkpoints: config.json defaults and clear errors for unsupported options,
// both llava-hf tensor naming schemes, sharded checkpoints, F16/BF16 storage, unexpected tensors.
#include <filesystem>
#include <fstream>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "model/llava_config.h"
#include "model/safetensors.h"
#include "tests/util/oracle.h"
#include "vtw/calibration.h"

namespace vtw {
namespace {

namespace fs = std::filesystem;

TEST(LlavaConfig, HfDefaultsForAMinimalLlava15Config) {
  // The shape of llava-hf/llava-1.5-7b-hf's config.json: most fields are left to the defaults.
  auto j = nlohmann::json::parse(R"({
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
    "image_token_index": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"model_type": "llama", "max_position_embeddings": 4096,
                    "rms_norm_eps": 1e-05, "vocab_size": 32064},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024,
                      "image_size": 336, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default"})");
  auto c = ParseLlavaConfig(j, "config.json");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->text.num_hidden_layers, 32);
  EXPECT_EQ(c->text.hidden_size, 4096);
  EXPECT_EQ(c->text.num_key_value_heads, 32);
  EXPECT_EQ(c->text.head_dim, 128);
  EXPECT_EQ(c->text.intermediate_size, 11008);
  EXPECT_EQ(c->num_image_tokens(), 576);
  EXPECT_EQ(c->vision_layers_used(), 23);
  EXPECT_DOUBLE_EQ(c->text.rope_theta, 10000.0);
}

TEST(LlavaConfig, UnsupportedOptionsAreNamed) {
  auto base = nlohmann::json::parse(R"({"model_type": "llava", "text_config": {}})");
  struct Case {
    std::function<void(nlohmann::json&)> edit;
    std::string needle;
  };
  std::vector<Case> cases = {
      {[](auto& j) { j["model_type"] = "llava_next"; }, "llava_next"},
      {[](auto& j) { j["text_config"]["model_type"] = "mistral"; }, "mistral"},
      {[](auto& j) { j["text_config"]["rope_scaling"] = {{"type", "linear"}}; }, "rope_scaling"},
      {[](auto& j) { j["text_config"]["hidden_act"] = "gelu"; }, "hidden_act"},
      {[](auto& j) { j["vision_feature_select_strategy"] = "pooled"; }, "pooled"},
      {[](auto& j) { j["vision_feature_layer"] = {-2, -5}; }, "vision_feature_layer"},
      {[](auto& j) { j["text_config"]["num_key_value_heads"] = 5; }, "num_key_value_heads"},
      {[](auto& j) { j["text_config"]["hidden_size"] = "big"; }, "hidden_size"},
      {[](auto& j) { j["vision_config"] = {{"model_type", "siglip_vision_model"}}; }, "siglip"},
  };
  for (const auto& c : cases) {
    nlohmann::json j = base;
    c.edit(j);
    auto r = ParseLlavaConfig(j, "cfg.json");
    ASSERT_FALSE(r.ok()) << j.dump();
    EXPECT_NE(r.status().message().find(c.needle), std::string::npos) << r.status().message();
    EXPECT_NE(r.status().message().find("cfg.json"), std::string::npos);
  }
  EXPECT_EQ(LoadLlavaConfig("/nonexistent/config.json").status().code(), StatusCode::kNotFound);
}

// Rewrites the oracle checkpoint into `dir` with renamed tensors, converted dtypes and/or shards.
void WriteCheckpoint(const fs::path& dir, const std::function<std::string(const std::string&)>& rename,
                     SafetensorsDType dtype, int shards, const std::string& extra_tensor = "") {
  fs::create_directories(dir);
  for (const char* f : {"config.json", "tokenizer.model", "tokenizer_config.json",
                        "preprocessor_config.json"}) {
    fs::copy_file(testing::OracleModelDir() + "/" + f, dir / f);
  }
  auto store = WeightStore::OpenDirectory(testing::OracleModelDir());
  ASSERT_TRUE(store.ok());
  std::vector<std::vector<uint16_t>> converted;
  std::vector<std::vector<TensorToWrite>> per_shard(shards);
  nlohmann::json weight_map;
  int i = 0;
  std::vector<std::string> names = (*store)->Names();
  converted.reserve(names.size() + 1);
  for (const std::string& name : names) {
    const TensorView* v = (*store)->Find(name);
    TensorToWrite t{rename(name), v->dtype, v->shape, v->data, v->nbytes};
    if (dtype != SafetensorsDType::kF32) {
      auto floats = ToFloatVector(*v);
      ASSERT_TRUE(floats.ok());
      std::vector<uint16_t> half(floats->size());
      for (size_t k = 0; k < half.size(); ++k) {
        half[k] = dtype == SafetensorsDType::kBF16 ? FloatToBf16RoundNearestEven((*floats)[k])
                                                   : FloatToF16RoundNearestEven((*floats)[k]);
      }
      converted.push_back(std::move(half));
      t.dtype = dtype;
      t.data = converted.back().data();
      t.nbytes = converted.back().size() * 2;
    }
    per_shard[i % shards].push_back(t);
    weight_map[t.name] = "model-0000" + std::to_string(i % shards + 1) + ".safetensors";
    ++i;
  }
  static const float kExtra[4] = {1, 2, 3, 4};
  if (!extra_tensor.empty()) {
    per_shard[0].push_back({extra_tensor, SafetensorsDType::kF32, {4}, kExtra, sizeof(kExtra)});
    weight_map[extra_tensor] = "model-00001.safetensors";
  }
  if (shards == 1) {
    ASSERT_TRUE(WriteSafetensors((dir / "model.safetensors").string(), per_shard[0], {}).ok());
    return;
  }
  for (int s = 0; s < shards; ++s) {
    const std::string file = "model-0000" + std::to_string(s + 1) + ".safetensors";
    ASSERT_TRUE(WriteSafetensors((dir / file).string(), per_shard[s], {}).ok());
  }
  std::ofstream(dir / "model.safetensors.index.json")
      << nlohmann::json{{"metadata", nlohmann::json::object()}, {"weight_map", weight_map}}.dump();
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::FreshTestDir("vtw_ckpt");
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Last-position logits of oracle case 2 with a model loaded from `dir`.
  at::Tensor Logits(const LlavaModel& model) {
    const auto& c = testing::OracleCases()[2];
    at::Tensor features = model.EncodeImages(testing::OracleTensor(c["pixel_values"]["file"]))[0];
    return PrefillLastLogits(model, testing::OracleLayout(c), features, 2);
  }
  fs::path dir_;
};

std::string NewScheme(const std::string& name) {
  auto replace = [&](const std::string& from, const std::string& to) -> std::optional<std::string> {
    if (name.rfind(from, 0) == 0) return to + name.substr(from.size());
    return std::nullopt;
  };
  if (auto r = replace("language_model.model.", "model.language_model.")) return *r;
  if (auto r = replace("vision_tower.", "model.vision_tower.")) return *r;
  if (auto r = replace("multi_modal_projector.", "model.multi_modal_projector.")) return *r;
  if (name == "language_model.lm_head.weight") return "lm_head.weight";
  return name;
}

TEST_F(CheckpointTest, NewNamingSchemeAndShardsGiveTheSameLogits) {
  at::Tensor want = Logits(testing::OracleModel());
  WriteCheckpoint(dir_, NewScheme, SafetensorsDType::kF32, 3);
  auto model = LlavaModel::Load(dir_.string(), at::kFloat);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  EXPECT_EQ(testing::MaxAbsDiff(Logits(**model), want), 0.0);
}

TEST_F(CheckpointTest, HalfPrecisionStorageLoadsIntoFp32AndBf16) {
  at::Tensor want = Logits(testing::OracleModel());
  for (auto dtype : {SafetensorsDType::kF16, SafetensorsDType::kBF16}) {
    fs::remove_all(dir_);
    WriteCheckpoint(dir_, [](const std::string& n) { return n; }, dtype, 1);
    auto model = LlavaModel::Load(dir_.string(), at::kFloat);
    ASSERT_TRUE(model.ok()) << model.status().ToString();
    EXPECT_LT(testing::MaxAbsDiff(Logits(**model), want), 0.05) << SafetensorsDTypeName(dtype);
    auto bf = LlavaModel::Load(dir_.string(), at::kBFloat16);
    ASSERT_TRUE(bf.ok());
    EXPECT_LT(testing::MaxAbsDiff(Logits(**bf), want), 0.1);
  }
}

TEST_F(CheckpointTest, UnexpectedTensorIsNamed) {
  WriteCheckpoint(dir_, [](const std::string& n) { return n; }, SafetensorsDType::kF32, 2,
                  "language_model.model.layers.0.self_attn.q_norm.weight");
  auto model = LlavaModel::Load(dir_.string(), at::kFloat);
  ASSERT_FALSE(model.ok());
  EXPECT_NE(model.status().message().find("q_norm"), std::string::npos)
      << model.status().message();
}

}  // namespace
}  // namespace vtw
