// `vtw generate` end to end (the real binary): HF-equal output on the oracle model, VTW stats,
// and bad input: each a clear message on stderr, exit status 1, never a crash.
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "model/safetensors.h"
#include "tests/util/oracle.h"
#include "tests/util/subprocess.h"

namespace vtw {
namespace {

namespace fs = std::filesystem;
using testing::OracleCases;
using testing::OracleDir;
using testing::OracleModelDir;
using testing::RunProcess;
using testing::VtwBinary;

class GenerateCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::FreshTestDir("vtw_cli");
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A writable copy of the oracle model.
  std::string CopyModel() {
    return testing::CopyOracleModel(dir_ / "model");
  }

  std::string WriteFile(const std::string& name, const std::string& bytes) {
    fs::path p = dir_ / name;
    std::ofstream(p, std::ios::binary) << bytes;
    return p.string();
  }

  testing::ProcessResult Generate(const std::vector<std::string>& extra,
                                  const std::string& model = OracleModelDir()) {
    std::vector<std::string> argv = {VtwBinary(), "generate", "--model", model, "--threads", "1"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return RunProcess(argv);
  }

  // Expects a clean failure whose stderr mentions `needle`.
  void ExpectError(const testing::ProcessResult& r, const std::string& needle) {
    EXPECT_EQ(r.signal, 0) << "crashed: " << r.err;
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << "stderr: " << r.err;
    EXPECT_LT(r.err.size(), 2000u) << "a message, not a dump";
  }

  std::string Image(int i) { return OracleDir() + "/" + OracleCases()[i]["image"].get<std::string>(); }

  fs::path dir_;
};

TEST_F(GenerateCliTest, JsonMatchesOracleWithVtwOffAndOn) {
  const auto& c = OracleCases()[0];
  auto r = Generate({"--image", Image(0), "--prompt", c["question"], "--max-new-tokens", "12",
                     "--ignore-eos", "--vtw-layer", "off", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["prompt_token_ids"], c["input_ids_unexpanded"]);
  EXPECT_EQ(j["token_ids"], c["models"]["tiny-llava"]["greedy"]["new_ids"]);
  EXPECT_EQ(j["text"], c["models"]["tiny-llava"]["greedy"]["text_skip_special"]);
  EXPECT_EQ(j["num_image_tokens"], 16);
  EXPECT_TRUE(j["vtw_layer"].is_null());
  EXPECT_EQ(j["flops"], j["flops_without_vtw"]);
  EXPECT_EQ(j["kv_cache_bytes"], j["kv_cache_bytes_without_vtw"]);
  ASSERT_EQ(j["first_step_top_logits"].size(), 10u);
  const auto& top = c["models"]["tiny-llava"]["prefill"]["top10_ids"];
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(j["first_step_top_logits"][i][0], top[i]);
    EXPECT_NEAR(j["first_step_top_logits"][i][1].get<double>(),
                c["models"]["tiny-llava"]["prefill"]["top10_values"][i].get<double>(), 1e-4);
  }

  auto w = Generate({"--image", Image(0), "--prompt", c["question"], "--max-new-tokens", "12",
                     "--ignore-eos", "--vtw-layer", "2", "--json"});
  ASSERT_EQ(w.exit_code, 0) << w.err;
  auto jw = nlohmann::json::parse(w.out);
  EXPECT_EQ(jw["vtw_layer"], 2);
  EXPECT_LT(jw["flops"].get<int64_t>(), jw["flops_without_vtw"].get<int64_t>());
  EXPECT_EQ(jw["flops_without_vtw"], j["flops_without_vtw"]);
  EXPECT_LT(jw["kv_cache_bytes"].get<int64_t>(), jw["kv_cache_bytes_without_vtw"].get<int64_t>());
  EXPECT_EQ(jw["first_step_top_logits"][0][0],
            testing::OracleVtw()["c0"]["K=2"]["prefill_top10_ids"][0]);
}

TEST_F(GenerateCliTest, TextOutputAndRawPrompt) {
  auto r = Generate({"--image", Image(1), "--raw-prompt", "--prompt",
                     "USER: <image>\nWhat shape is the blue object? ASSISTANT:",
                     "--max-new-tokens", "3", "--ignore-eos"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("3 tokens"), std::string::npos) << r.err;
  auto t = Generate({"--prompt", "Hello there", "--max-new-tokens", "2", "--json"});
  ASSERT_EQ(t.exit_code, 0) << t.err;
  EXPECT_EQ(nlohmann::json::parse(t.out)["num_image_tokens"], 0);
}

TEST_F(GenerateCliTest, BadModelFiles) {
  {  // truncated weights
    std::string m = CopyModel();
    fs::resize_file(m + "/model.safetensors", fs::file_size(m + "/model.safetensors") / 2);
    ExpectError(Generate({"--prompt", "hi"}, m), "model.safetensors");
  }
  fs::remove_all(dir_ / "model");
  {  // header length far past the end of the file
    std::string m = CopyModel();
    std::string bytes(16, '\0');
    bytes[5] = 1;  // 2^40
    std::ofstream(m + "/model.safetensors", std::ios::binary | std::ios::trunc) << bytes;
    ExpectError(Generate({"--prompt", "hi"}, m), "header length");
  }
  fs::remove_all(dir_ / "model");
  {  // inconsistent offsets: byte size does not match the shape
    std::string m = CopyModel();
    std::string header = R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}})";
    std::string bytes(8, '\0');
    uint64_t n = header.size();
    std::memcpy(bytes.data(), &n, 8);
    bytes += header + std::string(16, '\0');
    std::ofstream(m + "/model.safetensors", std::ios::binary | std::ios::trunc) << bytes;
    ExpectError(Generate({"--prompt", "hi"}, m), "'a'");
  }
  fs::remove_all(dir_ / "model");
  {  // a missing tensor
    std::string m = CopyModel();
    std::vector<TensorToWrite> keep;
    auto store = WeightStore::OpenDirectory(OracleModelDir());
    ASSERT_TRUE(store.ok());
    for (const std::string& name : (*store)->Names()) {
      if (name == "language_model.model.norm.weight") continue;
      const TensorView* v = (*store)->Find(name);
      keep.push_back({name, v->dtype, v->shape, v->data, v->nbytes});
    }
    ASSERT_TRUE(WriteSafetensors(m + "/model.safetensors", keep, {}).ok());
    ExpectError(Generate({"--prompt", "hi"}, m), "language_model.model.norm.weight");
  }
  fs::remove_all(dir_ / "model");
  {  // a shape that disagrees with config.json
    std::string m = CopyModel();
    std::ifstream in(m + "/config.json");
    auto cfg = nlohmann::json::parse(in);
    cfg["text_config"]["intermediate_size"] = 100;
    std::ofstream(m + "/config.json", std::ios::trunc) << cfg.dump();
    ExpectError(Generate({"--prompt", "hi"}, m), "shape");
  }
  fs::remove_all(dir_ / "model");
  {  // no tokenizer
    std::string m = CopyModel();
    fs::remove(m + "/tokenizer.model");
    ExpectError(Generate({"--prompt", "hi"}, m), "tokenizer.model");
  }
  ExpectError(Generate({"--prompt", "hi"}, (dir_ / "nope").string()), "does not exist");
}

