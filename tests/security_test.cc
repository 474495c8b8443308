// Security of the server, as operators run it: TLS, mTLS and bearer-token authentication of the
// real vtw-server binary (tests/util/server_process.h) with a throwaway CA, server and client
// certificates made by the `openssl` CLI in a fresh directory per test; the `vtw client` flags
// for a secured server; start-up errors for bad files; and that no request field names a file
// on the server.
//   SecurityLib:       server/security.h in-process (token files, header check, credentials).
//   SecurityStartup:   bad TLS/token flags stop vtw-server with exit 2 before the model loads.
//   TlsTest:           TLS, mTLS, token (each on its own server process), gRPC and the HTTPS
//                      front (curl).
//   RequestFieldsTest: request bytes are data, never paths.
#include "server/security.h"

#include <google/protobuf/descriptor.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "server/openai_api.h"
#include "tests/util/oracle.h"
#include "tests/util/server_process.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_server.h"
#include "cli/health_check.h"
#include "vtw/v1/inference.grpc.pb.h"

namespace vtw {
namespace {

namespace fs = std::filesystem;
using testing::OracleCases;
using testing::ProcessResult;
using testing::RunProcess;
using testing::ServerProcess;

constexpr char kOpenssl[] = "/usr/bin/openssl";
constexpr char kToken[] = "s3cr3t-T0ken_with.chars~";

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

void WriteFile(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// Runs openssl; a failure is a test failure with its stderr.
void Openssl(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {kOpenssl};
  argv.insert(argv.end(), args.begin(), args.end());
  const ProcessResult r = RunProcess(argv);
  ASSERT_EQ(r.exit_code, 0) << "openssl " << args.front() << " failed:\n" << r.err;
}

// A throwaway PKI in `dir`: ca.pem/ca.key (the CA servers and clients trust), server.pem/.key
// (SAN localhost, 127.0.0.1; signed by ca), client.pem/.key (clientAuth; signed by ca), and a
// second, unrelated CA other_ca.pem with a client certificate other_client.pem/.key it signed.
void MakePki(const fs::path& dir) {
  const auto p = [&](const char* name) { return (dir / name).string(); };
  const std::vector<std::string> ec = {"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                                       "-nodes"};
  auto make_ca = [&](const std::string& name, const std::string& cn) {
    std::vector<std::string> args = {"req", "-x509"};
    args.insert(args.end(), ec.begin(), ec.end());
    args.insert(args.end(),
                {"-keyout", p((name + ".key").c_str()), "-out", p((name + ".pem").c_str()), "-days",
                 "2", "-subj", "/CN=" + cn, "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign"});
    Openssl(args);
  };
  auto make_leaf = [&](const std::string& name, const std::string& ca, const std::string& cn,
                       const std::string& serial, const std::string& extensions) {
    WriteFile(dir / (name + ".ext"), extensions);
    std::vector<std::string> req = {"req"};
    req.insert(req.end(), ec.begin(), ec.end());
    req.insert(req.end(), {"-keyout", p((name + ".key").c_str()), "-out",
                           p((name + ".csr").c_str()), "-subj", "/CN=" + cn});
    Openssl(req);
    Openssl({"x509", "-req", "-in", p((name + ".csr").c_str()), "-CA", p((ca + ".pem").c_str()),
             "-CAkey", p((ca + ".key").c_str()), "-set_serial", serial, "-days", "2", "-out",
             p((name + ".pem").c_str()), "-extfile", p((name + ".ext").c_str())});
  };
  make_ca("ca", "vtw test CA");
  make_ca("other_ca", "some other CA");
  make_leaf("server", "ca", "localhost", "1001",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n");
  make_leaf("client", "ca", "vtw test client", "1002",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=clientAuth\n");
  make_leaf("other_client", "other_ca", "intruder", "1003",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=clientAuth\n");
}

std::shared_ptr<grpc::ChannelCredentials> ClientCredentials(const fs::path& dir,
                                                            const std::string& ca,
                                                            const std::string& cert = "") {
  ClientTlsFiles files;
  files.ca = (dir / (ca + ".pem")).string();
  if (!cert.empty()) {
    files.cert = (dir / (cert + ".pem")).string();
    files.key = (dir / (cert + ".key")).string();
  }
  auto creds = BuildChannelCredentials(files);
  EXPECT_TRUE(creds.ok()) << creds.status().ToString();
  return creds.ok() ? *creds : nullptr;
}

std::shared_ptr<grpc::Channel> Channel(const std::string& addr,
                                       std::shared_ptr<grpc::ChannelCredentials> creds) {
  // Its own subchannel pool, so that one test's failed handshake is not reused by another.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(addr, creds ? creds : grpc::InsecureChannelCredentials(), args);
}

std::string ImageBytes(int c) {
  return ReadFile(testing::OracleDir() + "/" + OracleCases()[c]["image"].get<std::string>());
}

constexpr int kNewTokens = 8;

v1::GenerateRequest OracleRequest(int c) {
  v1::GenerateRequest r;
  r.set_image(ImageBytes(c));
  r.set_prompt(OracleCases()[c]["question"].get<std::string>());
  r.mutable_sampling()->set_max_new_tokens(kNewTokens);
  r.mutable_sampling()->set_ignore_eos(true);
  r.mutable_vtw()->set_mode(v1::VTW_MODE_OFF);
  return r;
}

// The greedy answer of oracle case `c` as far as the oracle's margins make it exact.
void ExpectOracleAnswer(const v1::GenerateResponse& resp, int c) {
  const auto& greedy = OracleCases()[c]["models"]["tiny-llava"]["greedy"];
  const std::vector<int> want = greedy["new_ids"].get<std::vector<int>>();
  const size_t steps =
      std::min<size_t>(testing::StepsToCompare(greedy["step_top1_top2_margin"], 2e-4), kNewTokens);
  ASSERT_EQ(resp.token_ids_size(), kNewTokens);
  ASSERT_GE(steps, 1u);
  for (size_t i = 0; i < steps; ++i) {
    EXPECT_EQ(resp.token_ids(static_cast<int>(i)), static_cast<uint32_t>(want[i])) << "step " << i;
  }
  EXPECT_EQ(resp.usage().image_tokens(), 16u);
}

grpc::Status Generate(const std::shared_ptr<grpc::Channel>& channel, const v1::GenerateRequest& req,
                      v1::GenerateResponse* resp, const std::string& authorization = "") {
  auto stub = v1::InferenceService::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
  return stub->Generate(&ctx, req, resp);
}

grpc::Status GenerateStream(const std::shared_ptr<grpc::Channel>& channel,
                            const v1::GenerateRequest& req, std::string* text,
                            const std::string& authorization = "") {
  auto stub = v1::InferenceService::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
  auto reader = stub->GenerateStream(&ctx, req);
  v1::GenerateStreamResponse m;
  while (reader->Read(&m)) *text += m.text();
  return reader->Finish();
}

grpc::Status GetModelInfo(const std::shared_ptr<grpc::Channel>& channel, v1::ModelInfo* info,
                          const std::string& authorization = "") {
  auto stub = v1::InferenceService::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
  return stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), info);
}

// grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo with one list_services request,
// by hand over a generic stub; returns the raw response bytes ("" and *status on failure).
std::string ReflectionListServices(const std::shared_ptr<grpc::Channel>& channel,
                                   grpc::Status* status) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::CompletionQueue cq;
  void* tag = nullptr;
  bool ok = false;
  auto next = [&](intptr_t want) {
    return cq.Next(&tag, &ok) && reinterpret_cast<intptr_t>(tag) == want;
  };
  auto call =
      stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  std::string out;
  call->StartCall(reinterpret_cast<void*>(1));
  if (next(1) && ok) {
    const std::string request("\x3a\x00", 2);  // ServerReflectionRequest{list_services: ""}
    grpc::Slice slice(request);
    grpc::ByteBuffer buffer(&slice, 1);
    call->Write(buffer, reinterpret_cast<void*>(2));
    if (next(2) && ok) {
      grpc::ByteBuffer response;
      call->Read(&response, reinterpret_cast<void*>(3));
      if (next(3) && ok) {
        std::vector<grpc::Slice> slices;
        (void)response.Dump(&slices);
        for (const grpc::Slice& s : slices) {
          out.append(reinterpret_cast<const char*>(s.begin()), s.size());
        }
      }
    }
    call->WritesDone(reinterpret_cast<void*>(4));
    next(4);
  }
  call->Finish(status, reinterpret_cast<void*>(5));
  while (cq.Next(&tag, &ok) && reinterpret_cast<intptr_t>(tag) != 5) {
  }
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return out;
}

ProcessResult VtwClient(const std::vector<std::string>& args,
                        const std::vector<std::string>& env = {}) {
  std::vector<std::string> argv;
  if (!env.empty()) {
    argv.push_back("/usr/bin/env");
    argv.insert(argv.end(), env.begin(), env.end());
  }
  argv.push_back(testing::VtwBinary());
  argv.push_back("client");
  argv.insert(argv.end(), args.begin(), args.end());
  return RunProcess(argv);
}

int PortOf(const std::string& addr) { return std::stoi(addr.substr(addr.rfind(':') + 1)); }

// ---------------------------------------------------------------------------------------------

class SecurityLib : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::FreshTestDir("vtw_security"); }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }
  std::string Path(const char* name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

TEST_F(SecurityLib, TokenFileIsTrimmedAndChecked) {
  WriteFile(dir_ / "token", std::string(kToken) + " \t\r\n\n");
  auto token = ReadTokenFile("--auth-token-file", Path("token"));
  ASSERT_TRUE(token.ok()) << token.status().ToString();
  EXPECT_EQ(*token, kToken);

  WriteFile(dir_ / "empty", "\n  \n");
  auto empty = ReadTokenFile("--auth-token-file", Path("empty"));
  EXPECT_FALSE(empty.ok());
  EXPECT_TRUE(Contains(empty.status().message(), "--auth-token-file")) << empty.status().message();
  EXPECT_TRUE(Contains(empty.status().message(), Path("empty"))) << empty.status().message();
  EXPECT_TRUE(Contains(empty.status().message(), "empty")) << empty.status().message();

  auto missing = ReadTokenFile("--auth-token-file", Path("nope"));
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(Contains(missing.status().message(), Path("nope"))) << missing.status().message();

  WriteFile(dir_ / "spaced", "two words\n");
  EXPECT_FALSE(ReadTokenFile("--auth-token-file", Path("spaced")).ok());
  WriteFile(dir_ / "control", std::string("tok\x01") + "en");
  EXPECT_FALSE(ReadTokenFile("--auth-token-file", Path("control")).ok());
  EXPECT_FALSE(ReadTokenFile("--auth-token-file", dir_.string()).ok()) << "a directory";
}

TEST_F(SecurityLib, ConstantTimeEqualsAndBearerHeader) {
  EXPECT_TRUE(ConstantTimeEquals("abc", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abd"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abcd"));
  EXPECT_FALSE(ConstantTimeEquals("", "a"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));

  const BearerTokenAuth auth(kToken);
  const std::string t = kToken;
  EXPECT_TRUE(auth.CheckHeader("Bearer " + t));
  EXPECT_TRUE(auth.CheckHeader("bearer " + t));
  EXPECT_TRUE(auth.CheckHeader("BEARER  " + t));
  EXPECT_FALSE(auth.CheckHeader(""));
  EXPECT_FALSE(auth.CheckHeader(t));
  EXPECT_FALSE(auth.CheckHeader("Bearer"));
  EXPECT_FALSE(auth.CheckHeader("Bearer "));
  EXPECT_FALSE(auth.CheckHeader("Bearer" + t));
  EXPECT_FALSE(auth.CheckHeader("Basic " + t));
  EXPECT_FALSE(auth.CheckHeader("Bearer " + t + "x"));
  EXPECT_FALSE(auth.CheckHeader("Bearer " + t.substr(0, t.size() - 1)));
  EXPECT_FALSE(auth.CheckHeader("Bearer " + t + " "));
}

TEST_F(SecurityLib, CredentialErrorsNameTheFlagAndFile) {
  MakePki(dir_);
  ASSERT_FALSE(HasFatalFailure());
  auto none = BuildServerCredentials({});
  EXPECT_TRUE(none.ok());
  auto tls = BuildServerCredentials({Path("server.pem"), Path("server.key"), ""});
  EXPECT_TRUE(tls.ok()) << tls.status().ToString();
  auto mtls = BuildServerCredentials({Path("server.pem"), Path("server.key"), Path("ca.pem")});
  EXPECT_TRUE(mtls.ok()) << mtls.status().ToString();

  auto expect_error = [](const auto& result, const std::vector<std::string>& words) {
    ASSERT_FALSE(result.ok());
    for (const std::string& w : words) {
      EXPECT_TRUE(Contains(result.status().message(), w))
          << "'" << w << "' not in: " << result.status().message();
    }
  };
  expect_error(BuildServerCredentials({Path("server.pem"), "", ""}), {"--tls-key"});
  expect_error(BuildServerCredentials({"", Path("server.key"), ""}), {"--tls-cert"});
  expect_error(BuildServerCredentials({"", "", Path("ca.pem")}), {"--tls-client-ca", "--tls-cert"});
  expect_error(BuildServerCredentials({Path("missing.pem"), Path("server.key"), ""}),
               {"--tls-cert", Path("missing.pem"), "No such file"});
  expect_error(BuildServerCredentials({Path("server.pem"), Path("missing.key"), ""}),
               {"--tls-key", Path("missing.key")});
  expect_error(BuildServerCredentials({Path("server.pem"), Path("server.key"), Path("nope.pem")}),
               {"--tls-client-ca", Path("nope.pem")});
  // A key that is not the certificate's, files of the wrong kind.
  expect_error(BuildServerCredentials({Path("server.pem"), Path("client.key"), ""}),
               {"does not belong", Path("client.key"), Path("server.pem")});
  expect_error(BuildServerCredentials({Path("server.key"), Path("server.key"), ""}),
               {"no PEM certificate", Path("server.key")});
  expect_error(BuildServerCredentials({Path("server.pem"), Path("server.pem"), ""}),
               {"private key", Path("server.pem")});

  EXPECT_TRUE(BuildChannelCredentials({}).ok());
  EXPECT_TRUE(BuildChannelCredentials({Path("ca.pem"), "", ""}).ok());
  EXPECT_TRUE(
      BuildChannelCredentials({Path("ca.pem"), Path("client.pem"), Path("client.key")}).ok());
  expect_error(BuildChannelCredentials({"", Path("client.pem"), Path("client.key")}), {"--tls-ca"});
  expect_error(BuildChannelCredentials({Path("ca.pem"), Path("client.pem"), ""}), {"--tls-key"});
  expect_error(BuildChannelCredentials({Path("gone.pem"), "", ""}), {"--tls-ca", Path("gone.pem")});
}

// ---------------------------------------------------------------------------------------------

class SecurityStartup : public SecurityLib {
 protected:
  // vtw-server with `flags` must exit 2 before loading the model, saying `words` on stderr.
  void ExpectStartupError(const std::vector<std::string>& flags,
                          const std::vector<std::string>& words) {
    std::vector<std::string> argv = {testing::ServerBinary(), "--listen", "127.0.0.1:0",
                                     "--metrics-listen", "127.0.0.1:0", "--http-listen",
                                     "127.0.0.1:0"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    const ProcessResult r = RunProcess(argv);
    EXPECT_EQ(r.exit_code, 2) << r.err;
    for (const std::string& w : words) EXPECT_TRUE(Contains(r.err, w)) << w << " in: " << r.err;
    EXPECT_FALSE(Contains(r.err + r.out, "loading model")) << "stops before the model loads";
  }
};

TEST_F(SecurityStartup, BadFilesStopTheServerWithExitTwoNamingTheFile) {
  MakePki(dir_);
  ASSERT_FALSE(HasFatalFailure());
  ExpectStartupError({"--tls-cert", Path("missing.pem"), "--tls-key", Path("server.key")},
                     {"--tls-cert", Path("missing.pem")});
  ExpectStartupError({"--tls-cert", Path("server.pem"), "--tls-key", Path("missing.key")},
                     {"--tls-key", Path("missing.key")});
  ExpectStartupError({"--tls-cert", Path("server.pem")}, {"--tls-key"});
  ExpectStartupError({"--tls-client-ca", Path("ca.pem")}, {"--tls-client-ca", "--tls-cert"});
  ExpectStartupError({"--tls-cert", Path("server.pem"), "--tls-key", Path("server.key"),
                      "--tls-client-ca", Path("missing_ca.pem")},
                     {"--tls-client-ca", Path("missing_ca.pem")});
  ExpectStartupError({"--auth-token-file", Path("no_token")},
                     {"--auth-token-file", Path("no_token")});
  WriteFile(dir_ / "empty_token", "\n");
  ExpectStartupError({"--auth-token-file", Path("empty_token")}, {Path("empty_token"), "empty"});
  // The environment variables are read the same way.
  const ProcessResult env =
      RunProcess({"/usr/bin/env", "VTW_TLS_CERT=" + Path("env_missing.pem"),
                  "VTW_TLS_KEY=" + Path("server.key"), testing::ServerBinary(), "--listen",
                  "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--http-listen",
                  "127.0.0.1:0"});
  EXPECT_EQ(env.exit_code, 2) << env.err;
  EXPECT_TRUE(Contains(env.err, Path("env_missing.pem"))) << env.err;
}

// ---------------------------------------------------------------------------------------------

class TlsTest : public SecurityLib {
 protected:
  void SetUp() override {
    SecurityLib::SetUp();
    MakePki(dir_);
  }
  std::vector<std::string> TlsFlags() const {
    return {"--tls-cert", Path("server.pem"), "--tls-key", Path("server.key")};
  }
};

TEST_F(TlsTest, TlsClientWithTheRightCaGetsTheAnswerOthersDoNot) {
  ASSERT_FALSE(HasFatalFailure());
  auto server = ServerProcess::Start(TlsFlags(), ClientCredentials(dir_, "ca"));
  ASSERT_NE(server, nullptr);
  const std::string addr = server->grpc_addr();

  v1::GenerateResponse resp;
  grpc::Status st = Generate(Channel(addr, ClientCredentials(dir_, "ca")), OracleRequest(0), &resp);
  ASSERT_TRUE(st.ok()) << st.error_code() << " " << st.error_message();
  ExpectOracleAnswer(resp, 0);
  // By name too: the certificate's SAN has both localhost and 127.0.0.1.
  v1::ModelInfo info;
  st = GetModelInfo(
      Channel("localhost:" + std::to_string(PortOf(addr)), ClientCredentials(dir_, "ca")), &info);
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(info.num_layers(), 4u);

  // Plaintext to a TLS port, and TLS trusting another CA: no connection.
  st = Generate(Channel(addr, nullptr), OracleRequest(0), &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  st = Generate(Channel(addr, ClientCredentials(dir_, "other_ca")), OracleRequest(0), &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  EXPECT_EQ(testing::HealthStatus(addr, 2.0).rfind("error: UNAVAILABLE", 0), 0u);

  // `vtw client --tls-ca`: generation and health; without it the call fails.
  const std::string image =
      testing::OracleDir() + "/" + OracleCases()[0]["image"].get<std::string>();
  ProcessResult r =
      VtwClient({"--addr", addr, "--tls-ca", Path("ca.pem"), "--image", image, "--prompt",
                 OracleCases()[0]["question"].get<std::string>(), "--max-new-tokens", "8",
                 "--ignore-eos", "--vtw-layer", "off", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(Contains(r.out, "\"completion_tokens\":8")) << r.out;
  r = VtwClient({"--addr", addr, "--tls-ca", Path("ca.pem"), "--health"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "SERVING\n");
  r = VtwClient({"--addr", addr, "--info", "--timeout", "3"});
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_EQ(r.err.rfind("error: UNAVAILABLE: ", 0), 0u) << r.err;
  // Client-side file errors are usage errors (exit 2) naming the file.
  r = VtwClient({"--addr", addr, "--tls-ca", Path("nope.pem"), "--info"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_TRUE(Contains(r.err, Path("nope.pem"))) << r.err;
  r = VtwClient({"--addr", addr, "--tls-cert", Path("client.pem"), "--tls-key", Path("client.key"),
                 "--info"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_TRUE(Contains(r.err, "--tls-ca")) << r.err;
}

// curl against the HTTP front at `url` (https://...); `args` before the URL.
ProcessResult Curl(const std::vector<std::string>& args, const std::string& url) {
  std::vector<std::string> argv = {"/usr/bin/curl", "-sS", "--max-time", "60"};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.push_back(url);
  return RunProcess(argv);
}

// An oracle case as an OpenAI chat completion body (ignore_eos, 8 tokens, VTW off) in `path`.
void WriteChatBody(const fs::path& path, int i) {
  const auto& c = OracleCases()[i];
  const std::string b64 = EncodeBase64(testing::OracleImageBytes(i));
  const nlohmann::json part_image = {{"type", "image_url"},
                                     {"image_url", {{"url", "data:image/png;base64," + b64}}}};
  const nlohmann::json part_text = {{"type", "text"}, {"text", c["question"].get<std::string>()}};
  const nlohmann::json body = {
      {"messages", {{{"role", "user"}, {"content", {part_image, part_text}}}}},
      {"max_tokens", 8},
      {"ignore_eos", true},
      {"vtw_layer", "off"}};
  WriteFile(path, body.dump());
}

TEST_F(TlsTest, HttpsFrontUsesTheSameCertificate) {
  ASSERT_FALSE(HasFatalFailure());
  auto server = ServerProcess::Start(TlsFlags(), ClientCredentials(dir_, "ca"));
  ASSERT_NE(server, nullptr);
  const std::string port = std::to_string(server->http_port());
  const std::string base = "https://127.0.0.1:" + port;
  WriteChatBody(dir_ / "chat.json", 0);

  ProcessResult r = Curl({"--cacert", Path("ca.pem")}, base + "/v1/models");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(Contains(r.out, "\"object\":\"list\"")) << r.out;
  r = Curl({"--cacert", Path("ca.pem"), "-H", "Content-Type: application/json", "-d",
            "@" + Path("chat.json")},
           base + "/v1/chat/completions");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(Contains(r.out, "\"object\":\"chat.completion\"")) << r.out;
  EXPECT_TRUE(Contains(r.out, "\"completion_tokens\":8")) << r.out;
  // By name (the certificate's SAN has localhost), and /health.
  r = Curl({"--cacert", Path("ca.pem")}, "https://localhost:" + port + "/health");
  EXPECT_EQ(r.exit_code, 0) << r.err;

  // No trust in the CA, another CA, plaintext to the TLS port: no answer.
  r = Curl({}, base + "/v1/models");
  EXPECT_EQ(r.exit_code, 60) << "curl should fail verifying the certificate: " << r.err;
  r = Curl({"--cacert", Path("other_ca.pem")}, base + "/v1/models");
  EXPECT_EQ(r.exit_code, 60) << r.err;
  r = Curl({}, "http://127.0.0.1:" + port + "/v1/models");
  EXPECT_NE(r.exit_code, 0) << "plaintext HTTP to the HTTPS port answered: " << r.out;
  EXPECT_FALSE(Contains(r.out, "\"object\":\"list\"")) << r.out;

  // The server kept serving (gRPC over TLS too).
  v1::GenerateResponse resp;
  grpc::Status st = Generate(Channel(server->grpc_addr(), ClientCredentials(dir_, "ca")), OracleRequest(0), &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  ExpectOracleAnswer(resp, 0);
}

TEST_F(TlsTest, MutualTlsNeedsAClientCertificateSignedByTheClientCa) {
  ASSERT_FALSE(HasFatalFailure());
  std::vector<std::string> flags = TlsFlags();
  flags.insert(flags.end(), {"--tls-client-ca", Path("ca.pem")});
  auto server = ServerProcess::Start(flags, ClientCredentials(dir_, "ca", "client"));
  ASSERT_NE(server, nullptr);
  const std::string addr = server->grpc_addr();

  v1::GenerateResponse resp;
  grpc::Status st =
      Generate(Channel(addr, ClientCredentials(dir_, "ca", "client")), OracleRequest(1), &resp);
  ASSERT_TRUE(st.ok()) << st.error_code() << " " << st.error_message();
  ExpectOracleAnswer(resp, 1);

  st = Generate(Channel(addr, ClientCredentials(dir_, "ca")), OracleRequest(1), &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << "no client certificate";
  st = Generate(Channel(addr, ClientCredentials(dir_, "ca", "other_client")), OracleRequest(1),
                &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << "a certificate of another CA";
  st = Generate(Channel(addr, nullptr), OracleRequest(1), &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << "plaintext";
  // Health needs the handshake too (the probe must present a certificate).
  EXPECT_EQ(testing::HealthStatus(addr, 2.0, ClientCredentials(dir_, "ca", "client")), "SERVING");
  EXPECT_NE(testing::HealthStatus(addr, 2.0, ClientCredentials(dir_, "ca")), "SERVING");

  ProcessResult r = VtwClient({"--addr", addr, "--tls-ca", Path("ca.pem"), "--tls-cert",
                               Path("client.pem"), "--tls-key", Path("client.key"), "--info"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(Contains(r.out, "decoder layers: 4")) << r.out;
  r = VtwClient({"--addr", addr, "--tls-ca", Path("ca.pem"), "--info", "--timeout", "3"});
  EXPECT_EQ(r.exit_code, 1) << r.out;

  // The HTTPS front asks for the same client certificates.
  const std::string models = "https://127.0.0.1:" + std::to_string(server->http_port()) + "/v1/models";
  r = Curl({"--cacert", Path("ca.pem"), "--cert", Path("client.pem"), "--key", Path("client.key")}, models);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(Contains(r.out, "\"object\":\"list\"")) << r.out;
  r = Curl({"--cacert", Path("ca.pem")}, models);
  EXPECT_NE(r.exit_code, 0) << "HTTPS without a client certificate answered: " << r.out;
  r = Curl({"--cacert", Path("ca.pem"), "--cert", Path("other_client.pem"), "--key", Path("other_client.key")},
           models);
  EXPECT_NE(r.exit_code, 0) << "HTTPS with another CA's client certificate answered: " << r.out;
}

TEST_F(TlsTest, BearerTokenGuardsTheInferenceServiceButNotHealthOrReflection) {
  ASSERT_FALSE(HasFatalFailure());
  WriteFile(dir_ / "token", std::string(kToken) + "\n");
  auto server = ServerProcess::Start({"--auth-token-file", Path("token")});
  ASSERT_NE(server, nullptr);
  const auto channel = Channel(server->grpc_addr(), nullptr);
  const std::string good = std::string("Bearer ") + kToken;

  // Missing, wrong, wrong scheme, prefix: UNAUTHENTICATED with the actionable message.
  for (const std::string& header :
       {std::string(), std::string("Bearer wrong"), std::string("Basic ") + kToken,
        std::string(kToken), good.substr(0, good.size() - 1), good + "x"}) {
    SCOPED_TRACE("authorization: '" + header + "'");
    v1::GenerateResponse resp;
    grpc::Status st = Generate(channel, OracleRequest(2), &resp, header);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(st.error_message(), kUnauthenticatedMessage);
    EXPECT_EQ(resp.token_ids_size(), 0);
    std::string text;
    st = GenerateStream(channel, OracleRequest(2), &text, header);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(st.error_message(), kUnauthenticatedMessage);
    EXPECT_EQ(text, "");
    v1::ModelInfo info;
    st = GetModelInfo(channel, &info, header);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(info.num_layers(), 0u);
  }
  // The right token: OK, the expected answer, also with the scheme in lower case.
  v1::GenerateResponse resp;
  grpc::Status st = Generate(channel, OracleRequest(2), &resp, good);
  ASSERT_TRUE(st.ok()) << st.error_message();
  ExpectOracleAnswer(resp, 2);
  std::string text;
  st = GenerateStream(channel, OracleRequest(2), &text, std::string("bearer ") + kToken);
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(text, resp.text());
  v1::ModelInfo info;
  EXPECT_TRUE(GetModelInfo(channel, &info, good).ok());

  // Health and reflection need no token.
  EXPECT_EQ(testing::HealthStatus(server->grpc_addr(), 2.0), "SERVING");
  grpc::Status reflection_status;
  const std::string services = ReflectionListServices(channel, &reflection_status);
  EXPECT_TRUE(reflection_status.ok()) << reflection_status.error_message();
  EXPECT_TRUE(Contains(services, "vtw.v1.InferenceService")) << services;

  // Failed generation calls count under code="UNAUTHENTICATED" (6 unary + 6 streaming).
  const std::string metrics = testing::ScrapeMetrics(PortOf(server->metrics_addr()));
  EXPECT_EQ(testing::MetricValue(metrics, "vtw_requests_total{code=\"UNAUTHENTICATED\",protocol=\"grpc\"}"), 12)
      << metrics;
  EXPECT_EQ(testing::MetricValue(metrics, "vtw_requests_total{code=\"OK\",protocol=\"grpc\"}"), 2);
  // The token never reaches the log.
  EXPECT_FALSE(Contains(server->LogTail(500), kToken));

  // `vtw client`: the token from a file or $VTW_AUTH_TOKEN; without one, the server's message.
  ProcessResult r =
      VtwClient({"--addr", server->grpc_addr(), "--auth-token-file", Path("token"), "--info"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  r = VtwClient({"--addr", server->grpc_addr(), "--info"},
                {std::string("VTW_AUTH_TOKEN=") + kToken});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  r = VtwClient({"--addr", server->grpc_addr(), "--info"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.err, std::string("error: UNAUTHENTICATED: ") + kUnauthenticatedMessage + "\n");
  r = VtwClient({"--addr", server->grpc_addr(), "--health"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  r = VtwClient({"--addr", server->grpc_addr(), "--auth-token-file", Path("missing"), "--info"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(Contains(r.err, Path("missing"))) << r.err;
}

TEST_F(TlsTest, TlsAndTokenTogetherThroughTheClient) {
  ASSERT_FALSE(HasFatalFailure());
  WriteFile(dir_ / "token", kToken);
  std::vector<std::string> flags = TlsFlags();
  flags.insert(flags.end(), {"--auth-token-file", Path("token")});
  auto server = ServerProcess::Start(flags, ClientCredentials(dir_, "ca"));
  ASSERT_NE(server, nullptr);
  const std::string image =
      testing::OracleDir() + "/" + OracleCases()[3]["image"].get<std::string>();
  const std::vector<std::string> request = {
      "--addr",           server->grpc_addr(),
      "--tls-ca",         Path("ca.pem"),
      "--image",          image,
      "--prompt",         OracleCases()[3]["question"].get<std::string>(),
      "--max-new-tokens", "4",
      "--ignore-eos",     "--stream"};
  ProcessResult r = VtwClient(request, {std::string("VTW_AUTH_TOKEN=") + kToken});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(Contains(r.err, "4 tokens (length)")) << r.err;
  r = VtwClient(request);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(r.err, "UNAUTHENTICATED")) << r.err;
}

// ---------------------------------------------------------------------------------------------

// The names of every field of a request, recursively ("vtw.profile").
void CollectFieldNames(const google::protobuf::Descriptor* d, const std::string& prefix,
                       std::vector<std::string>* out) {
  for (int i = 0; i < d->field_count(); ++i) {
    const google::protobuf::FieldDescriptor* f = d->field(i);
    out->push_back(prefix + f->name());
    if (f->message_type()) CollectFieldNames(f->message_type(), prefix + f->name() + ".", out);
  }
}

TEST(RequestFieldsTest, NoFieldNamesAServerFile) {
  std::vector<std::string> fields;
  CollectFieldNames(v1::GenerateRequest::descriptor(), "", &fields);
  CollectFieldNames(v1::GetModelInfoRequest::descriptor(), "", &fields);
  ASSERT_FALSE(fields.empty());
  // No field (or word of a field name) is a path, file, URL or directory.
  for (const std::string& name : fields) {
    std::string spaced = name;
    std::replace(spaced.begin(), spaced.end(), '.', '_');
    std::stringstream words(spaced);
    for (std::string word; std::getline(words, word, '_');) {
      for (const char* bad : {"path", "file", "filename", "url", "uri", "dir", "directory"}) {
        EXPECT_NE(word, bad) << "request field " << name << " looks like it names a " << bad
                             << ": the API takes bytes, never server paths";
      }
    }
  }

  // Paths sent as data are data: image bytes that spell a path are not an image.
  testing::TestServer server(testing::OracleBundle());
  auto stub = server.Stub();
  for (const std::string& path :
       {std::string("/etc/passwd"), std::string("file:///etc/passwd"),
        testing::OracleDir() + "/" + OracleCases()[0]["image"].get<std::string>()}) {
    SCOPED_TRACE(path);
    v1::GenerateRequest req;
    req.set_prompt("What is in the image?");
    req.set_image(path);
    req.mutable_sampling()->set_max_new_tokens(2);
    v1::GenerateResponse resp;
    grpc::ClientContext ctx;
    grpc::Status st = stub->Generate(&ctx, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_TRUE(Contains(st.error_message(), "image")) << st.error_message();
  }
  // A prompt that is a path is text: it is tokenized and answered, nothing is read.
  v1::GenerateRequest req;
  req.set_prompt("/etc/passwd");
  req.set_request_id("../../etc/shadow");
  req.mutable_sampling()->set_max_new_tokens(4);
  v1::GenerateResponse resp;
  grpc::ClientContext ctx;
  grpc::Status st = stub->Generate(&ctx, req, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(resp.request_id(), "../../etc/shadow");
  EXPECT_EQ(resp.usage().image_tokens(), 0u);
  EXPECT_FALSE(Contains(resp.text(), "root:"));
  EXPECT_LE(resp.usage().completion_tokens(), 4u);
}

}  // namespace
}  // namespace vtw
