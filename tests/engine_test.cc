// The batching engine on its own, no gRPC: requests go in through Submit with a fake sink that
// records every delta and the terminal status. Mixed withdrawal layers in one batch match the
// single-request generator token for token (and FLOP for FLOP); cancellation and deadlines end
// requests (waiting or running) and free their KV cache; admission holds requests back while the
// KV budget is spent and refuses what can never fit; a full queue, draining and stopping each
// give their status; every accepted request gets exactly one OnDone.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "server/engine.h"
#include "server/generator.h"
#include "tests/util/oracle.h"
#include "tests/util/test_bundles.h"
#include "vtw/withdrawal.h"

namespace vtw {
namespace {

using testing::OracleCases;
using testing::OracleDir;

// Records what the engine reports, in order, across requests (one log per test).
class EventLog {
 public:
  void Add(const std::string& event) {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(event);
  }
  std::vector<std::string> events() const {
    std::lock_guard<std::mutex> lock(mu_);
    return events_;
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::string> events_;
};

class FakeSink final : public RequestSink {
 public:
  explicit FakeSink(std::string name, EventLog* log = nullptr) : name_(std::move(name)), log_(log) {}

  void OnDelta(const std::string& text, const std::vector<int32_t>& ids) override {
    std::lock_guard<std::mutex> lock(mu_);
    EXPECT_FALSE(done_) << name_ << ": a delta after OnDone";
    if (log_ && deltas_ == 0) log_->Add(name_ + " first");
    ++deltas_;
    text_ += text;
    ids_.insert(ids_.end(), ids.begin(), ids.end());
    cv_.notify_all();
  }

  void OnDone(const Status& status, const RequestSummary& summary) override {
    std::lock_guard<std::mutex> lock(mu_);
    ++done_;
    status_ = status;
    summary_ = summary;
    if (log_) log_->Add(name_ + " done");
    cv_.notify_all();
  }

  // Waits for OnDone (at most `seconds`); false on timeout.
  bool WaitDone(double seconds = 60) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return done_ > 0; });
  }
  bool WaitDeltas(int n, double seconds = 60) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::duration<double>(seconds),
                        [&] { return deltas_ >= n || done_ > 0; });
  }

  int done_count() const { std::lock_guard<std::mutex> l(mu_); return done_; }
  Status status() const { std::lock_guard<std::mutex> l(mu_); return status_; }
  RequestSummary summary() const { std::lock_guard<std::mutex> l(mu_); return summary_; }
  std::string text() const { std::lock_guard<std::mutex> l(mu_); return text_; }
  std::vector<int32_t> ids() const { std::lock_guard<std::mutex> l(mu_); return ids_; }

 private:
  const std::string name_;
  EventLog* log_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int deltas_ = 0, done_ = 0;
  std::string text_;
  std::vector<int32_t> ids_;
  Status status_;
  RequestSummary summary_;
};

std::string ImageBytes(int c) { return testing::OracleImageBytes(c); }

// Oracle case `c` as an engine request (greedy; EOS ignored, so it runs max_new_tokens).
std::unique_ptr<Request> MakeRequest(const ModelBundle& bundle, int c, int k, int max_new_tokens,
                                     std::shared_ptr<RequestSink> sink) {
  const std::string image = ImageBytes(c);
  auto prompt = PreparePrompt(bundle, image, OracleCases()[c]["question"].get<std::string>(),
                              /*raw=*/false, max_new_tokens, ImageLimits{});
  EXPECT_TRUE(prompt.ok()) << prompt.status().ToString();
  auto r = std::make_unique<Request>();
  r->id = "case-" + std::to_string(c);
  r->prompt = std::move(prompt).value();
  r->image_key = HashImageBytes(image);
  r->stop.max_new_tokens = max_new_tokens;
  r->stop.ignore_eos = true;
  r->stop.eos_id = bundle.tokenizer->eos_id();
  r->withdraw_layer = k;
  r->sink = std::move(sink);
  return r;
}

// Polls `done` for up to 10 s.
template <typename F>
bool Eventually(F done) {
  for (int i = 0; i < 500; ++i) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return done();
}

