#include "server/validation.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
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

StatusOr<int> MaxNewTokens(const RequestSpec& spec, const ServiceLimits& limits) {
  if (!spec.max_new_tokens) return limits.default_max_new_tokens;
  if (*spec.max_new_tokens < 1 || *spec.max_new_tokens > limits.max_new_tokens_limit) {
    return InvalidArgument(std::string(spec.max_new_tokens_field) + " must be in [1, " +
                           std::to_string(limits.max_new_tokens_limit) + "], got " +
                           std::to_string(*spec.max_new_tokens));
  }
  return static_cast<int>(*spec.max_new_tokens);
}

StatusOr<SamplingParams> Sampling(const RequestSpec& spec) {
  SamplingParams sampling;
  sampling.temperature = spec.temperature;
  sampling.top_k = static_cast<int>(std::clamp<int64_t>(spec.top_k, -1, int64_t{1} << 30));
  sampling.top_p = spec.top_p.value_or(1.0f);
  sampling.seed = spec.seed;
  Status st = ValidateSamplingParams(sampling);
  if (!st.ok()) return InvalidArgument("sampling: " + st.message());
  return sampling;
}

Status CheckStopStrings(const RequestSpec& spec) {
  const std::string field = spec.stop_field;
  for (const std::string& s : spec.stop) {
    if (s.empty() || s.size() > 256) return InvalidArgument(field + " strings must be 1..256 bytes long");
  }
  if (spec.stop.size() > 16) return InvalidArgument("at most 16 " + field + " strings");
  return Status::Ok();
}

}  // namespace

StatusOr<std::unique_ptr<Request>> BuildRequest(const ModelBundle& bundle, const RequestSpec& spec,
                                                const ServiceLimits& limits) {
  const int num_layers = bundle.model->num_layers();
  if (spec.prompt.empty()) return InvalidArgument("prompt is empty: send a question");
  if (spec.prompt.size() > limits.max_prompt_bytes) {
    return InvalidArgument("prompt is " + std::to_string(spec.prompt.size()) +
                           " bytes, over the limit of " + std::to_string(limits.max_prompt_bytes));
  }
  VTW_ASSIGN_OR_RETURN(const int max_new_tokens, MaxNewTokens(spec, limits));
  VTW_ASSIGN_OR_RETURN(const SamplingParams sampling, Sampling(spec));
  VTW_RETURN_IF_ERROR(CheckStopStrings(spec));
  VTW_ASSIGN_OR_RETURN(
      const int k, ResolveWithdrawLayer(bundle.vtw, num_layers, spec.vtw_mode,
                                        static_cast<int>(std::clamp<int64_t>(spec.vtw_layer, -1,
                                                                             1 << 20)),
                                        spec.vtw_profile));
  auto request = std::make_unique<Request>();
  VTW_ASSIGN_OR_RETURN(request->prompt, PreparePrompt(bundle, spec.image, spec.prompt,
                                                      spec.raw_prompt, max_new_tokens,
                                                      limits.image));
  if (!spec.image.empty()) request->image_key = HashImageBytes(spec.image);
  VTW_RETURN_IF_ERROR(CheckWithdrawLayer(request->prompt.layout, k, num_layers));
  request->id = spec.request_id.empty() ? NewRequestId() : spec.request_id.substr(0, 128);
  request->sampling = sampling;
  request->stop.max_new_tokens = max_new_tokens;
  request->stop.ignore_eos = spec.ignore_eos;
  request->stop.eos_id = bundle.tokenizer->eos_id();
  request->stop.stop = spec.stop;
  request->withdraw_layer = k;
  return request;
}

}  // namespace vtw
