// vtw-server: serves a LLaVA model with Visual Tokens Withdrawal over gRPC and over
// OpenAI-compatible HTTP. With no flags it serves the shipped model: gRPC on 0.0.0.0:50051,
// HTTP (/v1/chat/completions) on 0.0.0.0:8080, metrics on 0.0.0.0:9090/metrics. Every flag
// has a VTW_* environment variable and may come from a config file (--config, TOML/INI).
#include <pthread.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>

#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include "server/engine.h"
#include "server/log_format.h"
#include "server/metrics.h"
#include "server/metrics_http.h"
#include "server/openai_http.h"
#include "server/security.h"
#include "server/service.h"

namespace {

struct ServerFlags {
  std::string model;
  std::string listen = "0.0.0.0:50051";
  std::string metrics_listen = "0.0.0.0:9090";
  std::string http_listen = "0.0.0.0:8080";
  int http_threads = 128;
  int http_request_timeout = 300;
  std::string dtype = "fp32";
  std::string device = "cpu";
  int threads = 0;
  int max_queue = 256;
  int64_t kv_cache_bytes = int64_t{1} << 30;
  int64_t max_batch_tokens = 512;
  int max_running = 32;
  int image_cache_entries = 256;
  int drain_timeout = 30;
  std::string log_format = "text";
  std::string log_level = "info";
  int default_max_new_tokens = 64;
  int max_new_tokens_limit = 512;
  int64_t max_image_pixels = 40'000'000;
  int64_t max_message_bytes = 16 << 20;
  int64_t max_prompt_bytes = 16384;
  int max_connection_age = 300;
  std::string tls_cert;
  std::string tls_key;
  std::string tls_client_ca;
  std::string auth_token_file;
};

void AddFlags(CLI::App& app, ServerFlags& f) {
  auto opt = [&](const char* name, auto& value, const char* env, const char* help) {
    app.add_option(name, value, help)->envname(env)->capture_default_str();
  };
  opt("--model", f.model, "VTW_MODEL", "Model directory (default: the shipped model)");
  opt("--listen", f.listen, "VTW_LISTEN", "gRPC address");
  opt("--metrics-listen", f.metrics_listen, "VTW_METRICS_LISTEN", "Prometheus /metrics address");
  opt("--http-listen", f.http_listen, "VTW_HTTP_LISTEN",
      "OpenAI-compatible HTTP address (/v1/chat/completions); empty: no HTTP");
  opt("--http-threads", f.http_threads, "VTW_HTTP_THREADS",
      "HTTP requests served at once (each waits on its own thread)");
  opt("--http-request-timeout", f.http_request_timeout, "VTW_HTTP_REQUEST_TIMEOUT",
      "Deadline in seconds of an HTTP request (a request's \"vtw_timeout\" may shorten it)");
  opt("--dtype", f.dtype, "VTW_DTYPE", "fp32 or bf16");
  opt("--device", f.device, "VTW_DEVICE", "cpu (cuda needs a CUDA build of LibTorch)");
  opt("--threads", f.threads, "VTW_THREADS", "Model threads (0 = all cores)");
  opt("--max-queue", f.max_queue, "VTW_MAX_QUEUE", "Waiting requests before RESOURCE_EXHAUSTED");
  opt("--kv-cache-bytes", f.kv_cache_bytes, "VTW_KV_CACHE_BYTES", "KV-cache budget (bytes)");
  opt("--max-batch-tokens", f.max_batch_tokens, "VTW_MAX_BATCH_TOKENS", "Tokens per engine step");
  opt("--max-running", f.max_running, "VTW_MAX_RUNNING", "Requests in the running batch");
  opt("--image-cache-entries", f.image_cache_entries, "VTW_IMAGE_CACHE_ENTRIES",
      "Encoded images kept for reuse");
  opt("--drain-timeout", f.drain_timeout, "VTW_DRAIN_TIMEOUT",
      "Seconds in-flight requests get to finish after SIGTERM");
  opt("--log-format", f.log_format, "VTW_LOG_FORMAT", "text or json");
  opt("--log-level", f.log_level, "VTW_LOG_LEVEL", "trace, debug, info, warn, error");
  opt("--default-max-new-tokens", f.default_max_new_tokens, "VTW_DEFAULT_MAX_NEW_TOKENS",
      "max_new_tokens when a request leaves it unset");
  opt("--max-new-tokens-limit", f.max_new_tokens_limit, "VTW_MAX_NEW_TOKENS_LIMIT",
      "Largest max_new_tokens accepted");
  opt("--max-image-pixels", f.max_image_pixels, "VTW_MAX_IMAGE_PIXELS",
      "Largest decoded image (width x height)");
  opt("--max-message-bytes", f.max_message_bytes, "VTW_MAX_MESSAGE_BYTES",
      "Largest request message (RESOURCE_EXHAUSTED above)");
  opt("--max-prompt-bytes", f.max_prompt_bytes, "VTW_MAX_PROMPT_BYTES", "Largest prompt text");
  opt("--max-connection-age", f.max_connection_age, "VTW_MAX_CONNECTION_AGE",
      "Seconds before a client connection is asked to reconnect (spreads load after scale-up)");
  opt("--tls-cert", f.tls_cert, "VTW_TLS_CERT",
      "PEM certificate chain: serve gRPC and HTTP over TLS (with --tls-key)");
  opt("--tls-key", f.tls_key, "VTW_TLS_KEY", "PEM private key of --tls-cert");
  opt("--tls-client-ca", f.tls_client_ca, "VTW_TLS_CLIENT_CA",
      "PEM CA: clients must present a certificate it signed (mTLS; needs --tls-cert)");
  opt("--auth-token-file", f.auth_token_file, "VTW_AUTH_TOKEN_FILE",
      "File with a bearer token every vtw.v1 call and HTTP /v1 request must send as "
      "'authorization: Bearer <token>' (health, reflection and /health stay open)");
}

// Flag values that cannot work: the message to print (exit status 2), or empty.
std::string CheckFlags(const ServerFlags& f) {
  for (auto [name, value] : {std::pair<const char*, int64_t>{"--max-running", f.max_running},
                             {"--max-batch-tokens", f.max_batch_tokens},
                             {"--kv-cache-bytes", f.kv_cache_bytes},
                             {"--default-max-new-tokens", f.default_max_new_tokens},
                             {"--max-new-tokens-limit", f.max_new_tokens_limit},
                             {"--max-image-pixels", f.max_image_pixels},
                             {"--max-message-bytes", f.max_message_bytes},
                             {"--max-prompt-bytes", f.max_prompt_bytes},
                             {"--http-threads", f.http_threads},
                             {"--http-request-timeout", f.http_request_timeout}}) {
    if (value < 1) return std::string(name) + " must be >= 1, got " + std::to_string(value);
  }
  if (f.max_queue < 0 || f.drain_timeout < 0 || f.threads < 0) {
    return "--max-queue, --drain-timeout and --threads must be >= 0";
  }
  if (f.default_max_new_tokens > f.max_new_tokens_limit) {
    return "--default-max-new-tokens exceeds --max-new-tokens-limit";
  }
  return "";
}

// A test hook, deliberately not a flag (tests/faults_test.cc): the engine fails on purpose
// after N model steps, to test what clients, health and metrics see when the model throws.
// -1 when VTW_TEST_FAIL_AFTER_STEPS is unset.
vtw::StatusOr<int64_t> FailAfterStepsHook() {
  const char* env = std::getenv("VTW_TEST_FAIL_AFTER_STEPS");
  if (!env || !*env) return int64_t{-1};
  char* end = nullptr;
  const long long n = std::strtoll(env, &end, 10);
  if (*end != '\0' || n < 0) {
    return vtw::InvalidArgument(std::string("VTW_TEST_FAIL_AFTER_STEPS must be a number >= 0, got '") +
                                env + "'");
  }
  return static_cast<int64_t>(n);
}

struct Security {
  std::shared_ptr<grpc::ServerCredentials> credentials;
  std::string auth_token;  // empty: no token required
};

// TLS credentials and the bearer token, read before anything listens or loads.
vtw::StatusOr<Security> LoadSecurity(const ServerFlags& f) {
  Security s;
  VTW_ASSIGN_OR_RETURN(s.credentials,
                       vtw::BuildServerCredentials({f.tls_cert, f.tls_key, f.tls_client_ca}));
  if (!f.auth_token_file.empty()) {
    VTW_ASSIGN_OR_RETURN(s.auth_token, vtw::ReadTokenFile("--auth-token-file", f.auth_token_file));
  }
  return s;
}

vtw::ServiceLimits LimitsFrom(const ServerFlags& f) {
  vtw::ServiceLimits limits;
  limits.default_max_new_tokens = f.default_max_new_tokens;
  limits.max_new_tokens_limit = f.max_new_tokens_limit;
  limits.max_prompt_bytes = static_cast<size_t>(f.max_prompt_bytes);
  limits.image.max_pixels = f.max_image_pixels;
  limits.image.max_bytes = static_cast<size_t>(f.max_message_bytes);
  return limits;
}

vtw::EngineOptions EngineOptionsFrom(const ServerFlags& f, int64_t fail_after_steps) {
  vtw::EngineOptions o;
  o.scheduler.max_batch_tokens = f.max_batch_tokens;
  o.scheduler.max_running = f.max_running;
  o.scheduler.kv_cache_bytes = f.kv_cache_bytes;
  o.max_queue = f.max_queue;
  o.image_cache_entries = static_cast<size_t>(std::max(0, f.image_cache_entries));
  o.fail_after_steps = fail_after_steps;
  return o;
}

// The gRPC server (service, health, reflection) listening on --listen; null on failure.
std::unique_ptr<grpc::Server> StartGrpc(const ServerFlags& f, const Security& security,
                                        vtw::InferenceServiceImpl* service, int* bound_port) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(f.listen, security.credentials, bound_port);
  builder.RegisterService(service);
  builder.SetMaxReceiveMessageSize(static_cast<int>(f.max_message_bytes));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, f.max_connection_age * 1000);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, 60 * 1000);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || *bound_port == 0) return nullptr;
  return server;
}

