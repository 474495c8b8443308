// Sampler and stop criteria: greedy ties, per-seed determinism, top-k / top-p truncation, the
// sampled distribution, and EOS / stop-string / length stops.
#include <cmath>
#include <map>

#include <gtest/gtest.h>

#include "model/sampler.h"

namespace vtw {
namespace {

TEST(Sampler, GreedyTakesTheFirstMaximum) {
  Sampler s({});
  const float logits[] = {0.5f, 2.0f, 2.0f, -1.0f};
  EXPECT_EQ(s.Sample(logits, 4), 1);
}

TEST(Sampler, SameSeedSameTokensDifferentSeedDifferentTokens) {
  std::vector<float> logits(50);
  for (int i = 0; i < 50; ++i) logits[i] = std::sin(i * 0.7f);
  auto draw = [&](uint64_t seed) {
    Sampler s({1.0f, 0, 1.0f, seed});
    std::vector<int> out;
    for (int i = 0; i < 40; ++i) out.push_back(s.Sample(logits.data(), 50));
    return out;
  };
  EXPECT_EQ(draw(7), draw(7));
  EXPECT_NE(draw(7), draw(8));
}

TEST(Sampler, TopKAndTopPTruncate) {
  const float logits[] = {3.0f, 2.9f, 0.0f, -1.0f, 2.8f};
  for (uint64_t seed = 0; seed < 200; ++seed) {
    Sampler k1({1.0f, 1, 1.0f, seed});
    EXPECT_EQ(k1.Sample(logits, 5), 0);
    Sampler k2({1.0f, 2, 1.0f, seed});
    const int t = k2.Sample(logits, 5);
    EXPECT_TRUE(t == 0 || t == 1) << t;
    Sampler p({1.0f, 0, 0.01f, seed});  // the smallest set reaching 1% is the top token
    EXPECT_EQ(p.Sample(logits, 5), 0);
  }
}

TEST(Sampler, FrequenciesFollowTheSoftmax) {
  const float logits[] = {0.0f, std::log(3.0f)};  // p = 0.25, 0.75
  Sampler s({1.0f, 0, 1.0f, 42});
  int ones = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) ones += s.Sample(logits, 2);
  EXPECT_NEAR(ones / static_cast<double>(n), 0.75, 0.02);
  Sampler cold({0.25f, 0, 1.0f, 42});  // temperature sharpens: p1 = 3^4 / (1 + 3^4)
  ones = 0;
  for (int i = 0; i < n; ++i) ones += cold.Sample(logits, 2);
  EXPECT_NEAR(ones / static_cast<double>(n), 81.0 / 82.0, 0.01);
}

TEST(Sampler, ValidationMessages) {
  EXPECT_FALSE(ValidateSamplingParams({-1.0f, 0, 1.0f, 0}).ok());
  EXPECT_FALSE(ValidateSamplingParams({NAN, 0, 1.0f, 0}).ok());
  EXPECT_FALSE(ValidateSamplingParams({1.0f, 0, 0.0f, 0}).ok());
  EXPECT_FALSE(ValidateSamplingParams({1.0f, 0, 1.5f, 0}).ok());
  EXPECT_FALSE(ValidateSamplingParams({1.0f, -1, 1.0f, 0}).ok());
  EXPECT_TRUE(ValidateSamplingParams({0.7f, 40, 0.9f, 3}).ok());
  EXPECT_NE(ValidateSamplingParams({1.0f, 0, 0.0f, 0}).message().find("top_p"), std::string::npos);
}

TEST(StopChecker, EosStopStringsAndLength) {
  StopChecker c({5, false, 2, {"\n\n", "END"}});
  size_t visible = 0;
  EXPECT_EQ(c.Check(2, 1, "hi", &visible), FinishReason::kEos);
  EXPECT_EQ(c.Check(9, 1, "hi", &visible), FinishReason::kNone);
  EXPECT_EQ(c.Check(9, 2, "hi END", &visible), FinishReason::kStop);
  EXPECT_EQ(visible, 3u);
  EXPECT_EQ(c.Check(9, 5, "hi", &visible), FinishReason::kLength);
  StopChecker ignore({5, true, 2, {}});
  EXPECT_EQ(ignore.Check(2, 1, "", &visible), FinishReason::kNone);
  EXPECT_STREQ(FinishReasonName(FinishReason::kStop), "stop");
}

}  // namespace
}  // namespace vtw
