// The OpenAI-compatible HTTP front of the real vtw-server binary on loopback, called by real
// clients: Python's standard library (tests/http_client.py: urllib.request and http.client) and
// curl. Unary and streamed answers equal gRPC's for the oracle cases; bad requests get the
// documented OpenAI-shaped error and HTTP status and the server keeps serving; the bearer token
// guards /v1 like it guards gRPC; a client that goes away mid-stream or mid-request frees its KV
// cache; HTTP and gRPC requests run in one batch. Counters carry protocol="http".
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>

#include "tests/util/oracle.h"
#include "tests/util/server_process.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_server.h"
#include "vtw/v1/inference.grpc.pb.h"

namespace vtw {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using testing::OracleCases;
using testing::RunProcess;

std::string Base64(const std::string& bytes) {
  static const char* kAlphabet =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (unsigned char c : bytes) {
    acc = (acc << 8) | c;
    bits += 8;
    while (bits >= 6) {
      bits -= 6;
      out.push_back(kAlphabet[(acc >> bits) & 63]);
    }
  }
  if (bits > 0) out.push_back(kAlphabet[(acc << (6 - bits)) & 63]);
  while (out.size() % 4) out.push_back('=');
  return out;
}

std::string DataUrl(const std::string& bytes) { return "data:image/png;base64," + Base64(bytes); }

json UserMessage(const std::string& image_url, const std::string& text) {
  json parts = json::array();
  if (!image_url.empty()) {
    parts.push_back({{"type", "image_url"}, {"image_url", {{"url", image_url}}}});
  }
  parts.push_back({{"type", "text"}, {"text", text}});
  return {{"role", "user"}, {"content", parts}};
}

// The chat request of oracle case `c`: greedy, `max_tokens` tokens, ignore_eos, VTW `layer`.
json CaseBody(int c, int max_tokens, json layer = "off") {
  return {{"model", "tiny-llava"},
          {"messages", json::array({UserMessage(DataUrl(testing::OracleImageBytes(c)),
                                                OracleCases()[c]["question"].get<std::string>())})},
          {"max_tokens", max_tokens},
          {"ignore_eos", true},
          {"vtw_layer", layer}};
}

class HttpTest : public ::testing::Test {
 protected:
  // The oracle model with a context of 8192 positions (RoPE has no table to outgrow), for
  // requests long enough to be cut short.
  std::string LongContextModel() {
    const fs::path model = dir_ / "long-context" / "tiny-llava";  // the name is the served one
    fs::create_directories(model.parent_path());
    testing::CopyOracleModel(model);
    json config = json::parse(std::ifstream(model / "config.json"));
    config["text_config"]["max_position_embeddings"] = 8192;
    std::ofstream(model / "config.json", std::ios::trunc) << config.dump(2);
    return model.string();
  }

  void SetUp() override { dir_ = testing::FreshTestDir("vtw_http"); }

  void StartServer(std::vector<std::string> flags = {}) {
    server_ = testing::ServerProcess::Start(flags);
    ASSERT_NE(server_, nullptr);
    base_ = "http://127.0.0.1:" + std::to_string(server_->http_port());
  }

  std::string WriteBody(const std::string& body) {
    const std::string path = (dir_ / ("body" + std::to_string(bodies_++) + ".json")).string();
    std::ofstream(path, std::ios::binary) << body;
    return path;
  }

  // tests/http_client.py with `args` after the URL; its JSON output.
  json Py(const std::string& path, std::vector<std::string> args = {}) {
    std::vector<std::string> argv = {"/usr/bin/python3", std::string(VTW_SOURCE_DIR) + "/tests/http_client.py",
                                     base_ + path};
    argv.insert(argv.end(), args.begin(), args.end());
    const testing::ProcessResult r = RunProcess(argv);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    json out = json::parse(r.out, nullptr, false);
    EXPECT_FALSE(out.is_discarded()) << "client output: " << r.out << "\n" << r.err;
    return out;
  }
  // POST /v1/chat/completions; with "--stream" in `args` the body asks for a stream.
  json PostChat(json body, std::vector<std::string> args = {}) {
    if (std::find(args.begin(), args.end(), "--stream") != args.end()) body["stream"] = true;
    args.insert(args.begin(), {"--body", WriteBody(body.dump())});
    return Py("/v1/chat/completions", args);
  }

