// MetricsHttpServer: serves GET /metrics (Prometheus text format 0.0.4) from a prometheus-cpp
// registry on one small thread with plain sockets. (prometheus-cpp's civetweb exposer cannot
// start its threads in a process that has LibTorch loaded, so we serve the text ourselves.)
// Thread-safe; Start once, Stop (or the destructor) joins.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include <prometheus/registry.h>

#include "model/status.h"

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
  void Serve();
  void Handle(int fd);

  std::shared_ptr<prometheus::Registry> registry_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace vtw
