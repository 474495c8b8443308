#include "server/engine.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <stdexcept>
#include <string_view>

#include "vtw/withdrawal.h"

namespace vtw {
namespace {

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Why a request must end now (cancelled or past its deadline), or OK. The deadline is checked
// first: when a client's deadline fires, gRPC also cancels the call on the server, so both are
// usually true by the time the engine looks, and the request timed out rather than being
// abandoned (checked the other way round, tests/overload_test saw most deadline expiries
// counted as CANCELLED).
Status EndedByClient(const Request& r, Clock::time_point now, const char* while_what) {
  if (now >= r.deadline) {
    return Status(StatusCode::kDeadlineExceeded, std::string("the deadline passed ") + while_what);
  }
  if (r.cancelled->load()) return Status(StatusCode::kCancelled, "the client cancelled");
  return Status::Ok();
}

}  // namespace

Engine::Engine(const ModelBundle& bundle, EngineOptions options, ServerMetrics* metrics,
               std::function<void(const std::string&)> on_failure)
    : bundle_(bundle),
      model_(*bundle.model),
      options_(options),
      metrics_(metrics),
      on_failure_(std::move(on_failure)),
      compute_(bundle.model->config(), c10::elementSize(bundle.model->dtype())),
      accounting_(compute_, metrics),
      image_cache_(options.image_cache_entries) {
  if (metrics_) {
    metrics_->queue_capacity->Set(options_.max_queue);
    metrics_->kv_cache_capacity_bytes->Set(static_cast<double>(options_.scheduler.kv_cache_bytes));
    metrics_->model_layers->Set(model_.num_layers());
    metrics_->withdrawal_layer->Set(
        bundle.vtw.default_layer.value_or(WithdrawalOff(model_.num_layers())));
  }
  thread_ = std::thread([this] { Loop(); });
}

Engine::~Engine() { Stop(Status(StatusCode::kUnavailable, "the server is shutting down")); }

int64_t Engine::KvReservation(const Request& r) const {
  const PromptLayout& layout = r.prompt.layout;
  return compute_.KvCacheBytes(layout.num_text_tokens() + r.stop.max_new_tokens,
                               layout.num_image_tokens, r.withdraw_layer);
}

namespace {
constexpr std::string_view kQueueFull = "the server is at capacity";
}  // namespace

bool Engine::IsQueueFull(const Status& status) {
  return status.code() == StatusCode::kResourceExhausted &&
         std::string_view(status.message()).substr(0, kQueueFull.size()) == kQueueFull;
}

Status Engine::Submit(std::unique_ptr<Request> request) {
  const int64_t need = KvReservation(*request);
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_) return Status(StatusCode::kUnavailable, "the inference engine failed; see logs");
  if (stopping_ || draining_) {
    return Status(StatusCode::kUnavailable,
                  "the server is shutting down; retry on another replica");
  }
  if (need > options_.scheduler.kv_cache_bytes) {
    return ResourceExhausted("the request needs " + std::to_string(need) +
                             " bytes of KV cache, more than the server's budget of " +
                             std::to_string(options_.scheduler.kv_cache_bytes) +
                             ": lower max_new_tokens or use VTW");
  }
  if (static_cast<int>(waiting_.size()) >= options_.max_queue) {
    return ResourceExhausted(std::string(kQueueFull) + " (" + std::to_string(waiting_.size()) +
                             " requests waiting); retry later");
  }
  request->kv_reserved = need;
  waiting_.push_back(std::move(request));
  num_waiting_ = static_cast<int>(waiting_.size());
  if (metrics_) metrics_->requests_waiting->Set(num_waiting_);
  cv_.notify_one();
  return Status::Ok();
}

void Engine::Drain() {
  std::lock_guard<std::mutex> lock(mu_);
  draining_ = true;
}

bool Engine::WaitIdle(Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  return idle_cv_.wait_until(lock, deadline, [&] { return waiting_.empty() && !busy_; });
}

void Engine::Stop(const Status& reason) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_) {
      stopping_ = true;
      stop_reason_ = reason;
    }
    cv_.notify_one();
  }
  if (thread_.joinable()) thread_.join();
}

void Engine::Finish(std::unique_ptr<Request> r, const Status& status) {
  accounting_.RequestFinished(*r, status, Clock::now());
  if (r->sink) r->sink->OnDone(status, r->summary);
}

void Engine::FinishAll(Finished& finished, bool admitting) {
  // Counted first, then the gauges, then the clients told: a client that sees its answer also
  // sees its request counted and its KV cache released in the metrics.
  const auto now = Clock::now();
  for (auto& [r, status] : finished) accounting_.RequestFinished(*r, status, now);
  UpdateGauges(admitting);
  for (auto& [r, status] : finished) {
    if (r->sink) r->sink->OnDone(status, r->summary);
  }
  finished.clear();  // the KV caches are freed here
}