// The OpenAI-compatible HTTP front on --http-listen (null when the flag is empty), sharing the
// gRPC service's intake and TLS files.
vtw::StatusOr<std::unique_ptr<vtw::OpenAiHttpServer>> StartHttp(const ServerFlags& f,
                                                                const vtw::RequestIntake& intake) {
  if (f.http_listen.empty()) return std::unique_ptr<vtw::OpenAiHttpServer>();
  vtw::HttpServerOptions o;
  o.listen = f.http_listen;
  o.threads = f.http_threads;
  o.request_timeout_seconds = f.http_request_timeout;
  // The image travels base64 in the JSON: 4/3 of --max-message-bytes, plus room for the text.
  o.max_body_bytes = static_cast<size_t>(f.max_message_bytes) / 3 * 4 + (1 << 20);
  o.tls = {f.tls_cert, f.tls_key, f.tls_client_ca};
  auto http = std::make_unique<vtw::OpenAiHttpServer>(intake, o);
  VTW_RETURN_IF_ERROR(http->Start());
  return http;
}

// grpc.health.v1 for the whole server and for the service, set together.
void SetHealth(grpc::Server& server, bool serving) {
  grpc::HealthCheckServiceInterface* health = server.GetHealthCheckService();
  health->SetServingStatus(serving);
  health->SetServingStatus("vtw.v1.InferenceService", serving);
}

