#include "server/engine.h"

#include <algorithm>
#include <stdexcept>

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

namespace vtw {
namespace {

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Largest prefix length of `text` not splitting a UTF-8 character.
size_t Utf8Boundary(const std::string& text, size_t n) {
  while (n > 0 && n < text.size() && (static_cast<unsigned char>(text[n]) & 0xC0) == 0x80) --n;
  return n;
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
      image_cache_(options.image_cache_entries) {
  if (metrics_) {
    metrics_->queue_capacity->Set(options_.max_queue);
    metrics_->kv_cache_capacity_bytes->Set(static_cast<double>(options_.scheduler.kv_cache_bytes));
    metrics_->model_layers->Set(model_.num_layers());
    metrics_->withdrawal_layer->Set(bundle.vtw.default_layer.value_or(model_.num_layers()));
  }
  thread_ = std::thread([this] { Loop(); });
}

Engine::~Engine() { Stop(Status(StatusCode::kUnavailable, "the server is shutting down")); }

int64_t Engine::KvReservation(const Request& r) const {
  const PromptLayout& layout = r.prompt.layout;
  return compute_.KvCacheBytes(layout.num_text_tokens() + r.stop.max_new_tokens,
                               layout.num_image_tokens, r.withdraw_layer);
}

Status Engine::Submit(std::unique_ptr<Request> request) {
  const int64_t need = KvReservation(*request);
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_) return Status(StatusCode::kUnavailable, "the inference engine failed; see logs");
  if (stopping_ || draining_) {
    return Status(StatusCode::kUnavailable, "the server is shutting down; retry on another replica");
  }
  if (need > options_.scheduler.kv_cache_bytes) {
    return ResourceExhausted("the request needs " + std::to_string(need) +
                             " bytes of KV cache, more than the server's budget of " +
                             std::to_string(options_.scheduler.kv_cache_bytes) +
                             ": lower max_new_tokens or use VTW");
  }
  if (static_cast<int>(waiting_.size()) >= options_.max_queue) {
    return ResourceExhausted("the server is at capacity (" + std::to_string(waiting_.size()) +
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
  const auto now = Clock::now();
  RequestSummary& s = r->summary;
  s.total_seconds = Seconds(now - r->arrival);
  if (r->scheduled) s.queue_seconds = Seconds(r->scheduled_at - r->arrival);
  if (r->cache) s.kv_cache_bytes = r->cache->bytes_used();
  s.kv_cache_bytes_without_vtw =
      compute_.KvEntryBytes() * model_.num_layers() * r->num_computed;
  const char* code = StatusCodeName(status.code());
  if (metrics_) {
    metrics_->CountRequest(code);
    metrics_->request_duration->Observe(s.total_seconds);
  }
  spdlog::info(
      "access id={} status={} prompt_tokens={} image_tokens={} completion_tokens={} K={} "
      "vtw={} flops={} flops_saved={} queue_s={:.4f} ttft_s={:.4f} total_s={:.4f}{}",
      r->id, code, s.prompt_tokens, s.image_tokens, s.token_ids.size(), s.withdraw_layer,
      s.vtw_applied, s.flops, s.flops_without_vtw - s.flops, s.queue_seconds, s.ttft_seconds,
      s.total_seconds, status.ok() ? "" : " error=\"" + status.message() + "\"");
  if (r->sink) r->sink->OnDone(status, s);
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

void Engine::UpdateGauges() {
  int64_t used = 0, saved = 0;
  for (const auto& r : running_) {
    if (!r->cache) continue;
    const int64_t held = r->cache->bytes_used();
    used += held;
    saved += compute_.KvEntryBytes() * model_.num_layers() * r->num_computed - held;
  }
  kv_bytes_used_ = used;
  num_running_ = static_cast<int>(running_.size());
  bool idle;
  {
    std::lock_guard<std::mutex> lock(mu_);
    num_waiting_ = static_cast<int>(waiting_.size());
    busy_ = !running_.empty();
    idle = waiting_.empty() && !busy_;
  }
  if (idle) idle_cv_.notify_all();
  if (metrics_) {
    metrics_->kv_cache_bytes->Set(static_cast<double>(used));
    metrics_->kv_cache_bytes_saved->Set(static_cast<double>(saved));
    metrics_->requests_running->Set(num_running_);
    metrics_->requests_waiting->Set(num_waiting_);
  }
}

void Engine::Loop() {
  while (true) {
    std::vector<std::unique_ptr<Request>> admitted, expired;
    std::vector<Status> expired_status;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !waiting_.empty() || !running_.empty(); });
      if (stopping_) break;
      // Cancelled or expired while waiting.
      const auto now = Clock::now();
      for (auto it = waiting_.begin(); it != waiting_.end();) {
        Request& r = **it;
        if (r.cancelled->load() || now >= r.deadline) {
          // The deadline first: when a client's deadline fires, gRPC also cancels the call on
          // the server, so both are usually true by the time the engine looks; the request timed
          // out rather than being abandoned (checked the other way round, tests/overload_test
          // saw most deadline expiries counted as CANCELLED).
          expired_status.push_back(now >= r.deadline
                                       ? Status(StatusCode::kDeadlineExceeded,
                                                "the deadline passed while the request waited")
                                       : Status(StatusCode::kCancelled, "the client cancelled"));
          expired.push_back(std::move(*it));
          it = waiting_.erase(it);
        } else {
          ++it;
        }
      }
      if (!failed_) {
        std::vector<WaitingView> views;
        for (const auto& r : waiting_) views.push_back({r->kv_reserved});
        const int n = NumAdmissible(options_.scheduler, views, kv_reserved_,
                                    static_cast<int>(running_.size()));
        for (int i = 0; i < n; ++i) {
          kv_reserved_ += waiting_.front()->kv_reserved;
          admitted.push_back(std::move(waiting_.front()));
          waiting_.pop_front();
        }
      }
      busy_ = !running_.empty() || !admitted.empty();
    }
    for (size_t i = 0; i < expired.size(); ++i) Finish(std::move(expired[i]), expired_status[i]);
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

void Engine::StartRequests(std::vector<std::unique_ptr<Request>>& admitted) {
  const int num_layers = model_.num_layers();
  // Vision: look up each image, encode the missing ones in one batch.
  std::vector<at::Tensor> pixels;
  std::vector<ImageKey> keys;
  for (auto& r : admitted) {
    if (r->prompt.layout.num_image_tokens == 0) continue;
    at::Tensor cached = image_cache_.Find(r->image_key);
    if (cached.defined()) {
      r->image_features = cached;
      if (metrics_) metrics_->image_cache_hits->Increment();
      continue;
    }
    if (std::find(keys.begin(), keys.end(), r->image_key) == keys.end()) {
      keys.push_back(r->image_key);
      pixels.push_back(r->prompt.pixel_values);
      r->summary.flops += compute_.VisionFlops();
      r->summary.flops_without_vtw += compute_.VisionFlops();
      if (metrics_) {
        metrics_->image_cache_misses->Increment();
        metrics_->flops_vision->Increment(static_cast<double>(compute_.VisionFlops()));
      }
    } else if (metrics_) {
      metrics_->image_cache_hits->Increment();  // same image twice in one batch
    }
  }
  at::Tensor encoded;  // [keys, n_img, Ht]
  if (!pixels.empty()) {
    const auto start = Clock::now();
    encoded = model_.EncodeImages(at::cat(pixels, 0));
    if (metrics_) metrics_->vision_encoder_duration->Observe(Seconds(Clock::now() - start));
    for (size_t i = 0; i < keys.size(); ++i) image_cache_.Insert(keys[i], encoded[i]);
  }
  for (auto& r : admitted) {
    const PromptLayout& layout = r->prompt.layout;
    if (layout.num_image_tokens > 0 && !r->image_features.defined()) {
      const size_t i = std::find(keys.begin(), keys.end(), r->image_key) - keys.begin();
      r->image_features = encoded[static_cast<int64_t>(i)];  // encoded in this batch
    }
    r->prompt.pixel_values = at::Tensor();  // no longer needed
    std::vector<int64_t> capacity(num_layers);
    for (int l = 0; l < num_layers; ++l) {
      capacity[l] = (l < r->withdraw_layer ? layout.size() : layout.num_text_tokens()) +
                    r->stop.max_new_tokens;
    }
    r->cache = std::make_unique<KvCache>(model_.NewKvCache(capacity));
    r->token_ids = layout.token_ids;
    r->kinds = layout.kinds;
    r->sampler = std::make_unique<Sampler>(r->sampling);
    r->detok = std::make_unique<IncrementalDetokenizer>(*bundle_.tokenizer);
    r->summary.prompt_tokens = layout.size();
    r->summary.image_tokens = layout.num_image_tokens;
    r->summary.withdraw_layer = r->withdraw_layer;
    r->summary.vtw_applied = r->withdraw_layer < num_layers && layout.num_image_tokens > 0;
    if (metrics_) {
      metrics_->prompt_tokens->Increment(static_cast<double>(layout.size()));
      metrics_->image_tokens->Increment(static_cast<double>(layout.num_image_tokens));
      if (r->summary.vtw_applied) {
        metrics_->visual_tokens_withdrawn->Increment(static_cast<double>(layout.num_image_tokens));
      }
    }
    running_.push_back(std::move(r));
  }
  admitted.clear();
}

void Engine::EmitDelta(Request& r, std::vector<int32_t> ids, bool final) {
  const std::string& text = r.summary.text;
  size_t end = text.size();
  if (!final) {
    // Hold back what could be the start of a stop string, so it is never streamed.
    size_t holdback = 0;
    for (const std::string& stop : r.stop.stop) {
      if (!stop.empty()) holdback = std::max(holdback, stop.size() - 1);
    }
    end = Utf8Boundary(text, end > holdback ? end - holdback : 0);
  }
  end = std::max(end, r.streamed);
  std::string delta = text.substr(r.streamed, end - r.streamed);
  r.streamed = end;
  if (r.sink) r.sink->OnDelta(delta, ids);
}

void Engine::ReleaseFinished() {
  running_.erase(std::remove(running_.begin(), running_.end(), nullptr), running_.end());
  std::lock_guard<std::mutex> lock(mu_);
  kv_reserved_ = 0;
  for (const auto& r : running_) kv_reserved_ += r->kv_reserved;
}

void Engine::Step(std::vector<std::unique_ptr<Request>>& admitted) {
  StartRequests(admitted);
  // Requests that end in this step; reported after the gauges are updated, so a client that
  // sees its answer also sees its KV cache released in the metrics.
  std::vector<std::pair<std::unique_ptr<Request>, Status>> finished;
  auto report = [&] {
    ReleaseFinished();
    UpdateGauges();
    for (auto& [r, status] : finished) Finish(std::move(r), status);
  };
  // Drop cancelled and expired requests (their KV cache is freed at once).
  const auto now = Clock::now();
  for (auto& r : running_) {
    if (now >= r->deadline) {  // before the cancel flag: see Loop()
      finished.emplace_back(std::move(r), Status(StatusCode::kDeadlineExceeded,
                                                 "the deadline passed during generation"));
    } else if (r->cancelled->load()) {
      finished.emplace_back(std::move(r), Status(StatusCode::kCancelled, "the client cancelled"));
    }
  }
  ReleaseFinished();
  if (running_.empty()) {
    report();
    return;
  }

  std::vector<RunningView> views;
  for (const auto& r : running_) {
    views.push_back({static_cast<int64_t>(r->token_ids.size()), r->num_computed});
  }
  StepPlan plan = PlanStep(options_.scheduler, views);
  ForwardBatch batch;
  std::vector<at::Tensor> images;
  std::vector<size_t> members;  // running_ index of each batch sequence
  for (size_t i = 0; i < running_.size(); ++i) {
    const int64_t n = plan.tokens[i];
    if (n == 0) continue;
    Request& r = *running_[i];
    const int64_t begin = r.num_computed, end = begin + n;
    const int64_t image_rows = batch.AppendRows(r.token_ids, r.kinds, begin, end);
    if (image_rows > 0) {
      images.push_back(r.image_features.narrow(0, r.image_rows_fed, image_rows));
      r.image_rows_fed += image_rows;
    }
    const bool logits = end == static_cast<int64_t>(r.token_ids.size());
    batch.seqs.push_back({r.cache.get(), static_cast<int>(n), r.withdraw_layer, logits});
    members.push_back(i);
    const bool prefill = begin < r.prompt.layout.size();
    const Flops f = compute_.ChunkFlops(r.kinds, begin, end, r.withdraw_layer, logits);
    r.summary.flops += f.flops;
    r.summary.flops_without_vtw += f.flops_without_vtw;
    if (metrics_) {
      (prefill ? metrics_->flops_prefill : metrics_->flops_decode)
          ->Increment(static_cast<double>(f.flops));
      (prefill ? metrics_->flops_saved_prefill : metrics_->flops_saved_decode)
          ->Increment(static_cast<double>(f.saved()));
    }
    if (!r.scheduled) {
      r.scheduled = true;
      r.scheduled_at = Clock::now();
      if (metrics_) metrics_->queue_duration->Observe(Seconds(r.scheduled_at - r.arrival));
    }
    r.num_computed = end;
  }
  if (!images.empty()) batch.image_embeds = images.size() == 1 ? images[0] : at::cat(images, 0);
  if (options_.fail_after_steps >= 0 && forwards_ >= options_.fail_after_steps) {
    throw std::runtime_error("injected failure after " + std::to_string(forwards_) +
                             " engine steps (VTW_TEST_FAIL_AFTER_STEPS, a test hook)");
  }
  ForwardOutput out = model_.Forward(batch);
  ++forwards_;
  if (metrics_) {
    metrics_->engine_steps->Increment();
    metrics_->batch_tokens->Observe(static_cast<double>(plan.total_tokens));
  }
  const int64_t vocab = model_.config().text.vocab_size;
  const auto token_time = Clock::now();
  for (size_t row = 0; row < out.logits_seq.size(); ++row) {
    std::unique_ptr<Request>& slot = running_[members[out.logits_seq[row]]];
    Request& r = *slot;
    at::Tensor logits = out.logits[row].contiguous();
    const int32_t token = r.sampler->Sample(logits.data_ptr<float>(), vocab);
    RequestSummary& s = r.summary;
    s.token_ids.push_back(token);
    if (s.token_ids.size() == 1) {
      s.ttft_seconds = Seconds(token_time - r.arrival);
      if (metrics_) metrics_->time_to_first_token->Observe(s.ttft_seconds);
    } else if (metrics_) {
      metrics_->inter_token_latency->Observe(Seconds(token_time - r.last_token_at));
    }
    r.last_token_at = token_time;
    if (metrics_) metrics_->generated_tokens->Increment();
    const bool eos = token == r.stop.eos_id && !r.stop.ignore_eos;
    if (!eos) s.text += r.detok->Push(token);
    size_t visible = std::string::npos;
    FinishReason reason =
        StopChecker(r.stop).Check(token, static_cast<int>(s.token_ids.size()), s.text, &visible);
    if (reason == FinishReason::kNone) {
      r.token_ids.push_back(token);
      r.kinds.push_back(TokenKind::kText);
      EmitDelta(r, {token}, false);
      continue;
    }
    if (reason == FinishReason::kStop) {
      s.text.resize(visible);
    } else {
      s.text += r.detok->Flush();
    }
    s.finish_reason = reason;
    EmitDelta(r, {token}, true);
    finished.emplace_back(std::move(slot), Status::Ok());
  }
  report();
}

}  // namespace vtw
