// Scheduler: decides, between engine steps, which waiting requests are admitted and how many
// tokens each running request computes in the next step. Plain data in, plain data out: it
// never touches tensors (vLLM v1 style: one token-progress model, each request's computed tokens
// catching up with its known tokens; prefill and decode are the same thing). Not thread-safe:
// the engine thread owns it.
#pragma once

#include <cstdint>
#include <vector>

namespace vtw {

struct SchedulerConfig {
  int64_t max_batch_tokens = 512;  // rows in one forward step
  int max_running = 32;            // requests in the running batch
  int64_t kv_cache_bytes = int64_t{1} << 30;  // budget for the KV caches of running requests
};

// A running request as the scheduler sees it.
struct RunningView {
  int64_t num_known = 0;     // prompt + generated tokens so far
  int64_t num_computed = 0;  // tokens already run through the model (in the KV cache)
};

// A waiting request: the KV-cache bytes it reserves for its whole life (sized the VTW way).
struct WaitingView {
  int64_t kv_bytes = 0;
};

struct StepPlan {
  // tokens[i] = tokens running request i computes this step (0 = not scheduled).
  std::vector<int64_t> tokens;
  int64_t total_tokens = 0;
};

// How many waiting requests (from the front, FIFO) can be admitted now, given the bytes already
// reserved by running requests and the running count. Head-of-line: stops at the first request
// that does not fit, so a large request is not starved by small ones.
int NumAdmissible(const SchedulerConfig& config, const std::vector<WaitingView>& waiting,
                  int64_t kv_reserved, int num_running);

// The next step: every request with exactly one token to compute (decode) gets it first, then
// requests still prefilling get chunks, in order, from the remaining token budget.
StepPlan PlanStep(const SchedulerConfig& config, const std::vector<RunningView>& running);

}  // namespace vtw
