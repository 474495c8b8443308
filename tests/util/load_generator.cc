#include "tests/util/load_generator.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <thread>

#include "cli/health_check.h"
#include "tests/util/oracle.h"

namespace vtw::testing {
namespace {

using SteadyClock = std::chrono::steady_clock;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

// The value after `key` up to the next space (or the end of the line); "" when absent.
std::string Field(const std::string& line, const std::string& key) {
  const size_t at = line.find(key);
  if (at == std::string::npos) return "";
  const size_t begin = at + key.size();
  return line.substr(begin, line.find(' ', begin) - begin);
}

}  // namespace

const char* CallKindName(CallKind kind) {
  switch (kind) {
    case CallKind::kUnary: return "unary";
    case CallKind::kStream: return "stream";
    case CallKind::kStreamCancel: return "stream-cancel";
    case CallKind::kUnaryShortDeadline: return "unary-short-deadline";
    case CallKind::kStreamShortDeadline: return "stream-short-deadline";
  }
  return "?";
}

std::string CodeName(grpc::StatusCode code) { return tools::GrpcCodeName(code); }

// A GenerateStream call; deletes itself after reporting its terminal status.
class LoadGenerator::StreamCall final
    : public grpc::ClientReadReactor<v1::GenerateStreamResponse> {
 public:
  StreamCall(LoadGenerator* generator, int index, v1::GenerateRequest request,
             std::chrono::milliseconds deadline, bool cancel_after_first)
      : generator_(generator),
        index_(index),
        request_(std::move(request)),
        cancel_after_first_(cancel_after_first) {
    context_.set_deadline(std::chrono::system_clock::now() + deadline);
  }

  void Go(v1::InferenceService::Stub& stub) {
    stub.async()->GenerateStream(&context_, &request_, this);
    StartRead(&message_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended; OnDone follows
    ++messages_;
    tokens_ += message_.token_ids_size();
    if (message_.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) finished_ = true;
    if (cancel_after_first_ && messages_ == 1) context_.TryCancel();
    StartRead(&message_);
  }

  void OnDone(const grpc::Status& status) override {
    const bool complete = status.ok() && finished_ &&
                          tokens_ == static_cast<int>(request_.sampling().max_new_tokens());
    generator_->Complete(index_, status, messages_, tokens_, complete);
    delete this;
  }

 private:
  LoadGenerator* generator_;
  const int index_;
  grpc::ClientContext context_;
  v1::GenerateRequest request_;
  v1::GenerateStreamResponse message_;
  const bool cancel_after_first_;
  int messages_ = 0, tokens_ = 0;
  bool finished_ = false;
};

struct LoadGenerator::UnaryCall {
  grpc::ClientContext context;
  v1::GenerateRequest request;
  v1::GenerateResponse response;
};

LoadGenerator::LoadGenerator(const std::string& addr, LoadOptions options)
    : options_(std::move(options)) {
  for (const auto& c : OracleCases()) {
    images_.push_back(ReadFile(OracleDir() + "/" + c["image"].get<std::string>()));
    prompts_.push_back(c["question"].get<std::string>());
  }
  for (int i = 0; i < std::max(1, options_.channels); ++i) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // its own connection
    args.SetInt("vtw.test.channel", i);                 // distinct args: no channel sharing
    stubs_.push_back(v1::InferenceService::NewStub(
        grpc::CreateCustomChannel(addr, grpc::InsecureChannelCredentials(), args)));
  }
}

LoadGenerator::~LoadGenerator() { WaitAll(60); }

v1::GenerateRequest LoadGenerator::MakeRequest(int index) const {
  const size_t c = static_cast<size_t>(index) % images_.size();
  v1::GenerateRequest r;
  r.set_request_id(options_.id_prefix + "-" + std::to_string(index));
  r.set_image(images_[c]);
  r.set_prompt(prompts_[c]);
  r.mutable_sampling()->set_max_new_tokens(options_.max_new_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  // Withdrawal off and at K = 2 alternately (the oracle model has 4 layers).
  const bool off = (index / 3) % 2 == 0;
  r.mutable_vtw()->set_mode(off ? v1::VTW_MODE_OFF : v1::VTW_MODE_LAYER);
  r.mutable_vtw()->set_layer(off ? 0 : 2);
  return r;
}

int LoadGenerator::Start(CallKind kind) {
  int index;
  {
    std::lock_guard<std::mutex> lock(mu_);
    index = static_cast<int>(records_.size());
    CallRecord& r = records_.emplace_back();
    r.index = index;
    r.id = options_.id_prefix + "-" + std::to_string(index);
    r.kind = kind;
    r.start = SteadyClock::now();
    ++in_flight_;
  }
  const bool short_deadline =
      kind == CallKind::kUnaryShortDeadline || kind == CallKind::kStreamShortDeadline;
  const auto deadline = short_deadline ? options_.short_deadline : options_.deadline;
  v1::InferenceService::Stub& stub = *stubs_[static_cast<size_t>(index) % stubs_.size()];
  if (kind == CallKind::kUnary || kind == CallKind::kUnaryShortDeadline) {
    auto* call = new UnaryCall;
    call->request = MakeRequest(index);
    call->context.set_deadline(std::chrono::system_clock::now() + deadline);
    const int want = options_.max_new_tokens;
    stub.async()->Generate(&call->context, &call->request, &call->response,
                           [this, call, index, want](grpc::Status status) {
                             const auto& resp = call->response;
                             const bool complete =
                                 status.ok() && resp.token_ids_size() == want &&
                                 resp.finish_reason() != v1::FINISH_REASON_UNSPECIFIED;
                             Complete(index, status, 0, resp.token_ids_size(), complete);
                             delete call;
                           });
  } else {
    auto* call = new StreamCall(this, index, MakeRequest(index), deadline,
                                kind == CallKind::kStreamCancel);
    call->Go(stub);
  }
  return index;
}

void LoadGenerator::Complete(int index, const grpc::Status& status, int messages, int tokens,
                             bool complete) {
  std::lock_guard<std::mutex> lock(mu_);
  CallRecord& r = records_[static_cast<size_t>(index)];
  if (r.terminal_statuses++ == 0) {
    r.end = SteadyClock::now();
    r.done = true;
    r.code = status.error_code();
    r.message = status.error_message();
    r.messages = messages;
    r.tokens = tokens;
    r.complete = complete;
    --in_flight_;
  }
  cv_.notify_all();
}

CallKind LoadGenerator::MixedKind(int i) {
  static const CallKind kPattern[10] = {
      CallKind::kUnary,  CallKind::kStream,       CallKind::kUnary,
      CallKind::kStreamCancel, CallKind::kUnary,  CallKind::kStream,
      CallKind::kUnaryShortDeadline, CallKind::kUnary, CallKind::kStream,
      CallKind::kStreamShortDeadline};
  return kPattern[i % 10];
}

int LoadGenerator::RunOpenLoop(double rate, double seconds, const std::atomic<bool>* stop) {
  const auto start = SteadyClock::now();
  int started = 0;
  for (int i = 0;; ++i) {
    const double at = i / rate;
    if (at >= seconds) break;
    std::this_thread::sleep_until(start + std::chrono::duration_cast<SteadyClock::duration>(
                                              std::chrono::duration<double>(at)));
    if (stop && stop->load()) break;
    Start(MixedKind(i));
    ++started;
  }
  return started;
}

double LoadGenerator::RunClosedLoop(int concurrency, double seconds) {
  const auto start = SteadyClock::now();
  const auto until = start + std::chrono::duration_cast<SteadyClock::duration>(
                                 std::chrono::duration<double>(seconds));
  std::atomic<int> ok{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < concurrency; ++c) {
    clients.emplace_back([&] {
      while (SteadyClock::now() < until) {
        const int i = Start(CallKind::kStream);
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return records_[static_cast<size_t>(i)].done; });
        if (records_[static_cast<size_t>(i)].code == grpc::StatusCode::OK) ++ok;
      }
    });
  }
  for (auto& t : clients) t.join();
  const double elapsed = std::chrono::duration<double>(SteadyClock::now() - start).count();
  return ok.load() / elapsed;
}

