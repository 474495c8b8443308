#include "server/accounting.h"

#include <spdlog/spdlog.h>

#include "vtw/withdrawal.h"

namespace vtw {
namespace {

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

void Add(prometheus::Counter* counter, int64_t value) {
  counter->Increment(static_cast<double>(value));
}

}  // namespace

Accounting::Accounting(const ComputeModel& compute, ServerMetrics* metrics)
    : compute_(compute), metrics_(metrics) {}

void Accounting::ImageEncoded(Request& r) {
  const int64_t flops = compute_.VisionFlops();
  r.summary.flops += flops;
  r.summary.flops_without_vtw += flops;
  if (!metrics_) return;
  metrics_->image_cache_misses->Increment();
  Add(metrics_->flops_vision, flops);
}

void Accounting::ImageCacheHit() {
  if (metrics_) metrics_->image_cache_hits->Increment();
}

void Accounting::VisionBatchDone(double seconds) {
  if (metrics_) metrics_->vision_encoder_duration->Observe(seconds);
}

void Accounting::RequestStarted(Request& r) {
  const PromptLayout& layout = r.prompt.layout;
  RequestSummary& s = r.summary;
  s.prompt_tokens = layout.size();
  s.image_tokens = layout.num_image_tokens;
  s.withdraw_layer = r.withdraw_layer;
  s.vtw_applied = WithdrawsImage(r.withdraw_layer, compute_.num_layers(), layout.num_image_tokens);
  if (!metrics_) return;
  Add(metrics_->prompt_tokens, layout.size());
  Add(metrics_->image_tokens, layout.num_image_tokens);
  if (s.vtw_applied) Add(metrics_->visual_tokens_withdrawn, layout.num_image_tokens);
}

void Accounting::ChunkScheduled(Request& r, int64_t begin, int64_t end, bool logits,
                                Clock::time_point now) {
  const Flops f = compute_.ChunkFlops(r.kinds, begin, end, r.withdraw_layer, logits);
  r.summary.flops += f.flops;
  r.summary.flops_without_vtw += f.flops_without_vtw;
  const bool first = !r.scheduled;
  if (first) {
    r.scheduled = true;
    r.scheduled_at = now;
  }
  if (!metrics_) return;
  if (first) metrics_->queue_duration->Observe(Seconds(r.scheduled_at - r.arrival));
  const bool prefill = begin < r.prompt.layout.size();
  Add(prefill ? metrics_->flops_prefill : metrics_->flops_decode, f.flops);
  Add(prefill ? metrics_->flops_saved_prefill : metrics_->flops_saved_decode, f.saved());
}

void Accounting::StepDone(int64_t rows) {
  if (!metrics_) return;
  metrics_->engine_steps->Increment();
  metrics_->batch_tokens->Observe(static_cast<double>(rows));
}

void Accounting::TokenGenerated(Request& r, Clock::time_point now) {
  if (r.output->token_ids().size() == 1) {
    r.summary.ttft_seconds = Seconds(now - r.arrival);
    if (metrics_) metrics_->time_to_first_token->Observe(r.summary.ttft_seconds);
  } else if (metrics_) {
    metrics_->inter_token_latency->Observe(Seconds(now - r.last_token_at));
  }
  r.last_token_at = now;
  if (metrics_) metrics_->generated_tokens->Increment();
}

int64_t Accounting::KvBytesWithoutVtw(const Request& r) const {
  return compute_.KvCacheBytes(r.num_computed - r.image_rows_fed, r.image_rows_fed,
                               WithdrawalOff(compute_.num_layers()));
}

void Accounting::RequestFinished(Request& r, const Status& status, Clock::time_point now) {
  RequestSummary& s = r.summary;
  if (r.output) {
    s.text = r.output->text();
    s.token_ids = r.output->token_ids();
    s.finish_reason = r.output->finish_reason();
  }
  s.total_seconds = Seconds(now - r.arrival);
  if (r.scheduled) s.queue_seconds = Seconds(r.scheduled_at - r.arrival);
  if (r.cache) s.kv_cache_bytes = r.cache->bytes_used();
  s.kv_cache_bytes_without_vtw = KvBytesWithoutVtw(r);
  const char* code = StatusCodeName(status.code());
  if (metrics_) {
    metrics_->CountRequest(code, r.protocol);
    metrics_->request_duration->Observe(s.total_seconds);
  }
  spdlog::info(
      "access id={} protocol={} status={} prompt_tokens={} image_tokens={} completion_tokens={} K={} "
      "vtw={} flops={} flops_saved={} queue_s={:.4f} ttft_s={:.4f} total_s={:.4f}{}",
      r.id, r.protocol, code, s.prompt_tokens, s.image_tokens, s.token_ids.size(), s.withdraw_layer,
      s.vtw_applied, s.flops, s.flops_without_vtw - s.flops, s.queue_seconds, s.ttft_seconds,
      s.total_seconds, status.ok() ? "" : " error=\"" + status.message() + "\"");
}

}  // namespace vtw