TEST(Engine, MixedWithdrawalLayersInOneBatchMatchTheSingleRequestGenerator) {
  auto bundle = testing::OracleBundle();
  const int layers = bundle->model->num_layers();
  Engine engine(*bundle, {}, nullptr);
  constexpr int kCases = 8, kTokens = 10;
  std::vector<std::shared_ptr<FakeSink>> sinks;
  std::vector<int> ks;
  for (int c = 0; c < kCases; ++c) {
    ks.push_back(c % (layers + 1));  // K = 0 .. layers (off) across the batch
    sinks.push_back(std::make_shared<FakeSink>("case-" + std::to_string(c)));
    ASSERT_TRUE(engine.Submit(MakeRequest(*bundle, c, ks[c], kTokens, sinks[c])).ok());
  }
  for (int c = 0; c < kCases; ++c) {
    SCOPED_TRACE("case " + std::to_string(c) + " K=" + std::to_string(ks[c]));
    ASSERT_TRUE(sinks[c]->WaitDone());
    ASSERT_TRUE(sinks[c]->status().ok()) << sinks[c]->status().ToString();
    const RequestSummary s = sinks[c]->summary();
    // The same request alone, on the calling thread.
    GenerateOptions options;
    options.withdraw_layer = ks[c];
    options.stop.max_new_tokens = kTokens;
    options.stop.ignore_eos = true;
    options.stop.eos_id = bundle->tokenizer->eos_id();
    auto prompt = PreparePrompt(*bundle, ImageBytes(c), OracleCases()[c]["question"].get<std::string>(),
                                false, kTokens, ImageLimits{});
    ASSERT_TRUE(prompt.ok());
    at::Tensor features = bundle->model->EncodeImages(prompt->pixel_values)[0];
    auto alone = GenerateOne(*bundle->model, bundle->tokenizer.get(), prompt->layout, features,
                             options);
    ASSERT_TRUE(alone.ok()) << alone.status().ToString();
    EXPECT_EQ(s.token_ids, alone->token_ids);
    EXPECT_EQ(s.text, alone->text);
    EXPECT_EQ(sinks[c]->text(), s.text) << "the deltas add up to the answer";
    EXPECT_EQ(sinks[c]->ids(), s.token_ids);
    EXPECT_EQ(s.finish_reason, FinishReason::kLength);
    EXPECT_EQ(s.withdraw_layer, ks[c]);
    EXPECT_EQ(s.vtw_applied, WithdrawsImage(ks[c], layers, s.image_tokens));
    // FLOPs and KV bytes: the engine's accounting equals the generator's (the image encoded
    // in this batch or found in the cache: vision FLOPs are counted once per distinct image).
    const Flops total = alone->total_flops();
    EXPECT_EQ(s.flops_without_vtw - s.flops, total.saved());
    EXPECT_EQ(s.kv_cache_bytes, alone->kv_cache_bytes);
    EXPECT_EQ(s.kv_cache_bytes_without_vtw, alone->kv_cache_bytes_without_vtw);
    EXPECT_EQ(sinks[c]->done_count(), 1);
  }
  EXPECT_TRUE(engine.WaitIdle(Clock::now() + std::chrono::seconds(10)));
  EXPECT_EQ(engine.kv_bytes_used(), 0);
}

TEST(Engine, CancellationEndsARunningRequestAndFreesItsCache) {
  auto bundle = testing::LongContextBundle(4, 256, 8192);
  Engine engine(*bundle, {}, nullptr);
  auto sink = std::make_shared<FakeSink>("long");
  auto request = MakeRequest(*bundle, 0, bundle->model->num_layers(), 4000, sink);
  auto cancel = request->cancelled;
  ASSERT_TRUE(engine.Submit(std::move(request)).ok());
  ASSERT_TRUE(sink->WaitDeltas(2));
  EXPECT_GT(engine.kv_bytes_used(), 0);  // generating: the cache is held
  cancel->store(true);
  ASSERT_TRUE(sink->WaitDone());
  EXPECT_EQ(sink->status().code(), StatusCode::kCancelled) << sink->status().ToString();
  EXPECT_TRUE(Eventually([&] { return engine.kv_bytes_used() == 0 && engine.num_running() == 0; }));
  // The engine goes on serving.
  auto next = std::make_shared<FakeSink>("next");
  ASSERT_TRUE(engine.Submit(MakeRequest(*bundle, 1, 2, 3, next)).ok());
  ASSERT_TRUE(next->WaitDone());
  EXPECT_TRUE(next->status().ok()) << next->status().ToString();
  EXPECT_EQ(next->summary().token_ids.size(), 3u);
  EXPECT_EQ(sink->done_count(), 1);
}

