// The scheduler and the image cache as plain data: admission under the KV budget and the running
// limit, decode-first step plans with chunked prefill, and the LRU bound.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "server/image_cache.h"
#include "server/scheduler.h"
#include "tests/util/oracle.h"
#include "vtw/compute_model.h"

namespace vtw {
namespace {

TEST(Scheduler, AdmissionRespectsKvBudgetHeadOfLineAndRunningLimit) {
  SchedulerConfig c;
  c.kv_cache_bytes = 100;
  c.max_running = 3;
  EXPECT_EQ(NumAdmissible(c, {{40}, {40}, {40}}, 0, 0), 2);   // the third would exceed 100
  EXPECT_EQ(NumAdmissible(c, {{40}, {40}, {10}}, 30, 0), 1);  // head-of-line: 10 waits behind 40
  EXPECT_EQ(NumAdmissible(c, {{1}, {1}, {1}}, 0, 2), 1);      // running limit
  EXPECT_EQ(NumAdmissible(c, {{101}}, 0, 0), 0);
  EXPECT_EQ(NumAdmissible(c, {}, 0, 0), 0);
}

TEST(Scheduler, WithdrawalLetsMoreRequestsFitTheSameBudget) {
  const LlavaConfig& config = testing::OracleModel().config();
  ComputeModel cm(config, 4);
  // 14 text + 16 image tokens + 20 new tokens per request.
  const int64_t off = cm.KvCacheBytes(34, 16, 4), k1 = cm.KvCacheBytes(34, 16, 1);
  SchedulerConfig c;
  c.kv_cache_bytes = 10 * off;
  c.max_running = 1000;
  std::vector<WaitingView> off_queue(100, {off}), k1_queue(100, {k1});
  const int fit_off = NumAdmissible(c, off_queue, 0, 0);
  const int fit_k1 = NumAdmissible(c, k1_queue, 0, 0);
  EXPECT_EQ(fit_off, 10);
  EXPECT_GT(fit_k1, fit_off);
  EXPECT_EQ(fit_k1, static_cast<int>(c.kv_cache_bytes / k1));
}

TEST(Scheduler, DecodeFirstThenChunkedPrefillUnderTheTokenBudget) {
  SchedulerConfig c;
  c.max_batch_tokens = 10;
  // [0] prefilling 30 tokens, [1] decoding, [2] prefilling 5, [3] decoding, [4] done prefill
  // waiting for nothing (known == computed: not scheduled).
  std::vector<RunningView> running = {{30, 0}, {41, 40}, {5, 0}, {21, 20}, {7, 7}};
  StepPlan plan = PlanStep(c, running);
  EXPECT_EQ(plan.tokens, (std::vector<int64_t>{8, 1, 0, 1, 0}));
  EXPECT_EQ(plan.total_tokens, 10);
  c.max_batch_tokens = 100;
  plan = PlanStep(c, running);
  EXPECT_EQ(plan.tokens, (std::vector<int64_t>{30, 1, 5, 1, 0}));
  c.max_batch_tokens = 1;
  plan = PlanStep(c, running);
  EXPECT_EQ(plan.tokens, (std::vector<int64_t>{0, 1, 0, 0, 0}));
}

TEST(ImageCache, LruBoundAndContentKeys) {
  ImageCache cache(2);
  const ImageKey a = HashImageBytes("image a"), b = HashImageBytes("image b"),
                 c = HashImageBytes("image c");
  EXPECT_FALSE(a == b);
  EXPECT_TRUE(a == HashImageBytes(std::string("image a")));
  cache.Insert(a, at::ones({1}));
  cache.Insert(b, at::ones({1}) * 2);
  EXPECT_TRUE(cache.Find(a).defined());  // a is now the most recent
  cache.Insert(c, at::ones({1}) * 3);    // evicts b
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_FALSE(cache.Find(b).defined());
  EXPECT_EQ(cache.Find(a).item<float>(), 1.0f);
  EXPECT_EQ(cache.Find(c).item<float>(), 3.0f);
  ImageCache off(0);
  off.Insert(a, at::ones({1}));
  EXPECT_FALSE(off.Find(a).defined());
}

}  // namespace
}  // namespace vtw
