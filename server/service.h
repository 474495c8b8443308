// InferenceService: the gRPC callback service (vtw.v1.InferenceService). Each call gets one
// reactor object that owns its state; reactors validate and enqueue on the gRPC thread and write
// what the engine reports; they never run inference and never block on it. Until SetEngine is
// called (model loading) and after the engine is gone, calls get UNAVAILABLE. With a bearer
// token (RequireBearerToken) every call of the service must carry it, or gets UNAUTHENTICATED
// before anything else is looked at; grpc.health.v1 and reflection are other services and stay
// open.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>

#include <grpcpp/grpcpp.h>

#include "server/engine.h"
#include "server/metrics.h"
#include "server/security.h"
#include "server/validation.h"
#include "vtw/v1/inference.grpc.pb.h"

namespace vtw {

class InferenceServiceImpl final : public v1::InferenceService::CallbackService {
 public:
  InferenceServiceImpl(ServiceLimits limits, ServerMetrics* metrics)
      : limits_(limits), metrics_(metrics) {}

  // Makes the service live (after the model has loaded). Both must outlive the service's calls.
  void SetEngine(const ModelBundle* bundle, Engine* engine);
  // Calls from now on get UNAVAILABLE (used at shutdown before the engine is destroyed).
  void ClearEngine();
  // Every call must carry `authorization: Bearer <token>`. Call before the server starts.
  void RequireBearerToken(const std::string& token);

  // OK when no token is required or the call carries it; otherwise UNAUTHENTICATED with
  // kUnauthenticatedMessage, logged, and counted in vtw_requests_total when `count` (the
  // generation calls, which that counter is about).
  grpc::Status Authenticate(const grpc::CallbackServerContext* context, bool count);

  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* context,
                                     const v1::GenerateRequest* request,
                                     v1::GenerateResponse* response) override;
  grpc::ServerWriteReactor<v1::GenerateStreamResponse>* GenerateStream(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;

  // Validates and submits; on failure returns the status (nothing was accepted). Shared by the
  // unary and streaming reactors.
  Status Accept(grpc::CallbackServerContext* context, const v1::GenerateRequest& wire,
                std::shared_ptr<RequestSink> sink, std::shared_ptr<std::atomic<bool>> cancel,
                std::string* request_id);

  // Fills the final fields of a response message from a summary.
  template <typename Message>
  static void FillFinal(const RequestSummary& s, Message* m);

 private:
  ServiceLimits limits_;
  ServerMetrics* metrics_;
  std::unique_ptr<const BearerTokenAuth> auth_;  // set before the server starts, then read-only
  std::mutex mu_;
  const ModelBundle* bundle_ = nullptr;  // guarded by mu_
  Engine* engine_ = nullptr;             // guarded by mu_
};

}  // namespace vtw
