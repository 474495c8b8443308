// TestServer: the real gRPC server (service + engine + health + reflection) in-process on a
// loopback port, for integration tests with real gRPC clients.
#pragma once

#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "server/engine.h"
#include "server/metrics.h"
#include "server/metrics_http.h"
#include "server/intake.h"
#include "server/service.h"
#include "tests/util/test_bundles.h"
#include "vtw/v1/inference.grpc.pb.h"

namespace vtw::testing {

class TestServer {
 public:
  TestServer(std::unique_ptr<ModelBundle> bundle, EngineOptions engine = {},
             ServiceLimits limits = {});
  ~TestServer();

  std::unique_ptr<v1::InferenceService::Stub> Stub() const;
  std::shared_ptr<grpc::Channel> channel() const { return channel_; }
  Engine& engine() { return *engine_; }
  ServerMetrics& metrics() { return metrics_; }
  ModelBundle& bundle() { return *bundle_; }
  grpc::Server& server() { return *server_; }
  int metrics_port() const { return metrics_http_.port(); }
  // Health of the overall server ("" service) as the health service answers it.
  std::string HealthStatus() const;

 private:
  std::unique_ptr<ModelBundle> bundle_;
  ServerMetrics metrics_;
  MetricsHttpServer metrics_http_;
  std::unique_ptr<RequestIntake> intake_;
  std::unique_ptr<InferenceServiceImpl> service_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
};

// GET http://127.0.0.1:port/metrics (body only; empty on failure).
std::string ScrapeMetrics(int port);
// GET http://127.0.0.1:port<path> over HTTP/1.0 (no chunked replies); body only, "" on failure.
std::string HttpGet(int port, const std::string& path);
// The value of one sample line `name{labels}` in Prometheus text, or -1 when absent.
double MetricValue(const std::string& text, const std::string& series);

}  // namespace vtw::testing
