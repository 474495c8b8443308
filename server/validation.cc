#include "server/validation.h"

#include <atomic>
#include <cmath>
#include <random>

#include "vtw/withdrawal.h"

namespace vtw {
namespace {

std::string NewRequestId() {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t salt = std::random_device{}();
  char buf[40];
  std::snprintf(buf, sizeof(buf), "req-%08llx-%llu", static_cast<unsigned long long>(salt & 0xffffffff),
                static_cast<unsigned long long>(++counter));
  return buf;
}

}  // namespace

StatusOr<std::unique_ptr<Request>> BuildRequest(const ModelBundle& bundle,
                                                const v1::GenerateRequest& wire,
                                                const ServiceLimits& limits) {
  const LlavaModel& model = *bundle.model;
  const int num_layers = model.num_layers();
  if (wire.prompt().empty()) return InvalidArgument("prompt is empty: send a question");
  if (wire.prompt().size() > limits.max_prompt_bytes) {
    return InvalidArgument("prompt is " + std::to_string(wire.prompt().size()) +
                           " bytes, over the limit of " + std::to_string(limits.max_prompt_bytes));
  }
  const v1::SamplingParams& sp = wire.sampling();
  int max_new_tokens = limits.default_max_new_tokens;
  if (sp.has_max_new_tokens()) {
    if (sp.max_new_tokens() == 0 ||
        sp.max_new_tokens() > static_cast<uint32_t>(limits.max_new_tokens_limit)) {
      return InvalidArgument("sampling.max_new_tokens must be in [1, " +
                             std::to_string(limits.max_new_tokens_limit) + "], got " +
                             std::to_string(sp.max_new_tokens()));
    }
    max_new_tokens = static_cast<int>(sp.max_new_tokens());
  }
  SamplingParams sampling;
  sampling.temperature = sp.temperature();
  sampling.top_k = static_cast<int>(std::min<uint32_t>(sp.top_k(), 1u << 30));
  sampling.top_p = sp.has_top_p() ? sp.top_p() : 1.0f;
  sampling.seed = sp.seed();
  Status st = ValidateSamplingParams(sampling);
  if (!st.ok()) return InvalidArgument("sampling: " + st.message());
  for (const std::string& s : sp.stop()) {
    if (s.empty() || s.size() > 256) {
      return InvalidArgument("sampling.stop strings must be 1..256 bytes long");
    }
  }
  if (sp.stop_size() > 16) return InvalidArgument("at most 16 sampling.stop strings");

  VtwMode mode = VtwMode::kDefault;
  switch (wire.vtw().mode()) {
    case v1::VTW_MODE_DEFAULT: mode = VtwMode::kDefault; break;
    case v1::VTW_MODE_OFF: mode = VtwMode::kOff; break;
    case v1::VTW_MODE_LAYER: mode = VtwMode::kLayer; break;
    case v1::VTW_MODE_PROFILE: mode = VtwMode::kProfile; break;
    default: return InvalidArgument("unknown vtw.mode " + std::to_string(wire.vtw().mode()));
  }
  VTW_ASSIGN_OR_RETURN(
      int k, ResolveWithdrawLayer(bundle.vtw, num_layers, mode,
                                  static_cast<int>(std::min<uint32_t>(wire.vtw().layer(), 1 << 20)),
                                  wire.vtw().profile()));

  auto request = std::make_unique<Request>();
  VTW_ASSIGN_OR_RETURN(request->prompt, PreparePrompt(bundle, wire.image(), wire.prompt(),
                                                      /*raw=*/false, max_new_tokens, limits.image));
  if (!wire.image().empty()) request->image_key = HashImageBytes(wire.image());
  VTW_RETURN_IF_ERROR(CheckWithdrawLayer(request->prompt.layout, k, num_layers));
  request->id = wire.request_id().empty() ? NewRequestId() : wire.request_id().substr(0, 128);
  request->sampling = sampling;
  request->stop.max_new_tokens = max_new_tokens;
  request->stop.ignore_eos = sp.ignore_eos();
  request->stop.eos_id = bundle.tokenizer->eos_id();
  request->stop.stop.assign(sp.stop().begin(), sp.stop().end());
  request->withdraw_layer = k;
  return request;
}

grpc::Status ToGrpcStatus(const Status& status) {
  if (status.ok()) return grpc::Status::OK;
  grpc::StatusCode code = static_cast<grpc::StatusCode>(static_cast<int>(status.code()));
  if (status.code() == StatusCode::kDataLoss) code = grpc::StatusCode::INTERNAL;
  return grpc::Status(code, status.message());
}

}  // namespace vtw