vtw::StatusOr<std::unique_ptr<vtw::ModelBundle>> LoadModel(const ServerFlags& f,
                                                          at::ScalarType dtype) {
  const auto start = std::chrono::steady_clock::now();
  VTW_ASSIGN_OR_RETURN(std::unique_ptr<vtw::ModelBundle> bundle,
                       vtw::ModelBundle::Load(f.model, dtype));
  const auto& config = bundle->model->config();
  spdlog::info("model {} loaded in {:.2f} s: {} decoder layers, {} image tokens, default VTW {}",
               config.name,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
               config.text.num_hidden_layers, config.num_image_tokens(),
               bundle->vtw.default_layer ? "K=" + std::to_string(*bundle->vtw.default_layer)
                                         : std::string("off"));
  return bundle;
}

// On SIGTERM/SIGINT: health NOT_SERVING, no new requests, in-flight ones get --drain-timeout
// seconds, the rest end with UNAVAILABLE.
void WaitForSignalAndDrain(const sigset_t& signals, const ServerFlags& f, grpc::Server& server,
                           vtw::OpenAiHttpServer* http, vtw::Engine& engine) {
  int sig = 0;
  sigwait(&signals, &sig);
  spdlog::info("{} received: draining for up to {} s", sig == SIGTERM ? "SIGTERM" : "SIGINT",
               f.drain_timeout);
  SetHealth(server, false);
  if (http) http->SetServing(false);
  engine.Drain();
  const bool idle = engine.WaitIdle(std::chrono::steady_clock::now() +
                                    std::chrono::seconds(f.drain_timeout));
  if (!idle) {
    spdlog::warn("drain timeout: {} running and {} waiting requests end with UNAVAILABLE",
                 engine.num_running(), engine.num_waiting());
  }
  engine.Stop(vtw::Status(vtw::StatusCode::kUnavailable,
                          "the server shut down before the request finished; retry"));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vtw-server: LLaVA over gRPC with Visual Tokens Withdrawal"};
  ServerFlags f;
  AddFlags(app, f);
  app.set_config("--config", "", "Read flags from a TOML/INI file")->envname("VTW_CONFIG");
  CLI11_PARSE(app, argc, argv);
  // Bad flags, files or hooks stop the server (exit 2) before it listens or loads anything.
  if (std::string bad = CheckFlags(f); !bad.empty()) {
    std::fprintf(stderr, "error: %s\n", bad.c_str());
    return 2;
  }
  auto fail_after_steps = FailAfterStepsHook();
  auto security = LoadSecurity(f);
  for (const vtw::Status& st : {fail_after_steps.status(), security.status()}) {
    if (!st.ok()) {
      std::fprintf(stderr, "error: %s\n", st.message().c_str());
      return 2;
    }
  }

  vtw::ConfigureLogging(f.log_format, f.log_level);
  if (f.device != "cpu") {
    spdlog::error("--device {} is not available: this build of LibTorch supports cpu only", f.device);
    return 1;
  }
  auto dtype = vtw::ParseDType(f.dtype);
  if (!dtype.ok()) {
    spdlog::error("{}", dtype.status().message());
    return 1;
  }
  if (f.model.empty()) f.model = vtw::DefaultModelDir();
  if (*fail_after_steps >= 0) {
    spdlog::warn("VTW_TEST_FAIL_AFTER_STEPS={}: the engine will fail on purpose after {} steps "
                 "(a test hook; unset it outside tests)", *fail_after_steps, *fail_after_steps);
  }
  spdlog::info("effective configuration:\n{}", app.config_to_str(true, false));

  // SIGTERM / SIGINT are taken synchronously by the main thread (blocked everywhere else).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  at::set_num_threads(f.threads > 0 ? f.threads
                                    : static_cast<int>(std::thread::hardware_concurrency()));

  vtw::ServerMetrics metrics;
  vtw::MetricsHttpServer metrics_http(metrics.registry());
  if (vtw::Status st = metrics_http.Start(f.metrics_listen); !st.ok()) {
    spdlog::error("cannot serve metrics: {}", st.message());
    return 1;
  }
  spdlog::info("metrics on http://{}/metrics", f.metrics_listen);
  vtw::RequestIntake intake(LimitsFrom(f), &metrics);
  if (!security->auth_token.empty()) intake.RequireBearerToken(security->auth_token);
  vtw::InferenceServiceImpl service(intake);
  int bound_port = 0;
  std::unique_ptr<grpc::Server> server = StartGrpc(f, *security, &service, &bound_port);
  if (!server) {
    spdlog::error("cannot listen on {}", f.listen);
    return 1;
  }
  SetHealth(*server, false);
  spdlog::info("gRPC listening on {} (port {}, {}{}); loading model {} ({})", f.listen, bound_port,
               f.tls_cert.empty() ? "plaintext"
               : f.tls_client_ca.empty() ? "TLS"
                                         : "mTLS: client certificates required",
               security->auth_token.empty() ? "" : ", bearer token required", f.model, f.dtype);

  auto http = StartHttp(f, intake);
  if (!http.ok()) {
    spdlog::error("cannot serve HTTP: {}", http.status().message());
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    return 1;
  }
  vtw::OpenAiHttpServer* http_server = http->get();
  if (http_server) {
    spdlog::info("HTTP (OpenAI-compatible /v1/chat/completions) on {} (port {})", f.http_listen,
                 http_server->port());
  }
  auto bundle = LoadModel(f, *dtype);
  if (!bundle.ok()) {
    spdlog::error("cannot load the model: {}", bundle.status().message());
    if (http_server) http_server->Stop();
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    return 1;
  }
  auto engine = std::make_unique<vtw::Engine>(
      **bundle, EngineOptionsFrom(f, *fail_after_steps), &metrics, [&](const std::string&) {
        SetHealth(*server, false);
        if (http_server) http_server->SetServing(false);
      });
  intake.SetEngine(bundle->get(), engine.get());
  SetHealth(*server, true);
  if (http_server) http_server->SetServing(true);
  spdlog::info("serving");

  WaitForSignalAndDrain(signals, f, *server, http_server, *engine);
  intake.ClearEngine();
  if (http_server) http_server->Stop();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  engine.reset();
  spdlog::info("stopped");
  return 0;
}
