// Overload: the real vtw-server binary with a small queue, driven open-loop at twice its measured
// capacity for VTW_OVERLOAD_SECONDS (default 60) by unary and streaming gRPC clients, some of
// which cancel mid-stream and some of which have short deadlines, and at the same time by
// OpenAI-compatible HTTP clients (another quarter of the capacity, some with a short
// "vtw_timeout"). It must shed load with RESOURCE_EXHAUSTED (HTTP 429) on both fronts and keep
// serving, give every request exactly one terminal status, keep its memory bounded, and its
// Prometheus counters (per protocol) and access log must agree with what the clients saw.
// Timing is measured and printed (the OVERLOAD line, for docs/RELIABILITY.md), never asserted.
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "tests/util/http_load.h"
#include "tests/util/load_generator.h"
#include "tests/util/server_process.h"
#include "tests/util/test_server.h"

namespace vtw {
namespace {

using testing::CallRecord;
using testing::LoadGenerator;
using testing::LoadOptions;
using SteadyClock = std::chrono::steady_clock;

double EnvSeconds(const char* name, double fallback) {
  const char* env = std::getenv(name);
  return env && std::atof(env) > 0 ? std::atof(env) : fallback;
}

int MetricsPort(const testing::ServerProcess& server) {
  const std::string addr = server.metrics_addr();
  return std::atoi(addr.substr(addr.rfind(':') + 1).c_str());
}

std::string Join(const std::map<std::string, int>& counts) {
  std::string out;
  for (const auto& [code, n] : counts) out += (out.empty() ? "" : ",") + code + "=" + std::to_string(n);
  return out;
}

int Count(const std::map<std::string, int>& counts, const std::string& code) {
  auto it = counts.find(code);
  return it == counts.end() ? 0 : it->second;
}

// Every code either side reported, with the server's counter for it on `protocol`.
std::map<std::string, int> ServerCounts(const std::string& metrics, const std::set<std::string>& codes,
                                        const std::string& protocol) {
  std::map<std::string, int> out;
  for (const std::string& code : codes) {
    const double v = testing::MetricValue(
        metrics, "vtw_requests_total{code=\"" + code + "\",protocol=\"" + protocol + "\"}");
    if (v > 0) out[code] = static_cast<int>(v);
  }
  return out;
}

TEST(Overload, TwiceCapacityShedsLoadStaysBoundedAndReconciles) {
  const double seconds = EnvSeconds("VTW_OVERLOAD_SECONDS", 60);
  const double capacity_seconds = EnvSeconds("VTW_OVERLOAD_CAPACITY_SECONDS", 5);
  constexpr int kMaxRunning = 4, kMaxQueue = 8;
  auto server = testing::ServerProcess::Start(
      {"--max-queue", std::to_string(kMaxQueue), "--max-running", std::to_string(kMaxRunning)});
  ASSERT_TRUE(server);
  const int metrics_port = MetricsPort(*server);
  const int64_t rss_start = testing::ResidentBytes(server->pid());

  // Capacity: exactly max-running streaming clients back to back (the server is never queueing).
  LoadOptions cap_options;
  cap_options.id_prefix = "cap";
  LoadGenerator cap(server->grpc_addr(), cap_options);
  const double capacity = cap.RunClosedLoop(kMaxRunning, capacity_seconds);
  ASSERT_TRUE(cap.WaitAll(60));
  std::vector<double> cap_latency;
  for (const CallRecord& r : cap.Records()) {
    ASSERT_EQ(r.code, grpc::StatusCode::OK) << r.id << ": " << r.message;
    cap_latency.push_back(r.seconds());
  }
  ASSERT_GT(capacity, 0);

  // Overload: 2x capacity, open loop. An accepted request then waits behind a full queue, so it
  // takes about (max-queue + max-running) / capacity = 3x its latency at capacity. The short
  // deadline is 1.5x the latency at capacity, half that: most such requests expire (queued or
  // mid-generation), a few finish, and few finish within a hair of their deadline (where the
  // client's and the server's clocks race; see the reconciliation below). The hair is fixed
  // (timer and scheduling jitter, about a millisecond), so the deadline has a floor of 20 ms:
  // once decode got faster (the fused decode attention) the oracle model's latency at capacity
  // fell to ~11 ms, and a 16 ms deadline made 2.0% of all calls races (a share that grows as the
  // model gets faster, not as the server gets worse); with 20 ms, 0.4%, and 600 deadlines still
  // expire. (30 ms left only 25 expiring: the deadline path would go untested.)
  LoadOptions options;
  options.id_prefix = "ovl";
  options.short_deadline = std::chrono::milliseconds(
      std::max<int64_t>(20, static_cast<int64_t>(1500 * testing::Quantile(cap_latency, 0.5))));
  LoadGenerator load(server->grpc_addr(), options);
  const double offered = 2 * capacity;

  // Server memory, sampled every second while the load runs.
  std::vector<std::pair<double, int64_t>> rss;  // (seconds since the load began, bytes)
  std::atomic<bool> load_done{false};
  const auto load_start = SteadyClock::now();
  std::thread sampler([&] {
    while (!load_done.load()) {
      rss.emplace_back(std::chrono::duration<double>(SteadyClock::now() - load_start).count(),
                       testing::ResidentBytes(server->pid()));
      for (int i = 0; i < 10 && !load_done.load(); ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
  });
  // HTTP clients beside it: four connections, a quarter of the capacity together, every 5th
  // request with the gRPC short deadline as its "vtw_timeout".
  testing::HttpLoadOptions http_options;
  http_options.short_timeout = options.short_deadline;
  testing::HttpLoad http_load("127.0.0.1", server->http_port(), http_options);
  std::thread http_thread([&] { http_load.Run(4, capacity / 4, seconds); });
  const int started = load.RunOpenLoop(offered, seconds);
  http_thread.join();
  load_done = true;
  sampler.join();
  const bool all_done = load.WaitAll(120);
  EXPECT_TRUE(all_done) << load.in_flight() << " calls still have no status 120 s after the load";
  ASSERT_TRUE(server->Running()) << "the server died under load:\n" << server->LogTail();

  // After the load: nothing running or waiting, no KV cache held. A client that cancelled or
  // timed out has its status before the engine drops the request (at its next step), and the
  // gauges drop just before the counter and the access log line are written: poll, then settle.
  std::string metrics;
  auto gauge = [&](const char* name) { return testing::MetricValue(metrics, name); };
  for (int i = 0; i < 100; ++i) {
    metrics = testing::ScrapeMetrics(metrics_port);
    if (gauge("vtw_requests_running") == 0 && gauge("vtw_requests_waiting") == 0 &&
        gauge("vtw_kv_cache_bytes") == 0) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  metrics = testing::ScrapeMetrics(metrics_port);
  EXPECT_EQ(gauge("vtw_requests_running"), 0);
  EXPECT_EQ(gauge("vtw_requests_waiting"), 0);
  EXPECT_EQ(gauge("vtw_kv_cache_bytes"), 0);
  EXPECT_EQ(testing::HealthStatus(server->grpc_addr(), 5.0), "SERVING");

  // Exactly one terminal status per call; every OK answer complete.
  std::vector<CallRecord> records = cap.Records();
  const std::vector<CallRecord> overload = load.Records();
  records.insert(records.end(), overload.begin(), overload.end());
  EXPECT_EQ(static_cast<int>(overload.size()), started);
  std::vector<double> ok_latency;
  for (const CallRecord& r : records) {
    EXPECT_EQ(r.terminal_statuses, 1) << r.id;
    if (r.code == grpc::StatusCode::OK) {
      EXPECT_TRUE(r.complete) << r.id << " OK with " << r.tokens << " tokens";
    }
    if (r.code == grpc::StatusCode::OK && r.id.rfind("ovl-", 0) == 0) {
      ok_latency.push_back(r.seconds());
    }
    // Nothing but the statuses overload may produce.
    static const std::set<grpc::StatusCode> kAllowed = {
        grpc::StatusCode::OK, grpc::StatusCode::RESOURCE_EXHAUSTED, grpc::StatusCode::CANCELLED,
        grpc::StatusCode::DEADLINE_EXCEEDED};
    EXPECT_TRUE(kAllowed.count(r.code)) << r.id << " (" << CallKindName(r.kind)
                                         << "): " << testing::CodeName(r.code) << " "
                                         << r.message;
  }
  const std::map<std::string, int> client = LoadGenerator::CountByCode(records);
  const std::map<std::string, int> client_overload = LoadGenerator::CountByCode(overload);
  EXPECT_GT(Count(client_overload, "RESOURCE_EXHAUSTED"), 0)
      << "2x capacity was offered but nothing was shed";
  EXPECT_GT(Count(client_overload, "OK"), 0);
  EXPECT_GT(Count(client_overload, "CANCELLED"), 0);
  EXPECT_GT(Count(client_overload, "DEADLINE_EXCEEDED"), 0) << "no short deadline expired";

  // HTTP: a response for every call (an OpenAI error object for every non-200), only the
  // statuses overload may produce, every 200 complete, and some shed with 429.
  const std::vector<testing::HttpCallRecord> http = http_load.Records();
  for (const auto& r : http) {
    EXPECT_NE(r.http_status, 0) << r.id << ": no HTTP response: " << r.error;
    static const std::set<int> kAllowedHttp = {200, 429, 504};
    EXPECT_TRUE(kAllowedHttp.count(r.http_status)) << r.id << ": HTTP " << r.http_status << " " << r.error;
    if (r.http_status == 200) {
      EXPECT_TRUE(r.complete) << r.id << ": 200 without the whole answer";
    } else {
      EXPECT_FALSE(r.error.empty()) << r.id << ": HTTP " << r.http_status << " without an error message";
    }
  }
  const std::map<std::string, int> http_client = testing::HttpLoad::CountByCode(http);
  EXPECT_GT(Count(http_client, "OK"), 0) << "no HTTP request was served under load";
  EXPECT_GT(Count(http_client, "RESOURCE_EXHAUSTED"), 0) << "no HTTP request was shed with 429";

  // Reconciliation, request by request: the server's access log has exactly one line per id with
  // the status the client saw. The only allowed differences are races where the client gave up
  // first: its deadline or cancel fired while the server's status was on its way (client
  // DEADLINE_EXCEEDED or CANCELLED, server OK or RESOURCE_EXHAUSTED), or its deadline's
  // RST_STREAM reached the server before the server's own copy of the deadline had passed
  // (client DEADLINE_EXCEEDED, server CANCELLED), or it gave up before the server read it.
  const auto access = testing::ReadAccessLog(server->log_path());
  std::map<std::string, int> access_counts, http_access_counts;  // gRPC, HTTP
  for (const auto& [id, lines] : access) {
    const bool is_http = id.rfind(http_options.id_prefix + "-", 0) == 0;
    for (const auto& line : lines) ++(is_http ? http_access_counts : access_counts)[line.status];
  }
  int unseen = 0, gave_up_first = 0;
  std::map<std::string, int> races;  // "client->server" -> count
  std::set<std::string> ids;
  for (const CallRecord& r : records) {
    ids.insert(r.id);
    const std::string code = testing::CodeName(r.code);
    const bool gave_up = r.code == grpc::StatusCode::CANCELLED ||
                         r.code == grpc::StatusCode::DEADLINE_EXCEEDED;
    auto it = access.find(r.id);
    if (it == access.end()) {
      // Only a call that ended on the client before the server read it may be absent.
      EXPECT_TRUE(gave_up) << r.id << " (" << code << ") is missing from the server's access log";
      ++unseen;
      continue;
    }
    ASSERT_EQ(it->second.size(), 1u) << r.id << " has " << it->second.size()
                                     << " access log lines (one terminal status expected)";
    const std::string& server_code = it->second[0].status;
    if (server_code == code) continue;
    EXPECT_TRUE(gave_up) << r.id << " (" << CallKindName(r.kind) << "): client " << code
                         << ", server " << server_code;
    ++gave_up_first;
    ++races[code + "->" + server_code];
  }
  // HTTP clients never give up first (their read timeout is long; the server's deadline ends
  // a call), so the access log has exactly the status each of them saw.
  for (const auto& r : http) {
    ids.insert(r.id);
    auto it = access.find(r.id);
    if (it == access.end()) {
      ADD_FAILURE() << r.id << " (HTTP " << r.http_status << ") is missing from the server's access log";
      continue;
    }
    ASSERT_EQ(it->second.size(), 1u) << r.id << " has " << it->second.size() << " access log lines";
    EXPECT_EQ(it->second[0].status, r.code) << r.id << ": HTTP client saw " << r.http_status;
  }
  for (const auto& [id, lines] : access) {
    EXPECT_TRUE(ids.count(id)) << "the server logged a request no client sent: " << id;
  }
  // The counters: one per terminal status, the same as the access log, code by code; and the
  // clients' counts, code by code, once the races above are accounted for.
  std::set<std::string> codes;
  for (const auto& [code, n] : client) codes.insert(code);
  for (const auto& [code, n] : access_counts) codes.insert(code);
  const std::map<std::string, int> server_counts = ServerCounts(metrics, codes, "grpc");
  EXPECT_EQ(server_counts, access_counts) << "gRPC: metrics and access log disagree";
  std::set<std::string> http_codes;
  for (const auto& [code, n] : http_client) http_codes.insert(code);
  for (const auto& [code, n] : http_access_counts) http_codes.insert(code);
  const std::map<std::string, int> http_server_counts = ServerCounts(metrics, http_codes, "http");
  EXPECT_EQ(http_server_counts, http_access_counts) << "HTTP: metrics and access log disagree";
  EXPECT_EQ(http_server_counts, http_client) << "HTTP: metrics and clients disagree";
  std::map<std::string, int> client_adjusted = client;
  for (const auto& [race, n] : races) {
    const std::string from = race.substr(0, race.find("->")), to = race.substr(race.find("->") + 2);
    if ((client_adjusted[from] -= n) == 0) client_adjusted.erase(from);
    client_adjusted[to] += n;
  }
  for (const CallRecord& r : records) {
    if (!access.count(r.id) && --client_adjusted[testing::CodeName(r.code)] == 0) {
      client_adjusted.erase(testing::CodeName(r.code));
    }
  }
  EXPECT_EQ(client_adjusted, server_counts);
  // Races are rare: at most 2% of the calls (observed: see docs/RELIABILITY.md).
  EXPECT_LE(gave_up_first + unseen, std::max<int>(5, static_cast<int>(records.size()) / 50))
      << "client/server status differences";

  // Memory stays bounded. The first half includes the warm-up a long-running server does once
  // (allocator arenas, the image cache filling with the 8 oracle images, gRPC buffers for the
  // peak number of concurrent calls, already reached after a second of 2x load); a leak per
  // request grows with the request count instead, and the second half serves as many requests as
  // the first. The bound, 1.2x + 32 MB of the first half's maximum, is ~70 MB of growth for the
  // ~200 MB this server has: over two orders of magnitude above the measured difference (< 1 MB,
  // docs/RELIABILITY.md), yet at the ~13,000 requests a 30 s half sees here, a leak of ~6 KB per
  // request (a KV cache, a pixel tensor or a call object) exceeds it.
  int64_t first_max = 0, second_max = 0;
  for (const auto& [t, bytes] : rss) {
    int64_t& half = t < seconds / 2 ? first_max : second_max;
    half = std::max(half, bytes);
  }
  ASSERT_GT(first_max, 0);
  ASSERT_GT(second_max, 0);
  EXPECT_LE(static_cast<double>(second_max), 1.2 * static_cast<double>(first_max) + 32e6)
      << "RSS grew: first half max " << first_max << " bytes, second half max " << second_max;

  const double ok_rate = Count(client_overload, "OK") / seconds;
  std::printf(
      "OVERLOAD seconds=%.0f max_running=%d max_queue=%d capacity=%.2f/s offered=%.2f/s "
      "started=%d ok_rate=%.2f/s short_deadline=%lldms overload_client{%s} all_client{%s} "
      "all_server{%s} http_client{%s} http_server{%s} "
      "client_gave_up_first=%d unseen_by_server=%d races{%s} ok_latency_p50=%.3fs "
      "ok_latency_p95=%.3fs rss_start=%.1fMB rss_first_half_max=%.1fMB "
      "rss_second_half_max=%.1fMB\n",
      seconds, kMaxRunning, kMaxQueue, capacity, offered, started, ok_rate,
      static_cast<long long>(options.short_deadline.count()), Join(client_overload).c_str(),
      Join(client).c_str(), Join(server_counts).c_str(), Join(http_client).c_str(),
      Join(http_server_counts).c_str(), gave_up_first, unseen, Join(races).c_str(),
      testing::Quantile(ok_latency, 0.5), testing::Quantile(ok_latency, 0.95), rss_start / 1e6,
      first_max / 1e6, second_max / 1e6);
  std::fflush(stdout);

  // And it still shuts down cleanly.
  server->Signal(SIGTERM);
  EXPECT_EQ(server->Wait(60), 0) << server->LogTail();
}

}  // namespace
}  // namespace vtw