  // The error response of a request: status and error object as documented.
  void ExpectError(const json& r, int status, const std::string& type, const std::string& words) {
    EXPECT_EQ(r["status"], status) << r.dump();
    ASSERT_TRUE(r["json"].is_object()) << r.dump();
    const json& e = r["json"]["error"];
    EXPECT_EQ(e["type"], type) << r.dump();
    EXPECT_TRUE(e["code"].is_string()) << r.dump();
    EXPECT_NE(e["message"].get<std::string>().find(words), std::string::npos)
        << "message: " << e["message"] << "\nexpected: " << words;
  }

  int MetricsPort() const {
    const std::string a = server_->metrics_addr();
    return std::stoi(a.substr(a.rfind(':') + 1));
  }
  double Metric(const std::string& series) const {
    return testing::MetricValue(testing::ScrapeMetrics(MetricsPort()), series);
  }
  // Polls /metrics until `series` equals `value` (up to 30 s); the last value seen.
  double WaitForMetric(const std::string& series, double value) const {
    double v = -1;
    for (int i = 0; i < 300; ++i) {
      v = Metric(series);
      if (v == value) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return v;
  }

  std::unique_ptr<v1::InferenceService::Stub> Stub() const {
    return v1::InferenceService::NewStub(
        grpc::CreateChannel(server_->grpc_addr(), grpc::InsecureChannelCredentials()));
  }

  fs::path dir_;
  int bodies_ = 0;
  std::unique_ptr<testing::ServerProcess> server_;
  std::string base_;
};

v1::GenerateRequest GrpcCase(int c, int max_tokens) {
  v1::GenerateRequest r;
  r.set_image(testing::OracleImageBytes(c));
  r.set_prompt(OracleCases()[c]["question"].get<std::string>());
  r.mutable_sampling()->set_max_new_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  r.mutable_vtw()->set_mode(v1::VTW_MODE_OFF);
  return r;
}

std::string StreamText(const json& r) {
  std::string text;
  for (const json& e : r["events"]) {
    const json& delta = e["choices"][0]["delta"];
    if (delta.contains("content")) text += delta["content"].get<std::string>();
  }
  return text;
}

TEST_F(HttpTest, UnaryAndStreamGiveGrpcsAnswersForTheOracleCases) {
  StartServer();
  auto stub = Stub();
  const int cases = static_cast<int>(OracleCases().size());
  for (int c = 0; c < cases; ++c) {
    SCOPED_TRACE("oracle case " + std::to_string(c));
    v1::GenerateResponse want;
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->Generate(&ctx, GrpcCase(c, 12), &want).ok());

    json unary = PostChat(CaseBody(c, 12));
    ASSERT_EQ(unary["status"], 200) << unary.dump();
    const json& u = unary["json"];
    EXPECT_EQ(u["object"], "chat.completion");
    EXPECT_EQ(u["model"], "tiny-llava");
    EXPECT_EQ(u["id"].get<std::string>().rfind("chatcmpl-", 0), 0u);
    EXPECT_EQ(u["choices"][0]["message"]["content"], want.text());
    EXPECT_EQ(u["choices"][0]["finish_reason"], "length");
    EXPECT_EQ(u["usage"]["completion_tokens"], 12);
    EXPECT_EQ(u["usage"]["prompt_tokens"], want.usage().prompt_tokens());
    EXPECT_EQ(u["vtw"]["image_tokens"], 16);
    EXPECT_EQ(u["vtw"]["applied"], false);
    EXPECT_FALSE(unary["headers"]["x-request-id"].get<std::string>().empty());

    json streamed = PostChat(CaseBody(c, 12), {"--stream"});
    ASSERT_EQ(streamed["status"], 200) << streamed.dump();
    EXPECT_TRUE(streamed["done"]) << "the stream ends with data: [DONE]";
    ASSERT_GE(streamed["events"].size(), 3u);
    EXPECT_EQ(streamed["events"][0]["choices"][0]["delta"]["role"], "assistant");
    EXPECT_EQ(StreamText(streamed), want.text());
    const json& last = streamed["events"].back();
    EXPECT_EQ(last["object"], "chat.completion.chunk");
    EXPECT_EQ(last["choices"][0]["finish_reason"], "length");
    EXPECT_EQ(last["usage"]["completion_tokens"], 12);
  }
  // With withdrawal at K=1 the answer is gRPC's at K=1 and the vtw object reports the savings.
  v1::GenerateRequest req = GrpcCase(0, 12);
  req.mutable_vtw()->set_mode(v1::VTW_MODE_LAYER);
  req.mutable_vtw()->set_layer(1);
  v1::GenerateResponse want;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub->Generate(&ctx, req, &want).ok());
  json k1 = PostChat(CaseBody(0, 12, 1));
  ASSERT_EQ(k1["status"], 200) << k1.dump();
  EXPECT_EQ(k1["json"]["choices"][0]["message"]["content"], want.text());
  EXPECT_EQ(k1["json"]["vtw"]["layer"], 1);
  EXPECT_EQ(k1["json"]["vtw"]["applied"], true);
  EXPECT_EQ(k1["json"]["vtw"]["flops"], want.vtw().flops());
  EXPECT_EQ(k1["json"]["vtw"]["flops_saved"], want.vtw().flops_without_vtw() - want.vtw().flops());
  EXPECT_GT(k1["json"]["vtw"]["kv_cache_bytes_saved"], 0);