TEST(Engine, DeadlinesEndRunningAndWaitingRequests) {
  auto bundle = testing::LongContextBundle(4, 256, 8192);
  EngineOptions options;
  options.scheduler.max_running = 1;  // the second request waits behind the first
  Engine engine(*bundle, options, nullptr);
  auto running = std::make_shared<FakeSink>("running");
  auto waiting = std::make_shared<FakeSink>("waiting");
  auto r1 = MakeRequest(*bundle, 0, 2, 4000, running);
  // 1.5 s: long enough that a loaded machine still generates some tokens before it passes (at
  // 400 ms a CI run beside a training job once saw the deadline pass with none), far shorter
  // than the 4000 tokens asked for.
  r1->deadline = Clock::now() + std::chrono::milliseconds(1500);
  auto r2 = MakeRequest(*bundle, 1, 2, 4000, waiting);
  r2->deadline = Clock::now() + std::chrono::milliseconds(200);
  ASSERT_TRUE(engine.Submit(std::move(r1)).ok());
  ASSERT_TRUE(running->WaitDeltas(1));
  ASSERT_TRUE(engine.Submit(std::move(r2)).ok());
  ASSERT_TRUE(waiting->WaitDone());
  EXPECT_EQ(waiting->status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_NE(waiting->status().message().find("waited"), std::string::npos)
      << waiting->status().message();
  EXPECT_TRUE(waiting->summary().token_ids.empty());
  ASSERT_TRUE(running->WaitDone());
  EXPECT_EQ(running->status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_NE(running->status().message().find("during generation"), std::string::npos)
      << running->status().message();
  EXPECT_FALSE(running->summary().token_ids.empty());
  EXPECT_TRUE(Eventually([&] { return engine.kv_bytes_used() == 0 && engine.num_running() == 0; }));
}

TEST(Engine, AdmissionWaitsForTheKvBudgetAndRefusesWhatCanNeverFit) {
  auto bundle = testing::OracleBundle();
  // The budget holds one request's reservation, not two.
  auto probe = MakeRequest(*bundle, 0, 2, 8, nullptr);
  Engine sizing(*bundle, {}, nullptr);
  const int64_t one = sizing.KvReservation(*probe);
  EngineOptions options;
  options.scheduler.kv_cache_bytes = one + one / 2;
  Engine engine(*bundle, options, nullptr);
  EventLog log;
  std::vector<std::shared_ptr<FakeSink>> sinks;
  for (int c = 0; c < 3; ++c) {
    sinks.push_back(std::make_shared<FakeSink>(std::to_string(c), &log));
    ASSERT_TRUE(engine.Submit(MakeRequest(*bundle, c, 2, 8, sinks.back())).ok());
  }
  for (auto& s : sinks) {
    ASSERT_TRUE(s->WaitDone());
    EXPECT_TRUE(s->status().ok()) << s->status().ToString();
  }
  // One at a time, in order: each request's first token comes after the previous one ended.
  EXPECT_EQ(log.events(), (std::vector<std::string>{"0 first", "0 done", "1 first", "1 done",
                                                     "2 first", "2 done"}));
  EXPECT_GT(sinks[2]->summary().queue_seconds, sinks[0]->summary().queue_seconds);
  // Without withdrawal the same request reserves more: here more than the whole budget.
  auto off = MakeRequest(*bundle, 0, bundle->model->num_layers(), 8, sinks[0]);
  if (engine.KvReservation(*off) > options.scheduler.kv_cache_bytes) {
    Status st = engine.Submit(std::move(off));
    EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
    EXPECT_NE(st.message().find("KV cache"), std::string::npos) << st.message();
  }
  auto huge = MakeRequest(*bundle, 0, 2, 200, sinks[0]);
  Status st = engine.Submit(std::move(huge));
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted) << st.ToString();
  EXPECT_NE(st.message().find("lower max_new_tokens or use VTW"), std::string::npos);
  EXPECT_EQ(sinks[0]->done_count(), 1) << "a refused request never reaches its sink";
}

TEST(Engine, FullQueueDrainAndStopGiveOneTerminalStatusEach) {
  auto bundle = testing::LongContextBundle(4, 256, 8192);
  EngineOptions options;
  options.max_queue = 1;
  options.scheduler.max_running = 1;
  Engine engine(*bundle, options, nullptr);
  auto running = std::make_shared<FakeSink>("running");
  auto waiting = std::make_shared<FakeSink>("waiting");
  ASSERT_TRUE(engine.Submit(MakeRequest(*bundle, 0, 2, 4000, running)).ok());
  ASSERT_TRUE(running->WaitDeltas(1));
  ASSERT_TRUE(engine.Submit(MakeRequest(*bundle, 1, 2, 4000, waiting)).ok());
  ASSERT_TRUE(Eventually([&] { return engine.num_waiting() == 1; }));
  Status full = engine.Submit(MakeRequest(*bundle, 2, 2, 5, nullptr));
  EXPECT_EQ(full.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(full.message().find("capacity"), std::string::npos) << full.message();
  engine.Drain();
  Status drained = engine.Submit(MakeRequest(*bundle, 2, 2, 5, nullptr));
  EXPECT_EQ(drained.code(), StatusCode::kUnavailable);
  engine.Stop(Status(StatusCode::kUnavailable, "stopped by the test"));
  for (auto* s : {running.get(), waiting.get()}) {
    ASSERT_TRUE(s->WaitDone(1));
    EXPECT_EQ(s->status().code(), StatusCode::kUnavailable);
    EXPECT_EQ(s->status().message(), "stopped by the test");
    EXPECT_EQ(s->done_count(), 1);
  }
}

}  // namespace
}  // namespace vtw
