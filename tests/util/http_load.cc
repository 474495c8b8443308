#include "tests/util/http_load.h"

#include <httplib.h>

#include <thread>

#include <nlohmann/json.hpp>

#include "server/openai_api.h"
#include "tests/util/oracle.h"

namespace vtw::testing {
namespace {

using Clock = std::chrono::steady_clock;

}  // namespace

std::string CodeForHttpStatus(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "INVALID_ARGUMENT";
    case 401: return "UNAUTHENTICATED";
    case 413:
    case 429: return "RESOURCE_EXHAUSTED";
    case 499: return "CANCELLED";
    case 503: return "UNAVAILABLE";
    case 504: return "DEADLINE_EXCEEDED";
    default: return "HTTP_" + std::to_string(status);
  }
}

HttpLoad::HttpLoad(std::string host, int port, HttpLoadOptions options)
    : host_(std::move(host)), port_(port), options_(std::move(options)) {
  for (size_t i = 0; i < OracleCases().size(); ++i) {
    image_urls_.push_back("data:image/png;base64," + EncodeBase64(OracleImageBytes(static_cast<int>(i))));
    prompts_.push_back(OracleCases()[i]["question"].get<std::string>());
  }
}

HttpCallRecord HttpLoad::Call(const std::string& id, int index, httplib::Client& client) const {
  const size_t c = static_cast<size_t>(index) % image_urls_.size();
  HttpCallRecord r;
  r.id = id;
  r.short_timeout = index % 5 == 4;
  nlohmann::json body = {
      {"messages",
       {{{"role", "user"},
         {"content",
          {{{"type", "image_url"}, {"image_url", {{"url", image_urls_[c]}}}},
           {{"type", "text"}, {"text", prompts_[c]}}}}}}},
      {"max_tokens", options_.max_tokens},
      {"ignore_eos", true},
      {"vtw_layer", (index / 3) % 2 == 0 ? nlohmann::json("off") : nlohmann::json(2)}};
  if (r.short_timeout) body["vtw_timeout"] = options_.short_timeout.count() / 1000.0;
  const auto start = Clock::now();
  httplib::Result res =
      client.Post("/v1/chat/completions", {{"X-Request-Id", id}}, body.dump(), "application/json");
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (!res) {
    r.code = "CLIENT_ERROR";
    r.error = httplib::to_string(res.error());
    return r;
  }
  r.http_status = res->status;
  r.code = CodeForHttpStatus(res->status);
  const auto reply = nlohmann::json::parse(res->body, nullptr, /*allow_exceptions=*/false);
  if (res->status == 200) {
    r.complete = reply.is_object() && reply.contains("usage") &&
                 reply["usage"].value("completion_tokens", -1) == options_.max_tokens &&
                 reply.contains("choices") && !reply["choices"].empty() &&
                 reply["choices"][0].value("finish_reason", "") != "";
  } else if (reply.is_object() && reply.contains("error")) {
    r.error = reply["error"].value("message", "");
  } else {
    r.error = "not an OpenAI error object: " + res->body.substr(0, 200);
  }
  return r;
}

int HttpLoad::Run(int clients, double rate, double seconds) {
  const auto start = Clock::now();
  const auto end = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  const auto period = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(clients / std::max(rate, 1e-6)));
  std::vector<std::thread> threads;
  for (int t = 0; t < clients; ++t) {
    threads.emplace_back([this, t, start, end, period, clients] {
      httplib::Client client(host_, port_);
      client.set_keep_alive(true);
      client.set_read_timeout(std::chrono::duration_cast<std::chrono::microseconds>(
          std::chrono::duration<double>(options_.client_timeout_seconds)));
      // Staggered: client t starts t/clients of a period after the first.
      auto next = start + period * t / clients;
      for (int i = 0;; ++i) {
        std::this_thread::sleep_until(next);
        if (Clock::now() >= end) break;
        const std::string id = options_.id_prefix + "-" + std::to_string(t) + "-" + std::to_string(i);
        HttpCallRecord r = Call(id, i * clients + t, client);
        {
          std::lock_guard<std::mutex> lock(mu_);
          records_.push_back(std::move(r));
        }
        next = std::max(next + period, Clock::now() - period);  // late: go now, no burst to catch up
      }
    });
  }
  for (auto& t : threads) t.join();
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(records_.size());
}

std::vector<HttpCallRecord> HttpLoad::Records() const {
  std::lock_guard<std::mutex> lock(mu_);
  return records_;
}

std::map<std::string, int> HttpLoad::CountByCode(const std::vector<HttpCallRecord>& records) {
  std::map<std::string, int> out;
  for (const auto& r : records) ++out[r.code];
  return out;
}

}  // namespace vtw::testing