bool LoadGenerator::WaitAll(double timeout_seconds) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, std::chrono::duration<double>(timeout_seconds),
                      [&] { return in_flight_ == 0; });
}

int LoadGenerator::in_flight() const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_flight_;
}

std::vector<CallRecord> LoadGenerator::Records() const {
  std::lock_guard<std::mutex> lock(mu_);
  return std::vector<CallRecord>(records_.begin(), records_.end());
}

std::map<std::string, int> LoadGenerator::CountByCode(const std::vector<CallRecord>& records) {
  std::map<std::string, int> counts;
  for (const CallRecord& r : records) {
    if (r.done) ++counts[CodeName(r.code)];
  }
  return counts;
}

std::map<std::string, std::vector<AccessLine>> ReadAccessLog(const std::string& path) {
  std::map<std::string, std::vector<AccessLine>> out;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    if (line.find("access id=") == std::string::npos) continue;
    const std::string id = Field(line, "access id=");
    AccessLine a;
    a.status = Field(line, " status=");
    const std::string tokens = Field(line, " completion_tokens=");
    if (!tokens.empty()) a.completion_tokens = std::atoi(tokens.c_str());
    out[id].push_back(a);
  }
  return out;
}

int64_t ResidentBytes(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmRSS:", 0) == 0) {
      return std::atoll(line.c_str() + 6) * 1024;  // "VmRSS:   12345 kB"
    }
  }
  return -1;
}

double Quantile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t rank = static_cast<size_t>(std::ceil(p * static_cast<double>(values.size())));
  return values[std::min(values.size() - 1, rank == 0 ? 0 : rank - 1)];
}

}  // namespace vtw::testing