void Engine::FailAll(const Status& status) {
  std::deque<std::unique_ptr<Request>> waiting;
  {
    std::lock_guard<std::mutex> lock(mu_);
    waiting.swap(waiting_);
    kv_reserved_ = 0;
  }
  for (auto& r : running_) {
    if (r) Finish(std::move(r), status);
  }
  running_.clear();
  for (auto& r : waiting) Finish(std::move(r), status);
  UpdateGauges();
}

void Engine::UpdateGauges(bool admitting) {
  int64_t used = 0, saved = 0;
  for (const auto& r : running_) {
    if (!r->cache) continue;
    const int64_t held = r->cache->bytes_used();
    used += held;
    saved += accounting_.KvBytesWithoutVtw(*r) - held;
  }
  const int running = static_cast<int>(running_.size());
  bool idle;
  int waiting;
  {
    std::lock_guard<std::mutex> lock(mu_);
    waiting = static_cast<int>(waiting_.size());
    busy_ = !running_.empty() || admitting;
    idle = waiting_.empty() && !busy_;
  }
  // Metrics first, then the engine's own counters: whoever sees the engine idle (a test, the
  // drain) also sees the released KV and the request counts in /metrics.
  if (metrics_) {
    metrics_->kv_cache_bytes->Set(static_cast<double>(used));
    metrics_->kv_cache_bytes_saved->Set(static_cast<double>(saved));
    metrics_->requests_running->Set(running);
    metrics_->requests_waiting->Set(waiting);
  }
  kv_bytes_used_ = used;
  num_running_ = running;
  num_waiting_ = waiting;
  if (idle) idle_cv_.notify_all();
}

bool Engine::TakeWork(std::vector<std::unique_ptr<Request>>* admitted, Finished* ended) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return stopping_ || !waiting_.empty() || !running_.empty(); });
  if (stopping_) return false;
  const auto now = Clock::now();
  for (auto it = waiting_.begin(); it != waiting_.end();) {
    Status why = EndedByClient(**it, now, "while the request waited");
    if (why.ok()) {
      ++it;
      continue;
    }
    ended->emplace_back(std::move(*it), why);
    it = waiting_.erase(it);
  }
  if (!failed_) {
    std::vector<WaitingView> views;
    for (const auto& r : waiting_) views.push_back({r->kv_reserved});
    const int n =
        NumAdmissible(options_.scheduler, views, kv_reserved_, static_cast<int>(running_.size()));
    for (int i = 0; i < n; ++i) {
      kv_reserved_ += waiting_.front()->kv_reserved;
      admitted->push_back(std::move(waiting_.front()));
      waiting_.pop_front();
    }
  }
  busy_ = !running_.empty() || !admitted->empty();
  return true;
}

void Engine::Loop() {
  while (true) {
    std::vector<std::unique_ptr<Request>> admitted;
    Finished ended;
    if (!TakeWork(&admitted, &ended)) break;
    FinishAll(ended, /*admitting=*/!admitted.empty());
    try {
      Step(admitted);
    } catch (const std::exception& e) {
      const std::string what = e.what();
      spdlog::critical("engine failure: {}", what.substr(0, what.find('\n')));
      failed_ = true;
      for (auto& r : admitted) {
        if (r) running_.push_back(std::move(r));
      }
      FailAll(Internal("the inference engine failed: " + what.substr(0, what.find('\n'))));
      if (on_failure_) on_failure_(what);
    }
    UpdateGauges();
  }
  Status reason;
  {
    std::lock_guard<std::mutex> lock(mu_);
    reason = stop_reason_;
  }
  FailAll(reason);
}

void Engine::EncodeNewImages(std::vector<std::unique_ptr<Request>>& admitted) {
  std::vector<at::Tensor> pixels;
  std::vector<ImageKey> keys;    // images encoded in this batch, in order
  std::vector<Request*> owners;  // requests that take an encoded image (keys may repeat)
  for (auto& r : admitted) {
    if (r->prompt.layout.num_image_tokens == 0) continue;
    if (at::Tensor cached = image_cache_.Find(r->image_key); cached.defined()) {
      r->image_features = cached;
      accounting_.ImageCacheHit();
      continue;
    }
    owners.push_back(r.get());
    if (std::find(keys.begin(), keys.end(), r->image_key) != keys.end()) {
      accounting_.ImageCacheHit();  // the same image twice in one batch
      continue;
    }
    keys.push_back(r->image_key);
    pixels.push_back(r->prompt.pixel_values);
    accounting_.ImageEncoded(*r);
  }
  if (pixels.empty()) return;
  const auto start = Clock::now();
  at::Tensor encoded = model_.EncodeImages(at::cat(pixels, 0));  // [keys, image tokens, Ht]
  accounting_.VisionBatchDone(Seconds(Clock::now() - start));
  for (size_t i = 0; i < keys.size(); ++i) image_cache_.Insert(keys[i], encoded[i]);
  for (Request* r : owners) {
    const size_t i = std::find(keys.begin(), keys.end(), r->image_key) - keys.begin();
    r->image_features = encoded[static_cast<int64_t>(i)];
  }
}

