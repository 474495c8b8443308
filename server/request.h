// Request: one accepted generation request as the engine runs it, and RequestSink, the channel
// through which the engine reports tokens and the one terminal status. The gRPC thread builds a
// Request (validated, prompt prepared) and hands it to the engine; from then on only the engine
// thread touches it, except `cancelled`, which any thread may set.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "model/kv_cache.h"
#include "model/sampler.h"
#include "model/sequence_output.h"
#include "model/status.h"
#include "server/image_cache.h"
#include "server/model_bundle.h"
#include "vtw/compute_model.h"

namespace vtw {

using Clock = std::chrono::steady_clock;

// What the terminal report carries besides the status.
struct RequestSummary {
  std::string text;                 // the whole answer (also streamed as deltas)
  std::vector<int32_t> token_ids;   // generated ids (EOS included when it ended the answer)
  FinishReason finish_reason = FinishReason::kNone;
  int64_t prompt_tokens = 0, image_tokens = 0;
  int withdraw_layer = 0;           // K (vtw/withdrawal.h: num_layers when off)
  bool vtw_applied = false;
  int64_t flops = 0, flops_without_vtw = 0;
  int64_t kv_cache_bytes = 0, kv_cache_bytes_without_vtw = 0;
  double queue_seconds = 0, ttft_seconds = 0, total_seconds = 0;
};

// Implemented by the gRPC reactors. Called on the engine thread: OnDelta any number of times,
// then OnDone exactly once (also for requests that never ran). Must not block for long.
class RequestSink {
 public:
  virtual ~RequestSink() = default;
  virtual void OnDelta(const std::string& text, const std::vector<int32_t>& token_ids) = 0;
  virtual void OnDone(const Status& status, const RequestSummary& summary) = 0;
};

struct Request {
  // Set by the submitter.
  std::string id;
  const char* protocol = "grpc";  // kProtocolGrpc or kProtocolHttp (metrics label, access log)
  PreparedPrompt prompt;
  ImageKey image_key;
  SamplingParams sampling;
  StopParams stop;
  int withdraw_layer = -1;  // K in [0, layers] (validation sets it; vtw/withdrawal.h)
  Clock::time_point arrival = Clock::now();
  Clock::time_point deadline = Clock::time_point::max();
  std::shared_ptr<std::atomic<bool>> cancelled = std::make_shared<std::atomic<bool>>(false);
  std::shared_ptr<RequestSink> sink;

  // Engine state.
  std::vector<int64_t> token_ids;  // prompt (expanded) then generated
  std::vector<TokenKind> kinds;
  int64_t num_computed = 0;        // rows already in the KV cache
  int64_t image_rows_fed = 0;      // image rows among them
  at::Tensor image_features;       // [num_image_tokens, Ht]
  std::unique_ptr<KvCache> cache;
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<SequenceOutput> output;  // text, stop rules, what is safe to stream
  int64_t kv_reserved = 0;
  RequestSummary summary;
  Clock::time_point scheduled_at{}, last_token_at{};
  bool scheduled = false;
};

}  // namespace vtw
