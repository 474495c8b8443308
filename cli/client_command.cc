// `vtw client`: one call to a running vtw-server (vtw.v1.InferenceService, or
// grpc.health.v1.Health with --health) over a synchronous gRPC channel, printed for a person or
// as JSON. Owns only the client side of the contract in proto/vtw/v1/inference.proto.
// TLS (--tls-ca, mTLS with --tls-cert/--tls-key) and a bearer token (--auth-token-file or
// $VTW_AUTH_TOKEN, sent as `authorization: Bearer <token>` on vtw.v1 calls) for secured servers.
// Exit status: 0 on success, 1 when the RPC fails ("error: <CODE_NAME>: <message>" on stderr),
// 2 when the command line is wrong (checked before anything is sent, the TLS and token files
// included). Registration is not
// thread-safe (call from main).
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include "cli/commands.h"
#include "cli/health_check.h"
#include "cli/tool_common.h"
#include "model/image_processor.h"
#include "server/security.h"
#include "vtw/v1/inference.grpc.pb.h"

namespace vtw::tools {
namespace {

constexpr int kExitRpcError = 1;
constexpr int kExitUsage = 2;

// Numbers are taken as text and parsed here, so that every bad value exits with kExitUsage and a
// message naming the flag (CLI11's own conversion errors have other exit codes).
struct ClientFlags {
  std::string addr = "localhost:50051";
  std::string image;
  std::string prompt;
  bool stream = false;
  std::string vtw_layer = "default";
  std::string vtw_profile;
  std::string max_new_tokens;  // unset: the server's default
  std::string temperature;     // unset: 0 (greedy)
  std::string top_p;           // unset: the server's default (1)
  std::string top_k;
  std::string seed;
  std::vector<std::string> stop;
  bool ignore_eos = false;
  std::string timeout = "60";
  std::string request_id;
  bool json = false;
  bool info = false;
  bool health = false;
  std::string tls_ca;
  std::string tls_cert;
  std::string tls_key;
  std::string tls_server_name;
  std::string auth_token_file;
};

// Sent with every vtw.v1 call when not empty.
struct CallAuth {
  std::string token;
  void Apply(grpc::ClientContext* context) const {
    if (!token.empty()) context->AddMetadata("authorization", "Bearer " + token);
  }
};

// Thrown to end the command; caught in the callback once every gRPC object is destroyed.
struct CommandExit {
  int code;
};

[[noreturn]] void UsageError(const std::string& message) {
  std::fprintf(stderr, "error: %s\n", message.c_str());
  throw CommandExit{kExitUsage};
}

[[noreturn]] void RpcError(const grpc::Status& status) {
  std::fprintf(stderr, "error: %s: %s\n", GrpcCodeName(status.error_code()),
               status.error_message().c_str());
  throw CommandExit{kExitRpcError};
}

uint64_t ParseUnsigned(const std::string& flag, const std::string& text, uint64_t max) {
  if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos) {
    UsageError(flag + ": expected a non-negative integer, got '" + text + "'");
  }
  errno = 0;
  const unsigned long long value = std::strtoull(text.c_str(), nullptr, 10);
  if (errno == ERANGE || value > max) {
    UsageError(flag + ": " + text + " is too large (at most " + std::to_string(max) + ")");
  }
  return value;
}

double ParseReal(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(value)) {
    UsageError(flag + ": expected a number, got '" + text + "'");
  }
  return value;
}

