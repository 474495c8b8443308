// bf16 runs the same model: its prefill logits stay close to fp32 and greedy first tokens agree
// where fp32's top-2 margin is clear. The measured differences are printed (README reports them).
#include <cstdio>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "tests/util/oracle.h"
#include "vtw/calibration.h"

namespace vtw {
namespace {

TEST(Bf16, CloseToFp32OnOracleCases) {
  auto bf16 = LlavaModel::Load(testing::OracleModelDir(), at::kBFloat16);
  ASSERT_TRUE(bf16.ok()) << bf16.status().ToString();
  const LlavaModel& fp32 = testing::OracleModel();
  double worst = 0, worst_features = 0;
  int agree = 0, clear = 0;
  for (const auto& c : testing::OracleCases()) {
    at::Tensor pixels = testing::OracleTensor(c["pixel_values"]["file"]);
    PromptLayout layout = testing::OracleLayout(c);
    at::Tensor f32_features = fp32.EncodeImages(pixels)[0];
    at::Tensor bf_features = (*bf16)->EncodeImages(pixels)[0];
    ASSERT_EQ(bf_features.scalar_type(), at::kBFloat16);
    worst_features = std::max(worst_features, testing::MaxAbsDiff(bf_features, f32_features));
    for (int k : {2, 4}) {
      at::Tensor a = PrefillLastLogits(fp32, layout, f32_features, k);
      at::Tensor b = PrefillLastLogits(**bf16, layout, bf_features, k);
      worst = std::max(worst, testing::MaxAbsDiff(a, b));
      auto top2 = a.topk(2);
      const double margin = (std::get<0>(top2)[0] - std::get<0>(top2)[1]).item<double>();
      if (margin > 0.1) {
        ++clear;
        agree += a.argmax().item<int64_t>() == b.argmax().item<int64_t>();
      }
    }
  }
  std::printf("[bf16] max |logit diff| vs fp32 = %.4f, max |image feature diff| = %.4f, "
              "greedy first token agrees on %d/%d clear cases\n",
              worst, worst_features, agree, clear);
  EXPECT_LT(worst, 0.1);
  EXPECT_GT(clear, 4);
  EXPECT_EQ(agree, clear);
}

}  // namespace
}  // namespace vtw
