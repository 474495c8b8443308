// MetricsHttpServer: serves GET /metrics (Prometheus text format 0.0.4) from a prometheus-cpp
// registry, on cpp-httplib (server/http_util.h) with two threads. (prometheus-cpp's civetweb
// exposer cannot start its threads in a process that has LibTorch loaded.) Other paths get 404,
// other methods 405. Thread-safe; Start once, Stop (or the destructor) joins.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include <prometheus/registry.h>

#include "model/status.h"

namespace httplib {
class Server;
}

namespace vtw {

class MetricsHttpServer {
 public:
  explicit MetricsHttpServer(std::shared_ptr<prometheus::Registry> registry);
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // Binds `address` ("host:port"; port 0 picks a free one) and starts serving.
  Status Start(const std::string& address);
  void Stop();
  int port() const { return port_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace vtw