vtw::v1::GenerateRequest BuildRequest(const ClientFlags& f, bool prompt_given) {
  if (!prompt_given) UsageError("--prompt is required (or use --info or --health)");
  vtw::v1::GenerateRequest request;
  request.set_request_id(f.request_id);
  request.set_prompt(f.prompt);
  if (!f.image.empty()) {
    StatusOr<std::string> bytes = ReadImageFile(f.image);
    if (!bytes.ok()) UsageError("cannot read --image: " + bytes.status().message());
    if (bytes->empty()) UsageError("--image: file '" + f.image + "' is empty");
    request.set_image(std::move(*bytes));
  }

  vtw::v1::SamplingParams* sampling = request.mutable_sampling();
  if (!f.max_new_tokens.empty()) {
    sampling->set_max_new_tokens(static_cast<uint32_t>(
        ParseUnsigned("--max-new-tokens", f.max_new_tokens, std::numeric_limits<uint32_t>::max())));
  }
  if (!f.temperature.empty()) {
    sampling->set_temperature(static_cast<float>(ParseReal("--temperature", f.temperature)));
  }
  if (!f.top_p.empty()) sampling->set_top_p(static_cast<float>(ParseReal("--top-p", f.top_p)));
  if (!f.top_k.empty()) {
    sampling->set_top_k(static_cast<uint32_t>(
        ParseUnsigned("--top-k", f.top_k, std::numeric_limits<uint32_t>::max())));
  }
  if (!f.seed.empty()) {
    sampling->set_seed(ParseUnsigned("--seed", f.seed, std::numeric_limits<uint64_t>::max()));
  }
  for (const std::string& s : f.stop) sampling->add_stop(s);
  sampling->set_ignore_eos(f.ignore_eos);

  vtw::v1::VtwOptions* vtw = request.mutable_vtw();
  if (!f.vtw_profile.empty()) {
    if (f.vtw_layer != "default") UsageError("--vtw-layer and --vtw-profile exclude each other");
    vtw->set_mode(vtw::v1::VTW_MODE_PROFILE);
    vtw->set_profile(f.vtw_profile);
  } else if (f.vtw_layer == "default") {
    vtw->set_mode(vtw::v1::VTW_MODE_DEFAULT);
  } else if (f.vtw_layer == "off") {
    vtw->set_mode(vtw::v1::VTW_MODE_OFF);
  } else {
    if (f.vtw_layer.empty() || f.vtw_layer.find_first_not_of("0123456789") != std::string::npos) {
      UsageError("--vtw-layer: expected a layer number, 'off' or 'default', got '" + f.vtw_layer +
                 "'");
    }
    vtw->set_mode(vtw::v1::VTW_MODE_LAYER);
    vtw->set_layer(static_cast<uint32_t>(
        ParseUnsigned("--vtw-layer", f.vtw_layer, std::numeric_limits<uint32_t>::max())));
  }
  return request;
}

void SetDeadline(grpc::ClientContext* context, double timeout_seconds) {
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::duration_cast<std::chrono::system_clock::duration>(
                            std::chrono::duration<double>(timeout_seconds)));
}

// One line of JSON with the proto field names and every field, defaults included.
std::string ToJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  std::string out;
  if (!google::protobuf::util::MessageToJsonString(message, &out, options).ok()) {
    std::fprintf(stderr, "error: cannot print the response as JSON\n");
    throw CommandExit{kExitRpcError};
  }
  return out;
}

const char* FinishReasonWord(vtw::v1::FinishReason reason) {
  switch (reason) {
    case vtw::v1::FINISH_REASON_LENGTH: return "length";
    case vtw::v1::FINISH_REASON_EOS: return "eos";
    case vtw::v1::FINISH_REASON_STOP: return "stop";
    default: return "unfinished";
  }
}

double SavedPercent(uint64_t done, uint64_t without) {
  return without > 0 && without >= done ? 100.0 * static_cast<double>(without - done) / without
                                        : 0.0;
}

// "[vtw] 12 tokens (eos), prompt 52 (16 image), VTW K=2, 1.23 GFLOP (34.5% saved), ..." (stderr).
void PrintSummary(const vtw::v1::GenerateResponse& r) {
  const auto& v = r.vtw();
  const std::string vtw = v.applied() ? "K=" + std::to_string(v.layer()) : std::string("off");
  std::fprintf(stderr,
               "[vtw] %s: %u tokens (%s), prompt %u (%u image), VTW %s, %.4g GFLOP (%.1f%% "
               "saved), KV %.1f KiB (%.1f%% saved), queue %.3f s, TTFT %.3f s, total %.3f s\n",
               r.request_id().c_str(), r.usage().completion_tokens(),
               FinishReasonWord(r.finish_reason()), r.usage().prompt_tokens(),
               r.usage().image_tokens(), vtw.c_str(), v.flops() / 1e9,
               SavedPercent(v.flops(), v.flops_without_vtw()), v.kv_cache_bytes() / 1024.0,
               SavedPercent(v.kv_cache_bytes(), v.kv_cache_bytes_without_vtw()),
               r.timing().queue_seconds(), r.timing().time_to_first_token_seconds(),
               r.timing().total_seconds());
}

void RunInfo(vtw::v1::InferenceService::Stub& stub, const ClientFlags& f, const CallAuth& auth,
             double timeout) {
  grpc::ClientContext context;
  SetDeadline(&context, timeout);
  auth.Apply(&context);
  vtw::v1::ModelInfo info;
  grpc::Status status = stub.GetModelInfo(&context, vtw::v1::GetModelInfoRequest(), &info);
  if (!status.ok()) RpcError(status);
  if (f.json) {
    std::printf("%s\n", ToJson(info).c_str());
    return;
  }
  std::printf("model:          %s\n", info.model_name().c_str());
  std::printf("architecture:   %s\n", info.architecture().c_str());
  std::printf("dtype:          %s\n", info.dtype().c_str());
  std::printf("decoder layers: %u\n", info.num_layers());
  std::printf("image:          %u px, %u tokens\n", info.image_size(),
              info.image_tokens_per_image());
  std::printf("context length: %u\n", info.context_length());
  std::printf("vocab size:     %u\n", info.vocab_size());
  if (info.has_default_withdraw_layer()) {
    std::printf("default VTW:    K=%u\n", info.default_withdraw_layer());
  } else {
    std::printf("default VTW:    off\n");
  }
  const std::map<std::string, uint32_t> profiles(info.profiles().begin(), info.profiles().end());
  for (const auto& [name, layer] : profiles) {
    std::printf("profile:        %s K=%u\n", name.c_str(), layer);
  }
}

