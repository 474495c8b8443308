// Engine: the one thread that runs the model. It owns the waiting queue, the running batch, the
// KV caches and the image-feature cache. Each step, top to bottom (Engine::Step):
//   1. TakeWork: end waiting requests that were cancelled or expired; admit waiting requests
//      FIFO while their KV reservation (sized the VTW way) fits the budget (server/scheduler.h);
//   2. StartRequests: encode new images in one batch (cache hits skip the tower), size each
//      new request's KV cache per layer (vtw/withdrawal.h);
//   3. DropEndedRequests: running requests cancelled or past their deadline end, caches freed;
//   4. BuildBatch: the scheduler's plan (decode tokens first, then prefill chunks under the
//      token budget) as one ragged ForwardBatch, each sequence with its own withdrawal layer;
//   5. the forward; ConsumeLogits: sample, feed each request's SequenceOutput, stream deltas;
//   6. release finished requests, update the gauges, then report terminal statuses.
// FLOPs, tokens, times and the access log go through Accounting (server/accounting.h).
// Thread-safety: Submit/Drain/WaitIdle/Stop/accessors may be called from any thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "server/accounting.h"
#include "server/image_cache.h"
#include "server/metrics.h"
#include "server/model_bundle.h"
#include "server/request.h"
#include "server/scheduler.h"
#include "vtw/compute_model.h"

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
  // True for Submit's "the queue is full" (retry later: HTTP 429), as opposed to the other
  // RESOURCE_EXHAUSTED (a request too large for the KV budget or the limits: 413).
  static bool IsQueueFull(const Status& status);

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
  // Requests that end, with their terminal status.
  using Finished = std::vector<std::pair<std::unique_ptr<Request>, Status>>;

  void Loop();
  // Waits for work; false when stopping. Moves cancelled/expired waiting requests to `ended`
  // and the requests admitted now to `admitted`.
  bool TakeWork(std::vector<std::unique_ptr<Request>>* admitted, Finished* ended);
  void Step(std::vector<std::unique_ptr<Request>>& admitted);
  void StartRequests(std::vector<std::unique_ptr<Request>>& admitted);
  // Sets image_features of every admitted request with an image; one tower call for the misses.
  void EncodeNewImages(std::vector<std::unique_ptr<Request>>& admitted);
  void DropEndedRequests(Finished* finished);
  // The step's batch; members[i] = running_ index of batch sequence i.
  ForwardBatch BuildBatch(std::vector<size_t>* members);
  void ConsumeLogits(const ForwardOutput& out, const std::vector<size_t>& members,
                     Finished* finished);
  void Finish(std::unique_ptr<Request> request, const Status& status);
  // Counts the finished requests, updates the gauges, then tells their clients.
  // `admitting`: requests taken from the queue are not in running_ yet (the engine stays busy).
  void FinishAll(Finished& finished, bool admitting = false);
  void FailAll(const Status& status);
  void UpdateGauges(bool admitting = false);
  // Removes finished (null) entries from running_ and recomputes the reserved KV bytes.
  void ReleaseFinished();

  const ModelBundle& bundle_;
  const LlavaModel& model_;
  EngineOptions options_;
  ServerMetrics* metrics_;
  std::function<void(const std::string&)> on_failure_;
  ComputeModel compute_;
  Accounting accounting_;
  ImageCache image_cache_;

  mutable std::mutex mu_;
  std::condition_variable cv_;                    // wakes the engine
  std::condition_variable idle_cv_;               // wakes WaitIdle
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
