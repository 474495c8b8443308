// Accounting: the numbers of a request that operators and clients read (FLOPs done and saved by
// VTW, tokens, queue/TTFT/inter-token/total times, KV bytes with and without VTW), kept in the
// request's summary and in the Prometheus metrics by the same calls, so the two cannot
// disagree; plus the access-log line of a finished request. The engine calls it at each event of
// a request's life. Engine thread only; `metrics` may be null (tests, tools).
#pragma once

#include <cstdint>

#include "model/status.h"
#include "server/metrics.h"
#include "server/request.h"
#include "vtw/compute_model.h"

namespace vtw {

class Accounting {
 public:
  Accounting(const ComputeModel& compute, ServerMetrics* metrics);

  // Vision: `r`'s image went through the tower in this step (a cache miss), or was found.
  void ImageEncoded(Request& r);
  void ImageCacheHit();
  void VisionBatchDone(double seconds);

  // `r` entered the running batch (its prompt layout, K and cache are set).
  void RequestStarted(Request& r);
  // `r` computes positions [begin, end) of its sequence in this step (a prefill chunk or a
  // decode token); `logits`: the step computes its next-token logits. The first call also ends
  // the request's queue time.
  void ChunkScheduled(Request& r, int64_t begin, int64_t end, bool logits, Clock::time_point now);
  // One model forward over `rows` rows.
  void StepDone(int64_t rows);
  // `r` got a new token (already appended to r.output).
  void TokenGenerated(Request& r, Clock::time_point now);
  // Completes r.summary (text, ids, times, KV bytes), counts the request by `status` and writes
  // the access-log line.
  void RequestFinished(Request& r, const Status& status, Clock::time_point now);

  // KV-cache bytes `r` would hold now without withdrawal (every layer caching every row).
  int64_t KvBytesWithoutVtw(const Request& r) const;

 private:
  const ComputeModel& compute_;
  ServerMetrics* metrics_;
};

}  // namespace vtw
