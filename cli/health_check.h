// grpc.health.v1.Health/Check from the client side, without generated health code: the build
// has no health.proto, and the two messages are one field each, so they are encoded by hand and
// sent over a generic stub. Used by `vtw client --health` and the tests' server harness.
// Thread-safe (no shared state).
#pragma once

#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "model/status.h"

namespace vtw::tools {

// grpc.health.v1.HealthCheckResponse.ServingStatus.
enum class ServingStatus { kUnknown = 0, kServing = 1, kNotServing = 2, kServiceUnknown = 3 };

// "SERVING", "NOT_SERVING", "UNKNOWN", "SERVICE_UNKNOWN".
const char* ServingStatusName(ServingStatus status);

// Calls Health/Check for `service` ("" = the whole server) on `channel` with a deadline of
// `timeout_seconds`. On an OK RPC stores the answer in *status; otherwise returns the RPC's
// status (UNAVAILABLE when nothing listens, NOT_FOUND for a service the server does not know).
grpc::Status CheckHealth(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                         double timeout_seconds, ServingStatus* status);

// "OK", "CANCELLED", ..., "UNAUTHENTICATED": the canonical name of a gRPC status code
// (model/status.h's table).
const char* GrpcCodeName(grpc::StatusCode code);

}  // namespace vtw::tools
