// Server load benchmark (not a test): N concurrent streaming clients against a running vtw-server,
// a fixed request mix from a shapes dataset split, bounded duration, at several load levels and
// VTW settings; plus the serving overhead at batch 1 against the model run in this process.
// scripts/bench-load.sh starts the server(s) and runs this; see docs/PERFORMANCE.md.
//
//   load_bench --addr localhost:50061 --metrics localhost:9191 --data DIR/test.jsonl
//              [--clients 1,2,4,8] [--seconds 20] [--modes off,default,mix]
//              [--max-new-tokens 16] [--model DIR --dtype fp32] [--overhead N]
//              [--kv-budget-bytes B] [--out PREFIX]
//
// Modes: off = VTW_MODE_OFF; default = VTW_MODE_DEFAULT (the model's calibrated K from vtw.json);
// mix = VTW_MODE_LAYER with each request's K = the vtw.json profile layer of its question type,
// or K = 0, 1, ..., layers in turn when the model has no profiles (a mix of per-request K in one
// batch). Every request: greedy, ignore_eos, max_new_tokens tokens.
// Each client runs GenerateStream calls back to back; a phase starts requests for --seconds and
// ends when they finish. Per phase: requests/s, tokens/s, TTFT / inter-token latency / end-to-end
// p50 and p95 (client-observed), FLOPs per request and saved (server metrics), and the largest
// vtw_requests_running / vtw_kv_cache_bytes / vtw_kv_cache_bytes_saved seen (sampled every
// 100 ms). --overhead N: N sequential requests (batch 1, mode default), then the same N prompts
// run in this process (GenerateOne, same K and threads): overhead = (client e2e - model) / model.
// --http HOST:PORT (with --overhead N): N rounds of the same request (mode default, batch 1) as
// gRPC Generate, gRPC GenerateStream, HTTP POST /v1/chat/completions unary and with
// "stream": true (SSE), interleaved round by round: client end-to-end medians per path and the
// median per-round ratios HTTP / gRPC (the HTTP front's overhead next to the gRPC one).
// --modes none skips the load phases. Writes PREFIX.json and PREFIX.csv.
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>

#include "bench/bench_common.h"
#include "server/generator.h"
#include "server/model_bundle.h"
#include "server/openai_api.h"
#include "vtw/compute_model.h"
#include "vtw/v1/inference.grpc.pb.h"

namespace vtw {
namespace {

using json = nlohmann::json;
using bench::Now;
using bench::Progress;



// p-quantile (0..1), linear interpolation between order statistics; 0 when empty.
double Quantile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double x = p * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(x)), hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (x - static_cast<double>(lo));
}

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

// GET http://HOSTPORT/metrics; "" on failure.
std::string HttpGetMetrics(const std::string& hostport) {
  const size_t colon = hostport.rfind(':');
  const std::string host = hostport.substr(0, colon), port = hostport.substr(colon + 1);
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0) return "";
  int fd = -1;
  for (addrinfo* a = res; a; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0) return "";
  const std::string req = "GET /metrics HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n\r\n";
  if (send(fd, req.data(), req.size(), 0) < 0) {
    close(fd);
    return "";
  }
  std::string out;
  char buf[65536];
  for (ssize_t n; (n = recv(fd, buf, sizeof buf, 0)) > 0;) out.append(buf, static_cast<size_t>(n));
  close(fd);
  const size_t body = out.find("\r\n\r\n");
  return body == std::string::npos ? "" : out.substr(body + 4);
}

// Prometheus text -> {"name{labels}": value}.
std::map<std::string, double> ParseMetrics(const std::string& text) {
  std::map<std::string, double> m;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    const size_t sp = line.rfind(' ');
    if (sp == std::string::npos) continue;
    m[line.substr(0, sp)] = std::atof(line.c_str() + sp + 1);
  }
  return m;
}

double Get(const std::map<std::string, double>& m, const std::string& key) {
  auto it = m.find(key);
  return it == m.end() ? 0 : it->second;
}

struct Item {
  std::string image, question, type;
};

struct Options {
  std::string addr = "localhost:50061", metrics, data, model, out = "load", dtype = "fp32", http;
  std::vector<int> clients = {1, 2, 4, 8};
  std::vector<std::string> modes = {"off", "default", "mix"};
  double seconds = 20;
  int max_new_tokens = 16;
  int overhead = 0;
  int threads = 0;
  int64_t kv_budget_bytes = int64_t{1} << 30;
  bool warm = true;
  std::string label;
};

