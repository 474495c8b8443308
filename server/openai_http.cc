#include "server/openai_http.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netdb.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <sys/socket.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <ctime>
#include <deque>
#include <mutex>

#include <httplib.h>
#include <spdlog/spdlog.h>

#include "server/http_util.h"
#include "server/metrics.h"
#include "server/openai_api.h"

namespace vtw {
namespace {

using json = nlohmann::json;

constexpr const char* kChatPath = "/v1/chat/completions";
constexpr const char* kModelsPath = "/v1/models";
constexpr const char* kHealthPath = "/health";
constexpr const char* kJson = "application/json";
constexpr const char* kUnauthenticated =
    "missing or invalid bearer token: send the header 'Authorization: Bearer <token>'";
// How often a waiting request looks at its connection (a client that went away cancels it).
constexpr auto kWatchInterval = std::chrono::milliseconds(50);

// What the engine reports for one HTTP request; the pool thread serving it waits on it.
class HttpCall final : public RequestSink {
 public:
  void OnDelta(const std::string& text, const std::vector<int32_t>&) override {
    if (text.empty()) return;
    std::lock_guard<std::mutex> lock(mu_);
    deltas_.push_back(text);
    cv_.notify_all();
  }
  void OnDone(const Status& status, const RequestSummary& summary) override {
    std::lock_guard<std::mutex> lock(mu_);
    status_ = status;
    summary_ = summary;
    done_ = true;
    cv_.notify_all();
  }

  // Waits up to `timeout` for news; moves the deltas that came into *deltas. True when done.
  bool Wait(std::chrono::milliseconds timeout, std::deque<std::string>* deltas) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, timeout, [&] { return done_ || !deltas_.empty(); });
    if (deltas) {
      deltas->insert(deltas->end(), deltas_.begin(), deltas_.end());
    }
    deltas_.clear();
    return done_;
  }
  // After Wait returned true.
  const Status& status() const { return status_; }
  const RequestSummary& summary() const { return summary_; }

  const std::shared_ptr<std::atomic<bool>> cancel = std::make_shared<std::atomic<bool>>(false);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::string> deltas_;
  bool done_ = false;
  Status status_;
  RequestSummary summary_;
};

// The numeric host and port of a socket address.
bool HostAndPort(const sockaddr_storage& addr, socklen_t len, std::string* host, int* port) {
  char buf[NI_MAXHOST];
  char serv[NI_MAXSERV];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&addr), len, buf, sizeof buf, serv,
                  sizeof serv, NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    return false;
  }
  *host = buf;
  *port = std::atoi(serv);
  return true;
}

// The socket of the connection `req` came on, or -1. cpp-httplib does not hand it to handlers:
// with TLS it is the SSL object's; otherwise the one open socket whose local port and peer
// match the request's (the connection is open while its handler runs, so it cannot be reused).
int ConnectionFd(const httplib::Request& req) {
  if (req.ssl) return SSL_get_fd(req.ssl);
  DIR* dir = opendir("/proc/self/fd");
  if (!dir) return -1;
  int found = -1;
  while (dirent* e = readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0') continue;
    sockaddr_storage local{}, peer{};
    socklen_t local_len = sizeof local, peer_len = sizeof peer;
    if (getsockname(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&local), &local_len) != 0 ||
        (local.ss_family != AF_INET && local.ss_family != AF_INET6) ||
        getpeername(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0) {
      continue;
    }
    std::string local_host, peer_host;
    int local_port = 0, peer_port = 0;
    if (HostAndPort(local, local_len, &local_host, &local_port) && local_port == req.local_port &&
        HostAndPort(peer, peer_len, &peer_host, &peer_port) && peer_port == req.remote_port &&
        peer_host == req.remote_addr) {
      found = static_cast<int>(fd);
      break;
    }
  }
  closedir(dir);
  return found;
}

