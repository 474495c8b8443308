#include "server/metrics.h"

#include "model/status.h"

namespace vtw {
namespace {

using prometheus::Histogram;

Histogram::BucketBoundaries LatencyBuckets() {
  return {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
}

}  // namespace

ServerMetrics::ServerMetrics() : registry_(std::make_shared<prometheus::Registry>()) {
  auto& r = *registry_;
  auto histogram = [&](const char* name, const char* help, Histogram::BucketBoundaries b) {
    return &prometheus::BuildHistogram().Name(name).Help(help).Register(r).Add({}, std::move(b));
  };
  auto counter = [&](const char* name, const char* help) {
    return &prometheus::BuildCounter().Name(name).Help(help).Register(r).Add({});
  };
  auto gauge = [&](const char* name, const char* help) {
    return &prometheus::BuildGauge().Name(name).Help(help).Register(r).Add({});
  };
  requests_total_ = &prometheus::BuildCounter()
                         .Name("vtw_requests_total")
                         .Help("Finished requests by gRPC status code name and protocol")
                         .Register(r);
  for (const char* protocol : kProtocols) {  // every code pre-created at 0
    for (int code = 0; code < kNumStatusCodes; ++code) {
      requests_total_->Add(
          {{"code", StatusCodeName(static_cast<StatusCode>(code))}, {"protocol", protocol}});
    }
  }
  request_duration = histogram("vtw_request_duration_seconds",
                               "Time from acceptance to the terminal status", LatencyBuckets());
  queue_duration = histogram("vtw_queue_duration_seconds",
                             "Time from acceptance to the first engine step", LatencyBuckets());
  time_to_first_token = histogram("vtw_time_to_first_token_seconds",
                                  "Time from acceptance to the first generated token",
                                  LatencyBuckets());
  inter_token_latency = histogram("vtw_inter_token_latency_seconds",
                                  "Time between consecutive generated tokens of a request",
                                  {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5});
  batch_tokens = histogram("vtw_batch_tokens", "Tokens (rows) per engine step",
                           {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048});
  vision_encoder_duration = histogram("vtw_vision_encoder_duration_seconds",
                                      "Time to encode one batch of new images", LatencyBuckets());
  prompt_tokens = counter("vtw_prompt_tokens_total", "Prompt tokens (image tokens included)");
  image_tokens = counter("vtw_image_tokens_total", "Image tokens in prompts");
  generated_tokens = counter("vtw_generated_tokens_total", "Generated tokens");
  visual_tokens_withdrawn = counter("vtw_visual_tokens_withdrawn_total",
                                    "Image tokens withdrawn by VTW (once per request)");
  image_cache_hits = counter("vtw_image_cache_hits_total", "Images found in the feature cache");
  image_cache_misses = counter("vtw_image_cache_misses_total", "Images that had to be encoded");
  engine_steps = counter("vtw_engine_steps_total", "Engine steps (model forward passes)");
  auto& flops = prometheus::BuildCounter()
                    .Name("vtw_flops_total")
                    .Help("Floating-point operations done, by phase")
                    .Register(r);
  auto& saved = prometheus::BuildCounter()
                    .Name("vtw_flops_saved_total")
                    .Help("Floating-point operations avoided by VTW, by phase")
                    .Register(r);
  flops_prefill = &flops.Add({{"phase", "prefill"}});
  flops_decode = &flops.Add({{"phase", "decode"}});
  flops_vision = &flops.Add({{"phase", "vision"}});
  flops_saved_prefill = &saved.Add({{"phase", "prefill"}});
  flops_saved_decode = &saved.Add({{"phase", "decode"}});
  flops_saved_vision = &saved.Add({{"phase", "vision"}});
  requests_running = gauge("vtw_requests_running", "Requests in the running batch");
  requests_waiting = gauge("vtw_requests_waiting", "Requests waiting for admission");
  queue_capacity = gauge("vtw_queue_capacity", "Capacity of the waiting queue");
  kv_cache_bytes = gauge("vtw_kv_cache_bytes", "KV-cache bytes held by running requests");
  kv_cache_capacity_bytes =
      gauge("vtw_kv_cache_capacity_bytes", "KV-cache budget for running requests");
  kv_cache_bytes_saved = gauge("vtw_kv_cache_bytes_saved",
                               "KV-cache bytes not held right now thanks to VTW");
  withdrawal_layer = gauge("vtw_withdrawal_layer",
                           "Default withdrawal layer K (equals vtw_model_layers when off)");
  model_layers = gauge("vtw_model_layers", "Decoder layers of the served model");
}

void ServerMetrics::CountRequest(const std::string& code, const std::string& protocol) {
  requests_total_->Add({{"code", code}, {"protocol", protocol}}).Increment();
}

}  // namespace vtw