  // curl, as the README shows it.
  const std::string body = WriteBody(CaseBody(1, 12).dump());
  const testing::ProcessResult curl = RunProcess(
      {"/usr/bin/curl", "-sS", "--max-time", "60", "-H", "Content-Type: application/json", "-d",
       "@" + body, base_ + "/v1/chat/completions"});
  ASSERT_EQ(curl.exit_code, 0) << curl.err;
  json cj = json::parse(curl.out, nullptr, false);
  ASSERT_FALSE(cj.is_discarded()) << curl.out;
  v1::GenerateResponse want1;
  grpc::ClientContext ctx1;
  ASSERT_TRUE(stub->Generate(&ctx1, GrpcCase(1, 12), &want1).ok());
  EXPECT_EQ(cj["choices"][0]["message"]["content"], want1.text());
  json stream_body = CaseBody(1, 12);
  stream_body["stream"] = true;
  const testing::ProcessResult curl_stream =
      RunProcess({"/usr/bin/curl", "-sS", "-N", "--max-time", "60", "-d", "@" + WriteBody(stream_body.dump()),
                  base_ + "/v1/chat/completions"});
  EXPECT_NE(curl_stream.out.find("data: [DONE]"), std::string::npos) << curl_stream.out;

  json models = Py("/v1/models");
  EXPECT_EQ(models["status"], 200);
  EXPECT_EQ(models["json"]["data"][0]["id"], "tiny-llava");
  json health = Py("/health");
  EXPECT_EQ(health["status"], 200);
  EXPECT_EQ(health["json"]["status"], "SERVING");
  EXPECT_EQ(Metric("vtw_requests_total{code=\"OK\",protocol=\"http\"}"),
            2 * cases + 1 + 2);
}