struct Record {
  std::string mode;
  int item = 0;
  double start = 0, first = 0, end = 0;
  std::vector<double> itl;  // seconds per token between consecutive token messages
  int tokens = 0;
  bool ok = false;
  std::string error;
  int k = -1;
  double server_total = 0, server_ttft = 0, server_queue = 0;
  uint64_t flops = 0, flops_without_vtw = 0, kv = 0, kv_without = 0;
  int prompt_tokens = 0, image_tokens = 0;
};

class Bench {
 public:
  explicit Bench(Options o) : o_(std::move(o)) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    for (int i = 0; i < 8; ++i) {  // a few connections, as separate clients would have
      args.SetInt("vtw.bench.channel", i);
      stubs_.push_back(v1::InferenceService::NewStub(
          grpc::CreateCustomChannel(o_.addr, grpc::InsecureChannelCredentials(), args)));
    }
    LoadData();
  }

  int Run() {
    json out;
    out["options"] = {{"addr", o_.addr},       {"data", o_.data},
                      {"seconds", o_.seconds}, {"max_new_tokens", o_.max_new_tokens},
                      {"clients", o_.clients}, {"modes", o_.modes},
                      {"label", o_.label}};
    if (!FetchInfo(&out)) return 1;
    if (o_.warm) Warm();
    json phases = json::array();
    std::ofstream csv(o_.out + ".csv");
    csv << "label,mode,clients,requests,ok,errors,seconds,requests_per_s,tokens_per_s,"
           "ttft_p50_ms,ttft_p95_ms,itl_p50_ms,itl_p95_ms,e2e_p50_ms,e2e_p95_ms,"
           "mean_k,gflops_per_request,flops_saved_fraction,max_running,max_kv_cache_bytes,"
           "max_kv_cache_bytes_saved\n";
    for (const std::string& mode : o_.modes) {
      if (mode == "none") continue;
      for (int n : o_.clients) {
        json p = Phase(mode, n);
        phases.push_back(p);
        char line[1024];
        std::snprintf(line, sizeof line,
                      "%s,%s,%d,%d,%d,%d,%.3f,%.3f,%.1f,%.2f,%.2f,%.3f,%.3f,%.2f,%.2f,%.2f,%.4f,"
                      "%.4f,%.0f,%.0f,%.0f\n",
                      o_.label.c_str(), mode.c_str(), n, p["requests"].get<int>(),
                      p["ok"].get<int>(), p["errors"].get<int>(), p["seconds"].get<double>(),
                      p["requests_per_s"].get<double>(), p["tokens_per_s"].get<double>(),
                      1e3 * p["ttft_p50"].get<double>(), 1e3 * p["ttft_p95"].get<double>(),
                      1e3 * p["itl_p50"].get<double>(), 1e3 * p["itl_p95"].get<double>(),
                      1e3 * p["e2e_p50"].get<double>(), 1e3 * p["e2e_p95"].get<double>(),
                      p["mean_k"].get<double>(), p["gflops_per_request"].get<double>(),
                      p["flops_saved_fraction"].get<double>(), p["max_running"].get<double>(),
                      p["max_kv_cache_bytes"].get<double>(),
                      p["max_kv_cache_bytes_saved"].get<double>());
        csv << line;
        csv.flush();
        out["phases"] = phases;
        std::ofstream(o_.out + ".json") << out.dump(2) << "\n";
      }
    }
    out["phases"] = phases;
    if (o_.overhead > 0) out["overhead"] = Overhead();
    if (o_.overhead > 0 && !o_.http.empty()) out["http_vs_grpc"] = HttpVsGrpc();
    out["kv_budget"] = KvBudget();
    std::ofstream(o_.out + ".json") << out.dump(2) << "\n";
    PrintSummary(out);
    return 0;
  }

 private:
  void LoadData() {
    const std::string dir = std::filesystem::path(o_.data).parent_path().string();
    std::ifstream in(o_.data);
    if (!in) {
      std::fprintf(stderr, "error: cannot read --data %s\n", o_.data.c_str());
      std::exit(2);
    }
    std::map<std::string, std::string> images;
    for (std::string line; std::getline(in, line);) {
      if (line.empty()) continue;
      json j = json::parse(line);
      Item it;
      const std::string rel = j["image"].get<std::string>();
      auto [pos, added] = images.emplace(rel, "");
      if (added) pos->second = ReadFile(dir + "/" + rel);
      it.image = pos->second;
      it.question = j["question"].get<std::string>();
      it.type = j.value("type", "");
      items_.push_back(std::move(it));
    }
    distinct_images_ = static_cast<int>(images.size());
    Progress("data: " + std::to_string(items_.size()) + " questions on " +
             std::to_string(distinct_images_) + " images");
  }

  bool FetchInfo(json* out) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::ModelInfo info;
    grpc::Status s = stubs_[0]->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
    if (!s.ok()) {
      std::fprintf(stderr, "error: GetModelInfo: %s\n", s.error_message().c_str());
      return false;
    }
    layers_ = static_cast<int>(info.num_layers());
    default_k_ = info.has_default_withdraw_layer() ? static_cast<int>(info.default_withdraw_layer())
                                                   : layers_;
    for (const auto& [name, k] : info.profiles()) profiles_[name] = static_cast<int>(k);
    (*out)["model"] = {{"name", info.model_name()},
                       {"layers", layers_},
                       {"image_tokens", info.image_tokens_per_image()},
                       {"dtype", info.dtype()},
                       {"default_k", default_k_},
                       {"profiles", profiles_}};
    Progress("model " + info.model_name() + ": " + std::to_string(layers_) + " layers, default K " +
             std::to_string(default_k_));
    return true;
  }

  v1::GenerateRequest MakeRequest(const std::string& mode, int item, int max_new) const {
    const Item& it = items_[static_cast<size_t>(item) % items_.size()];
    v1::GenerateRequest r;
    r.set_image(it.image);
    r.set_prompt(it.question);
    r.mutable_sampling()->set_max_new_tokens(static_cast<uint32_t>(max_new));
    r.mutable_sampling()->set_ignore_eos(true);
    if (mode == "off") {
      r.mutable_vtw()->set_mode(v1::VTW_MODE_OFF);
    } else if (mode == "mix") {
      // The question type's profile K; a model without profiles: K = 0, 1, ..., layers in turn.
      auto p = profiles_.find(it.type);
      const int k = !profiles_.empty() ? (p == profiles_.end() ? default_k_ : p->second)
                                       : item % (layers_ + 1);
      r.mutable_vtw()->set_mode(v1::VTW_MODE_LAYER);
      r.mutable_vtw()->set_layer(static_cast<uint32_t>(k));
    } else if (mode == "default") {
      r.mutable_vtw()->set_mode(v1::VTW_MODE_DEFAULT);
    } else {  // a number: that layer for every request
      r.mutable_vtw()->set_mode(v1::VTW_MODE_LAYER);
      r.mutable_vtw()->set_layer(static_cast<uint32_t>(std::atoi(mode.c_str())));
    }
    return r;
  }

  Record Call(const std::string& mode, int item, int max_new, int stub) {
    Record rec;
    rec.mode = mode;
    rec.item = item;
    v1::GenerateRequest req = MakeRequest(mode, item, max_new);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(600));
    rec.start = Now();
    auto reader = stubs_[static_cast<size_t>(stub) % stubs_.size()]->GenerateStream(&ctx, req);
    v1::GenerateStreamResponse m;
    double last = 0;
    while (reader->Read(&m)) {
      const double t = Now();
      const int n = m.token_ids_size();
      if (n > 0) {
        if (rec.tokens == 0) {
          rec.first = t;
        } else {
          rec.itl.push_back((t - last) / n);
        }
        rec.tokens += n;
        last = t;
      }
      if (m.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
        rec.k = static_cast<int>(m.vtw().layer());
        rec.server_total = m.timing().total_seconds();
        rec.server_ttft = m.timing().time_to_first_token_seconds();
        rec.server_queue = m.timing().queue_seconds();
        rec.flops = m.vtw().flops();
        rec.flops_without_vtw = m.vtw().flops_without_vtw();
        rec.kv = m.vtw().kv_cache_bytes();
        rec.kv_without = m.vtw().kv_cache_bytes_without_vtw();
        rec.prompt_tokens = static_cast<int>(m.usage().prompt_tokens());
        rec.image_tokens = static_cast<int>(m.usage().image_tokens());
      }
    }
    grpc::Status s = reader->Finish();
    rec.end = Now();
    rec.ok = s.ok();
    if (!s.ok()) rec.error = s.error_message();
    return rec;
  }

  // Every distinct image once, so that every phase sees the same (warm) image cache.
  void Warm() {
    std::map<std::string, int> first;
    for (size_t i = 0; i < items_.size(); ++i) first.emplace(items_[i].image, static_cast<int>(i));
    int failed = 0;
    for (const auto& [img, i] : first) failed += !Call("default", i, 1, 0).ok;
    Progress("warm-up: " + std::to_string(first.size()) + " images encoded into the server's "
             "image cache" + (failed ? ", " + std::to_string(failed) + " failed" : ""));
  }

  json Phase(const std::string& mode, int clients) {
    Progress("phase mode=" + mode + " clients=" + std::to_string(clients) + " for " +
             std::to_string(o_.seconds) + " s");
    const auto before = ParseMetrics(o_.metrics.empty() ? "" : HttpGetMetrics(o_.metrics));
    std::atomic<bool> sampling{true};
    double max_running = 0, max_kv = 0, max_saved = 0;
    std::thread sampler([&] {
      while (sampling.load()) {
        if (!o_.metrics.empty()) {
          const auto m = ParseMetrics(HttpGetMetrics(o_.metrics));
          max_running = std::max(max_running, Get(m, "vtw_requests_running"));
          max_kv = std::max(max_kv, Get(m, "vtw_kv_cache_bytes"));
          max_saved = std::max(max_saved, Get(m, "vtw_kv_cache_bytes_saved"));
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    });
    std::mutex mu;
    std::vector<Record> records;
    std::atomic<int> next{0};
    const double start = Now(), until = start + o_.seconds;
    std::vector<std::thread> threads;
    for (int c = 0; c < clients; ++c) {
      threads.emplace_back([&, c] {
        while (Now() < until) {
          Record r = Call(mode, next++, o_.max_new_tokens, c);
          std::lock_guard<std::mutex> lock(mu);
          records.push_back(std::move(r));
        }
      });
    }
    for (auto& t : threads) t.join();
    const double end = Now();
    sampling = false;
    sampler.join();
    const auto after = ParseMetrics(o_.metrics.empty() ? "" : HttpGetMetrics(o_.metrics));
    auto delta = [&](const std::string& key) { return Get(after, key) - Get(before, key); };

    std::vector<double> ttft, itl, e2e, server_total;
    int ok = 0, tokens = 0;
    double k_sum = 0, flops = 0, flops_without = 0;
    std::map<std::string, int> errors;
    for (const Record& r : records) {
      if (!r.ok) {
        ++errors[r.error];
        continue;
      }
      ++ok;
      tokens += r.tokens;
      ttft.push_back(r.first - r.start);
      e2e.push_back(r.end - r.start);
      server_total.push_back(r.server_total);
      itl.insert(itl.end(), r.itl.begin(), r.itl.end());
      k_sum += r.k;
      flops += static_cast<double>(r.flops);
      flops_without += static_cast<double>(r.flops_without_vtw);
    }
    const double secs = end - start;
    json p = {{"mode", mode},
              {"clients", clients},
              {"requests", static_cast<int>(records.size())},
              {"ok", ok},
              {"errors", static_cast<int>(records.size()) - ok},
              {"error_messages", errors},
              {"seconds", secs},
              {"requests_per_s", ok / secs},
              {"tokens_per_s", tokens / secs},
              {"ttft_p50", Quantile(ttft, 0.5)},
              {"ttft_p95", Quantile(ttft, 0.95)},
              {"itl_p50", Quantile(itl, 0.5)},
              {"itl_p95", Quantile(itl, 0.95)},
              {"e2e_p50", Quantile(e2e, 0.5)},
              {"e2e_p95", Quantile(e2e, 0.95)},
              {"server_total_p50", Quantile(server_total, 0.5)},
              {"mean_k", ok ? k_sum / ok : 0},
              {"gflops_per_request", ok ? flops / ok * 1e-9 : 0},
              {"flops_saved_fraction", flops_without > 0 ? 1 - flops / flops_without : 0},
              {"max_running", max_running},
              {"max_kv_cache_bytes", max_kv},
              {"max_kv_cache_bytes_saved", max_saved},
              {"metrics_delta",
               {{"engine_steps", delta("vtw_engine_steps_total")},
                {"generated_tokens", delta("vtw_generated_tokens_total")},
                {"flops_prefill", delta("vtw_flops_total{phase=\"prefill\"}")},
                {"flops_decode", delta("vtw_flops_total{phase=\"decode\"}")},
                {"flops_saved_prefill", delta("vtw_flops_saved_total{phase=\"prefill\"}")},
                {"flops_saved_decode", delta("vtw_flops_saved_total{phase=\"decode\"}")},
                {"vision_seconds", delta("vtw_vision_encoder_duration_seconds_sum")},
                {"image_cache_misses", delta("vtw_image_cache_misses_total")},
                {"batch_tokens_sum", delta("vtw_batch_tokens_sum")}}}};
    Progress("  " + std::to_string(ok) + " ok, " + std::to_string(records.size() - ok) +
             " errors, " + std::to_string(ok / secs) + " req/s, TTFT p50 " +
             std::to_string(1e3 * Quantile(ttft, 0.5)) + " ms, ITL p50 " +
             std::to_string(1e3 * Quantile(itl, 0.5)) + " ms, max running " +
             std::to_string(max_running));
    return p;
  }

  // Requests that fit in the KV budget by the engine's reservation rule (compute model):
  // prompt + max_new_tokens per layer, layers >= K without image rows. For the served model
  // (from a typical request of the data) and for LLaVA-1.5-7B in bf16.
  json KvBudget() {
    json out = json::array();
    auto add = [&](const std::string& what, const LlavaConfig& c, int64_t elem, int64_t text,
                   int64_t image, std::vector<int> ks, int64_t budget) {
      ComputeModel cm(c, elem);
      const int layers = c.text.num_hidden_layers;
      const int64_t off = cm.KvCacheBytes(text, image, layers);
      for (int k : ks) {
        const int64_t b = cm.KvCacheBytes(text, image, k);
        out.push_back({{"model", what}, {"k", k}, {"layers", layers}, {"text_tokens", text},
                       {"image_tokens", image}, {"reservation_bytes", b},
                       {"reservation_bytes_off", off}, {"budget_bytes", budget},
                       {"requests_fit", budget / b}, {"requests_fit_off", budget / off},
                       {"ratio", static_cast<double>(off) / b}});
      }
    };
    if (!o_.model.empty()) {
      auto config = LoadLlavaConfig(o_.model + "/config.json");
      if (config.ok()) {
        // A typical request: the median prompt of the overhead/warm-up calls (or 25 text tokens).
        const int64_t text = typical_text_tokens_ > 0 ? typical_text_tokens_ : 25;
        std::vector<int> ks = {default_k_};
        for (const auto& [name, k] : profiles_) {
          if (std::find(ks.begin(), ks.end(), k) == ks.end()) ks.push_back(k);
        }
        add(std::filesystem::path(o_.model).filename().string(), config.value(),
            o_.dtype == "bf16" ? 2 : 4, text + o_.max_new_tokens, config.value().num_image_tokens(),
            ks, o_.kv_budget_bytes);
      }
    }
    LlavaConfig c7;  // LLaVA-1.5-7B: 576 image tokens, 40 text + 64 new, bf16, 16 GiB budget
    c7.text.vocab_size = 32064;
    c7.name = "llava-1.5-7b";
    add("llava-1.5-7b bf16", c7, 2, 40 + 64, 576, {16, 8, 24}, int64_t{16} << 30);
    return out;
  }

  json Overhead() {
    Progress("overhead: " + std::to_string(o_.overhead) + " sequential requests through the server");
    std::vector<Record> served;
    for (int i = 0; i < o_.overhead; ++i) served.push_back(Call("default", i * 3, o_.max_new_tokens, 0));
    json out;
    std::vector<double> e2e, server_total;
    for (const Record& r : served) {
      if (!r.ok) continue;
      e2e.push_back(r.end - r.start);
      server_total.push_back(r.server_total);
    }
    if (!served.empty()) typical_text_tokens_ = served[0].prompt_tokens - served[0].image_tokens;
    out["requests"] = static_cast<int>(served.size());
    out["client_e2e_seconds"] = e2e;
    out["server_total_seconds"] = server_total;
    if (o_.model.empty()) return out;
    Progress("overhead: loading " + o_.model + " in this process");
    auto dtype = ParseDType(o_.dtype);
    auto bundle = ModelBundle::Load(o_.model, dtype.ok() ? dtype.value() : at::kFloat);
    if (!bundle.ok()) {
      out["error"] = bundle.status().ToString();
      return out;
    }
    const ModelBundle& b = *bundle.value();
    at::set_num_threads(o_.threads > 0 ? o_.threads
                                       : static_cast<int>(std::thread::hardware_concurrency()));
    std::vector<double> model_s, vision_s, prep_s;
    for (const Record& r : served) {
      if (!r.ok) continue;
      const Item& it = items_[static_cast<size_t>(r.item) % items_.size()];
      double t0 = Now();
      auto prepared = PreparePrompt(b, it.image, it.question, false, o_.max_new_tokens, ImageLimits{});
      prep_s.push_back(Now() - t0);
      if (!prepared.ok()) continue;
      t0 = Now();
      at::Tensor features = b.model->EncodeImages(prepared.value().pixel_values)[0];
      vision_s.push_back(Now() - t0);
      GenerateOptions g;
      g.stop.max_new_tokens = o_.max_new_tokens;
      g.stop.ignore_eos = true;
      g.stop.eos_id = b.tokenizer->eos_id();
      g.withdraw_layer = r.k;
      std::vector<double> t;
      for (int rep = 0; rep < 3; ++rep) {
        auto res = GenerateOne(*b.model, b.tokenizer.get(), prepared.value().layout, features, g);
        if (res.ok()) t.push_back(res.value().prefill_seconds + res.value().decode_seconds);
      }
      model_s.push_back(Quantile(t, 0.5));
    }
    auto sum = [](const std::vector<double>& v) {
      double s = 0;
      for (double x : v) s += x;
      return s;
    };
    const double se = sum(e2e), ss = sum(server_total), sm = sum(model_s);
    out["model_seconds"] = model_s;
    out["vision_seconds"] = vision_s;
    out["prepare_seconds"] = prep_s;
    out["sum_client_e2e"] = se;
    out["sum_server_total"] = ss;
    out["sum_model"] = sm;
    out["overhead"] = sm > 0 ? (se - sm) / sm : 0;
    out["overhead_grpc_and_validation"] = sm > 0 ? (se - ss) / sm : 0;
    out["overhead_engine"] = sm > 0 ? (ss - sm) / sm : 0;
    out["median_client_e2e"] = Quantile(e2e, 0.5);
    out["median_server_total"] = Quantile(server_total, 0.5);
    out["median_model"] = Quantile(model_s, 0.5);
    out["median_vision_uncached"] = Quantile(vision_s, 0.5);
    out["median_prepare"] = Quantile(prep_s, 0.5);
    return out;
  }

  // Client end-to-end seconds of one unary gRPC Generate (mode default); < 0 on error.
  double GrpcUnary(int item) {
    v1::GenerateRequest req = MakeRequest("default", item, o_.max_new_tokens);
    v1::GenerateResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(600));
    const double t0 = Now();
    const grpc::Status s = stubs_[0]->Generate(&ctx, req, &resp);
    const double t = Now() - t0;
    return s.ok() && resp.token_ids_size() == o_.max_new_tokens ? t : -1;
  }

  // The same request as an OpenAI chat completion body (the model's default K: "auto").
  std::string ChatBody(int item, bool stream) const {
    const Item& it = items_[static_cast<size_t>(item) % items_.size()];
    const bool jpeg = it.image.size() > 2 && static_cast<uint8_t>(it.image[0]) == 0xFF &&
                      static_cast<uint8_t>(it.image[1]) == 0xD8;
    const json image = {{"type", "image_url"},
                        {"image_url", {{"url", std::string("data:image/") + (jpeg ? "jpeg" : "png") +
                                                   ";base64," + EncodeBase64(it.image)}}}};
    const json text = {{"type", "text"}, {"text", it.question}};
    json body = {{"messages", {{{"role", "user"}, {"content", {image, text}}}}},
                 {"max_tokens", o_.max_new_tokens},
                 {"ignore_eos", true},
                 {"vtw_layer", "auto"}};
    if (stream) body["stream"] = true;
    return body.dump();
  }

  // Client end-to-end seconds of one HTTP chat completion on `client`; < 0 on error.
  double HttpCall(httplib::Client& client, int item, bool stream) {
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/chat/completions";
    req.body = ChatBody(item, stream);
    req.set_header("Content-Type", "application/json");
    std::string received;
    bool done = false;
    if (stream) {
      req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
        received.append(data, n);
        done = received.find("data: [DONE]") != std::string::npos;
        return true;
      };
    }
    const double t0 = Now();
    httplib::Result res = client.send(req);
    const double t = Now() - t0;
    if (!res || res->status != 200) return -1;
    if (stream) return done ? t : -1;
    const json reply = json::parse(res->body, nullptr, false);
    return reply.is_object() && reply["usage"].value("completion_tokens", -1) == o_.max_new_tokens
               ? t
               : -1;
  }

  json HttpVsGrpc() {
    Progress("http vs grpc: " + std::to_string(o_.overhead) + " rounds of gRPC unary, gRPC stream, "
             "HTTP unary, HTTP SSE at batch 1 (" + o_.http + ")");
    const size_t colon = o_.http.rfind(':');
    httplib::Client client(o_.http.substr(0, colon), std::atoi(o_.http.substr(colon + 1).c_str()));
    client.set_keep_alive(true);
    client.set_tcp_nodelay(true);  // as curl does (the default since curl 7.50)
    client.set_read_timeout(std::chrono::seconds(600));
    std::map<std::string, std::vector<double>> t;
    std::vector<double> unary_ratio, stream_ratio;
    int errors = 0;
    for (int i = 0; i < o_.overhead; ++i) {
      const int item = i * 3;
      const double gu = GrpcUnary(item);
      const Record gs = Call("default", item, o_.max_new_tokens, 0);
      const double hu = HttpCall(client, item, false);
      const double hs = HttpCall(client, item, true);
      if (gu < 0 || !gs.ok || hu < 0 || hs < 0) {
        ++errors;
        continue;
      }
      t["grpc_unary"].push_back(gu);
      t["grpc_stream"].push_back(gs.end - gs.start);
      t["http_unary"].push_back(hu);
      t["http_stream"].push_back(hs);
      unary_ratio.push_back(hu / gu);
      stream_ratio.push_back(hs / (gs.end - gs.start));
    }
    json out = {{"rounds", o_.overhead}, {"errors", errors}};
    for (const auto& [name, v] : t) {
      out[name + "_seconds"] = v;
      out["median_" + name] = Quantile(v, 0.5);
    }
    out["median_ratio_http_unary_to_grpc_unary"] = Quantile(unary_ratio, 0.5);
    out["median_ratio_http_stream_to_grpc_stream"] = Quantile(stream_ratio, 0.5);
    return out;
  }

  void PrintSummary(const json& out) {
    std::printf("\n== load_bench %s: %s, %d new tokens per request, %.0f s per phase ==\n",
                o_.label.c_str(), out["model"]["name"].get<std::string>().c_str(),
                o_.max_new_tokens, o_.seconds);
    std::printf("%-8s %7s %8s %9s %10s %10s %10s %10s %6s %7s %7s\n", "mode", "clients", "ok",
                "req/s", "tokens/s", "TTFT p50", "TTFT p95", "ITL p50", "ITLp95", "mean K",
                "run max");
    for (const json& p : out["phases"]) {
      std::printf("%-8s %7d %8d %9.2f %10.1f %8.1fms %8.1fms %8.2fms %6.2f %7.2f %7.0f\n",
                  p["mode"].get<std::string>().c_str(), p["clients"].get<int>(),
                  p["ok"].get<int>(), p["requests_per_s"].get<double>(),
                  p["tokens_per_s"].get<double>(), 1e3 * p["ttft_p50"].get<double>(),
                  1e3 * p["ttft_p95"].get<double>(), 1e3 * p["itl_p50"].get<double>(),
                  1e3 * p["itl_p95"].get<double>(), p["mean_k"].get<double>(),
                  p["max_running"].get<double>());
    }
    for (const json& k : out["kv_budget"]) {
      std::printf("KV budget %.2f GB, %s: K=%d -> %lld requests fit (off: %lld), %.2fx\n",
                  k["budget_bytes"].get<int64_t>() * 1e-9, k["model"].get<std::string>().c_str(),
                  k["k"].get<int>(), static_cast<long long>(k["requests_fit"].get<int64_t>()),
                  static_cast<long long>(k["requests_fit_off"].get<int64_t>()),
                  k["ratio"].get<double>());
    }
    if (out.contains("overhead") && out["overhead"].contains("overhead")) {
      const json& h = out["overhead"];
      std::printf("serving overhead at batch 1: %.1f%% (client e2e median %.2f ms, server total "
                  "%.2f ms, model %.2f ms; gRPC+validation %.1f%%, engine %.1f%%)\n",
                  100 * h["overhead"].get<double>(), 1e3 * h["median_client_e2e"].get<double>(),
                  1e3 * h["median_server_total"].get<double>(),
                  1e3 * h["median_model"].get<double>(),
                  100 * h["overhead_grpc_and_validation"].get<double>(),
                  100 * h["overhead_engine"].get<double>());
    }
    if (out.contains("http_vs_grpc") && out["http_vs_grpc"].contains("median_grpc_unary")) {
      const json& h = out["http_vs_grpc"];
      std::printf("batch 1, client e2e medians over %d rounds (%d failed): gRPC unary %.2f ms, "
                  "HTTP unary %.2f ms (ratio %.3f); gRPC stream %.2f ms, HTTP SSE %.2f ms "
                  "(ratio %.3f)\n",
                  h["rounds"].get<int>(), h["errors"].get<int>(),
                  1e3 * h["median_grpc_unary"].get<double>(), 1e3 * h["median_http_unary"].get<double>(),
                  h["median_ratio_http_unary_to_grpc_unary"].get<double>(),
                  1e3 * h["median_grpc_stream"].get<double>(), 1e3 * h["median_http_stream"].get<double>(),
                  h["median_ratio_http_stream_to_grpc_stream"].get<double>());
    }
  }

  Options o_;
  std::vector<std::unique_ptr<v1::InferenceService::Stub>> stubs_;
  std::vector<Item> items_;
  int distinct_images_ = 0;
  int layers_ = 0, default_k_ = 0;
  std::map<std::string, int> profiles_;
  int64_t typical_text_tokens_ = 0;
};

