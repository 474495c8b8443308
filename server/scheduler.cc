#include "server/scheduler.h"

#include <algorithm>

namespace vtw {

int NumAdmissible(const SchedulerConfig& config, const std::vector<WaitingView>& waiting,
                  int64_t kv_reserved, int num_running) {
  int admitted = 0;
  for (const WaitingView& w : waiting) {
    if (num_running + admitted >= config.max_running) break;
    if (kv_reserved + w.kv_bytes > config.kv_cache_bytes) break;
    kv_reserved += w.kv_bytes;
    ++admitted;
  }
  return admitted;
}

StepPlan PlanStep(const SchedulerConfig& config, const std::vector<RunningView>& running) {
  StepPlan plan;
  plan.tokens.assign(running.size(), 0);
  int64_t budget = config.max_batch_tokens;
  // Decode tokens first: they keep time-per-output-token low.
  for (size_t i = 0; i < running.size() && budget > 0; ++i) {
    if (running[i].num_known - running[i].num_computed == 1) {
      plan.tokens[i] = 1;
      --budget;
    }
  }
  // Then chunked prefill of the others, oldest first.
  for (size_t i = 0; i < running.size() && budget > 0; ++i) {
    const int64_t pending = running[i].num_known - running[i].num_computed;
    if (pending <= 1) continue;
    plan.tokens[i] = std::min(pending, budget);
    budget -= plan.tokens[i];
  }
  for (int64_t t : plan.tokens) plan.total_tokens += t;
  return plan;
}

}  // namespace vtw
