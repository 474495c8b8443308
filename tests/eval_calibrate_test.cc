// `vtw calibrate`, `vtw eval` and `vtw study` (eval/vqa_eval.h and the real binary) on the HF
// oracle model: calibration reproduces kl_calibration.json (every mean KL within 1e-5, the same K
// per eta), --write round-trips through vtw.json, evaluation mechanics (counts, per-type keys,
// FLOPs saved, KL), the information-migration blocking identities, the attention study, and
// errors with clear messages.
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "eval/attention_study.h"
#include "eval/blocked_generation.h"
#include "eval/calibrate.h"
#include "eval/image_features.h"
#include "eval/vqa_eval.h"
#include "server/generator.h"
#include "server/model_bundle.h"
#include "tests/util/oracle.h"
#include "tests/util/subprocess.h"
#include "vtw/calibration.h"
#include "vtw/vtw_settings.h"

namespace vtw {
namespace {

namespace fs = std::filesystem;
using testing::OracleCases;
using testing::OracleDir;
using testing::OracleKl;
using testing::OracleModelDir;
using testing::RunProcess;
using testing::VtwBinary;
using tools::VqaExample;

// Question type of oracle case i (two per type, to exercise per-type logic).
std::string CaseType(size_t i) { return "t" + std::to_string(i % 4); }

const ModelBundle& Bundle() {
  static const std::unique_ptr<ModelBundle> bundle = [] {
    auto b = ModelBundle::Load(OracleModelDir(), at::kFloat);
    if (!b.ok()) throw std::runtime_error(b.status().ToString());
    return std::move(b).value();
  }();
  return *bundle;
}

class EvalCalibrateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::FreshTestDir("vtw_evalcal");
  }
  void TearDown() override { fs::remove_all(dir_); }

  // The 8 oracle cases as a JSONL; image paths relative to the file (or absolute).
  std::string WriteOracleJsonl(bool relative = true, const std::string& name = "cases.jsonl") {
    fs::path p = dir_ / name;
    std::ofstream out(p);
    for (size_t i = 0; i < OracleCases().size(); ++i) {
      const auto& c = OracleCases()[i];
      fs::path image = fs::path(OracleDir()) / c["image"].get<std::string>();
      std::string img = relative ? fs::relative(image, dir_).string() : image.string();
      nlohmann::json j = {{"image", img},
                          {"question", c["question"]},
                          {"answer", "yes"},
                          {"type", CaseType(i)}};
      out << j.dump() << "\n";
    }
    return p.string();
  }

  std::string WriteFile(const std::string& name, const std::string& text) {
    fs::path p = dir_ / name;
    std::ofstream(p) << text;
    return p.string();
  }

  // A writable copy of the oracle model (never write into tests/data).
  std::string CopyModel() {
    return testing::CopyOracleModel(dir_ / "model");
  }

  testing::ProcessResult Vtw(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {VtwBinary()};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.push_back("--threads");
    argv.push_back("1");
    return RunProcess(argv);
  }

  void ExpectError(const testing::ProcessResult& r, const std::string& needle) {
    EXPECT_EQ(r.signal, 0) << "crashed: " << r.err;
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << "stderr: " << r.err;
    EXPECT_LT(r.err.size(), 2000u) << "a message, not a dump";
  }

  fs::path dir_;
};

void ExpectMatchesOracle(const std::vector<std::vector<double>>& kl,
                         const std::vector<double>& mean) {
  const auto& want = OracleKl()["per_case_kl"];
  ASSERT_EQ(kl.size(), 8u);
  for (size_t i = 0; i < kl.size(); ++i) {
    const auto& row = want[OracleCases()[i]["id"].get<std::string>()];
    ASSERT_EQ(kl[i].size(), 5u);
    for (int k = 0; k <= 4; ++k) {
      EXPECT_NEAR(kl[i][k], row[k].get<double>(), 1e-5) << "case " << i << " K=" << k;
    }
  }
  ASSERT_EQ(mean.size(), 5u);
  for (int k = 0; k <= 4; ++k) {
    EXPECT_NEAR(mean[k], OracleKl()["mean_kl"][k].get<double>(), 1e-5) << "K=" << k;
  }
}

