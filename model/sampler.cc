#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace vtw {

Status ValidateSamplingParams(const SamplingParams& p) {
  if (!std::isfinite(p.temperature) || p.temperature < 0) {
    return InvalidArgument("temperature must be >= 0 (0 = greedy), got " +
                           std::to_string(p.temperature));
  }
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return InvalidArgument("top_p must be in (0, 1], got " + std::to_string(p.top_p));
  }
  if (p.top_k < 0) return InvalidArgument("top_k must be >= 0 (0 = off)");
  return Status::Ok();
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

int32_t Sampler::Sample(const float* logits, int64_t vocab) {
  if (params_.temperature <= 0.0f) {
    return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  }
  std::vector<int32_t> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  // Stable descending order, so ties keep the lower id first.
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int64_t keep = vocab;
  if (params_.top_k > 0) keep = std::min<int64_t>(keep, params_.top_k);
  const double inv_t = 1.0 / params_.temperature;
  const double max_logit = logits[order[0]] * inv_t;
  std::vector<double> probs(keep);
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    probs[i] = std::exp(logits[order[i]] * inv_t - max_logit);
    sum += probs[i];
  }
  if (params_.top_p < 1.0f) {
    double cumulative = 0;
    int64_t cut = keep;
    for (int64_t i = 0; i < keep; ++i) {
      cumulative += probs[i] / sum;
      if (cumulative >= params_.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    sum = std::accumulate(probs.begin(), probs.begin() + keep, 0.0);
  }
  const double u = std::uniform_real_distribution<double>(0.0, sum)(rng_);
  double acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += probs[i];
    if (u < acc) return order[i];
  }
  return order[keep - 1];
}

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength: return "length";
    case FinishReason::kEos: return "eos";
    case FinishReason::kStop: return "stop";
    case FinishReason::kNone: return "";
  }
  return "";
}

FinishReason StopChecker::Check(int32_t token, int num_generated, const std::string& text,
                                size_t* visible_length) const {
  if (!params_.ignore_eos && token == params_.eos_id) return FinishReason::kEos;
  for (const std::string& s : params_.stop) {
    if (s.empty()) continue;
    size_t at = text.find(s);
    if (at != std::string::npos) {
      if (visible_length) *visible_length = at;
      return FinishReason::kStop;
    }
  }
  if (num_generated >= params_.max_new_tokens) return FinishReason::kLength;
  return FinishReason::kNone;
}

}  // namespace vtw
