#include "server/intake.h"

#include <spdlog/spdlog.h>

namespace vtw {

void RequestIntake::SetEngine(const ModelBundle* bundle, Engine* engine) {
  std::lock_guard<std::mutex> lock(mu_);
  bundle_ = bundle;
  engine_ = engine;
}

void RequestIntake::ClearEngine() {
  std::lock_guard<std::mutex> lock(mu_);
  bundle_ = nullptr;
  engine_ = nullptr;
}

void RequestIntake::RequireBearerToken(const std::string& token) {
  auth_ = std::make_unique<const BearerTokenAuth>(token);
}

const ModelBundle* RequestIntake::bundle() const {
  std::lock_guard<std::mutex> lock(mu_);
  return bundle_;
}

Status RequestIntake::NotLoaded() {
  return Status(StatusCode::kUnavailable, "the model is not loaded (starting or stopping)");
}

Status RequestIntake::Authenticate(std::string_view authorization, std::string_view peer,
                                   const char* protocol, bool count, const char* message) const {
  if (!auth_ || auth_->CheckHeader(authorization)) return Status::Ok();
  if (count && metrics_) metrics_->CountRequest("UNAUTHENTICATED", protocol);
  spdlog::info("access id=- protocol={} status=UNAUTHENTICATED peer={} error=\"{}\"", protocol,
               peer, message);
  return Status(StatusCode::kUnauthenticated, message);
}

Status RequestIntake::Accept(const RequestSpec& spec, const char* protocol,
                             Clock::time_point deadline, std::shared_ptr<RequestSink> sink,
                             std::shared_ptr<std::atomic<bool>> cancel,
                             std::string* request_id) const {
  const ModelBundle* bundle;
  Engine* engine;
  {
    std::lock_guard<std::mutex> lock(mu_);
    bundle = bundle_;
    engine = engine_;
  }
  Status status;
  if (!bundle || !engine) {
    status = NotLoaded();
  } else {
    StatusOr<std::unique_ptr<Request>> built = BuildRequest(*bundle, spec, limits_);
    if (!built.ok()) {
      status = built.status();
    } else {
      std::unique_ptr<Request> request = std::move(built).value();
      request->protocol = protocol;
      request->deadline = deadline;
      request->sink = std::move(sink);
      request->cancelled = std::move(cancel);
      *request_id = request->id;
      status = engine->Submit(std::move(request));
    }
  }
  return status.ok() ? status : Reject(status, protocol, spec.request_id);
}

Status RequestIntake::Reject(const Status& status, const char* protocol,
                             std::string_view request_id) const {
  if (metrics_) metrics_->CountRequest(StatusCodeName(status.code()), protocol);
  spdlog::info("access id={} protocol={} status={} error=\"{}\"",
               request_id.empty() ? std::string_view("-") : request_id.substr(0, 128), protocol,
               StatusCodeName(status.code()), status.message());
  return status;
}

}  // namespace vtw
