// The vtw-server binary as operators run it: SIGTERM under load drains and exits 0 with a status
// for every accepted request; a missing or corrupt model fails fast with a clear message; a real
// Prometheus server scrapes it and PromQL sees exactly the FLOPs the responses report.
#include <signal.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/util/oracle.h"
#include "tests/util/server_process.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_server.h"
#include "vtw/v1/inference.grpc.pb.h"

namespace vtw {
namespace {

namespace fs = std::filesystem;
using testing::OracleCases;

v1::GenerateRequest Request(int c, int max_new_tokens, int layer) {
  std::ifstream in(testing::OracleDir() + "/" + OracleCases()[c]["image"].get<std::string>(),
                   std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  v1::GenerateRequest r;
  r.set_image(os.str());
  r.set_prompt(OracleCases()[c]["question"].get<std::string>());
  r.mutable_sampling()->set_max_new_tokens(max_new_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  r.mutable_vtw()->set_mode(layer < 0 ? v1::VTW_MODE_OFF : v1::VTW_MODE_LAYER);
  r.mutable_vtw()->set_layer(layer < 0 ? 0 : layer);
  return r;
}

TEST(ServerOps, SigtermUnderLoadDrainsAndExitsZero) {
  auto server = testing::ServerProcess::Start(
      {"--max-running", "2", "--max-batch-tokens", "4", "--drain-timeout", "20"});
  ASSERT_TRUE(server);
  auto channel = grpc::CreateChannel(server->grpc_addr(), grpc::InsecureChannelCredentials());
  auto stub = v1::InferenceService::NewStub(channel);
  constexpr int kStreams = 6;
  std::vector<grpc::Status> statuses(kStreams);
  std::vector<int> tokens(kStreams, 0);
  std::atomic<int> started{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < kStreams; ++i) {
    clients.emplace_back([&, i] {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
      auto reader = stub->GenerateStream(&ctx, Request(i % 8, 200, i % 3 == 0 ? -1 : 2));
      v1::GenerateStreamResponse m;
      bool first = true;
      while (reader->Read(&m)) {
        if (first) ++started;
        first = false;
        tokens[i] += m.token_ids_size();
      }
      statuses[i] = reader->Finish();
    });
  }
  for (int i = 0; i < 500 && started.load() < 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_GE(started.load(), 1);
  server->Signal(SIGTERM);
  // While draining, health is NOT_SERVING and new requests are refused with UNAVAILABLE.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  if (server->Running()) {
    v1::GenerateResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::Status late = stub->Generate(&ctx, Request(0, 2, -1), &resp);
    EXPECT_EQ(late.error_code(), grpc::StatusCode::UNAVAILABLE) << late.error_message();
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(server->Wait(60), 0) << server->LogTail();
  int ok = 0;
  for (int i = 0; i < kStreams; ++i) {
    // Every accepted stream ended with a status: finished (OK) within the drain, or UNAVAILABLE.
    EXPECT_TRUE(statuses[i].ok() || statuses[i].error_code() == grpc::StatusCode::UNAVAILABLE)
        << i << ": " << statuses[i].error_code() << " " << statuses[i].error_message();
    if (statuses[i].ok()) {
      ++ok;
      EXPECT_EQ(tokens[i], 200);
    }
  }
  EXPECT_GE(ok, 1);
  EXPECT_NE(server->LogTail(200).find("SIGTERM received"), std::string::npos);
}

TEST(ServerOps, DrainTimeoutEndsInFlightRequestsWithUnavailable) {
  auto server = testing::ServerProcess::Start(
      {"--max-running", "1", "--max-batch-tokens", "1", "--drain-timeout", "0"});
  ASSERT_TRUE(server);
  auto stub = v1::InferenceService::NewStub(
      grpc::CreateChannel(server->grpc_addr(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  auto reader = stub->GenerateStream(&ctx, Request(0, 200, -1));
  v1::GenerateStreamResponse m;
  ASSERT_TRUE(reader->Read(&m));
  server->Signal(SIGTERM);
  while (reader->Read(&m)) {
  }
  grpc::Status st = reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  EXPECT_EQ(server->Wait(60), 0);
}

TEST(ServerOps, MissingOrCorruptModelFailsFastWithAClearMessage) {
  const std::string bin = testing::ServerBinary();
  auto missing = testing::RunProcess({bin, "--model", "/nonexistent/model", "--listen",
                                      "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                                      "--http-listen", "127.0.0.1:0"});
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_NE(missing.err.find("does not exist"), std::string::npos) << missing.err;

  const fs::path dir = testing::FreshTestDir("vtw_corrupt") / "model";
  testing::CopyOracleModel(dir);
  fs::resize_file(dir / "model.safetensors", 1000);
  auto corrupt = testing::RunProcess({bin, "--model", dir.string(), "--listen", "127.0.0.1:0",
                                      "--metrics-listen", "127.0.0.1:0", "--http-listen",
                                      "127.0.0.1:0"});
  EXPECT_EQ(corrupt.exit_code, 1);
  EXPECT_NE(corrupt.err.find("model.safetensors"), std::string::npos) << corrupt.err;
  EXPECT_EQ(corrupt.err.find("serving"), std::string::npos) << "never reports serving";
  fs::remove_all(dir.parent_path());
}

// Runs Prometheus (Debian's package) scraping the server every second.
class PrometheusProcess {
 public:
  explicit PrometheusProcess(const std::string& target) {
    dir_ = fs::path(::testing::TempDir()) / ("vtw_prom_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    port_ = testing::PickFreePort();
    std::ofstream(dir_ / "prometheus.yml")
        << "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        << "rule_files:\n  - " << VTW_SOURCE_DIR << "/deploy/prometheus/rules.yml\n"
        << "scrape_configs:\n  - job_name: vtw-serve\n    static_configs:\n"
        << "      - targets: ['" << target << "']\n";
    pid_ = fork();
    if (pid_ == 0) {
      const std::string log = (dir_ / "prometheus.log").string();
      freopen(log.c_str(), "w", stderr);
      freopen(log.c_str(), "a", stdout);
      const std::string config = "--config.file=" + (dir_ / "prometheus.yml").string();
      const std::string storage = "--storage.tsdb.path=" + (dir_ / "data").string();
      const std::string listen = "--web.listen-address=127.0.0.1:" + std::to_string(port_);
      execl("/usr/bin/prometheus", "prometheus", config.c_str(), storage.c_str(), listen.c_str(),
            static_cast<char*>(nullptr));
      _exit(127);
    }
  }
  ~PrometheusProcess() {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    fs::remove_all(dir_);
  }
  // Result of an instant PromQL query (the "data.result" array), or null on error.
  nlohmann::json Query(const std::string& promql) const {
    std::string encoded;
    for (unsigned char c : promql) {
      if (isalnum(c) || c == '_' || c == '.' || c == '-') {
        encoded += static_cast<char>(c);
      } else {
        char buf[4];
        std::snprintf(buf, sizeof(buf), "%%%02X", c);
        encoded += buf;
      }
    }
    std::string body = testing::HttpGet(port_, "/api/v1/query?query=" + encoded);
    auto j = nlohmann::json::parse(body, nullptr, false);
    if (j.is_discarded() || j.value("status", "") != "success") return nullptr;
    return j["data"]["result"];
  }
  std::string Log() const {
    std::ifstream in(dir_ / "prometheus.log");
    std::ostringstream os;
    os << in.rdbuf();
    std::string s = os.str();
    return s.size() > 3000 ? s.substr(s.size() - 3000) : s;
  }

 private:
  fs::path dir_;
  int port_ = 0;
  pid_t pid_ = -1;
};

double ScalarOf(const nlohmann::json& result) {
  if (!result.is_array() || result.empty()) return -1;
  return std::stod(result[0]["value"][1].get<std::string>());
}

TEST(ServerOps, RealPrometheusSeesTheFlopsSavedTheResponsesReport) {
  auto server = testing::ServerProcess::Start();
  ASSERT_TRUE(server);
  PrometheusProcess prometheus(server->metrics_addr());
  auto stub = v1::InferenceService::NewStub(
      grpc::CreateChannel(server->grpc_addr(), grpc::InsecureChannelCredentials()));
  double saved = 0;
  for (int i = 0; i < 8; ++i) {
    v1::GenerateResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->Generate(&ctx, Request(i, 6, i % 4), &resp).ok());
    saved += static_cast<double>(resp.vtw().flops_without_vtw() - resp.vtw().flops());
  }
  ASSERT_GT(saved, 0);
  double seen = -1;
  for (int i = 0; i < 150 && seen != saved; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    seen = ScalarOf(prometheus.Query("sum(vtw_flops_saved_total)"));
  }
  EXPECT_EQ(seen, saved) << prometheus.Log();
  EXPECT_EQ(ScalarOf(prometheus.Query("sum(vtw_requests_total{code=\"OK\"})")), 8);
  EXPECT_EQ(ScalarOf(prometheus.Query("up{job=\"vtw-serve\"}")), 1);

  // Load for a few scrape intervals (streams, repeated images, several K), then every Grafana
  // panel query and every recording rule must evaluate without error and return data.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(6);
  for (int i = 0; std::chrono::steady_clock::now() < until; ++i) {
    grpc::ClientContext ctx;
    auto reader = stub->GenerateStream(&ctx, Request(i % 8, 8, i % 5 - 1));
    v1::GenerateStreamResponse m;
    while (reader->Read(&m)) {
    }
    ASSERT_TRUE(reader->Finish().ok());
  }
  std::this_thread::sleep_for(std::chrono::seconds(3));
  const std::string script = std::string(VTW_SOURCE_DIR) + "/scripts/dashboard-queries.py";
  int checked = 0;
  for (const char* what : {"--dashboard-only", "--rules"}) {
    std::vector<std::string> argv = {"/usr/bin/python3", script};
    if (std::string(what) == "--rules") argv.push_back("--rules");
    auto listed = testing::RunProcess(argv);
    ASSERT_EQ(listed.exit_code, 0) << listed.err;
    std::istringstream lines(listed.out);
    std::string expr;
    while (std::getline(lines, expr)) {
      if (expr.empty()) continue;
      ++checked;
      nlohmann::json result = prometheus.Query(expr);
      EXPECT_FALSE(result.is_null()) << "query failed: " << expr;
      EXPECT_FALSE(result.is_array() && result.empty()) << "no data: " << expr;
    }
  }
  EXPECT_GT(checked, 40);
}

}  // namespace
}  // namespace vtw
