// ServerMetrics: every Prometheus metric of vtw-serve (prometheus-cpp), in base units. The metric
// names are a public contract (README, deploy/prometheus, deploy/grafana); MetricsHttpServer
// (server/metrics_http.h) serves them. prometheus-cpp metrics are thread-safe: the engine thread
// and the network threads update them concurrently.
#pragma once

#include <memory>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace vtw {

// The `protocol` label values: requests over gRPC (vtw.v1) and over HTTP (/v1/chat/completions).
inline constexpr const char* kProtocolGrpc = "grpc";
inline constexpr const char* kProtocolHttp = "http";
inline constexpr const char* kProtocols[] = {kProtocolGrpc, kProtocolHttp};

class ServerMetrics {
 public:
  ServerMetrics();
  ServerMetrics(const ServerMetrics&) = delete;
  ServerMetrics& operator=(const ServerMetrics&) = delete;

  const std::shared_ptr<prometheus::Registry>& registry() const { return registry_; }

  // Counts a finished request by its status code name ("OK", "INVALID_ARGUMENT", ...; the
  // gRPC names also for HTTP requests) and protocol (kProtocols).
  void CountRequest(const std::string& code, const std::string& protocol);

  prometheus::Histogram* request_duration;
  prometheus::Histogram* queue_duration;
  prometheus::Histogram* time_to_first_token;
  prometheus::Histogram* inter_token_latency;
  prometheus::Histogram* batch_tokens;
  prometheus::Histogram* vision_encoder_duration;
  prometheus::Counter* prompt_tokens;
  prometheus::Counter* image_tokens;
  prometheus::Counter* generated_tokens;
  prometheus::Counter* visual_tokens_withdrawn;
  prometheus::Counter* image_cache_hits;
  prometheus::Counter* image_cache_misses;
  prometheus::Counter* engine_steps;
  prometheus::Counter* flops_prefill;
  prometheus::Counter* flops_decode;
  prometheus::Counter* flops_vision;
  prometheus::Counter* flops_saved_prefill;
  prometheus::Counter* flops_saved_decode;
  prometheus::Counter* flops_saved_vision;
  prometheus::Gauge* requests_running;
  prometheus::Gauge* requests_waiting;
  prometheus::Gauge* queue_capacity;
  prometheus::Gauge* kv_cache_bytes;
  prometheus::Gauge* kv_cache_capacity_bytes;
  prometheus::Gauge* kv_cache_bytes_saved;
  prometheus::Gauge* withdrawal_layer;
  prometheus::Gauge* model_layers;

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* requests_total_;
};

}  // namespace vtw