void Engine::StartRequests(std::vector<std::unique_ptr<Request>>& admitted) {
  EncodeNewImages(admitted);
  const int num_layers = model_.num_layers();
  for (auto& r : admitted) {
    const PromptLayout& layout = r->prompt.layout;
    r->prompt.pixel_values = at::Tensor();  // no longer needed
    r->cache = std::make_unique<KvCache>(model_.NewKvCache(
        KvCapacityPerLayer(layout, r->withdraw_layer, num_layers, r->stop.max_new_tokens)));
    r->token_ids = layout.token_ids;
    r->kinds = layout.kinds;
    r->sampler = std::make_unique<Sampler>(r->sampling);
    r->output = std::make_unique<SequenceOutput>(bundle_.tokenizer.get(), r->stop);
    accounting_.RequestStarted(*r);
    running_.push_back(std::move(r));
  }
  admitted.clear();
}

void Engine::ReleaseFinished() {
  running_.erase(std::remove(running_.begin(), running_.end(), nullptr), running_.end());
  std::lock_guard<std::mutex> lock(mu_);
  kv_reserved_ = 0;
  for (const auto& r : running_) kv_reserved_ += r->kv_reserved;
}

void Engine::DropEndedRequests(Finished* finished) {
  const auto now = Clock::now();
  for (auto& r : running_) {
    Status why = EndedByClient(*r, now, "during generation");
    if (!why.ok()) finished->emplace_back(std::move(r), why);
  }
  ReleaseFinished();  // their KV caches are freed now
}

ForwardBatch Engine::BuildBatch(std::vector<size_t>* members) {
  std::vector<RunningView> views;
  for (const auto& r : running_) {
    views.push_back({static_cast<int64_t>(r->token_ids.size()), r->num_computed});
  }
  const StepPlan plan = PlanStep(options_.scheduler, views);
  const auto now = Clock::now();
  ForwardBatch batch;
  std::vector<at::Tensor> images;  // each [image rows of the request in this step, Ht]
  for (size_t i = 0; i < running_.size(); ++i) {
    if (plan.tokens[i] == 0) continue;
    Request& r = *running_[i];
    const int64_t begin = r.num_computed, end = begin + plan.tokens[i];
    const int64_t image_rows = batch.AppendRows(r.token_ids, r.kinds, begin, end);
    if (image_rows > 0) {
      images.push_back(r.image_features.narrow(0, r.image_rows_fed, image_rows));
      r.image_rows_fed += image_rows;
    }
    const bool logits = end == static_cast<int64_t>(r.token_ids.size());
    batch.seqs.push_back({r.cache.get(), static_cast<int>(end - begin), r.withdraw_layer, logits});
    members->push_back(i);
    accounting_.ChunkScheduled(r, begin, end, logits, now);
    r.num_computed = end;
  }
  if (!images.empty()) batch.image_embeds = images.size() == 1 ? images[0] : at::cat(images, 0);
  return batch;
}

void Engine::ConsumeLogits(const ForwardOutput& out, const std::vector<size_t>& members,
                           Finished* finished) {
  const int64_t vocab = model_.config().text.vocab_size;
  const auto now = Clock::now();
  for (size_t row = 0; row < out.logits_seq.size(); ++row) {
    std::unique_ptr<Request>& slot = running_[members[out.logits_seq[row]]];
    Request& r = *slot;
    at::Tensor logits = out.logits[row].contiguous();  // [V] fp32
    const int32_t token = r.sampler->Sample(logits.data_ptr<float>(), vocab);
    const std::string delta = r.output->Append(token);
    accounting_.TokenGenerated(r, now);
    if (r.sink) r.sink->OnDelta(delta, {token});
    if (r.output->finished()) {
      finished->emplace_back(std::move(slot), Status::Ok());
    } else {
      r.token_ids.push_back(token);
      r.kinds.push_back(TokenKind::kText);
    }
  }
}

void Engine::Step(std::vector<std::unique_ptr<Request>>& admitted) {
  StartRequests(admitted);
  Finished finished;  // requests that end in this step
  DropEndedRequests(&finished);
  if (!running_.empty()) {
    std::vector<size_t> members;  // running_ index of each batch sequence
    const ForwardBatch batch = BuildBatch(&members);
    if (options_.fail_after_steps >= 0 && forwards_ >= options_.fail_after_steps) {
      throw std::runtime_error("injected failure after " + std::to_string(forwards_) +
                               " engine steps (VTW_TEST_FAIL_AFTER_STEPS, a test hook)");
    }
    const ForwardOutput out = model_.Forward(batch);
    ++forwards_;
    accounting_.StepDone(batch.num_tokens());
    ConsumeLogits(out, members, &finished);
  }
  ReleaseFinished();
  FinishAll(finished);
}

}  // namespace vtw
