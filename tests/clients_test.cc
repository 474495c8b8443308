// The clients of the gRPC contract, as users run them: the `vtw client` binary and
// examples/python/client.py (Debian's /usr/bin/python3 with python3-grpcio).
//   ClientCliTest / PythonClientTest: no server needed (flag errors, unreachable address,
//     deadline, local image errors).
//   ServerClientsTest: a real vtw-server on loopback (tests/util/server_process.h); unary,
//     streaming, JSON and Python outputs agree token for token, and server errors come back as
//     "error: <CODE>: <message>" with exit status 1. Fails (does not skip) without vtw-server.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/util/oracle.h"
#include "tests/util/server_process.h"
#include "tests/util/subprocess.h"

namespace vtw {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::ProcessResult;
using testing::RunProcess;
using testing::ServerProcess;

constexpr char kPython[] = "/usr/bin/python3";  // Debian's, with python3-grpcio

std::string PythonClient() { return std::string(VTW_SOURCE_DIR) + "/examples/python/client.py"; }

std::string Image(int i) {
  return testing::OracleDir() + "/" + testing::OracleCases()[i]["image"].get<std::string>();
}
std::string Question(int i) { return testing::OracleCases()[i]["question"].get<std::string>(); }

ProcessResult VtwClient(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {testing::VtwBinary(), "client"};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunProcess(argv);
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// A fresh directory per test (removed at the end).
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::FreshTestDir("vtw_clients");
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string WriteFile(const std::string& name, const std::string& bytes) {
    const fs::path p = dir_ / name;
    std::ofstream(p, std::ios::binary) << bytes;
    return p.string();
  }

  // examples/python/client.py with its stubs generated into this test's directory.
  ProcessResult Python(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {kPython, PythonClient(), "--stubs", (dir_ / "stubs").string()};
    argv.insert(argv.end(), args.begin(), args.end());
    return RunProcess(argv);
  }

  fs::path dir_;
};

// ---------------------------------------------------------------------------------------------
// Without a server.

using ClientCliTest = TempDirTest;

TEST_F(ClientCliTest, UnreachableAddressIsUnavailable) {
  const std::string addr = "127.0.0.1:" + std::to_string(testing::PickFreePort());
  const std::vector<std::vector<std::string>> modes = {
      {"--prompt", "hi"}, {"--prompt", "hi", "--stream"}, {"--info"}, {"--health"}};
  for (const std::vector<std::string>& mode : modes) {
    std::vector<std::string> args = {"--addr", addr, "--timeout", "20"};
    args.insert(args.end(), mode.begin(), mode.end());
    const auto start = std::chrono::steady_clock::now();
    const ProcessResult r = VtwClient(args);
    EXPECT_LT(Seconds(start), 20.0) << "must fail fast, not wait for the deadline";
    EXPECT_EQ(r.signal, 0) << r.err;
    EXPECT_EQ(r.exit_code, 1) << mode[0] << ": " << r.err;
    EXPECT_EQ(r.err.rfind("error: UNAVAILABLE: ", 0), 0u) << mode[0] << ": " << r.err;
  }
}

TEST_F(ClientCliTest, DeadlineAppliesWhenTheServerNeverAnswers) {
  // A socket that accepts TCP connections (backlog) but never speaks HTTP/2.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(fd, 16), 0);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string target = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  const auto start = std::chrono::steady_clock::now();
  const ProcessResult r = VtwClient({"--addr", target, "--prompt", "hi", "--timeout", "1"});
  const double elapsed = Seconds(start);
  close(fd);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_TRUE(Contains(r.err, "error: DEADLINE_EXCEEDED: ") ||
              Contains(r.err, "error: UNAVAILABLE: "))
      << r.err;
  EXPECT_LT(elapsed, 15.0);
}

TEST_F(ClientCliTest, ImageFileErrorsAreLocal) {
  // An address nothing listens on: the error must come before any connection attempt.
  const std::string addr = "127.0.0.1:" + std::to_string(testing::PickFreePort());
  const std::string missing = (dir_ / "missing.png").string();
  ProcessResult r = VtwClient({"--addr", addr, "--image", missing, "--prompt", "hi"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_TRUE(Contains(r.err, missing) && Contains(r.err, "does not exist")) << r.err;
  EXPECT_FALSE(Contains(r.err, "UNAVAILABLE")) << r.err;

  r = VtwClient({"--addr", addr, "--image", WriteFile("empty.png", ""), "--prompt", "hi"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_TRUE(Contains(r.err, "empty")) << r.err;

  r = VtwClient({"--addr", addr, "--image", dir_.string(), "--prompt", "hi"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_TRUE(Contains(r.err, "directory")) << r.err;
}

TEST_F(ClientCliTest, BadFlagsExitWithStatus2) {
  const std::string addr = "127.0.0.1:" + std::to_string(testing::PickFreePort());
  struct Case {
    std::vector<std::string> args;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {{"--prompt", "hi", "--vtw-layer", "abc"}, "--vtw-layer"},
      {{"--prompt", "hi", "--vtw-layer", "-1"}, "--vtw-layer"},
      {{"--prompt", "hi", "--vtw-layer", "2", "--vtw-profile", "vqa"}, "--vtw-profile"},
      {{"--prompt", "hi", "--max-new-tokens", "-3"}, "--max-new-tokens"},
      {{"--prompt", "hi", "--max-new-tokens", "99999999999"}, "--max-new-tokens"},
      {{"--prompt", "hi", "--temperature", "warm"}, "--temperature"},
      {{"--prompt", "hi", "--top-p", "nan"}, "--top-p"},
      {{"--prompt", "hi", "--top-k", "1.5"}, "--top-k"},
      {{"--prompt", "hi", "--seed", "-1"}, "--seed"},
      {{"--prompt", "hi", "--timeout", "0"}, "--timeout"},
      {{"--prompt", "hi", "--timeout", "soon"}, "--timeout"},
      {{"--image", Image(0)}, "--prompt"},
      {{"--info", "--health"}, "--health"},
      {{"--prompt", "hi", "stray"}, "stray"},
  };
  for (const Case& c : cases) {
    std::vector<std::string> args = {"--addr", addr};
    args.insert(args.end(), c.args.begin(), c.args.end());
    const ProcessResult r = VtwClient(args);
    std::string line;
    for (const auto& a : c.args) line += a + " ";
    EXPECT_EQ(r.signal, 0) << line << r.err;
    EXPECT_EQ(r.exit_code, 2) << line << r.err;
    EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << line << r.err;
    EXPECT_TRUE(Contains(r.err, c.needle)) << line << r.err;
    EXPECT_FALSE(Contains(r.err, "UNAVAILABLE")) << line << "sent before checking: " << r.err;
  }
}

using PythonClientTest = TempDirTest;

TEST_F(PythonClientTest, GenerateStubsWritesTheModules) {
  const fs::path out = dir_ / "gen";
  const ProcessResult r = RunProcess(
      {"/usr/bin/env", std::string("PYTHON=") + kPython, "bash",
       std::string(VTW_SOURCE_DIR) + "/examples/python/generate_stubs.sh", out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* f : {"vtw/v1/inference_pb2.py", "vtw/v1/inference_pb2_grpc.py",
                        "health_pb2.py", "health_pb2_grpc.py"}) {
    EXPECT_TRUE(fs::exists(out / f)) << f;
  }
}

TEST_F(PythonClientTest, UnreachableAddressIsUnavailable) {
  const std::string addr = "127.0.0.1:" + std::to_string(testing::PickFreePort());
  ProcessResult r = Python({"--addr", addr, "--prompt", "hi", "--timeout", "20"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_TRUE(Contains(r.err, "error: UNAVAILABLE: ")) << r.err;

  r = Python({"--addr", addr, "--prompt", "hi", "--image", (dir_ / "missing.png").string()});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_TRUE(Contains(r.err, "missing.png")) << r.err;

  r = Python({"--addr", addr, "--prompt", "hi", "--vtw-layer", "abc"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_TRUE(Contains(r.err, "--vtw-layer")) << r.err;
}

// ---------------------------------------------------------------------------------------------
// Against a real server.

class ServerClientsTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    server_ = ServerProcess::Start();
    ASSERT_NE(server_, nullptr) << "see the failure above: the server did not start";
  }

  ProcessResult Client(const std::vector<std::string>& args) {
    std::vector<std::string> all = {"--addr", server_->grpc_addr()};
    all.insert(all.end(), args.begin(), args.end());
    return VtwClient(all);
  }
  ProcessResult PythonClient(const std::vector<std::string>& args) {
    std::vector<std::string> all = {"--addr", server_->grpc_addr()};
    all.insert(all.end(), args.begin(), args.end());
    return Python(all);
  }

  // Runs a client that must succeed and returns its stdout parsed as JSON.
  json MustJson(const ProcessResult& r) {
    EXPECT_EQ(r.exit_code, 0) << r.err << "\nserver log:\n" << server_->LogTail();
    try {
      return json::parse(r.out);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "not JSON: " << e.what() << "\n" << r.out;
      return json::object();
    }
  }

  // Sends `image` once so that the server's image cache holds its features.
  void WarmImage(const std::string& image) {
    const ProcessResult r = Client({"--image", image, "--prompt", "hi", "--max-new-tokens", "1"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  // A server error: exit status 1 and "error: <code>: <message>" on stderr.
  void ExpectRpcError(const ProcessResult& r, const std::string& code, const std::string& what) {
    EXPECT_EQ(r.signal, 0) << what << ": " << r.err;
    EXPECT_EQ(r.exit_code, 1) << what << ": " << r.err;
    EXPECT_EQ(r.err.rfind("error: " + code + ": ", 0), 0u) << what << ": " << r.err;
    EXPECT_GT(r.err.size(), ("error: " + code + ": \n").size()) << what << ": message is empty";
  }

  std::unique_ptr<ServerProcess> server_;
};

// The fields that must not depend on the client or on streaming (timing and request_id may).
// `vtw.flops` counts the vision encoder only for a request whose image was not in the server's
// image cache: callers send each image once first (WarmImage) so that every compared request
// finds it there.
void ExpectSameResult(const json& a, const json& b, const std::string& what) {
  EXPECT_EQ(a["text"], b["text"]) << what;
  EXPECT_EQ(a["token_ids"], b["token_ids"]) << what;
  EXPECT_EQ(a["finish_reason"], b["finish_reason"]) << what;
  EXPECT_EQ(a["usage"], b["usage"]) << what;
  EXPECT_EQ(a["vtw"], b["vtw"]) << what;
}

TEST_F(ServerClientsTest, UnaryStreamAndJsonAgree) {
  WarmImage(Image(0));
  for (const std::string layer : {"default", "off", "1"}) {
    SCOPED_TRACE("--vtw-layer " + layer);
    const std::vector<std::string> base = {"--image",          Image(0), "--prompt",    Question(0),
                                           "--max-new-tokens", "12",     "--vtw-layer", layer};
    auto with = [&](std::vector<std::string> extra) {
      std::vector<std::string> args = base;
      args.insert(args.end(), extra.begin(), extra.end());
      return args;
    };
    const json unary = MustJson(Client(with({"--json", "--request-id", "u-" + layer})));
    const json stream =
        MustJson(Client(with({"--json", "--stream", "--request-id", "s-" + layer})));
    EXPECT_EQ(unary["request_id"], "u-" + layer);
    EXPECT_EQ(stream["request_id"], "s-" + layer);
    ExpectSameResult(unary, stream, "unary vs stream");
    ASSERT_FALSE(unary["token_ids"].empty());
    EXPECT_EQ(unary["usage"]["completion_tokens"], unary["token_ids"].size());
    EXPECT_EQ(unary["usage"]["image_tokens"], 16);
    EXPECT_NE(unary["finish_reason"], "FINISH_REASON_UNSPECIFIED");
    EXPECT_GT(unary["timing"]["total_seconds"].get<double>(), 0.0);
    const uint64_t flops = std::stoull(unary["vtw"]["flops"].get<std::string>());
    const uint64_t without = std::stoull(unary["vtw"]["flops_without_vtw"].get<std::string>());
    if (layer == "off") {
      EXPECT_FALSE(unary["vtw"]["applied"].get<bool>());
      EXPECT_EQ(flops, without);
    } else if (layer == "1") {
      EXPECT_TRUE(unary["vtw"]["applied"].get<bool>());
      EXPECT_EQ(unary["vtw"]["layer"], 1);
      EXPECT_LT(flops, without);
    }

    // Plain output: the text and a newline on stdout, the summary on stderr.
    const std::string text = unary["text"].get<std::string>();
    ProcessResult plain = Client(base);
    EXPECT_EQ(plain.exit_code, 0) << plain.err;
    EXPECT_EQ(plain.out, text + "\n");
    EXPECT_TRUE(Contains(plain.err, "[vtw] ")) << plain.err;
    const std::string vtw_label = unary["vtw"]["applied"].get<bool>()
                                      ? "VTW K=" + std::to_string(unary["vtw"]["layer"].get<int>())
                                      : std::string("VTW off");
    EXPECT_TRUE(Contains(plain.err, vtw_label)) << plain.err;
    ProcessResult streamed = Client(with({"--stream"}));
    EXPECT_EQ(streamed.exit_code, 0) << streamed.err;
    EXPECT_EQ(streamed.out, text + "\n");
    EXPECT_TRUE(Contains(streamed.err, "[vtw] ")) << streamed.err;
  }
}

TEST_F(ServerClientsTest, PythonClientAgreesWithVtwClient) {
  WarmImage(Image(1));
  for (const std::string layer : {"default", "off"}) {
    SCOPED_TRACE("--vtw-layer " + layer);
    const std::vector<std::string> base = {"--image", Image(1), "--prompt", Question(1),
                                           "--max-new-tokens", "10", "--vtw-layer", layer};
    auto with = [&](std::vector<std::string> extra) {
      std::vector<std::string> args = base;
      args.insert(args.end(), extra.begin(), extra.end());
      return args;
    };
    const json cpp = MustJson(Client(with({"--json"})));
    const json py_unary = MustJson(PythonClient(with({"--json"})));
    const json py_stream = MustJson(PythonClient(with({"--json", "--stream"})));
    ExpectSameResult(cpp, py_unary, "vtw client vs python unary");
    ExpectSameResult(cpp, py_stream, "vtw client vs python stream");

    const ProcessResult plain = PythonClient(with({"--stream"}));
    EXPECT_EQ(plain.exit_code, 0) << plain.err;
    EXPECT_EQ(plain.out, cpp["text"].get<std::string>() + "\n");
    EXPECT_TRUE(Contains(plain.err, "[vtw] ")) << plain.err;
  }
}

TEST_F(ServerClientsTest, GreedyTokensMatchTheOracle) {
  const json info = MustJson(Client({"--info", "--json"}));
  const auto& c = testing::OracleCases()[0];
  const std::vector<std::string> base = {"--image",        Image(0), "--prompt", Question(0),
                                         "--max-new-tokens", "12",   "--ignore-eos", "--json"};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  };
  const json off = MustJson(Client(with({"--vtw-layer", "off"})));
  const json k2 = MustJson(Client(with({"--vtw-layer", "2", "--stream"})));
  EXPECT_EQ(off["finish_reason"], "FINISH_REASON_LENGTH");
  ASSERT_EQ(off["token_ids"].size(), 12u);
  ASSERT_EQ(k2["token_ids"].size(), 12u);
  // The oracle is fp32 (Hugging Face); a bf16 server is compared by the other tests only.
  if (info["dtype"] != "fp32") return;
  EXPECT_EQ(off["token_ids"], c["models"]["tiny-llava"]["greedy"]["new_ids"]);
  const json& vtw = testing::OracleVtw()["c0"]["K=2"];
  const size_t steps = testing::StepsToCompare(vtw["step_top1_top2_margin"], 1e-3);
  for (size_t i = 0; i < steps; ++i) {
    EXPECT_EQ(k2["token_ids"][i], vtw["greedy_new_ids"][i]) << "step " << i;
  }
}

TEST_F(ServerClientsTest, InfoAndHealth) {
  const json info = MustJson(Client({"--info", "--json"}));
  EXPECT_EQ(info["architecture"], "LlavaForConditionalGeneration");
  EXPECT_EQ(info["num_layers"], 4);
  EXPECT_EQ(info["image_tokens_per_image"], 16);
  EXPECT_EQ(info["context_length"], 256);
  EXPECT_GT(info["vocab_size"].get<int>(), 0);

  const ProcessResult text = Client({"--info"});
  EXPECT_EQ(text.exit_code, 0) << text.err;
  EXPECT_TRUE(Contains(text.out, "decoder layers: 4")) << text.out;

  const ProcessResult health = Client({"--health"});
  EXPECT_EQ(health.exit_code, 0) << health.err;
  EXPECT_EQ(health.out, "SERVING\n");
  EXPECT_EQ(testing::HealthStatus(server_->grpc_addr()), "SERVING");
}

TEST_F(ServerClientsTest, ServerErrorsReachTheUser) {
  const std::string corrupt = WriteFile("corrupt.png", "\x89PNG\r\n\x1a\nnot really a png");
  ExpectRpcError(Client({"--image", corrupt, "--prompt", "hi"}), "INVALID_ARGUMENT",
                 "corrupt image");
  ExpectRpcError(Client({"--image", Image(0), "--prompt", ""}), "INVALID_ARGUMENT",
                 "empty prompt");
  ExpectRpcError(Client({"--prompt", "<image> what is this?"}), "INVALID_ARGUMENT",
                 "<image> without an image");
  ExpectRpcError(Client({"--image", Image(0), "--prompt", "hi", "--max-new-tokens", "0"}),
                 "INVALID_ARGUMENT", "max_new_tokens 0");
  ExpectRpcError(Client({"--image", Image(0), "--prompt", "hi", "--temperature", "-1"}),
                 "INVALID_ARGUMENT", "negative temperature");
  ExpectRpcError(Client({"--image", Image(0), "--prompt", "hi", "--top-p", "1.5"}),
                 "INVALID_ARGUMENT", "top_p over 1");
  ExpectRpcError(Client({"--image", Image(0), "--prompt", "hi", "--vtw-layer", "9"}),
                 "INVALID_ARGUMENT", "layer past the layer count");
  ExpectRpcError(Client({"--image", Image(0), "--prompt", "hi", "--vtw-profile", "no-such"}),
                 "INVALID_ARGUMENT", "unknown profile");
  ExpectRpcError(Client({"--image", Image(0), "--prompt", "hi", "--stream", "--max-new-tokens",
                         "0"}),
                 "INVALID_ARGUMENT", "streaming, max_new_tokens 0");
  const ProcessResult py = PythonClient({"--image", Image(0), "--prompt", "hi",
                                         "--max-new-tokens", "0"});
  EXPECT_EQ(py.exit_code, 1) << py.err;
  EXPECT_TRUE(Contains(py.err, "error: INVALID_ARGUMENT: ")) << py.err;

  // A deadline shorter than any request.
  ExpectRpcError(Client({"--image", Image(0), "--prompt", "hi", "--max-new-tokens", "200",
                         "--ignore-eos", "--timeout", "0.001"}),
                 "DEADLINE_EXCEEDED", "1 ms deadline");

  // The server keeps serving after all that.
  const json ok = MustJson(Client({"--image", Image(0), "--prompt", "hi", "--max-new-tokens", "2",
                                   "--ignore-eos", "--json"}));
  EXPECT_EQ(ok["token_ids"].size(), 2u);
}

}  // namespace
}  // namespace vtw
