// The shipped model (models/vtw-shapes) on a fixed held-out subset of the synthetic task, run
// the way a user runs it: `vtw dataset` writes the first 360 questions of the test split (seed 7,
// never seen in training: the trainer uses the train/val splits of data seed 1), then `vtw eval`
// scores them with VTW off and at the calibrated K stored in the model directory (vtw.json).
// Acceptance bars of the shipped model: >= 90% overall and >= 80% on every question type with
// VTW off; at the calibrated K >= 40% of prefill FLOPs saved and <= 1 point of accuracy lost.
// A second test runs a fixed subset of the independent, cairo-drawn set.
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/util/oracle.h"
#include "tests/util/subprocess.h"

namespace vtw {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using testing::FreshTestDir;
using testing::ProcessResult;
using testing::RunProcess;
using testing::VtwBinary;

std::string ShippedModelDir() { return std::string(VTW_SOURCE_DIR) + "/models/vtw-shapes"; }

// The calibrated K in the shipped model's vtw.json.
void CalibratedK(int* k) {
  std::ifstream vtw_json(ShippedModelDir() + "/vtw.json");
  ASSERT_TRUE(vtw_json) << "the shipped model has no vtw.json (run vtw calibrate --write)";
  const json settings = json::parse(vtw_json);
  ASSERT_TRUE(settings.contains("default_layer") && settings["default_layer"].is_number_integer())
      << settings.dump();
  *k = settings["default_layer"].get<int>();
}

// `vtw eval` of the shipped model on `data` with VTW off and at K: the two result objects.
struct OffAndK {
  json off, at_k;
};
void EvalOffAndK(const std::string& data, int k, int examples, const std::vector<std::string>& extra,
                 OffAndK* out) {
  std::vector<std::string> argv = {VtwBinary(), "eval", "--model", ShippedModelDir(), "--data", data,
                                   "--vtw-layer", "off," + std::to_string(k), "--json", "--no-progress"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  ProcessResult eval = RunProcess(argv);
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  const json j = json::parse(eval.out);
  ASSERT_EQ(j["num_examples"], examples);
  ASSERT_EQ(j["results"].size(), 2u) << j.dump();
  const json* off = nullptr;
  const json* at_k = nullptr;
  for (const json& r : j["results"]) (r["vtw_layer"].is_null() ? off : at_k) = &r;
  ASSERT_TRUE(off != nullptr && at_k != nullptr) << j.dump();
  ASSERT_EQ((*at_k)["vtw_layer"], k);
  out->off = *off;
  out->at_k = *at_k;
}

TEST(ShippedModel, MeetsTheAccuracyBarsWithVtwOffAndAtTheCalibratedK) {
  int k = -1;
  ASSERT_NO_FATAL_FAILURE(CalibratedK(&k));
  const std::string dir = FreshTestDir("shipped_model").string();
  ProcessResult data = RunProcess({VtwBinary(), "dataset", "--out", dir, "--split", "test",
                                   "--count", "360", "--seed", "7"});
  ASSERT_EQ(data.exit_code, 0) << data.err;
  OffAndK r;
  ASSERT_NO_FATAL_FAILURE(EvalOffAndK(dir + "/test.jsonl", k, 360, {}, &r));

  const double acc_off = r.off["accuracy"].get<double>();
  const double acc_k = r.at_k["accuracy"].get<double>();
  std::cout << "shipped model, 360 held-out questions: VTW off " << acc_off << ", K=" << k << " "
            << acc_k << " (prefill FLOPs saved " << r.at_k["prefill_flops_saved_pct"] << "%)\n";
  EXPECT_GE(acc_off, 0.90) << r.off.dump(2);
  ASSERT_EQ(r.off["per_type"].size(), 6u) << r.off.dump(2);
  for (const auto& [type, t] : r.off["per_type"].items()) {
    EXPECT_GE(t["count"].get<int>(), 40) << type;
    EXPECT_GE(t["accuracy"].get<double>(), 0.80) << type << ": " << t.dump();
  }
  EXPECT_GE(r.at_k["prefill_flops_saved_pct"].get<double>(), 40.0) << r.at_k.dump(2);
  EXPECT_GE(acc_k, acc_off - 0.01) << r.at_k.dump(2);
}

// The first 180 questions of the independent set (scripts/make-independent-eval.py, drawn with
// cairo instead of OpenCV, seed 11; docs/REPORT.md has all 900): the shipped model on images of
// another renderer. The goal on the whole set (>= 92% overall, >= 85% every type, VTW off) is
// checked by docs/REPORT.md; this subset (30 questions a type) guards it in CI with floors under
// what the shipped model does here (measured 2026-12-06: VTW off 93.3%, lowest type count_shape
// 80.0%, K = 3 92.2%; the model before the renderer fine-tune: 83.3%, 63.3%, 84.4%).
TEST(ShippedModel, IndependentRendererSubsetStaysAboveItsFloors) {
  int k = -1;
  ASSERT_NO_FATAL_FAILURE(CalibratedK(&k));
  const std::string script = std::string(VTW_SOURCE_DIR) + "/scripts/make-independent-eval.py";
  const std::string dir = FreshTestDir("shipped_model_independent").string();
  ProcessResult data = RunProcess({"/usr/bin/python3", script, "--out", dir, "--count", "180", "--seed", "11"});
  ASSERT_EQ(data.exit_code, 0) << "make-independent-eval.py failed (python3-cairo installed? "
                                  "scripts/install-deps.sh installs it):\n"
                               << data.err;
  OffAndK r;
  ASSERT_NO_FATAL_FAILURE(EvalOffAndK(dir + "/independent.jsonl", k, 180, {"--threads", "1"}, &r));
  const double acc_off = r.off["accuracy"].get<double>();
  const double acc_k = r.at_k["accuracy"].get<double>();
  std::cout << "shipped model, 180 independent (cairo) questions: VTW off " << acc_off << ", K="
            << k << " " << acc_k << "\n";
  EXPECT_GE(acc_off, 0.90) << r.off.dump(2);
  ASSERT_EQ(r.off["per_type"].size(), 6u) << r.off.dump(2);
  for (const auto& [type, t] : r.off["per_type"].items()) {
    EXPECT_GE(t["count"].get<int>(), 25) << type;
    EXPECT_GE(t["accuracy"].get<double>(), 0.75) << type << ": " << t.dump();
  }
  EXPECT_GE(acc_k, acc_off - 0.02) << r.at_k.dump(2);
}

}  // namespace
}  // namespace vtw
