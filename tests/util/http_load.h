// HTTP load for the overload test: clients of the OpenAI-compatible front
// (POST /v1/chat/completions, unary, cpp-httplib's client), each on its own keep-alive
// connection, starting requests at a fixed pace (a client that is late starts the next one right
// away). Every call records its HTTP status, the gRPC code name that status stands for, and
// whether an OK answer was complete, by request id (X-Request-Id, as the access log shows it).
#pragma once

#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace httplib {
class Client;
}

namespace vtw::testing {

struct HttpLoadOptions {
  std::string id_prefix = "http";                 // request ids: PREFIX-THREAD-INDEX
  int max_tokens = 16;                            // with ignore_eos: an OK answer has exactly this many
  std::chrono::milliseconds short_timeout{300};   // "vtw_timeout" of every 5th request
  double client_timeout_seconds = 120;            // the client's own read timeout (never the first to give up)
};

struct HttpCallRecord {
  std::string id;
  int http_status = 0;     // 0: no HTTP response (connection error)
  std::string code;        // the gRPC code name for http_status (CodeForHttpStatus)
  bool short_timeout = false;
  bool complete = false;   // 200 with max_tokens completion tokens and a finish_reason
  std::string error;       // the error message (non-200) or the client's error
  double seconds = 0;
};

// The gRPC code name the server's HTTP status stands for (server/openai_api.cc HttpStatusFor):
// 200 OK, 400 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 429 / 413 RESOURCE_EXHAUSTED, 499 CANCELLED,
// 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED, others "HTTP_<status>".
std::string CodeForHttpStatus(int status);

class HttpLoad {
 public:
  HttpLoad(std::string host, int port, HttpLoadOptions options);

  // `clients` threads for `seconds`, together starting `rate` requests per second. Blocks until
  // every call has ended. Returns the number of calls.
  int Run(int clients, double rate, double seconds);
  std::vector<HttpCallRecord> Records() const;
  static std::map<std::string, int> CountByCode(const std::vector<HttpCallRecord>& records);

 private:
  HttpCallRecord Call(const std::string& id, int index, httplib::Client& client) const;

  std::string host_;
  int port_;
  HttpLoadOptions options_;
  std::vector<std::string> image_urls_, prompts_;  // data: URLs of the oracle images
  mutable std::mutex mu_;
  std::vector<HttpCallRecord> records_;  // guarded by mu_
};

}  // namespace vtw::testing