int RunHealth(const std::shared_ptr<grpc::Channel>& channel, const ClientFlags& f,
              double timeout) {
  ServingStatus serving = ServingStatus::kUnknown;
  grpc::Status status = CheckHealth(channel, "", timeout, &serving);
  if (!status.ok()) RpcError(status);
  if (f.json) {
    std::printf("{\"status\":\"%s\"}\n", ServingStatusName(serving));
  } else {
    std::printf("%s\n", ServingStatusName(serving));
  }
  return serving == ServingStatus::kServing ? 0 : kExitRpcError;
}

void RunGenerate(vtw::v1::InferenceService::Stub& stub, const ClientFlags& f,
                 const CallAuth& auth, const vtw::v1::GenerateRequest& request, double timeout) {
  grpc::ClientContext context;
  SetDeadline(&context, timeout);
  auth.Apply(&context);
  vtw::v1::GenerateResponse response;
  grpc::Status status = stub.Generate(&context, request, &response);
  if (!status.ok()) RpcError(status);
  if (f.json) {
    std::printf("%s\n", ToJson(response).c_str());
    return;
  }
  std::printf("%s\n", response.text().c_str());
  std::fflush(stdout);
  PrintSummary(response);
}

// Prints each delta as it arrives; the response printed at the end (JSON, summary) is the
// concatenation of the deltas with the fields of the final message.
void RunStream(vtw::v1::InferenceService::Stub& stub, const ClientFlags& f, const CallAuth& auth,
               const vtw::v1::GenerateRequest& request, double timeout) {
  grpc::ClientContext context;
  SetDeadline(&context, timeout);
  auth.Apply(&context);
  std::unique_ptr<grpc::ClientReader<vtw::v1::GenerateStreamResponse>> reader =
      stub.GenerateStream(&context, request);
  vtw::v1::GenerateStreamResponse message;
  vtw::v1::GenerateResponse response;
  bool finished = false;
  while (reader->Read(&message)) {
    if (!message.request_id().empty()) response.set_request_id(message.request_id());
    response.mutable_text()->append(message.text());
    response.mutable_token_ids()->MergeFrom(message.token_ids());
    if (!f.json && !message.text().empty()) {
      std::fwrite(message.text().data(), 1, message.text().size(), stdout);
      std::fflush(stdout);
    }
    if (message.finish_reason() != vtw::v1::FINISH_REASON_UNSPECIFIED) {
      finished = true;
      response.set_finish_reason(message.finish_reason());
      *response.mutable_usage() = message.usage();
      *response.mutable_vtw() = message.vtw();
      *response.mutable_timing() = message.timing();
    }
  }
  grpc::Status status = reader->Finish();
  if (!f.json) {
    std::fputc('\n', stdout);
    std::fflush(stdout);
  }
  if (!status.ok()) RpcError(status);
  if (!finished) {
    std::fprintf(stderr, "error: the stream ended without a final message (no finish_reason)\n");
    throw CommandExit{kExitRpcError};
  }
  if (f.json) {
    std::printf("%s\n", ToJson(response).c_str());
  } else {
    PrintSummary(response);
  }
}

int RunClient(const ClientFlags& f, bool prompt_given, const std::vector<std::string>& extras) {
  if (!extras.empty()) UsageError("unexpected argument '" + extras.front() + "'");
  if (f.info && f.health) UsageError("--info and --health exclude each other");
  const double timeout = ParseReal("--timeout", f.timeout);
  if (timeout <= 0) UsageError("--timeout must be > 0 seconds, got '" + f.timeout + "'");
  if (f.addr.empty()) UsageError("--addr must be HOST:PORT");
  // Build (and so check) the whole request before connecting.
  vtw::v1::GenerateRequest request;
  if (!f.info && !f.health) request = BuildRequest(f, prompt_given);

  CallAuth auth;
  if (!f.auth_token_file.empty()) {
    StatusOr<std::string> token = ReadTokenFile("--auth-token-file", f.auth_token_file);
    if (!token.ok()) UsageError(token.status().message());
    auth.token = std::move(token).value();
  } else if (const char* env = std::getenv("VTW_AUTH_TOKEN"); env && *env) {
    std::string token = env;
    while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back()))) {
      token.pop_back();
    }
    if (Status st = ValidateToken("$VTW_AUTH_TOKEN", token); !st.ok()) UsageError(st.message());
    auth.token = std::move(token);
  }
  StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      BuildChannelCredentials({f.tls_ca, f.tls_cert, f.tls_key});
  if (!credentials.ok()) UsageError(credentials.status().message());
  grpc::ChannelArguments args;
  if (!f.tls_server_name.empty()) {
    if (f.tls_ca.empty()) UsageError("--tls-server-name needs TLS: set --tls-ca");
    args.SetSslTargetNameOverride(f.tls_server_name);
  }

  std::shared_ptr<grpc::Channel> channel = grpc::CreateCustomChannel(f.addr, *credentials, args);
  if (f.health) return RunHealth(channel, f, timeout);
  std::unique_ptr<vtw::v1::InferenceService::Stub> stub =
      vtw::v1::InferenceService::NewStub(channel);
  if (f.info) {
    RunInfo(*stub, f, auth, timeout);
  } else if (f.stream) {
    RunStream(*stub, f, auth, request, timeout);
  } else {
    RunGenerate(*stub, f, auth, request, timeout);
  }
  return 0;
}

}  // namespace

