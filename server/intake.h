// RequestIntake: the door every protocol's requests come through, so that gRPC
// (server/service.h) and HTTP (server/openai_http.h) apply the same rules: the bearer token,
// whether the engine is there (model loaded, not shutting down), validation
// (server/validation.h), submission to the engine (queue limits, KV budget, draining), and the
// counting and access-log line of every request refused at the door. Accepted requests are
// counted and logged by the engine when they end. Thread-safe.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "server/engine.h"
#include "server/metrics.h"
#include "server/security.h"
#include "server/validation.h"

namespace vtw {

class RequestIntake {
 public:
  RequestIntake(ServiceLimits limits, ServerMetrics* metrics) : limits_(limits), metrics_(metrics) {}
  RequestIntake(const RequestIntake&) = delete;
  RequestIntake& operator=(const RequestIntake&) = delete;

  // Requests are accepted from now on (after the model has loaded). Both must outlive them.
  void SetEngine(const ModelBundle* bundle, Engine* engine);
  // Requests from now on get UNAVAILABLE (at shutdown, before the engine is destroyed).
  void ClearEngine();
  // Every request must carry `Bearer <token>`. Call before serving.
  void RequireBearerToken(const std::string& token);
  bool token_required() const { return auth_ != nullptr; }

  // OK when no token is required or `authorization` (the header or metadata value, "" when
  // absent) carries it; otherwise UNAUTHENTICATED with `message`, logged with `peer`, and
  // counted in vtw_requests_total under `protocol` when `count`.
  Status Authenticate(std::string_view authorization, std::string_view peer, const char* protocol,
                      bool count, const char* message) const;

  // Validates `spec` and submits it with `deadline`, `sink` and `cancel`. OK: accepted, the sink
  // gets exactly one OnDone, *request_id is set. Otherwise nothing was accepted: the status
  // (UNAVAILABLE before the model loads or after shutdown; validation and Engine::Submit
  // errors), counted and logged here.
  Status Accept(const RequestSpec& spec, const char* protocol, Clock::time_point deadline,
                std::shared_ptr<RequestSink> sink, std::shared_ptr<std::atomic<bool>> cancel,
                std::string* request_id) const;

  // Counts and logs a request refused before it reached Accept (its wire form could not be
  // read); returns `status`.
  Status Reject(const Status& status, const char* protocol, std::string_view request_id) const;

  // The served model while it is loaded, else null.
  const ModelBundle* bundle() const;
  // What a request gets while bundle() is null.
  static Status NotLoaded();
  const ServiceLimits& limits() const { return limits_; }
  ServerMetrics* metrics() const { return metrics_; }

 private:
  const ServiceLimits limits_;
  ServerMetrics* const metrics_;
  std::unique_ptr<const BearerTokenAuth> auth_;  // set before serving, then read-only
  mutable std::mutex mu_;
  const ModelBundle* bundle_ = nullptr;  // guarded by mu_
  Engine* engine_ = nullptr;             // guarded by mu_
};

}  // namespace vtw