TEST_F(EvalCalibrateTest, LoadsJsonlWithRelativeAndAbsoluteImages) {
  for (bool relative : {true, false}) {
    auto examples = tools::LoadVqaJsonl(WriteOracleJsonl(relative));
    ASSERT_TRUE(examples.ok()) << examples.status().ToString();
    ASSERT_EQ(examples->size(), 8u);
    for (size_t i = 0; i < 8; ++i) {
      const VqaExample& e = (*examples)[i];
      EXPECT_TRUE(fs::equivalent(e.image, fs::path(OracleDir()) /
                                              OracleCases()[i]["image"].get<std::string>()));
      EXPECT_EQ(e.question, OracleCases()[i]["question"]);
      EXPECT_EQ(e.type, CaseType(i));
      EXPECT_EQ(e.line, static_cast<int>(i) + 1);
    }
  }
}

TEST_F(EvalCalibrateTest, PromptsMatchOracleTokenIds) {
  for (const auto& c : OracleCases()) {
    auto layout = tools::QuestionLayout(Bundle(), c["question"], true, 4);
    ASSERT_TRUE(layout.ok()) << layout.status().ToString();
    EXPECT_EQ(layout->token_ids, c["input_ids"].get<std::vector<int64_t>>());
  }
}

TEST_F(EvalCalibrateTest, CalibrationReproducesOracle) {
  auto examples = tools::LoadVqaJsonl(WriteOracleJsonl());
  ASSERT_TRUE(examples.ok()) << examples.status().ToString();
  tools::CalibrateOptions options;
  options.samples = 20;  // more than there are: all 8
  options.etas = {0.003, 0.01, 0.05};
  options.progress = false;
  auto r = tools::CalibrateVqa(Bundle(), *examples, options);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->num_layers, 4);
  EXPECT_EQ(r->samples.size(), 8u);
  ExpectMatchesOracle(r->kl, r->overall.mean_kl);
  EXPECT_EQ(r->overall.picked, (std::vector<int>{4, 3, 1}));
  for (size_t i = 0; i < options.etas.size(); ++i) {
    char eta[16];
    std::snprintf(eta, sizeof eta, "%g", options.etas[i]);
    EXPECT_EQ(r->overall.picked[i], OracleKl()["picked_K"][eta].get<int>()) << "eta " << eta;
  }
  EXPECT_TRUE(r->by_type.empty());
  VtwSettings s = tools::CalibrationSettings(*r);
  EXPECT_EQ(s.default_layer, 4);
  EXPECT_DOUBLE_EQ(s.eta, 0.003);
  EXPECT_EQ(s.num_samples, 8);
  EXPECT_TRUE(s.profiles.empty());
}

TEST_F(EvalCalibrateTest, CalibrationSelectsFirstSamplesAndPerType) {
  auto examples = tools::LoadVqaJsonl(WriteOracleJsonl());
  ASSERT_TRUE(examples.ok());
  tools::CalibrateOptions options;
  options.samples = 3;
  options.etas = {0.01};
  options.progress = false;
  auto r = tools::CalibrateVqa(Bundle(), *examples, options);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->samples.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(r->samples[i].line, i + 1);
  // Mean of the first three oracle cases.
  const auto& want = OracleKl()["per_case_kl"];
  for (int k = 0; k <= 4; ++k) {
    double m = (want["c0"][k].get<double>() + want["c1"][k].get<double>() +
                want["c2"][k].get<double>()) / 3;
    EXPECT_NEAR(r->overall.mean_kl[k], m, 1e-5);
  }

  options.samples = 1;
  options.by_type = true;
  r = tools::CalibrateVqa(Bundle(), *examples, options);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->samples.size(), 4u);  // the first of each of the 4 types: cases 0..3
  ASSERT_EQ(r->by_type.size(), 4u);
  for (int t = 0; t < 4; ++t) {
    const auto& s = r->by_type.at(CaseType(t));
    EXPECT_EQ(s.num_samples, 1);
    const auto& row = want[OracleCases()[t]["id"].get<std::string>()];
    for (int k = 0; k <= 4; ++k) EXPECT_NEAR(s.mean_kl[k], row[k].get<double>(), 1e-5);
    EXPECT_EQ(s.picked[0], PickWithdrawLayer(s.mean_kl, 0.01));
  }
  VtwSettings s = tools::CalibrationSettings(*r);
  EXPECT_EQ(s.profiles.size(), 4u);
  EXPECT_EQ(s.default_layer, r->overall.picked[0]);
}