TEST_F(HttpTest, BadRequestsGetTheDocumentedErrorAndTheServerKeepsServing) {
  // A small message limit so that a "huge" body is a few MB: the body limit is 4/3 of it + 1 MiB.
  StartServer({"--max-message-bytes", "300000"});
  const json ok_messages = json::array({UserMessage(DataUrl(testing::OracleImageBytes(0)), "What?")});
  int invalid = 0;
  auto bad = [&](const std::string& body, const std::string& words) {
    SCOPED_TRACE(body.substr(0, 200));
    ExpectError(Py("/v1/chat/completions", {"--body", WriteBody(body)}), 400,
                "invalid_request_error", words);
    ++invalid;
  };
  bad("{\"messages\": [", "not valid JSON");
  bad("[]", "must be a JSON object");
  bad(json{{"messages", "hello"}}.dump(), "\"messages\" must be a non-empty list");
  bad(json{{"messages", ok_messages}, {"max_tokens", "ten"}}.dump(),
      "\"max_tokens\" must be an integer");
  bad(json{{"messages", ok_messages}, {"temperature", true}}.dump(),
      "\"temperature\" must be a number");
  bad(json{{"messages", json::array({UserMessage("data:image/png;base64,%%%%", "q")})}}.dump(),
      "not valid base64");
  bad(json{{"messages", json::array({UserMessage(DataUrl("this is not an image"), "q")})}}.dump(),
      "image");
  bad(json{{"messages", json::array({UserMessage("https://example.com/cat.png", "q")})}}.dump(),
      "the server never fetches URLs");
  json two = json::array({UserMessage(DataUrl(testing::OracleImageBytes(0)), "a"),
                          {{"role", "assistant"}, {"content", "b"}},
                          UserMessage(DataUrl(testing::OracleImageBytes(1)), "c")});
  bad(json{{"messages", two}}.dump(), "more than one image");
  bad(json{{"messages", ok_messages}, {"max_tokens", 100000}}.dump(), "max_tokens");
  bad(json{{"messages", ok_messages}, {"vtw_layer", 99}}.dump(), "99");

  // A body over the limit: 413 before anything is parsed.
  const std::string huge = "{\"messages\": \"" + std::string(3 << 20, 'x') + "\"}";
  ExpectError(Py("/v1/chat/completions", {"--body", WriteBody(huge)}), 413,
              "invalid_request_error", "larger than this server's limit");
  ExpectError(PostChat({{"model", "gpt-4o"}, {"messages", ok_messages}}), 404,
              "invalid_request_error", "serves 'tiny-llava'");
  ExpectError(Py("/v2/nothing"), 404, "invalid_request_error", "POST /v1/chat/completions");
  ExpectError(Py("/v1/chat/completions"), 405, "invalid_request_error", "use POST");

  // Still serving, and the counters say what the clients saw.
  json good = PostChat(CaseBody(0, 4));
  EXPECT_EQ(good["status"], 200) << good.dump();
  EXPECT_EQ(Metric("vtw_requests_total{code=\"INVALID_ARGUMENT\",protocol=\"http\"}"), invalid);
  EXPECT_EQ(Metric("vtw_requests_total{code=\"RESOURCE_EXHAUSTED\",protocol=\"http\"}"), 1);
  EXPECT_EQ(Metric("vtw_requests_total{code=\"NOT_FOUND\",protocol=\"http\"}"), 1);
  EXPECT_EQ(Metric("vtw_requests_total{code=\"OK\",protocol=\"http\"}"), 1);
  EXPECT_EQ(Metric("vtw_requests_total{code=\"INVALID_ARGUMENT\",protocol=\"grpc\"}"), 0);
}