// True when the client closed or reset the connection.
bool PeerGone(int fd) {
  if (fd < 0) return false;
  pollfd p{fd, POLLRDHUP, 0};
  return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

// JSON text; invalid UTF-8 (say, echoed from a request) becomes U+FFFD instead of throwing.
std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

void SendError(httplib::Response& res, const Status& status) {
  res.status = HttpStatusFor(status);
  if (res.status == 401) res.set_header("WWW-Authenticate", "Bearer");
  if (res.status == 429 || res.status == 503) res.set_header("Retry-After", "1");
  res.set_content(Dump(ErrorJson(status)), kJson);
}

std::string Event(const json& j) { return "data: " + Dump(j) + "\n\n"; }

// The Server-Sent Events of an accepted streamed request, produced on the connection's thread
// by cpp-httplib's chunked content provider, which calls Next until it returns false or the
// stream is done. Never writes 0 bytes (that would end the response early).
class EventStream {
 public:
  EventStream(std::shared_ptr<HttpCall> call, std::string id, std::string model, int fd)
      : call_(std::move(call)), id_(std::move(id)), model_(std::move(model)), fd_(fd),
        created_(std::time(nullptr)) {}

  bool Next(httplib::DataSink& sink) {
    if (!started_) {
      started_ = true;
      return Write(sink, Event(ChunkJson(id_, created_, model_, "", /*role=*/true, nullptr)));
    }
    std::deque<std::string> deltas;
    const bool done = call_->Wait(kWatchInterval, &deltas);
    for (const std::string& d : deltas) {
      if (!Write(sink, Event(ChunkJson(id_, created_, model_, d, false, nullptr)))) return false;
    }
    if (!done) {
      if (deltas.empty() && PeerGone(fd_)) {
        call_->cancel->store(true);
        return false;
      }
      return true;
    }
    const Status& status = call_->status();
    const std::string last =
        status.ok() ? Event(ChunkJson(id_, created_, model_, "", false, &call_->summary()))
                    : Event(ErrorJson(status));
    if (!Write(sink, last + "data: [DONE]\n\n")) return false;
    sink.done();
    return true;
  }

  // The response ended (success: all of it was written). A stream cut short cancels the
  // request; the engine drops it and frees its KV cache.
  void Release(bool success) {
    if (!success) call_->cancel->store(true);
  }

 private:
  bool Write(httplib::DataSink& sink, const std::string& data) {
    if (sink.write(data.data(), data.size())) return true;
    call_->cancel->store(true);
    return false;
  }

  const std::shared_ptr<HttpCall> call_;
  const std::string id_, model_;
  const int fd_;
  const int64_t created_;
  bool started_ = false;
};

}  // namespace

OpenAiHttpServer::OpenAiHttpServer(const RequestIntake& intake, HttpServerOptions options)
    : intake_(intake), options_(std::move(options)) {}

OpenAiHttpServer::~OpenAiHttpServer() { Stop(); }

Status OpenAiHttpServer::Start() {
  if (options_.threads < 1) return InvalidArgument("--http-threads must be >= 1");
  if (options_.tls.enabled()) {
    const ServerTlsFiles& t = options_.tls;
    server_ = std::make_unique<httplib::SSLServer>(
        t.cert.c_str(), t.key.c_str(), t.client_ca.empty() ? nullptr : t.client_ca.c_str());
  } else {
    server_ = std::make_unique<httplib::Server>();
  }
  if (!server_->is_valid()) {
    return InvalidArgument("the HTTP server cannot use the TLS files (--tls-cert, --tls-key, "
                           "--tls-client-ca)");
  }
  const int threads = options_.threads;
  server_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  server_->set_payload_max_length(options_.max_body_bytes);
  // Without TCP_NODELAY a response written in pieces (SSE chunk after chunk) waits for the
  // client's delayed ACK: +13 ms per SSE stream at batch 1 here (docs/PERFORMANCE.md).
  server_->set_tcp_nodelay(true);
  Routes();
  return BindAndServe(*server_, "--http-listen", options_.listen, &thread_, &port_);
}

void OpenAiHttpServer::Stop() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

StatusOr<std::string> OpenAiHttpServer::ServedModel() const {
  const ModelBundle* bundle = intake_.bundle();
  if (!bundle) return RequestIntake::NotLoaded();
  return bundle->model->config().name;
}

