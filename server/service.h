// InferenceService: the gRPC callback service (vtw.v1.InferenceService). Each call gets one
// reactor object that owns its state; reactors validate and enqueue on the gRPC thread (through
// the RequestIntake that the HTTP front shares) and write what the engine reports; they never
// run inference and never block on it. Until the intake has an engine (model loading) and after
// it is gone, calls get UNAVAILABLE. With a bearer token every call of the service must carry
// it, or gets UNAUTHENTICATED before anything else is looked at; grpc.health.v1 and reflection
// are other services and stay open.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>

#include <grpcpp/grpcpp.h>

#include "server/intake.h"
#include "server/security.h"
#include "server/validation.h"
#include "vtw/v1/inference.grpc.pb.h"

namespace vtw {

// vtw::Status -> grpc::Status: the one place (same code numbers; DATA_LOSS from model files
// becomes INTERNAL).
grpc::Status ToGrpcStatus(const Status& status);

// The protocol-neutral form of a wire request (server/validation.h); InvalidArgument for an
// unknown vtw.mode.
StatusOr<RequestSpec> SpecFromWire(const v1::GenerateRequest& wire);

class InferenceServiceImpl final : public v1::InferenceService::CallbackService {
 public:
  // `intake` (shared with the HTTP front) must outlive the service's calls.
  explicit InferenceServiceImpl(const RequestIntake& intake) : intake_(intake) {}

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

  // Validates and submits through the intake; on failure returns the status (nothing was
  // accepted). Shared by the unary and streaming reactors.
  Status Accept(grpc::CallbackServerContext* context, const v1::GenerateRequest& wire,
                std::shared_ptr<RequestSink> sink, std::shared_ptr<std::atomic<bool>> cancel,
                std::string* request_id);

  // Fills the final fields of a response message from a summary.
  template <typename Message>
  static void FillFinal(const RequestSummary& s, Message* m);

 private:
  const RequestIntake& intake_;
};

}  // namespace vtw
