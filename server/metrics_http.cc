#include "server/metrics_http.h"

#include <httplib.h>
#include <prometheus/text_serializer.h>

#include "server/http_util.h"

namespace vtw {

MetricsHttpServer::MetricsHttpServer(std::shared_ptr<prometheus::Registry> registry)
    : registry_(std::move(registry)), server_(std::make_unique<httplib::Server>()) {
  server_->new_task_queue = [] { return new httplib::ThreadPool(2); };
  server_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(prometheus::TextSerializer().Serialize(registry_->Collect()),
                    "text/plain; version=0.0.4; charset=utf-8");
  });
  server_->set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    if (res.status == 404 && req.method != "GET" && req.method != "HEAD") res.status = 405;
    res.set_content(res.status == 405 ? "only GET is supported\n" : "metrics are at /metrics\n",
                    "text/plain; charset=utf-8");
    return httplib::Server::HandlerResponse::Handled;
  }));
}

MetricsHttpServer::~MetricsHttpServer() { Stop(); }

Status MetricsHttpServer::Start(const std::string& address) {
  return BindAndServe(*server_, "--metrics-listen", address, &thread_, &port_);
}

void MetricsHttpServer::Stop() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace vtw
