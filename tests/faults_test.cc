// Faults the vtw-server binary must survive, each against the real process on loopback:
//   - a client process killed mid-stream: its KV cache is freed, other clients still finish;
//   - SIGTERM while overloaded: every request gets a terminal status, none is lost or hangs;
//   - a missing or corrupt model directory: non-zero exit, a message naming the problem, and
//     health never SERVING while it was starting (polled throughout);
//   - the engine failing (the VTW_TEST_FAIL_AFTER_STEPS test hook makes the model step throw):
//     clients get INTERNAL / UNAVAILABLE instead of hanging, health turns NOT_SERVING.
// Cancellation and deadlines freeing the KV cache in-process are in server_test; the basic drain
// and the fail-fast messages of a bad model in server_ops_test.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "tests/util/load_generator.h"
#include "tests/util/oracle.h"
#include "tests/util/server_process.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_server.h"

extern char** environ;

namespace vtw {
namespace {

namespace fs = std::filesystem;
using testing::CallRecord;
using testing::LoadGenerator;
using testing::LoadOptions;
using SteadyClock = std::chrono::steady_clock;

int MetricsPort(const testing::ServerProcess& server) {
  const std::string addr = server.metrics_addr();
  return std::atoi(addr.substr(addr.rfind(':') + 1).c_str());
}

// Starts argv (no shell) with stdout and stderr on the given descriptors; -1 on failure.
pid_t Spawn(const std::vector<std::string>& argv, int stdout_fd, int stderr_fd) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, stdout_fd, 1);
  posix_spawn_file_actions_adddup2(&actions, stderr_fd, 2);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  return rc == 0 ? pid : -1;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

// Polls /metrics until nothing runs, nothing waits and no KV cache is held (or 10 s pass), then
// scrapes once more a moment later (the gauges drop just before the request counter moves).
std::string ScrapeWhenIdle(int metrics_port) {
  for (int i = 0; i < 100; ++i) {
    const std::string text = testing::ScrapeMetrics(metrics_port);
    if (testing::MetricValue(text, "vtw_requests_running") == 0 &&
        testing::MetricValue(text, "vtw_requests_waiting") == 0 &&
        testing::MetricValue(text, "vtw_kv_cache_bytes") == 0) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  return testing::ScrapeMetrics(metrics_port);
}

int Count(const std::map<std::string, int>& counts, const std::string& code) {
  auto it = counts.find(code);
  return it == counts.end() ? 0 : it->second;
}

TEST(Faults, ClientProcessKilledMidStreamFreesItsKvCacheAndOthersFinish) {
  auto server = testing::ServerProcess::Start({"--max-running", "4"});
  ASSERT_TRUE(server);
  // Two well-behaved streaming clients run back to back the whole time.
  LoadOptions options;
  options.id_prefix = "bg";
  LoadGenerator background(server->grpc_addr(), options);
  std::thread background_thread([&] { background.RunClosedLoop(2, 6.0); });

  // Victims: `vtw client --stream` processes, SIGKILLed as soon as their first text arrives, so
  // the server sees the connection drop in the middle of a 160-token answer.
  const auto& c = testing::OracleCases()[0];
  constexpr int kVictims = 3;
  std::vector<std::string> victims;
  for (int v = 0; v < kVictims; ++v) {
    const std::string id = "victim-" + std::to_string(v);
    victims.push_back(id);
    int fds[2];
    ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0);
    const int null_fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
    const pid_t pid = Spawn(
        {testing::VtwBinary(), "client", "--addr", server->grpc_addr(), "--image",
         testing::OracleDir() + "/" + c["image"].get<std::string>(), "--prompt",
         c["question"].get<std::string>(), "--stream", "--ignore-eos", "--max-new-tokens", "160",
         "--request-id", id, "--timeout", "60"},
        fds[1], null_fd);
    close(fds[1]);
    close(null_fd);
    ASSERT_GT(pid, 0);
    pollfd p{fds[0], POLLIN, 0};
    char byte;
    const bool got_text = poll(&p, 1, 30000) == 1 && read(fds[0], &byte, 1) == 1;
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    close(fds[0]);
    ASSERT_TRUE(got_text) << id << " printed nothing within 30 s";
    EXPECT_TRUE(WIFSIGNALED(status)) << id << " had already exited";
  }
  background_thread.join();
  ASSERT_TRUE(background.WaitAll(60));

  // The others were not disturbed: every background request finished, complete.
  const std::vector<CallRecord> records = background.Records();
  ASSERT_GT(records.size(), 0u);
  for (const CallRecord& r : records) {
    EXPECT_EQ(r.code, grpc::StatusCode::OK) << r.id << ": " << r.message;
    EXPECT_TRUE(r.complete) << r.id;
  }
  // Each victim was cancelled mid-answer, and its KV cache released: gauges back to 0.
  const std::string metrics = ScrapeWhenIdle(MetricsPort(*server));
  EXPECT_EQ(testing::MetricValue(metrics, "vtw_kv_cache_bytes"), 0);
  EXPECT_EQ(testing::MetricValue(metrics, "vtw_requests_running"), 0);
  EXPECT_EQ(testing::MetricValue(metrics, "vtw_requests_waiting"), 0);
  const auto access = testing::ReadAccessLog(server->log_path());
  for (const std::string& id : victims) {
    auto it = access.find(id);
    ASSERT_NE(it, access.end()) << id << " missing from the access log";
    ASSERT_EQ(it->second.size(), 1u) << id;
    EXPECT_EQ(it->second[0].status, "CANCELLED") << id;
    EXPECT_LT(it->second[0].completion_tokens, 160) << id;
  }
  EXPECT_EQ(testing::MetricValue(metrics, "vtw_requests_total{code=\"CANCELLED\",protocol=\"grpc\"}"), kVictims);
  EXPECT_EQ(testing::MetricValue(metrics, "vtw_requests_total{code=\"OK\",protocol=\"grpc\"}"),
            static_cast<double>(records.size()));
  EXPECT_EQ(testing::HealthStatus(server->grpc_addr(), 5.0), "SERVING");
  std::printf("FAULT client-killed victims=%d background_ok=%zu kv_after=%.0f\n", kVictims,
              records.size(), testing::MetricValue(metrics, "vtw_kv_cache_bytes"));
}

TEST(Faults, SigtermDuringOverloadLosesNoRequest) {
  auto server = testing::ServerProcess::Start(
      {"--max-queue", "8", "--max-running", "4", "--drain-timeout", "10"});
  ASSERT_TRUE(server);
  LoadOptions options;
  options.id_prefix = "term";
  options.max_new_tokens = 48;
  LoadGenerator load(server->grpc_addr(), options);
  std::atomic<bool> stop{false};
  // ~4x capacity (~75 requests/s of 48 tokens here): the queue is full when SIGTERM comes.
  std::thread generator([&] { load.RunOpenLoop(300, 60, &stop); });
  std::this_thread::sleep_for(std::chrono::seconds(3));
  const auto sigterm_at = SteadyClock::now();
  server->Signal(SIGTERM);
  // Load goes on through the drain and past the exit.
  const int exit_status = server->Wait(60);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  stop = true;
  generator.join();
  EXPECT_EQ(exit_status, 0) << server->LogTail();
  ASSERT_TRUE(load.WaitAll(60)) << load.in_flight() << " calls never got a status";

  const std::vector<CallRecord> records = load.Records();
  const auto access = testing::ReadAccessLog(server->log_path());
  std::set<std::string> ids;
  int ok_after_sigterm = 0, unseen = 0, gave_up_first = 0;
  for (const CallRecord& r : records) {
    ids.insert(r.id);
    const std::string code = testing::CodeName(r.code);
    EXPECT_EQ(r.terminal_statuses, 1) << r.id;
    static const std::set<grpc::StatusCode> kAllowed = {
        grpc::StatusCode::OK, grpc::StatusCode::RESOURCE_EXHAUSTED, grpc::StatusCode::UNAVAILABLE,
        grpc::StatusCode::CANCELLED, grpc::StatusCode::DEADLINE_EXCEEDED};
    EXPECT_TRUE(kAllowed.count(r.code)) << r.id << ": " << code << " " << r.message;
    if (r.code == grpc::StatusCode::OK) {
      EXPECT_TRUE(r.complete) << r.id;
      if (r.end > sigterm_at) ++ok_after_sigterm;
    }
    const bool gave_up = r.code == grpc::StatusCode::CANCELLED ||
                         r.code == grpc::StatusCode::DEADLINE_EXCEEDED;
    auto it = access.find(r.id);
    if (it == access.end()) {
      // Not seen by the service: refused by gRPC itself while shutting down or after the exit
      // (UNAVAILABLE), or given up by the client before the server read it.
      EXPECT_TRUE(r.code == grpc::StatusCode::UNAVAILABLE || gave_up) << r.id << ": " << code;
      ++unseen;
      continue;
    }
    ASSERT_EQ(it->second.size(), 1u) << r.id;
    // What the server decided is what the client got (unless the client gave up first).
    if (it->second[0].status != code) {
      EXPECT_TRUE(gave_up) << r.id << ": client " << code << ", server " << it->second[0].status;
      ++gave_up_first;
    }
  }
  for (const auto& [id, lines] : access) EXPECT_TRUE(ids.count(id)) << id;
  const auto counts = LoadGenerator::CountByCode(records);
  EXPECT_GT(Count(counts, "RESOURCE_EXHAUSTED"), 0) << "the server was not overloaded";
  EXPECT_GT(Count(counts, "UNAVAILABLE"), 0) << "nothing was refused after SIGTERM";
  EXPECT_GT(ok_after_sigterm, 0) << "the drain let nothing finish";
  const std::string log = ReadFile(server->log_path());
  EXPECT_NE(log.find("SIGTERM received"), std::string::npos);
  EXPECT_NE(log.find("stopped"), std::string::npos);
  std::string joined;
  for (const auto& [code, n] : counts) joined += " " + code + "=" + std::to_string(n);
  std::printf("FAULT sigterm-under-overload requests=%zu%s ok_after_sigterm=%d in_access_log=%zu "
              "unseen_by_service=%d client_gave_up_first=%d exit=%d\n",
              records.size(), joined.c_str(), ok_after_sigterm, access.size(), unseen,
              gave_up_first, exit_status);
}

TEST(Faults, BadModelDirectoryExitsNonZeroAndNeverServes) {
  const fs::path root = testing::FreshTestDir("vtw_faults_model");
  struct Case {
    std::string name;
    std::function<fs::path()> make;  // returns the --model directory
    std::string needle;              // in the log
    bool good = false;
  };
  std::vector<Case> cases = {
      {"missing directory", [&] { return root / "does-not-exist"; }, "does not exist"},
      {"truncated weights",
       [&] {
         const fs::path d = root / "truncated";
         testing::CopyOracleModel(d);
         fs::resize_file(d / "model.safetensors", 1000);
         return d;
       },
       "model.safetensors"},
      {"garbage config.json",
       [&] {
         const fs::path d = root / "bad-config";
         testing::CopyOracleModel(d);
         std::ofstream(d / "config.json", std::ios::trunc) << "{ not json";
         return d;
       },
       "config.json"},
      {"no tokenizer.model",
       [&] {
         const fs::path d = root / "no-tokenizer";
         testing::CopyOracleModel(d);
         fs::remove(d / "tokenizer.model");
         return d;
       },
       "tokenizer.model"},
      // The control: the same poller does see SERVING when the model is good.
      {"good model (control)",
       [&] {
         const fs::path d = root / "good";
         testing::CopyOracleModel(d);
         return d;
       },
       "serving", true},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const fs::path model = c.make();
    const std::string log_path = (root / "server.log").string();
    std::map<std::string, int> seen;
    int status = 0;
    bool exited = false;
    std::string log;
    for (int attempt = 1; attempt <= 3; ++attempt) {  // a port picked free may be taken meanwhile
      const std::string addr = "127.0.0.1:" + std::to_string(testing::PickFreePort());
      const int log_fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      ASSERT_GE(log_fd, 0);
      const pid_t pid = Spawn({testing::ServerBinary(), "--model", model.string(), "--listen",
                               addr, "--metrics-listen",
                               "127.0.0.1:" + std::to_string(testing::PickFreePort()),
                               "--http-listen", "127.0.0.1:0", "--threads", "1"},
                              log_fd, log_fd);
      close(log_fd);
      ASSERT_GT(pid, 0);
      // Health, as fast as it answers, for as long as the process lives (a good one: until
      // SERVING).
      seen.clear();
      exited = false;
      const auto deadline = SteadyClock::now() + std::chrono::seconds(60);
      while (SteadyClock::now() < deadline) {
        if (waitpid(pid, &status, WNOHANG) == pid) {
          exited = true;
          break;
        }
        std::string h = testing::HealthStatus(addr, 0.2);
        if (h.rfind("error: ", 0) == 0) h = h.substr(0, h.find(':', 7));  // "error: UNAVAILABLE"
        ++seen[h];
        if (c.good && h == "SERVING") break;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      if (!exited) {
        kill(pid, c.good ? SIGTERM : SIGKILL);
        waitpid(pid, &status, 0);
      }
      log = ReadFile(log_path);
      const bool port_taken = log.find("cannot listen") != std::string::npos ||
                              log.find("cannot serve metrics") != std::string::npos;
      if (!port_taken) break;
    }
    std::string polled;
    for (const auto& [h, n] : seen) polled += " [" + h + "]x" + std::to_string(n);
    if (c.good) {
      EXPECT_EQ(seen["SERVING"], 1) << polled << "\n" << log;
      EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << log;
    } else {
      EXPECT_TRUE(exited) << "still running after 60 s:\n" << log;
      EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << status << "\n" << log;
      EXPECT_EQ(seen.count("SERVING"), 0u) << polled;
      EXPECT_NE(log.find("cannot load the model"), std::string::npos) << log;
      EXPECT_EQ(log.find(" info serving"), std::string::npos) << log;
    }
    EXPECT_NE(log.find(c.needle), std::string::npos) << log;
    std::printf("FAULT bad-model case=\"%s\" exit=%d health_polls:%s\n", c.name.c_str(),
                WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), polled.c_str());
  }
  fs::remove_all(root);
}

TEST(Faults, EngineFailureFailsRequestsAndTurnsHealthNotServing) {
  // The test hook: the model step after 30 successful ones throws, as a failing model would.
  setenv("VTW_TEST_FAIL_AFTER_STEPS", "30", 1);
  auto server = testing::ServerProcess::Start({"--max-running", "4"});
  unsetenv("VTW_TEST_FAIL_AFTER_STEPS");
  ASSERT_TRUE(server);
  LoadOptions options;
  options.id_prefix = "fail";
  options.max_new_tokens = 64;  // nobody can finish within 30 steps
  LoadGenerator load(server->grpc_addr(), options);
  for (int i = 0; i < 12; ++i) {  // 4 run, 8 wait; half streams, half unary
    load.Start(i % 2 ? testing::CallKind::kStream : testing::CallKind::kUnary);
  }
  // No client hangs: every call ends long before its 60 s deadline.
  ASSERT_TRUE(load.WaitAll(30)) << load.in_flight() << " calls hang after the engine failed";
  const std::vector<CallRecord> records = load.Records();
  for (const CallRecord& r : records) {
    // INTERNAL: accepted before the failure; UNAVAILABLE: arrived after it.
    EXPECT_TRUE(r.code == grpc::StatusCode::INTERNAL || r.code == grpc::StatusCode::UNAVAILABLE)
        << r.id << ": " << testing::CodeName(r.code) << " " << r.message;
    EXPECT_NE(r.message.find("engine failed"), std::string::npos) << r.message;
  }
  const auto counts = LoadGenerator::CountByCode(records);
  EXPECT_GT(Count(counts, "INTERNAL"), 0);
  // Health turns NOT_SERVING (set by the failure callback), the process stays up.
  std::string health;
  for (int i = 0; i < 50 && health != "NOT_SERVING"; ++i) {
    health = testing::HealthStatus(server->grpc_addr(), 1.0);
    if (health != "NOT_SERVING") std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(health, "NOT_SERVING");
  EXPECT_TRUE(server->Running());
  // New requests are refused at once with UNAVAILABLE.
  LoadGenerator late(server->grpc_addr(), [] {
    LoadOptions o;
    o.id_prefix = "late";
    return o;
  }());
  late.Start(testing::CallKind::kUnary);
  late.Start(testing::CallKind::kStream);
  ASSERT_TRUE(late.WaitAll(10));
  for (const CallRecord& r : late.Records()) {
    EXPECT_EQ(r.code, grpc::StatusCode::UNAVAILABLE) << r.id << ": " << r.message;
    EXPECT_NE(r.message.find("engine failed"), std::string::npos) << r.message;
  }
  const std::string metrics = ScrapeWhenIdle(MetricsPort(*server));
  EXPECT_EQ(testing::MetricValue(metrics, "vtw_requests_total{code=\"INTERNAL\",protocol=\"grpc\"}"),
            Count(counts, "INTERNAL"));
  EXPECT_EQ(testing::MetricValue(metrics, "vtw_requests_total{code=\"UNAVAILABLE\",protocol=\"grpc\"}"),
            Count(counts, "UNAVAILABLE") + 2);
  EXPECT_EQ(testing::MetricValue(metrics, "vtw_kv_cache_bytes"), 0);
  EXPECT_EQ(testing::MetricValue(metrics, "vtw_requests_running"), 0);
  EXPECT_EQ(testing::MetricValue(metrics, "vtw_requests_waiting"), 0);
  const std::string log = ReadFile(server->log_path());
  EXPECT_NE(log.find("engine failure: injected failure after 30 engine steps"), std::string::npos)
      << server->LogTail();
  // It still shuts down cleanly.
  server->Signal(SIGTERM);
  EXPECT_EQ(server->Wait(30), 0) << server->LogTail();
  std::printf("FAULT engine-failure requests=%zu internal=%d unavailable=%d late_unavailable=2 "
              "health=%s\n",
              records.size(), Count(counts, "INTERNAL"), Count(counts, "UNAVAILABLE"),
              health.c_str());
}

}  // namespace
}  // namespace vtw
