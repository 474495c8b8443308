// Load for overload and fault tests against a real server: gRPC calls started with the callback
// API (no thread per call), so an open-loop generator can start requests at a fixed rate whatever
// the server does with them. Each call records its one terminal status (a second one is counted
// as a bug), its latency, and whether an OK answer was complete. Also: a closed loop of N
// concurrent streams (capacity), the server's access log parsed by request id, and VmRSS of a
// process.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "vtw/v1/inference.grpc.pb.h"

namespace vtw::testing {

// What one call does.
enum class CallKind {
  kUnary,                // Generate, generous deadline
  kStream,               // GenerateStream, read to the end
  kStreamCancel,         // GenerateStream, cancelled by the client after its first message
  kUnaryShortDeadline,   // Generate with LoadOptions::short_deadline
  kStreamShortDeadline,  // GenerateStream with LoadOptions::short_deadline
};
const char* CallKindName(CallKind kind);

struct LoadOptions {
  int max_new_tokens = 16;  // every request: ignore_eos, so an OK answer has exactly this many
  std::chrono::milliseconds deadline{60000};        // the generous one
  std::chrono::milliseconds short_deadline{300};    // the short one
  std::string id_prefix = "load";                   // request ids: PREFIX-INDEX
  int channels = 4;                                 // separate connections, used round-robin
};

struct CallRecord {
  int index = 0;
  std::string id;
  CallKind kind = CallKind::kUnary;
  std::chrono::steady_clock::time_point start, end;
  bool done = false;
  int terminal_statuses = 0;  // must end as 1
  grpc::StatusCode code = grpc::StatusCode::UNKNOWN;
  std::string message;
  int messages = 0;       // stream messages read
  int tokens = 0;         // token ids received
  bool complete = false;  // OK with max_new_tokens tokens and a finish reason
  double seconds() const { return std::chrono::duration<double>(end - start).count(); }
};

class LoadGenerator {
 public:
  LoadGenerator(const std::string& addr, LoadOptions options);
  ~LoadGenerator();  // waits (up to 60 s) for calls still in flight
  LoadGenerator(const LoadGenerator&) = delete;
  LoadGenerator& operator=(const LoadGenerator&) = delete;

  // Starts one call now without blocking; returns its index.
  int Start(CallKind kind);
  // The kind of the i-th open-loop request: 40% unary, 30% stream, 10% stream cancelled after
  // its first message, 10% unary and 10% stream with the short deadline (a fixed interleaving).
  static CallKind MixedKind(int i);
  // Starts MixedKind(i) requests at `rate` per second for `seconds` (the i-th at start + i/rate,
  // whether or not earlier ones finished), stopping early when `stop` becomes true. Blocks.
  // Returns the number started.
  int RunOpenLoop(double rate, double seconds, const std::atomic<bool>* stop = nullptr);
  // `concurrency` clients each running kStream calls back to back for `seconds`. Blocks. Returns
  // the completed-OK calls per second.
  double RunClosedLoop(int concurrency, double seconds);

  // Blocks until every started call has its terminal status or `timeout_seconds` passed.
  // True when none is left in flight.
  bool WaitAll(double timeout_seconds);
  int in_flight() const;
  // A copy of every call's record, by index.
  std::vector<CallRecord> Records() const;

  // How many calls ended with each code (name -> count), over `records`.
  static std::map<std::string, int> CountByCode(const std::vector<CallRecord>& records);

 private:
  class StreamCall;
  struct UnaryCall;
  v1::GenerateRequest MakeRequest(int index) const;
  void Complete(int index, const grpc::Status& status, int messages, int tokens, bool complete);

  LoadOptions options_;
  std::vector<std::string> images_, prompts_;
  std::vector<std::unique_ptr<v1::InferenceService::Stub>> stubs_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<CallRecord> records_;  // guarded by mu_; index = position
  int in_flight_ = 0;               // guarded by mu_
};

// gRPC status code name ("OK", "RESOURCE_EXHAUSTED", ...).
std::string CodeName(grpc::StatusCode code);

// One line of the server's access log ("access id=ID status=CODE ...").
struct AccessLine {
  std::string status;
  int completion_tokens = -1;  // -1 when the line has none (rejected before the engine)
};
// The access log lines of the server log at `path`, by request id (every line of an id, in order).
std::map<std::string, std::vector<AccessLine>> ReadAccessLog(const std::string& path);

// VmRSS of process `pid` in bytes (from /proc/PID/status), or -1.
int64_t ResidentBytes(pid_t pid);

// p-quantile (0..1) of `values` (nearest rank); 0 when empty.
double Quantile(std::vector<double> values, double p);

}  // namespace vtw::testing