[[noreturn]] void Usage(const std::string& why) {
  std::fprintf(stderr,
               "error: %s\nusage: load_bench --addr HOST:PORT --data SPLIT.jsonl [--metrics "
               "HOST:PORT] [--clients 1,2,4,8] [--seconds S] [--modes off,default,mix,K...] "
               "[--max-new-tokens N] [--model DIR] [--dtype fp32|bf16] [--threads N] "
               "[--overhead N] [--http HOST:PORT] [--kv-budget-bytes B] [--no-warm] [--label L] [--out PREFIX]\n",
               why.c_str());
  std::exit(2);
}

Options ParseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) Usage("missing value for " + a);
      return argv[++i];
    };
    if (a == "--addr") o.addr = value();
    else if (a == "--metrics") o.metrics = value();
    else if (a == "--http") o.http = value();
    else if (a == "--data") o.data = value();
    else if (a == "--model") o.model = value();
    else if (a == "--dtype") o.dtype = value();
    else if (a == "--out") o.out = value();
    else if (a == "--label") o.label = value();
    else if (a == "--seconds") o.seconds = std::atof(value().c_str());
    else if (a == "--max-new-tokens") o.max_new_tokens = std::atoi(value().c_str());
    else if (a == "--overhead") o.overhead = std::atoi(value().c_str());
    else if (a == "--threads") o.threads = std::atoi(value().c_str());
    else if (a == "--kv-budget-bytes") o.kv_budget_bytes = std::atoll(value().c_str());
    else if (a == "--no-warm") o.warm = false;
    else if (a == "--modes") o.modes = Split(value());
    else if (a == "--clients") {
      o.clients.clear();
      for (const std::string& c : Split(value())) o.clients.push_back(std::atoi(c.c_str()));
    } else Usage("unknown argument " + a);
  }
  if (o.data.empty()) Usage("--data is required");
  return o;
}

}  // namespace
}  // namespace vtw

int main(int argc, char** argv) {
  vtw::Bench bench(vtw::ParseArgs(argc, argv));
  return bench.Run();
}