TEST_F(HttpTest, BearerTokenGuardsV1LikeGrpc) {
  const std::string token_file = (dir_ / "token").string();
  std::ofstream(token_file) << "s3cret-token\n";
  StartServer({"--auth-token-file", token_file});
  const json body = CaseBody(0, 4);
  json missing = PostChat(body);
  ExpectError(missing, 401, "authentication_error", "Authorization: Bearer");
  EXPECT_EQ(missing["headers"]["www-authenticate"], "Bearer");
  ExpectError(PostChat(body, {"--token", "wrong"}), 401, "authentication_error", "bearer token");
  ExpectError(Py("/v1/models"), 401, "authentication_error", "bearer token");
  EXPECT_EQ(PostChat(body, {"--token", "s3cret-token"})["status"], 200);
  EXPECT_EQ(Py("/v1/models", {"--token", "s3cret-token"})["status"], 200);
  EXPECT_EQ(Py("/health")["status"], 200) << "health stays open";
  EXPECT_EQ(Metric("vtw_requests_total{code=\"UNAUTHENTICATED\",protocol=\"http\"}"), 2);
  EXPECT_EQ(Metric("vtw_requests_total{code=\"OK\",protocol=\"http\"}"), 1);
}

TEST_F(HttpTest, ClientsThatGoAwayAreCancelledAndFreeTheirKvCache) {
  StartServer({"--model", LongContextModel(), "--max-new-tokens-limit", "8000"});
  // A stream left after three events.
  json left = PostChat(CaseBody(0, 6000), {"--stream", "--disconnect-after-events", "3"});
  EXPECT_EQ(left["status"], 200) << left.dump();
  EXPECT_EQ(left["events"].size(), 3u);
  EXPECT_FALSE(left["done"]);
  EXPECT_EQ(WaitForMetric("vtw_requests_total{code=\"CANCELLED\",protocol=\"http\"}", 1), 1);
  EXPECT_EQ(WaitForMetric("vtw_kv_cache_bytes", 0), 0);
  // A unary request given up after a second.
  PostChat(CaseBody(1, 6000), {"--disconnect-after-seconds", "1"});
  EXPECT_EQ(WaitForMetric("vtw_requests_total{code=\"CANCELLED\",protocol=\"http\"}", 2), 2);
  EXPECT_EQ(WaitForMetric("vtw_kv_cache_bytes", 0), 0);
  EXPECT_EQ(Metric("vtw_requests_running"), 0);
  // Neither ran to the end: 6000 tokens take far longer than the test waited.
  EXPECT_LT(Metric("vtw_generated_tokens_total"), 6000);
  EXPECT_EQ(PostChat(CaseBody(0, 4))["status"], 200) << "still serving";
}

TEST_F(HttpTest, HttpAndGrpcRequestsRunInOneBatch) {
  StartServer({"--model", LongContextModel(), "--max-new-tokens-limit", "8000"});
  json alone = PostChat(CaseBody(2, 300));
  ASSERT_EQ(alone["status"], 200) << alone.dump();
  // A long gRPC stream is running; HTTP requests join it in the running batch.
  auto stub = Stub();
  grpc::ClientContext grpc_ctx;
  auto reader = stub->GenerateStream(&grpc_ctx, GrpcCase(3, 4000));
  v1::GenerateStreamResponse m;
  ASSERT_TRUE(reader->Read(&m));
  json concurrent;
  std::thread http([&] { concurrent = PostChat(CaseBody(2, 300), {"--concurrent", "3"}); });
  double most_running = 0;
  for (int i = 0; i < 300 && most_running < 4; ++i) {
    most_running = std::max(most_running, Metric("vtw_requests_running"));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  http.join();
  grpc_ctx.TryCancel();
  while (reader->Read(&m)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(most_running, 4) << "the gRPC stream and three HTTP requests ran together";
  ASSERT_EQ(concurrent.size(), 3u) << concurrent.dump();
  for (const json& r : concurrent) {
    ASSERT_EQ(r["status"], 200) << r.dump();
    EXPECT_EQ(r["json"]["choices"][0]["message"]["content"],
              alone["json"]["choices"][0]["message"]["content"])
        << "batched answers equal the one alone";
  }
  EXPECT_EQ(WaitForMetric("vtw_kv_cache_bytes", 0), 0);
}

}  // namespace
}  // namespace vtw