TEST_F(GenerateCliTest, BadImagesAndPrompts) {
  ExpectError(Generate({"--image", WriteFile("corrupt.png", "\x89PNG\r\n\x1a\ngarbage bytes"),
                        "--prompt", "hi"}),
              "image");
  ExpectError(Generate({"--image", WriteFile("random.bin", std::string(300, '\x42')),
                        "--prompt", "hi"}),
              "image");
  ExpectError(Generate({"--image", WriteFile("empty.png", ""), "--prompt", "hi"}), "empty");
  ExpectError(Generate({"--image", (dir_ / "missing.png").string(), "--prompt", "hi"}),
              "does not exist");
  // A PNG header claiming 30000 x 30000 pixels: rejected before decoding.
  std::string png("\x89PNG\r\n\x1a\n", 8);
  png += std::string("\x00\x00\x00\x0dIHDR", 8);
  png += std::string("\x00\x00\x75\x30\x00\x00\x75\x30\x08\x02\x00\x00\x00", 13);
  png += std::string("\x00\x00\x00\x00", 4);
  ExpectError(Generate({"--image", WriteFile("bomb.png", png), "--prompt", "hi"}), "30000");
  ExpectError(Generate({"--image", Image(0), "--raw-prompt", "--prompt",
                        "USER: <image><image>\nHi ASSISTANT:"}),
              "<image>");
  ExpectError(Generate({"--raw-prompt", "--prompt", "USER: <image>\nHi ASSISTANT:"}),
              "no image was sent");
  std::string long_prompt;
  for (int i = 0; i < 300; ++i) long_prompt += "circle ";
  ExpectError(Generate({"--image", Image(0), "--prompt", long_prompt}), "context length");
  ExpectError(Generate({"--image", Image(0), "--prompt", "hi", "--vtw-layer", "9"}), "outside");
  ExpectError(Generate({"--image", Image(0), "--prompt", "hi", "--temperature", "-1"}),
              "temperature");
  ExpectError(Generate({"--image", Image(0), "--prompt", "hi", "--dtype", "fp8"}), "dtype");
}

}  // namespace
}  // namespace vtw