void RegisterClientCommand(CLI::App& app) {
  auto flags = std::make_shared<ClientFlags>();
  CLI::App* cmd = app.add_subcommand(
      "client", "Call a running vtw-server: generate (unary or --stream), --info or --health");
  cmd->allow_extras();  // reported by the callback with exit status 2
  cmd->add_option("--addr", flags->addr, "Server address")
      ->type_name("HOST:PORT")
      ->capture_default_str();
  cmd->add_option("--image", flags->image, "Image file (PNG, JPEG, WebP, BMP); none: text only")
      ->type_name("FILE");
  CLI::Option* prompt = cmd->add_option("--prompt", flags->prompt,
                                        "The question; the server applies the chat template");
  cmd->add_flag("--stream", flags->stream, "Use GenerateStream: print text as it is generated");
  cmd->add_option("--vtw-layer", flags->vtw_layer,
                  "Withdrawal layer K, 'off', or 'default' (the model's calibrated K)")
      ->type_name("K|off|default")
      ->capture_default_str();
  cmd->add_option("--vtw-profile", flags->vtw_profile,
                  "Use the layer calibrated for this task profile (see --info)");
  cmd->add_option("--max-new-tokens", flags->max_new_tokens,
                  "Tokens to generate at most (default: the server's)")
      ->type_name("N");
  cmd->add_option("--temperature", flags->temperature, "0 = greedy (default)")->type_name("T");
  cmd->add_option("--top-p", flags->top_p, "Nucleus sampling mass in (0, 1]")->type_name("P");
  cmd->add_option("--top-k", flags->top_k, "Keep the k most likely tokens (0 = off)")
      ->type_name("K");
  cmd->add_option("--seed", flags->seed, "Sampling seed")->type_name("S");
  cmd->add_option("--stop", flags->stop, "Stop string (repeat the flag for more)")
      ->type_name("S")
      ->allow_extra_args(false);
  cmd->add_flag("--ignore-eos", flags->ignore_eos, "Do not stop at the end-of-sequence token");
  cmd->add_option("--timeout", flags->timeout, "Deadline of the call in seconds")
      ->type_name("SECONDS")
      ->capture_default_str();
  cmd->add_option("--request-id", flags->request_id, "Request id (echoed; default: server-made)");
  cmd->add_flag("--json", flags->json, "Print the response as one line of JSON");
  cmd->add_flag("--info", flags->info, "Call GetModelInfo instead of generating");
  cmd->add_flag("--health", flags->health,
                "Call grpc.health.v1.Health/Check; exit 0 only when SERVING");
  cmd->add_option("--tls-ca", flags->tls_ca,
                  "PEM CA bundle to verify the server's certificate with: connect over TLS")
      ->type_name("FILE");
  cmd->add_option("--tls-cert", flags->tls_cert,
                  "PEM client certificate for servers that require one (mTLS; with --tls-key)")
      ->type_name("FILE");
  cmd->add_option("--tls-key", flags->tls_key, "PEM private key of --tls-cert")->type_name("FILE");
  cmd->add_option("--tls-server-name", flags->tls_server_name,
                  "Name to check the server's certificate against (default: the --addr host)")
      ->type_name("NAME");
  cmd->add_option("--auth-token-file", flags->auth_token_file,
                  "File with the server's bearer token (default: $VTW_AUTH_TOKEN, the token "
                  "itself); sent as 'authorization: Bearer <token>'")
      ->type_name("FILE");
  cmd->callback([flags, prompt, cmd] {
    int code = 0;
    try {
      code = RunClient(*flags, prompt->count() > 0, cmd->remaining());
    } catch (const CommandExit& e) {
      code = e.code;
    }
    std::fflush(stdout);
    std::exit(code);
  });
}

}  // namespace vtw::tools