TEST_F(EvalCalibrateTest, CalibrateBinaryJsonMatchesOracle) {
  auto r = Vtw({"calibrate", "--model", OracleModelDir(), "--data", WriteOracleJsonl(), "--eta",
                "0.003", "--eta", "0.01", "--eta", "0.05", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["num_layers"], 4);
  EXPECT_EQ(j["num_samples"], 8);
  std::vector<std::vector<double>> kl;
  for (const auto& s : j["samples"]) kl.push_back(s["kl"].get<std::vector<double>>());
  ExpectMatchesOracle(kl, j["mean_kl"].get<std::vector<double>>());
  ASSERT_EQ(j["picked"].size(), 3u);
  EXPECT_EQ(j["picked"][0]["layer"], 4);
  EXPECT_EQ(j["picked"][0]["vtw_off"], true);
  EXPECT_EQ(j["picked"][1]["layer"], 3);
  EXPECT_EQ(j["picked"][2]["layer"], 1);
  EXPECT_EQ(j["picked_layer"], 4);
  EXPECT_TRUE(j["written"].is_null());
  EXPECT_NE(r.err.find("calibrate"), std::string::npos) << "progress on stderr: " << r.err;

  // The text table.
  r = Vtw({"calibrate", "--model", OracleModelDir(), "--data", WriteOracleJsonl(), "--eta",
           "0.01", "--no-progress"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("eta 0.01: K = 3"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("2.250079e-01"), std::string::npos) << r.out;
  EXPECT_TRUE(r.err.empty()) << r.err;
}

TEST_F(EvalCalibrateTest, CalibrateWriteRoundTripsAndEvalAutoUsesIt) {
  const std::string model = CopyModel();
  const std::string data = WriteOracleJsonl();
  auto r = Vtw({"calibrate", "--model", model, "--data", data, "--eta", "0.01", "--eta", "0.003",
                "--by-type", "--samples", "2", "--write", "--json", "--no-progress"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["written"], model + "/vtw.json");
  auto s = LoadVtwSettings(model, 4);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->default_layer, j["picked"][0]["layer"].get<int>());
  EXPECT_EQ(s->default_layer, PickWithdrawLayer(j["mean_kl"].get<std::vector<double>>(), 0.01));
  EXPECT_DOUBLE_EQ(s->eta, 0.01);
  EXPECT_EQ(s->num_samples, 8);  // 2 per type, 4 types
  ASSERT_EQ(s->profiles.size(), 4u);
  for (int t = 0; t < 4; ++t) {
    EXPECT_EQ(s->profiles.at(CaseType(t)), j["by_type"][CaseType(t)]["picked"][0]["layer"]);
  }
  EXPECT_FALSE(fs::exists(OracleModelDir() + "/vtw.json"));

  // eval --vtw-layer auto reads the calibrated K from vtw.json.
  VtwSettings fixed;
  fixed.default_layer = 2;
  fixed.profiles = {{"t0", 1}, {"t1", 3}};
  ASSERT_TRUE(SaveVtwSettings(model, fixed).ok());
  r = Vtw({"eval", "--model", model, "--data", data, "--json", "--no-progress"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["layer"], 2);
  EXPECT_EQ(j["vtw_layer"], 2);
  EXPECT_EQ(j["calibrated_layer"], 2);
  EXPECT_GT(j["prefill_flops_saved_pct"].get<double>(), 0.0);

  // by-type: each type at its profile, others at the default.
  auto examples = tools::LoadVqaJsonl(data);
  ASSERT_TRUE(examples.ok());
  tools::EvalOptions by_type;
  by_type.per_type_layers = fixed.profiles;
  by_type.default_layer = 2;
  by_type.progress = false;
  auto bt = tools::EvaluateVqa(Bundle(), *examples, by_type);
  ASSERT_TRUE(bt.ok()) << bt.status().ToString();
  ASSERT_EQ(bt->layers.size(), 1u);
  EXPECT_EQ(bt->layers[0].layer, -1);
  // Its FLOPs are the sum of the per-example choices: t0 -> K 1, t1 -> K 3, others K 2.
  int64_t want = 0;
  for (const auto& [type, k] : std::map<std::string, int>{{"t0", 1}, {"t1", 3}, {"t2", 2},
                                                           {"t3", 2}}) {
    std::vector<VqaExample> subset;
    for (const auto& e : *examples) {
      if (e.type == type) subset.push_back(e);
    }
    tools::EvalOptions each;
    each.layers = {k};
    each.progress = false;
    auto r1 = tools::EvaluateVqa(Bundle(), subset, each);
    ASSERT_TRUE(r1.ok());
    want += r1->layers[0].prefill.flops;
  }
  EXPECT_EQ(bt->layers[0].prefill.flops, want);
  r = Vtw({"eval", "--model", model, "--data", data, "--vtw-layer", "by-type", "--json",
           "--no-progress"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["vtw_layer"], "by-type");
}

TEST_F(EvalCalibrateTest, EvalAllLayersMechanics) {
  auto examples = tools::LoadVqaJsonl(WriteOracleJsonl());
  ASSERT_TRUE(examples.ok());
  tools::EvalOptions options;
  for (int k = 0; k <= 4; ++k) options.layers.push_back(k);
  options.progress = false;
  auto r = tools::EvaluateVqa(Bundle(), *examples, options);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->num_layers, 4);
  EXPECT_EQ(r->num_examples, 8);
  EXPECT_EQ(r->num_images, 8);
  ASSERT_EQ(r->layers.size(), 5u);
  for (int k = 0; k <= 4; ++k) {
    const tools::LayerEval& l = r->layers[k];
    EXPECT_EQ(l.layer, k);
    EXPECT_EQ(l.count, 8);
    EXPECT_LE(l.correct, 8);
    ASSERT_EQ(l.per_type.size(), 4u);
    int64_t sum = 0;
    for (int t = 0; t < 4; ++t) {
      EXPECT_EQ(l.per_type.at(CaseType(t)).count, 2);
      sum += l.per_type.at(CaseType(t)).correct;
    }
    EXPECT_EQ(sum, l.correct);
    EXPECT_GT(l.generated_tokens, 0);
    EXPECT_LE(l.generated_tokens, 8 * 4);
    if (k < 4) {
      EXPECT_GT(l.prefill.saved(), 0) << "K=" << k;
      EXPECT_GT(l.total.saved(), 0) << "K=" << k;
      if (k > 0) {
        EXPECT_GT(l.prefill.flops, r->layers[k - 1].prefill.flops);
      }
    } else {
      EXPECT_EQ(l.prefill.saved(), 0);
      EXPECT_EQ(l.total.saved(), 0);
    }
    EXPECT_EQ(l.prefill.flops_without_vtw, r->layers[4].prefill.flops);
    // The first step's KL against K = off is the calibration KL at the last prompt position.
    ASSERT_TRUE(l.mean_kl.has_value());
    EXPECT_NEAR(*l.mean_kl, OracleKl()["mean_kl"][k].get<double>(), 1e-5) << "K=" << k;
  }
  // A single K gives the same result as within `all`.
  options.layers = {2};
  auto one = tools::EvaluateVqa(Bundle(), *examples, options);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->layers[0].correct, r->layers[2].correct);
  EXPECT_EQ(one->layers[0].prefill.flops, r->layers[2].prefill.flops);
  EXPECT_FALSE(one->layers[0].mean_kl.has_value());
}

TEST_F(EvalCalibrateTest, EvalBinaryEndToEnd) {
  // Two questions per image, a typo'd answer with punctuation and case.
  std::string jsonl;
  for (int i = 0; i < 3; ++i) {
    fs::path image = fs::path(OracleDir()) / OracleCases()[i]["image"].get<std::string>();
    jsonl += nlohmann::json{{"image", image.string()}, {"question", "What color is it?"},
                            {"answer", "Red."}, {"type", "color"}}.dump() + "\n";
    jsonl += "\n";  // blank lines are skipped
    jsonl += nlohmann::json{{"image", image.string()}, {"question", "How many shapes are there?"},
                            {"answer", "1"}, {"type", "count_all"}}.dump() + "\n";
  }
  const std::string data = WriteFile("small.jsonl", jsonl);
  auto r = Vtw({"eval", "--model", OracleModelDir(), "--data", data, "--vtw-layer", "all",
                "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["num_examples"], 6);
  EXPECT_EQ(j["num_images"], 3);
  EXPECT_EQ(j["num_layers"], 4);
  EXPECT_EQ(j["mode"], "withdraw");
  ASSERT_EQ(j["results"].size(), 5u);
  for (int k = 0; k <= 4; ++k) {
    const auto& l = j["results"][k];
    EXPECT_EQ(l["count"], 6);
    EXPECT_EQ(l["per_type"]["color"]["count"], 3);
    EXPECT_EQ(l["per_type"]["count_all"]["count"], 3);
    EXPECT_GE(l["accuracy"].get<double>(), 0.0);
    EXPECT_LE(l["accuracy"].get<double>(), 1.0);
    if (k < 4) {
      EXPECT_EQ(l["vtw_layer"], k);
      EXPECT_GT(l["prefill_flops_saved_pct"].get<double>(), 0.0);
      EXPECT_GT(l["mean_kl"].get<double>(), 0.0);
    } else {
      EXPECT_TRUE(l["vtw_layer"].is_null());
      EXPECT_EQ(l["prefill_flops_saved_pct"].get<double>(), 0.0);
      EXPECT_EQ(l["mean_kl"].get<double>(), 0.0);
    }
    EXPECT_GT(l["mean_prefill_flops"].get<double>(), 0.0);
    EXPECT_GT(l["mean_flops"].get<double>(), l["mean_prefill_flops"].get<double>());
  }
  EXPECT_NE(r.err.find("eval"), std::string::npos) << "progress on stderr";
  EXPECT_NE(r.err.find("6/6"), std::string::npos) << r.err;

  r = Vtw({"eval", "--model", OracleModelDir(), "--data", data, "--vtw-layer", "off", "--json",
           "--limit", "4", "--no-progress"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["num_examples"], 4);
  EXPECT_EQ(j["count"], 4);
  EXPECT_EQ(j["prefill_flops_saved_pct"].get<double>(), 0.0);
  EXPECT_EQ(j["flops_saved_pct"].get<double>(), 0.0);
  EXPECT_TRUE(j["vtw_layer"].is_null());
  EXPECT_TRUE(r.err.empty()) << r.err;

  // Table output, and the other image modes.
  r = Vtw({"eval", "--model", OracleModelDir(), "--data", data, "--vtw-layer", "1,off",
           "--no-progress"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("count_all"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\noff "), std::string::npos) << r.out;
  for (const char* mode : {"block", "blank"}) {
    r = Vtw({"eval", "--model", OracleModelDir(), "--data", data, "--vtw-layer", "all",
             "--image-mode", mode, "--json", "--no-progress"});
    ASSERT_EQ(r.exit_code, 0) << mode << ": " << r.err;
    j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["mode"], mode);
    EXPECT_EQ(j["results"].size(), 5u);
  }
}

TEST_F(EvalCalibrateTest, BlockingIdentities) {
  // Blocking text->image attention in no layer is the full model; in every layer it is
  // withdrawal at K = 0 (the text never sees the image); in between, it differs from both.
  const ModelBundle& b = Bundle();
  for (size_t i = 0; i < 3; ++i) {
    const auto& c = OracleCases()[i];
    auto layout = tools::QuestionLayout(b, c["question"], true, 4);
    ASSERT_TRUE(layout.ok());
    tools::ImageFeatureCache cache(b);
    auto features = cache.Get(OracleDir() + "/" + c["image"].get<std::string>());
    ASSERT_TRUE(features.ok());
    at::Tensor full = PrefillLastLogits(*b.model, *layout, *features, 4);
    at::Tensor text_only = PrefillLastLogits(*b.model, *layout, *features, 0);
    auto none = tools::GenerateBlocked(b, *layout, *features, 0, 4);
    auto every = tools::GenerateBlocked(b, *layout, *features, 4, 4);
    auto two = tools::GenerateBlocked(b, *layout, *features, 2, 4);
    ASSERT_TRUE(none.ok() && every.ok() && two.ok());
    EXPECT_LT(testing::MaxAbsDiff(none->first_logits, full), 1e-4);
    EXPECT_LT(testing::MaxAbsDiff(every->first_logits, text_only), 1e-4);
    EXPECT_GT(testing::MaxAbsDiff(two->first_logits, full), 1e-3);
    EXPECT_GT(testing::MaxAbsDiff(two->first_logits, text_only), 1e-3);
    // Greedy continuation on the blocked cache equals the full model's when nothing is blocked.
    GenerateOptions go;
    go.withdraw_layer = 4;
    go.stop.max_new_tokens = 4;
    go.stop.eos_id = b.tokenizer->eos_id();
    auto g = GenerateOne(*b.model, b.tokenizer.get(), *layout, *features, go);
    ASSERT_TRUE(g.ok());
    EXPECT_EQ(none->token_ids, g->token_ids);
    EXPECT_EQ(none->text, g->text);
  }
}

TEST_F(EvalCalibrateTest, AttentionStudy) {
  auto examples = tools::LoadVqaJsonl(WriteOracleJsonl());
  ASSERT_TRUE(examples.ok());
  auto s = tools::StudyAttention(Bundle(), *examples, 5, false);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->num_samples, 5);
  EXPECT_EQ(s->mean_image_tokens, 16);
  ASSERT_EQ(s->layers.size(), 4u);
  for (const auto& l : s->layers) {
    EXPECT_NEAR(l.bos + l.prefix_text + l.image + l.question_text + l.self, 1.0, 1e-5);
    EXPECT_GT(l.bos, 0.0);
    EXPECT_GT(l.image, 0.0);
    EXPECT_GT(l.self, 0.0);
    EXPECT_NEAR(l.image_per_token, l.image / 16, 1e-9);
  }
  auto r = Vtw({"study", "--model", OracleModelDir(), "--data", WriteOracleJsonl(), "--samples",
                "8", "--json", "--no-progress"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["num_samples"], 8);
  EXPECT_EQ(j["layers"].size(), 4u);
  EXPECT_NEAR(j["layers"][0]["text"].get<double>() + j["layers"][0]["image"].get<double>(), 1.0,
              1e-5);
}

TEST_F(EvalCalibrateTest, NormalizeAndSelect) {
  EXPECT_EQ(tools::NormalizeAnswer("  Red. blue"), "red");
  EXPECT_EQ(tools::NormalizeAnswer("yes!"), "yes");
  EXPECT_EQ(tools::NormalizeAnswer("\n3,"), "3");
  EXPECT_EQ(tools::NormalizeAnswer(""), "");
  EXPECT_EQ(tools::NormalizeAnswer("   "), "");
  std::vector<VqaExample> ex;
  for (int i = 0; i < 10; ++i) ex.push_back({"", "q", "a", i % 3 == 0 ? "a" : "b", i + 1});
  auto first = tools::SelectFirst(ex, 4, false);
  ASSERT_EQ(first.size(), 4u);
  EXPECT_EQ(first[3].line, 4);
  auto per = tools::SelectFirst(ex, 2, true);  // a: lines 1, 4; b: lines 2, 3
  ASSERT_EQ(per.size(), 4u);
  EXPECT_EQ(per[0].line, 1);
  EXPECT_EQ(per[1].line, 2);
  EXPECT_EQ(per[2].line, 3);
  EXPECT_EQ(per[3].line, 4);
}

TEST_F(EvalCalibrateTest, Errors) {
  const std::string good = WriteOracleJsonl();
  // Missing data file.
  const std::string missing = (dir_ / "nope.jsonl").string();
  auto l = tools::LoadVqaJsonl(missing);
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.status().code(), StatusCode::kNotFound);
  EXPECT_NE(l.status().message().find(missing), std::string::npos);
  ExpectError(Vtw({"eval", "--model", OracleModelDir(), "--data", missing}), missing);
  ExpectError(Vtw({"calibrate", "--model", OracleModelDir(), "--data", missing}), missing);

  // Malformed line: the message names the file and the line.
  std::ifstream in(good);
  std::string first_line;
  std::getline(in, first_line);
  const std::string bad = WriteFile("bad.jsonl", first_line + "\n{\"question\": oops}\n");
  l = tools::LoadVqaJsonl(bad);
  ASSERT_FALSE(l.ok());
  EXPECT_NE(l.status().message().find(bad + ":2"), std::string::npos) << l.status().message();
  ExpectError(Vtw({"calibrate", "--model", OracleModelDir(), "--data", bad}), bad + ":2");
  ExpectError(Vtw({"eval", "--model", OracleModelDir(), "--data", bad}), bad + ":2");
  const std::string no_q = WriteFile("noq.jsonl", "{\"image\": \"x.png\"}\n");
  ExpectError(Vtw({"eval", "--model", OracleModelDir(), "--data", no_q}),
              no_q + ":1: missing field \"question\"");
  const std::string not_obj = WriteFile("arr.jsonl", "[1, 2]\n");
  ExpectError(Vtw({"eval", "--model", OracleModelDir(), "--data", not_obj}), not_obj + ":1");
  const std::string empty = WriteFile("empty.jsonl", "\n\n");
  ExpectError(Vtw({"eval", "--model", OracleModelDir(), "--data", empty}), "no examples");

  // Missing image file: names the image and the line.
  const std::string noimg = WriteFile(
      "noimg.jsonl", first_line + "\n" +
                         nlohmann::json{{"image", "missing/pic.png"}, {"question", "q?"}}.dump() +
                         "\n");
  l = tools::LoadVqaJsonl(noimg);
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.status().code(), StatusCode::kNotFound);
  EXPECT_NE(l.status().message().find("missing/pic.png"), std::string::npos);
  EXPECT_NE(l.status().message().find(noimg + ":2"), std::string::npos);
  ExpectError(Vtw({"calibrate", "--model", OracleModelDir(), "--data", noimg}), "missing/pic.png");

  // --samples 0 (and other bad flags).
  auto examples = tools::LoadVqaJsonl(good);
  ASSERT_TRUE(examples.ok());
  tools::CalibrateOptions options;
  options.samples = 0;
  options.progress = false;
  auto c = tools::CalibrateVqa(Bundle(), *examples, options);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
  ExpectError(Vtw({"calibrate", "--model", OracleModelDir(), "--data", good, "--samples", "0"}),
              "--samples must be >= 1");
  ExpectError(Vtw({"calibrate", "--model", OracleModelDir(), "--data", good, "--eta", "-1"}),
              "--eta");
  ExpectError(Vtw({"eval", "--model", OracleModelDir(), "--data", good, "--vtw-layer", "9"}),
              "outside [0, 4]");
  ExpectError(Vtw({"eval", "--model", OracleModelDir(), "--data", good, "--image-mode", "x"}),
              "--image-mode");
  ExpectError(Vtw({"study", "--model", OracleModelDir(), "--data", good, "--samples", "0"}),
              "--samples must be >= 1");

  // Eval needs answers; calibration does not.
  const std::string no_answer = WriteFile(
      "noans.jsonl", nlohmann::json{{"image", (fs::path(OracleDir()) / "images/red_circle.png").string()},
                                    {"question", "What?"}}.dump() + "\n");
  ExpectError(Vtw({"eval", "--model", OracleModelDir(), "--data", no_answer}), "line 1");
  auto r = Vtw({"calibrate", "--model", OracleModelDir(), "--data", no_answer, "--no-progress"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

}  // namespace
}  // namespace vtw
