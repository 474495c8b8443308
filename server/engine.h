// Engine: the one thread that runs the model. It owns the waiting queue, the running batch, the
// KV caches and the image-feature cache; every step it admits requests (KV budget sized the VTW
// way), encodes new images in one batch, asks the scheduler for the step's tokens (decode tokens
// of running requests mixed with chunked prefill of new ones), runs one ragged forward with each
// request's own withdrawal layer, samples, and reports tokens and terminal statuses to each
// request's sink. Thread-safety: Submit/Drain/Stop/accessors may be called from any thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "server/image_cache.h"
#include "server/metrics.h"
#include "server/request.h"
#include "server/scheduler.h"
#include "vtw/compute_model.h"
#include "vtw/model_bundle.h"

namespace vtw {

struct EngineOptions {
  SchedulerConfig scheduler;
  int max_queue = 256;               // waiting requests before RESOURCE_EXHAUSTED
  size_t image_cache_entries = 256;  // image features kept for reuse
  // Test hook (tests/faults_test.cc; vtw-server reads it from VTW_TEST_FAIL_AFTER_STEPS): when
  // >= 0, the step after this many model forwards throws as a failing model would, so the
  // engine-failure path (every request INTERNAL, Submit UNAVAILABLE, on_failure) can be tested
  // end to end. -1 (the default) disables it.
  int64_t fail_after_steps = -1;
};

class Engine {
 public:
  // `metrics` may be null. `on_failure` (optional) is called once, on the engine thread, if the
  // model throws: every request then ends with INTERNAL and Submit refuses new work.
  Engine(const ModelBundle& bundle, EngineOptions options, ServerMetrics* metrics,
         std::function<void(const std::string&)> on_failure = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // KV-cache bytes a request reserves: prompt + max_new_tokens, layers >= K without image rows.
  int64_t KvReservation(const Request& request) const;

  // Hands `request` to the engine. OK: accepted; the sink will get exactly one OnDone. Not OK
  // (the sink is never called): UNAVAILABLE when draining/stopped/failed, RESOURCE_EXHAUSTED
  // when the queue is full or the request can never fit the KV budget.
  Status Submit(std::unique_ptr<Request> request);

  // Refuses new requests from now on; accepted ones continue.
  void Drain();
  // Blocks until nothing is waiting or running, or until `deadline`. True when idle.
  bool WaitIdle(Clock::time_point deadline);
  // Ends every remaining request with `reason` and joins the engine thread. Idempotent.
  void Stop(const Status& reason);

  int num_waiting() const { return num_waiting_.load(); }
  int num_running() const { return num_running_.load(); }
  int64_t kv_bytes_used() const { return kv_bytes_used_.load(); }
  bool failed() const { return failed_.load(); }
  const ComputeModel& compute() const { return compute_; }

 private:
  void Loop();
  void Step(std::vector<std::unique_ptr<Request>>& admitted);
  void StartRequests(std::vector<std::unique_ptr<Request>>& admitted);
  void Finish(std::unique_ptr<Request> request, const Status& status);
  void FailAll(const Status& status);
  void UpdateGauges();
  // Removes finished (null) entries from running_ and recomputes the reserved KV bytes.
  void ReleaseFinished();
  // Emits the request's text that is safe to stream (a possible stop-string prefix held back).
  void EmitDelta(Request& r, std::vector<int32_t> ids, bool final);

  const ModelBundle& bundle_;
  const LlavaModel& model_;
  EngineOptions options_;
  ServerMetrics* metrics_;
  std::function<void(const std::string&)> on_failure_;
  ComputeModel compute_;
  ImageCache image_cache_;

  mutable std::mutex mu_;
  std::condition_variable cv_;       // wakes the engine
  std::condition_variable idle_cv_;  // wakes WaitIdle
  std::deque<std::unique_ptr<Request>> waiting_;  // guarded by mu_
  int64_t kv_reserved_ = 0;                       // guarded by mu_ (running requests)
  bool draining_ = false, stopping_ = false;      // guarded by mu_
  Status stop_reason_;                            // guarded by mu_
  bool busy_ = false;                             // guarded by mu_: running non-empty

  std::vector<std::unique_ptr<Request>> running_;  // engine thread only
  std::atomic<int> num_waiting_{0}, num_running_{0};
  std::atomic<int64_t> kv_bytes_used_{0};
  std::atomic<bool> failed_{false};
  int64_t forwards_ = 0;  // engine thread only: model forwards run (for fail_after_steps)
  std::thread thread_;
};

}  // namespace vtw
