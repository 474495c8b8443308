#include "cli/health_check.h"

#include <chrono>
#include <future>
#include <vector>

#include <grpcpp/generic/generic_stub.h>

namespace vtw::tools {
namespace {

constexpr char kCheckMethod[] = "/grpc.health.v1.Health/Check";

// HealthCheckRequest { string service = 1; }
std::string EncodeRequest(const std::string& service) {
  std::string out;
  if (service.empty()) return out;  // proto3: the default value is not written
  out.push_back(0x0a);              // field 1, length-delimited
  for (uint64_t n = service.size();; n >>= 7) {
    if (n < 0x80) {
      out.push_back(static_cast<char>(n));
      break;
    }
    out.push_back(static_cast<char>((n & 0x7f) | 0x80));
  }
  return out + service;
}

bool ReadVarint(const std::string& in, size_t* pos, uint64_t* value) {
  *value = 0;
  for (int shift = 0; shift < 64 && *pos < in.size(); shift += 7) {
    const uint8_t byte = static_cast<uint8_t>(in[(*pos)++]);
    *value |= static_cast<uint64_t>(byte & 0x7f) << shift;
    if (!(byte & 0x80)) return true;
  }
  return false;
}

// HealthCheckResponse { ServingStatus status = 1; }; unknown fields are skipped.
bool DecodeResponse(const std::string& in, ServingStatus* status) {
  *status = ServingStatus::kUnknown;
  size_t pos = 0;
  while (pos < in.size()) {
    uint64_t key = 0, value = 0;
    if (!ReadVarint(in, &pos, &key)) return false;
    switch (key & 7) {
      case 0:  // varint
        if (!ReadVarint(in, &pos, &value)) return false;
        if ((key >> 3) == 1) *status = static_cast<ServingStatus>(value);
        break;
      case 1: pos += 8; break;
      case 2:
        if (!ReadVarint(in, &pos, &value)) return false;
        pos += value;
        break;
      case 5: pos += 4; break;
      default: return false;
    }
  }
  return pos == in.size();
}

}  // namespace

const char* ServingStatusName(ServingStatus status) {
  switch (status) {
    case ServingStatus::kUnknown: return "UNKNOWN";
    case ServingStatus::kServing: return "SERVING";
    case ServingStatus::kNotServing: return "NOT_SERVING";
    case ServingStatus::kServiceUnknown: return "SERVICE_UNKNOWN";
  }
  return "UNKNOWN";
}

grpc::Status CheckHealth(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                         double timeout_seconds, ServingStatus* status) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::duration_cast<std::chrono::system_clock::duration>(
                           std::chrono::duration<double>(timeout_seconds)));
  const std::string request_bytes = EncodeRequest(service);
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&context, kCheckMethod, grpc::StubOptions(), &request, &response,
                 [&done](grpc::Status s) { done.set_value(std::move(s)); });
  grpc::Status rpc_status = done.get_future().get();
  if (!rpc_status.ok()) return rpc_status;
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return {grpc::StatusCode::INTERNAL, "unreadable response"};
  std::string bytes;
  for (const grpc::Slice& s : slices) {
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  if (!DecodeResponse(bytes, status)) {
    return {grpc::StatusCode::INTERNAL, "malformed grpc.health.v1.HealthCheckResponse"};
  }
  return grpc::Status::OK;
}

const char* GrpcCodeName(grpc::StatusCode code) {
  return StatusCodeName(static_cast<StatusCode>(code));  // the same numbers
}

}  // namespace vtw::tools
