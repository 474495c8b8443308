// Sampler: picks the next token from one row of logits (greedy, temperature, top-k, top-p) with
// a per-request seeded generator; StopChecker decides when a sequence ends (EOS, stop strings,
// max new tokens). One instance per request; not thread-safe.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "model/status.h"

namespace vtw {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy
  int top_k = 0;             // 0 = off
  float top_p = 1.0f;        // 1 = off; (0, 1]
  uint64_t seed = 0;
};

// InvalidArgument for negative or non-finite temperature, top_p outside (0, 1], negative top_k.
Status ValidateSamplingParams(const SamplingParams& params);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  // Next token id from `logits` ([vocab] fp32). Greedy takes the first maximum. Otherwise HF's
  // order: divide by temperature, keep the top_k largest, keep the smallest set whose
  // probability reaches top_p (always at least one token), then draw.
  int32_t Sample(const float* logits, int64_t vocab);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

enum class FinishReason { kNone, kLength, kEos, kStop };
const char* FinishReasonName(FinishReason reason);  // "length", "eos", "stop", ""

struct StopParams {
  int max_new_tokens = 64;
  bool ignore_eos = false;
  int32_t eos_id = 2;
  std::vector<std::string> stop;  // stop strings: generation ends when the text contains one
};

class StopChecker {
 public:
  explicit StopChecker(StopParams params) : params_(std::move(params)) {}

  // Feeds one generated token and the text decoded so far (all generated text). Returns why the
  // sequence stops after this token, or kNone. On kStop, *visible_length is the length of the
  // text to return (up to the start of the stop string).
  FinishReason Check(int32_t token, int num_generated, const std::string& text,
                     size_t* visible_length) const;

 private:
  StopParams params_;
};

}  // namespace vtw
