// Parity with Hugging Face transformers (tests/data/oracle): vision tower, projector, decoder,
// logits, greedy ids, and Visual Tokens Withdrawal for every K, in fp32 within 1e-4.
#include <cmath>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "server/generator.h"
#include "tests/util/oracle.h"

namespace vtw {
namespace {

using testing::MaxAbsDiff;
using testing::OracleCases;
using testing::OracleLayout;
using testing::OracleModel;
using testing::OracleTensor;
using testing::OracleVtw;

constexpr double kTol = 1e-4;

at::Tensor CaseFeatures(const nlohmann::json& c) {
  at::Tensor pixels = OracleTensor(c["pixel_values"]["file"]);
  return OracleModel().EncodeImages(pixels)[0];  // [16, 64]
}

TEST(OracleParity, VisionTowerAndProjector) {
  for (const auto& c : OracleCases()) {
    SCOPED_TRACE(c["id"].get<std::string>());
    const auto& inter = c["models"]["tiny-llava"]["intermediates"];
    std::vector<at::Tensor> hidden;
    at::Tensor features = OracleModel().EncodeImages(OracleTensor(c["pixel_values"]["file"]), &hidden);
    at::Tensor want_hidden = OracleTensor(inter["vision_hidden_states_file"]);  // [4, 17, 64]
    // The runtime runs only the layers the feature layer (-2) needs: hidden[0..2].
    ASSERT_EQ(hidden.size(), 3u);
    for (size_t i = 0; i < hidden.size(); ++i) {
      EXPECT_LT(MaxAbsDiff(hidden[i][0], want_hidden[i]), kTol) << "vision hidden state " << i;
    }
    EXPECT_LT(MaxAbsDiff(features[0], OracleTensor(inter["image_features_file"])), kTol);
  }
}

TEST(OracleParity, DecoderHiddenStatesAndAllLogits) {
  for (const auto& c : OracleCases()) {
    SCOPED_TRACE(c["id"].get<std::string>());
    const auto& m = c["models"]["tiny-llava"];
    PromptLayout layout = OracleLayout(c);
    ASSERT_EQ(layout.token_ids, c["input_ids"].get<std::vector<int64_t>>());
    ForwardBatch batch;
    batch.AppendRows(layout.token_ids, layout.kinds, 0, layout.size());
    batch.image_embeds = CaseFeatures(c);
    batch.seqs.push_back({nullptr, static_cast<int>(layout.size()), OracleModel().num_layers(), true});
    ForwardTrace trace;
    trace.all_logits = true;
    trace.hidden_states = true;
    ForwardOutput out = OracleModel().Forward(batch, &trace);
    at::Tensor want_hidden = OracleTensor(m["intermediates"]["decoder_hidden_states_file"]);
    ASSERT_EQ(trace.hidden.size(), 6u);  // embeddings, 4 layers, final norm
    for (int i = 0; i < 4; ++i) {
      EXPECT_LT(MaxAbsDiff(trace.hidden[i], want_hidden[i]), kTol) << "decoder hidden " << i;
    }
    EXPECT_LT(MaxAbsDiff(trace.hidden[5], want_hidden[4]), kTol) << "final norm";
    EXPECT_LT(MaxAbsDiff(trace.logits_all, OracleTensor(m["prefill"]["all_logits_file"])), kTol);
    EXPECT_LT(MaxAbsDiff(out.logits[0], OracleTensor(m["prefill"]["last_logits_file"])), kTol);
  }
}

GenerateResult RunCase(const nlohmann::json& c, int k, int prefill_chunk = 0) {
  GenerateOptions options;
  options.withdraw_layer = k;
  options.stop.max_new_tokens = 12;
  options.stop.ignore_eos = true;
  options.record_step_logits = true;
  options.prefill_chunk = prefill_chunk;
  auto r = GenerateOne(OracleModel(), nullptr, OracleLayout(c), CaseFeatures(c), options);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return std::move(r).value();
}

void ExpectGreedyMatches(const GenerateResult& r, const nlohmann::json& want_ids,
                         const nlohmann::json& margins, const at::Tensor& want_logits) {
  const size_t steps = testing::StepsToCompare(margins, 2 * kTol);
  ASSERT_EQ(r.token_ids.size(), 12u);
  for (size_t i = 0; i < steps; ++i) {
    EXPECT_EQ(r.token_ids[i], want_ids[i].get<int>()) << "step " << i;
    // Logits are comparable while the sequences agree.
    EXPECT_LT(MaxAbsDiff(r.step_logits[i], want_logits[i]), kTol) << "step " << i;
  }
}

TEST(OracleParity, GreedyWithKvCache) {
  for (const auto& c : OracleCases()) {
    SCOPED_TRACE(c["id"].get<std::string>());
    const auto& g = c["models"]["tiny-llava"]["greedy"];
    GenerateResult r = RunCase(c, OracleModel().num_layers());
    ExpectGreedyMatches(r, g["new_ids"], g["step_top1_top2_margin"],
                        OracleTensor(g["step_logits_file"]));
  }
}

TEST(OracleParity, VtwEveryK) {
  for (const auto& c : OracleCases()) {
    const std::string id = c["id"];
    for (int k = 0; k <= 4; ++k) {
      SCOPED_TRACE(id + " K=" + std::to_string(k));
      const auto& v = OracleVtw()[id]["K=" + std::to_string(k)];
      GenerateResult r = RunCase(c, k);
      EXPECT_LT(MaxAbsDiff(r.step_logits[0], OracleTensor(v["prefill_last_logits_file"])), kTol);
      ExpectGreedyMatches(r, v["greedy_new_ids"], v["step_top1_top2_margin"],
                          OracleTensor(v["step_logits_file"]));
    }
  }
}

TEST(OracleParity, ChunkedPrefillEqualsOneShot) {
  const auto& c = OracleCases()[2];
  for (int k : {0, 2, 4}) {
    GenerateResult whole = RunCase(c, k);
    for (int chunk : {1, 5, 7}) {
      GenerateResult chunked = RunCase(c, k, chunk);
      EXPECT_EQ(chunked.token_ids, whole.token_ids) << "K=" << k << " chunk " << chunk;
      for (size_t i = 0; i < whole.step_logits.size(); ++i) {
        EXPECT_LT(MaxAbsDiff(chunked.step_logits[i], whole.step_logits[i]), 1e-5);
      }
      EXPECT_EQ(chunked.prefill_flops.flops, whole.prefill_flops.flops);
    }
  }
}

}  // namespace
}  // namespace vtw
