// OpenAiHttpServer: the OpenAI-compatible HTTP front door, on cpp-httplib (Debian's
// libcpp-httplib-dev: a maintained, header-declared HTTP/1.1 server with TLS through OpenSSL,
// a thread pool, chunked responses and body limits; chosen over Boost.Beast (far more code for
// the same routes) and civetweb (prometheus-cpp's exposer, which could not start its threads in a
// process that has LibTorch loaded)).
//
//   POST /v1/chat/completions  OpenAI chat format (server/openai_api.h); "stream": true answers
//                              with Server-Sent Events: a role chunk, one chunk per text delta,
//                              a final chunk with finish_reason, usage and vtw, then [DONE].
//   GET  /v1/models            the served model (its config name is the "model" clients send).
//   GET  /health               200 {"status": "SERVING"} while the engine accepts requests,
//                              503 otherwise (loading, draining, failed). No auth.
//
// Requests go through the same RequestIntake as gRPC (auth, validation, queue, KV budget,
// drain, metrics with protocol="http", access log). Each request waits on its own pool thread
// (--http-threads); while it waits, the connection is watched, and a client that disconnects
// cancels its request (the engine drops it and frees its KV cache within a step). Errors are
// OpenAI-shaped JSON with the HTTP status of HttpStatusFor. Thread-safe; Start once, Stop joins.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "model/status.h"
#include "server/intake.h"
#include "server/security.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace vtw {

struct HttpServerOptions {
  std::string listen = "0.0.0.0:8080";  // host:port; port 0 picks a free one
  int threads = 128;                     // requests served at once (each waits on its thread)
  double request_timeout_seconds = 300;  // deadline of a request without "vtw_timeout"
  size_t max_body_bytes = 24 << 20;      // 413 above
  ServerTlsFiles tls;                    // HTTPS (and client certificates) when enabled()
};

class OpenAiHttpServer {
 public:
  // `intake` must outlive the server. Start it before the model loads: until the intake has an
  // engine, requests get 503 and /health says NOT_SERVING.
  OpenAiHttpServer(const RequestIntake& intake, HttpServerOptions options);
  ~OpenAiHttpServer();
  OpenAiHttpServer(const OpenAiHttpServer&) = delete;
  OpenAiHttpServer& operator=(const OpenAiHttpServer&) = delete;

  // Binds options.listen and starts serving on a background thread. UNAVAILABLE when the
  // address cannot be bound; INVALID_ARGUMENT for a bad address or unusable TLS files.
  Status Start();
  // Stops accepting, ends keep-alive connections and joins. Requests still waiting should be
  // finished first (the engine stopped): their threads return once their sinks are done.
  void Stop();
  // /health answers SERVING only while set (and the intake has an engine).
  void SetServing(bool serving) { serving_ = serving; }
  int port() const { return port_; }

 private:
  void Routes();
  void ChatCompletion(const httplib::Request& req, httplib::Response& res);
  // The served model's name; UNAVAILABLE while no model is loaded.
  StatusOr<std::string> ServedModel() const;

  const RequestIntake& intake_;
  const HttpServerOptions options_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
  std::atomic<bool> serving_{false};
};

}  // namespace vtw