void OpenAiHttpServer::Routes() {
  server_->Post(kChatPath, [this](const httplib::Request& req, httplib::Response& res) {
    ChatCompletion(req, res);
  });
  server_->Get(kModelsPath, [this](const httplib::Request& req, httplib::Response& res) {
    const std::string peer = req.remote_addr + ":" + std::to_string(req.remote_port);
    Status auth = intake_.Authenticate(req.get_header_value("Authorization"), peer,
                                       kProtocolHttp, /*count=*/false, kUnauthenticated);
    if (!auth.ok()) return SendError(res, auth);
    StatusOr<std::string> model = ServedModel();
    if (!model.ok()) return SendError(res, model.status());
    res.set_content(Dump(ModelsJson(*model, std::time(nullptr))), kJson);
  });
  server_->Get(kHealthPath, [this](const httplib::Request&, httplib::Response& res) {
    const bool serving = serving_ && intake_.bundle() != nullptr;
    res.status = serving ? 200 : 503;
    res.set_content(Dump(json{{"status", serving ? "SERVING" : "NOT_SERVING"}}), kJson);
  });
  server_->set_error_handler(httplib::Server::HandlerWithResponse([this](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    const bool known = req.path == kChatPath || req.path == kModelsPath || req.path == kHealthPath;
    Status status;
    if (res.status == 413) {
      status = ResourceExhausted(
          "the request body is larger than this server's limit of " +
          std::to_string(options_.max_body_bytes) +
          " bytes (an image travels base64-encoded, about 4/3 of its file size)");
      if (req.path == kChatPath) (void)intake_.Reject(status, kProtocolHttp, "");
    } else if (res.status == 404 && known) {
      res.status = 405;
      status = InvalidArgument(std::string(req.path == kChatPath ? "use POST" : "use GET") +
                               " for " + req.path);
    } else if (res.status == 404) {
      status = NotFound("no route " + req.method + " " + req.path + "; this server serves POST " +
                        kChatPath + ", GET " + kModelsPath + " and GET " + kHealthPath);
    } else {
      status = InvalidArgument("the HTTP request could not be read (status " +
                               std::to_string(res.status) + ")");
    }
    res.set_content(Dump(ErrorJson(status)), kJson);
    return httplib::Server::HandlerResponse::Handled;
  }));
  server_->set_exception_handler(
      [](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "unknown error";
        try {
          if (ep) std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        spdlog::error("HTTP {} {} failed: {}", req.method, req.path, what);
        SendError(res, Internal("internal error: " + what));
      });
}

void OpenAiHttpServer::ChatCompletion(const httplib::Request& req, httplib::Response& res) {
  const std::string peer = req.remote_addr + ":" + std::to_string(req.remote_port);
  Status auth = intake_.Authenticate(req.get_header_value("Authorization"), peer, kProtocolHttp,
                                     /*count=*/true, kUnauthenticated);
  if (!auth.ok()) return SendError(res, auth);
  const std::string client_id = req.get_header_value("X-Request-Id");
  StatusOr<std::string> model = ServedModel();
  if (!model.ok()) return SendError(res, intake_.Reject(model.status(), kProtocolHttp, client_id));
  StatusOr<ChatCompletionRequest> parsed = ParseChatCompletionRequest(req.body, *model);
  if (!parsed.ok()) return SendError(res, intake_.Reject(parsed.status(), kProtocolHttp, client_id));
  ChatCompletionRequest& chat = parsed.value();
  chat.spec.request_id = client_id;
  const double timeout = std::min(chat.timeout_seconds.value_or(options_.request_timeout_seconds),
                                  options_.request_timeout_seconds);
  const Clock::time_point deadline =
      Clock::now() + std::chrono::duration_cast<Clock::duration>(
                         std::chrono::duration<double>(timeout));

  auto call = std::make_shared<HttpCall>();
  std::string id;
  Status accepted = intake_.Accept(chat.spec, kProtocolHttp, deadline, call, call->cancel, &id);
  if (!accepted.ok()) return SendError(res, accepted);
  res.set_header("X-Request-Id", id);
  const int fd = ConnectionFd(req);
  const std::string completion_id = "chatcmpl-" + id;

  if (chat.stream) {
    auto stream = std::make_shared<EventStream>(call, completion_id, *model, fd);
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [stream](size_t, httplib::DataSink& sink) { return stream->Next(sink); },
        [stream](bool success) { stream->Release(success); });
    return;
  }
  // Unary: wait for the answer, watching the connection.
  bool gone = false;
  while (!call->Wait(kWatchInterval, nullptr)) {
    if (!gone && PeerGone(fd)) {
      gone = true;
      call->cancel->store(true);  // the engine ends it within a step; OnDone still comes
    }
  }
  if (!call->status().ok()) return SendError(res, call->status());
  res.set_content(
      Dump(CompletionJson(completion_id, std::time(nullptr), *model, call->summary())),
      kJson);
}

}  // namespace vtw
