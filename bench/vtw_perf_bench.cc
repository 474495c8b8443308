// VTW performance benchmark (not a test): everything the performance issue asks for, measured in
// ONE process so that every ratio compares numbers taken on the same machine state.
//   1. GEMM GFLOP/s at the shapes a prefill runs ([rows x H] x [H x H], x [H x I], [rows x I] x
//      [I x H]) in bf16 and fp32, a decode GEMV (1 row), and memory bandwidth (copy and sum of a
//      1 GiB tensor).
//   2. A random-weight LLaVA model generated in memory from a seed (no files): "llava7b" (CLIP
//      ViT-L/14-336 tower, 23 of 24 layers used, + 32-layer 4096-wide Llama, vocab 32064) or
//      "medium" (the LLaVA-1.5-shaped 8-layer model of bench/model_bench.cc).
//   3. Vision tower time for one image; decoder prefill of one request (5 text + 576 image + 40
//      text tokens) with VTW off and at K, interleaved, with the measured speed-up next to the
//      FLOPs-ideal ratio of vtw/compute_model.h and the achieved GFLOP/s next to the GEMM peak.
//   4. Decode tokens/s at batch 1, 4, 16 (VTW off and at K) with the memory-bound limit at batch 1
//      (bytes read per step / measured read bandwidth).
//   5. Optionally (--profile) one prefill and one decode step per batch size (VTW off) under
//      LibTorch's profiler: time per top-level op.
// --write-model DIR --tokenizer-from MODEL_DIR writes the medium geometry (random weights, fp32)
// as a servable model directory (the shapes tokenizer, 336 px preprocessing, a vtw.json with
// K = 4 of 8 and per-type profiles) for the server load benchmark (scripts/bench-load.sh), and
// exits.
// Medians over --reps repetitions. Prints progress to stderr and a summary table to stdout;
// --json FILE writes every number.
//
//   build-perf/vtw_perf_bench --geometry llava7b [--reps 3] [--json F] [--profile]
//   build-perf/vtw_perf_bench --geometry medium --dtype fp32,bf16
// Threads: --threads N (default: all cores).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/profiler_legacy.h>

#include "bench/bench_common.h"
#include "model/decode_attention.h"
#include "model/llava_model.h"
#include "model/safetensors.h"
#include "vtw/compute_model.h"

namespace vtw {
namespace {

using json = nlohmann::json;
using bench::MediumConfig;
using bench::Now;
using bench::Progress;


double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Runs `fn` `warmup` times untimed, then `reps` times; returns the seconds of each timed run.
std::vector<double> Time(int warmup, int reps, const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double s = Now();
    fn();
    t.push_back(Now() - s);
  }
  return t;
}


std::string Fmt(const char* fmt, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

// MemAvailable from /proc/meminfo, bytes (-1 when unknown).
int64_t MemAvailable() {
  std::ifstream in("/proc/meminfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("MemAvailable:", 0) == 0) return std::atoll(line.c_str() + 13) * 1024;
  }
  return -1;
}

// LLaVA-1.5-7B: CLIP ViT-L/14-336 (the VisionConfig defaults) + Llama-2-7B geometry, vocab 32064.
LlavaConfig Llava7bConfig() {
  LlavaConfig c;  // vision defaults: 1024 wide, 4096 MLP, 24 layers, 16 heads, 336 px, patch 14
  c.text.vocab_size = 32064;
  c.text.hidden_size = 4096;
  c.text.intermediate_size = 11008;
  c.text.num_hidden_layers = 32;
  c.text.num_attention_heads = 32;
  c.text.num_key_value_heads = 32;
  c.text.head_dim = 128;
  c.text.max_position_embeddings = 4096;
  c.image_token_index = 32000;
  c.vision_feature_layer = -2;
  c.name = "llava7b-random";
  return c;
}


// RandomLlavaWeights with progress on stderr (same visitor, same generator use: the same seed
// gives the same weights as RandomLlavaWeights).
LlavaWeights RandomWeightsWithProgress(const LlavaConfig& config, at::ScalarType dtype,
                                       uint64_t seed) {
  LlavaWeights w;
  ResizeLlavaWeights(config, &w);
  int64_t total = 0, done = 0;
  ForEachLlavaTensor(config, &w, [&](const std::string&, const std::vector<int64_t>& shape,
                                     at::Tensor* slot, InitKind) {
    if (!slot) return;
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    total += n;
  });
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  double last = Now();
  ForEachLlavaTensor(config, &w, [&](const std::string& name, const std::vector<int64_t>& shape,
                                     at::Tensor* slot, InitKind init) {
    if (!slot) return;
    switch (init) {
      case InitKind::kNormal:
        *slot = at::empty(shape, at::kFloat).normal_(0.0, 0.02, gen).to(dtype);
        break;
      case InitKind::kOnes: *slot = at::ones(shape, at::TensorOptions().dtype(dtype)); break;
      case InitKind::kZeros: *slot = at::zeros(shape, at::TensorOptions().dtype(dtype)); break;
    }
    done += slot->numel();
    if (Now() - last > 5 || done == total) {
      last = Now();
      Progress("weights " + Fmt("%.2f", done * 1e-9) + " / " + Fmt("%.2f", total * 1e-9) +
               " G params (" + name + ")");
    }
  });
  if (config.text.tie_word_embeddings) w.text.lm_head = w.text.embed_tokens;
  return w;
}

// A LLaVA-1.5-shaped prompt: 5 text tokens, the image, then `tail` text tokens.
ForwardBatch Prompt(const LlavaConfig& c, int tail, int k, KvCache* cache,
                    const at::Tensor& features) {
  const int64_t n_img = c.num_image_tokens();
  ForwardBatch b;
  for (int64_t i = 0; i < 5 + n_img + tail; ++i) {
    const bool image = i >= 5 && i < 5 + n_img;
    b.token_ids.push_back(image ? c.image_token_index : 100 + i % 50);
    b.kinds.push_back(image ? TokenKind::kImage : TokenKind::kText);
    b.positions.push_back(i);
  }
  b.image_embeds = features;
  b.seqs.push_back({cache, static_cast<int>(b.token_ids.size()), k, true});
  return b;
}

struct Options {
  std::string geometry = "medium";
  std::vector<std::string> dtypes;  // default: llava7b bf16; medium fp32,bf16
  int reps = 3;
  int threads = 0;
  int k = -1;  // default: half the layers
  int tail = 40;
  std::vector<int> batches = {1, 4, 16};
  int decode_steps = 0;  // default: 3 (llava7b) or 10
  // Decode attention implementations, measured step by step in turn (A/B in one run).
  std::vector<std::string> decode_attention = {"fused", "bmm"};
  uint64_t seed = 1;
  bool profile = false;
  std::string json_path;
  std::string write_model, tokenizer_from;
};

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

[[noreturn]] void Usage(const char* why) {
  std::fprintf(stderr,
               "error: %s\nusage: vtw_perf_bench [--geometry llava7b|medium] [--dtype bf16,fp32] "
               "[--reps N] [--threads N] [--k K] [--tail N] [--batches 1,4,16|none] "
               "[--decode-steps N] [--decode-attention fused,bmm] [--seed S] [--profile] "
               "[--json FILE]\n",
               why);
  std::exit(2);
}

Options ParseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) Usage(("missing value for " + a).c_str());
      return argv[++i];
    };
    if (a == "--geometry") o.geometry = value();
    else if (a == "--dtype") o.dtypes = Split(value());
    else if (a == "--reps") o.reps = std::atoi(value().c_str());
    else if (a == "--threads") o.threads = std::atoi(value().c_str());
    else if (a == "--k") o.k = std::atoi(value().c_str());
    else if (a == "--tail") o.tail = std::atoi(value().c_str());
    else if (a == "--decode-steps") o.decode_steps = std::atoi(value().c_str());
    else if (a == "--decode-attention") o.decode_attention = Split(value());
    else if (a == "--seed") o.seed = std::strtoull(value().c_str(), nullptr, 10);
    else if (a == "--json") o.json_path = value();
    else if (a == "--profile") o.profile = true;
    else if (a == "--write-model") o.write_model = value();
    else if (a == "--tokenizer-from") o.tokenizer_from = value();
    else if (a == "--batches") {
      o.batches.clear();  // "none": no decode measurements
      for (const std::string& b : Split(value())) {
        if (b != "none") o.batches.push_back(std::atoi(b.c_str()));
      }
    } else Usage(("unknown argument " + a).c_str());
  }
  if (o.geometry != "llava7b" && o.geometry != "medium") Usage("--geometry: llava7b or medium");
  if (o.dtypes.empty()) {
    o.dtypes = o.geometry == "llava7b" ? std::vector<std::string>{"bf16"}
                                       : std::vector<std::string>{"fp32", "bf16"};
  }
  if (o.decode_steps <= 0) o.decode_steps = o.geometry == "llava7b" ? 3 : 10;
  if (o.reps < 1) Usage("--reps must be >= 1");
  if (o.decode_attention.empty()) Usage("--decode-attention: fused, bmm or both");
  for (const std::string& impl : o.decode_attention) {
    if (impl != "fused" && impl != "bmm") Usage("--decode-attention: fused, bmm or both");
  }
  return o;
}

// --- a servable random model -----------------------------------------------------------------

int WriteServedModel(const Options& o) {
  namespace fs = std::filesystem;
  if (o.tokenizer_from.empty()) Usage("--write-model needs --tokenizer-from MODEL_DIR");
  LlavaConfig c = MediumConfig();
  c.image_token_index = 512;  // the shapes tokenizer's <image>
  c.name = fs::path(o.write_model).filename().string();
  fs::create_directories(o.write_model);
  LlavaWeights w = RandomWeightsWithProgress(c, at::kFloat, o.seed);
  std::vector<TensorToWrite> tensors;
  ForEachLlavaTensor(c, &w, [&](const std::string& name, const std::vector<int64_t>& shape,
                                at::Tensor* slot, InitKind) {
    if (!slot || !slot->defined()) return;  // unused by the runtime: not written
    *slot = slot->contiguous();
    tensors.push_back({name, SafetensorsDType::kF32, shape, slot->data_ptr(), slot->nbytes()});
  });
  Status st = WriteSafetensors(o.write_model + "/model.safetensors", tensors, {{"format", "pt"}});
  if (!st.ok()) {
    std::fprintf(stderr, "error: %s\n", st.ToString().c_str());
    return 1;
  }
  std::ofstream(o.write_model + "/config.json") << LlavaConfigToJson(c).dump(2) << "\n";
  for (const char* f : {"tokenizer.model", "tokenizer_config.json", "added_tokens.json",
                        "special_tokens_map.json", "generation_config.json"}) {
    const fs::path from = fs::path(o.tokenizer_from) / f;
    if (fs::exists(from)) {
      fs::copy_file(from, fs::path(o.write_model) / f, fs::copy_options::overwrite_existing);
    }
  }
  json pre = json::parse(std::ifstream(fs::path(o.tokenizer_from) / "preprocessor_config.json"));
  pre["crop_size"] = {{"height", c.vision.image_size}, {"width", c.vision.image_size}};
  pre["size"] = {{"shortest_edge", c.vision.image_size}};
  std::ofstream(o.write_model + "/preprocessor_config.json") << pre.dump(2) << "\n";
  // Not calibrated (random weights): K = half the layers, per-type profiles spread over 0..8 as
  // the shipped model's are over 0..6, so that a per-request K mix can be served.
  json vtw = {{"default_layer", 4},
              {"profiles", {{"color", 5}, {"count_all", 7}, {"count_shape", 7}, {"exists", 7},
                            {"shape", 0}, {"side", 4}}},
              {"note", "random weights, not calibrated: written by vtw_perf_bench --write-model"}};
  std::ofstream(o.write_model + "/vtw.json") << vtw.dump(2) << "\n";
  Progress("wrote " + o.write_model);
  return 0;
}

// --- machine ---------------------------------------------------------------------------------

json MeasureGemm(const LlavaConfig& c, int64_t rows, int64_t text_rows, int reps) {
  const int64_t h = c.text.hidden_size, inter = c.text.intermediate_size;
  struct Shape { const char* what; int64_t m, k, n; };
  const std::vector<Shape> shapes = {
      {"prefill q/o proj", rows, h, h},       {"prefill gate/up", rows, h, inter},
      {"prefill down", rows, inter, h},       {"text rows gate/up", text_rows, h, inter},
      {"decode GEMV gate/up", 1, h, inter},   {"decode 16 rows gate/up", 16, h, inter},
  };
  json out = json::array();
  for (at::ScalarType dtype : {at::kBFloat16, at::kFloat}) {
    for (const Shape& s : shapes) {
      at::Tensor a = at::randn({s.m, s.k}).to(dtype), b = at::randn({s.n, s.k}).to(dtype);
      const double flop = 2.0 * s.m * s.k * s.n;
      // At least ~0.3 s of timed work per shape, at most 20 repetitions.
      const double one = Median(Time(1, 1, [&] { at::linear(a, b); }));
      const int r = std::clamp(static_cast<int>(0.3 / std::max(one, 1e-6)), reps, 20);
      const double t = Median(Time(0, r, [&] { at::linear(a, b); }));
      json j = {{"shape", s.what}, {"dtype", DTypeName(dtype)}, {"m", s.m}, {"k", s.k},
                {"n", s.n}, {"seconds", t}, {"gflops", flop / t * 1e-9}, {"reps", r},
                {"weight_gbytes_per_s", static_cast<double>(b.nbytes()) / t * 1e-9}};
      Progress(std::string("GEMM ") + DTypeName(dtype) + " " + s.what + " [" +
               std::to_string(s.m) + "x" + std::to_string(s.k) + "]x[" + std::to_string(s.k) +
               "x" + std::to_string(s.n) + "]: " + Fmt("%.1f", flop / t * 1e-9) + " GFLOP/s");
      out.push_back(j);
    }
  }
  return out;
}

json MeasureBandwidth(int reps) {
  const int64_t n = int64_t{1} << 28;  // 1 GiB of fp32
  at::Tensor src = at::empty({n}, at::kFloat).fill_(1.0f);
  at::Tensor dst = at::empty({n}, at::kFloat).fill_(0.0f);
  const double bytes = static_cast<double>(src.nbytes());
  const double copy = Median(Time(1, std::max(reps, 5), [&] { dst.copy_(src); }));
  const double sum = Median(Time(1, std::max(reps, 5), [&] { src.sum(); }));
  json j = {{"bytes", bytes},
            {"copy_seconds", copy},
            {"copy_gbytes_per_s", 2 * bytes / copy * 1e-9},  // read + write
            {"read_seconds", sum},
            {"read_gbytes_per_s", bytes / sum * 1e-9}};
  Progress("bandwidth: copy " + Fmt("%.1f", 2 * bytes / copy * 1e-9) + " GB/s (read+write), sum " +
           Fmt("%.1f", bytes / sum * 1e-9) + " GB/s (read)");
  return j;
}

// --- profile ---------------------------------------------------------------------------------

// Time per op name over the top-level ops (those called from model code, not from inside another
// op) of one profiled call, and self time (inclusive minus children) over all ops.
json ProfileOps(const std::function<void()>& fn) {
  using torch::autograd::profiler::EventKind;
  using torch::autograd::profiler::LegacyEvent;
  torch::autograd::profiler::thread_event_lists lists;
  {
    torch::autograd::profiler::TLSLegacyProfilerGuard guard(
        torch::profiler::impl::ProfilerConfig(torch::profiler::impl::ProfilerState::CPU),
        [&](const torch::autograd::profiler::thread_event_lists& l) { lists = l; });
    fn();
  }
  std::map<std::string, double> top_us, self_us;
  std::map<std::string, int> top_calls;
  double total_top = 0;
  for (const auto& events : lists) {
    struct Open { const LegacyEvent* e; double child_us; };
    std::vector<Open> stack;
    for (const LegacyEvent& e : events) {
      if (e.kind() == EventKind::PushRange) {
        stack.push_back({&e, 0});
      } else if (e.kind() == EventKind::PopRange && !stack.empty()) {
        Open o = stack.back();
        stack.pop_back();
        const double us = o.e->cpuElapsedUs(e);
        const std::string name = o.e->name();
        self_us[name] += us - o.child_us;
        if (stack.empty()) {
          top_us[name] += us;
          ++top_calls[name];
          total_top += us;
        } else {
          stack.back().child_us += us;
        }
      }
    }
  }
  std::vector<std::pair<double, std::string>> order;
  for (const auto& [name, us] : top_us) order.push_back({us, name});
  std::sort(order.rbegin(), order.rend());
  json top = json::array();
  for (const auto& [us, name] : order) {
    top.push_back({{"op", name}, {"ms", us / 1000}, {"calls", top_calls[name]},
                   {"share", us / total_top}, {"self_ms", self_us[name] / 1000}});
  }
  return {{"top_level_ops", top}, {"top_level_total_ms", total_top / 1000}};
}

// --- model -----------------------------------------------------------------------------------

json RunModel(const Options& o, const LlavaConfig& c, at::ScalarType dtype, double gemm_peak) {
  json j;
  const int layers = c.text.num_hidden_layers;
  const int k = o.k >= 0 ? o.k : layers / 2;
  const int64_t n_img = c.num_image_tokens();
  Progress(std::string("generating ") + c.name + " " + DTypeName(dtype) + " weights (seed " +
           std::to_string(o.seed) + ")");
  const double gen_start = Now();
  LlavaModel model(c, RandomWeightsWithProgress(c, dtype, o.seed), dtype);
  const double gen_seconds = Now() - gen_start;
  int64_t weight_bytes = LlavaWeightsBytes(c, model.mutable_weights());
  // Bytes a decode step reads at least: every decoder layer, the final norm and lm_head.
  int64_t decode_weight_bytes = model.weights().text.lm_head.nbytes() +
                                model.weights().text.norm.nbytes();
  for (const LlamaLayerWeights& l : model.weights().text.layers) {
    for (const at::Tensor* t : {&l.q_proj.weight, &l.k_proj.weight, &l.v_proj.weight,
                                &l.o_proj.weight, &l.gate_proj.weight, &l.up_proj.weight,
                                &l.down_proj.weight, &l.input_layernorm,
                                &l.post_attention_layernorm}) {
      decode_weight_bytes += t->nbytes();
    }
  }
  Progress("model ready: " + Fmt("%.2f", weight_bytes * 1e-9) + " GB of weights in " +
           Fmt("%.1f", gen_seconds) + " s");
  j["weight_bytes"] = weight_bytes;
  j["decode_weight_bytes"] = decode_weight_bytes;
  j["generate_seconds"] = gen_seconds;
  j["k"] = k;
  j["layers"] = layers;

  ComputeModel cm(c, c10::elementSize(dtype));
  at::Tensor features = at::randn({n_img, c.text.hidden_size}).to(dtype);
  const ForwardBatch probe = Prompt(c, o.tail, k, nullptr, features);
  const int64_t prompt_len = probe.num_tokens(), text_len = prompt_len - n_img;
  const Flops f = cm.ChunkFlops(probe.kinds, 0, prompt_len, k, true);
  j["prompt_tokens"] = prompt_len;
  j["image_tokens"] = n_img;

  // Vision tower: one image.
  {
    at::Tensor pixels = at::randn({1, 3, c.vision.image_size, c.vision.image_size});
    const std::vector<double> t = Time(1, o.reps, [&] { model.EncodeImages(pixels); });
    const double med = Median(t);
    j["vision"] = {{"seconds", t}, {"median_seconds", med}, {"flops", cm.VisionFlops()},
                   {"gflops", cm.VisionFlops() / med * 1e-9}};
    Progress("vision tower (1 image): " + Fmt("%.3f", med) + " s, " +
             Fmt("%.1f", cm.VisionFlops() / med * 1e-9) + " GFLOP/s");
  }

  // Decoder prefill: VTW off and at K, interleaved (off, K, off, K, ...) after one warm-up each.
  {
    auto run = [&](int kk) {
      KvCache cache = model.NewKvCache();
      ForwardBatch b = Prompt(c, o.tail, kk, &cache, features);
      model.Forward(b);
    };
    Progress("prefill warm-up (" + std::to_string(prompt_len) + " tokens)");
    run(layers);
    run(k);
    std::vector<double> t_off, t_k;
    for (int r = 0; r < o.reps; ++r) {
      double s = Now();
      run(layers);
      t_off.push_back(Now() - s);
      s = Now();
      run(k);
      t_k.push_back(Now() - s);
      Progress("prefill rep " + std::to_string(r + 1) + ": off " + Fmt("%.3f", t_off.back()) +
               " s, K=" + std::to_string(k) + " " + Fmt("%.3f", t_k.back()) + " s");
    }
    const double off = Median(t_off), on = Median(t_k);
    const double ideal = static_cast<double>(f.flops_without_vtw) / f.flops;
    const double speedup = off / on;
    const double vision = j["vision"]["median_seconds"].get<double>();
    const double e2e_ideal = static_cast<double>(f.flops_without_vtw + cm.VisionFlops()) /
                             (f.flops + cm.VisionFlops());
    j["prefill"] = {
        {"seconds_off", t_off}, {"seconds_k", t_k}, {"median_off", off}, {"median_k", on},
        {"flops_off", f.flops_without_vtw}, {"flops_k", f.flops},
        {"gflops_off", f.flops_without_vtw / off * 1e-9}, {"gflops_k", f.flops / on * 1e-9},
        {"gemm_peak_gflops", gemm_peak},
        {"fraction_of_gemm_peak_off", f.flops_without_vtw / off * 1e-9 / gemm_peak},
        {"fraction_of_gemm_peak_k", f.flops / on * 1e-9 / gemm_peak},
        {"speedup", speedup}, {"flops_ideal_speedup", ideal},
        {"speedup_over_ideal", speedup / ideal},
        {"with_vision_speedup", (off + vision) / (on + vision)},
        {"with_vision_flops_ideal_speedup", e2e_ideal}};
    Progress("prefill: off " + Fmt("%.3f", off) + " s, K=" + std::to_string(k) + " " +
             Fmt("%.3f", on) + " s: " + Fmt("%.2f", speedup) + "x (FLOPs-ideal " +
             Fmt("%.2f", ideal) + "x)");
  }

  if (o.profile) {
    Progress("profiling one prefill (VTW off)");
    json p = ProfileOps([&] {
      KvCache cache = model.NewKvCache();
      ForwardBatch b = Prompt(c, o.tail, layers, &cache, features);
      model.Forward(b);
    });
    j["profile_prefill_off"] = p;
    Progress("profiling one prefill (K=" + std::to_string(k) + ")");
    j["profile_prefill_k"] = ProfileOps([&] {
      KvCache cache = model.NewKvCache();
      ForwardBatch b = Prompt(c, o.tail, k, &cache, features);
      model.Forward(b);
    });
  }

  // Decode: caches filled with random keys/values of the prompt's length (layers >= K: text
  // only), then one new token per sequence per step. With several attention implementations the
  // steps alternate between them (fused, bmm, fused, bmm, ...), so that both see the same cache
  // lengths and the same machine noise; each gets one warm-up step.
  json decode = json::array();
  const int64_t kv = c.text.num_key_value_heads, d = c.text.head_dim;
  const int64_t impls = static_cast<int64_t>(o.decode_attention.size());
  const int64_t steps_per_cache = impls * (o.decode_steps + 2) + 2;  // + warm-up and profile
  auto set_impl = [&](const std::string& name) {
    model.set_decode_attention(name == "bmm" ? DecodeAttentionImpl::kBmm
                                             : DecodeAttentionImpl::kFused);
  };
  for (int kk : {layers, k}) {
    std::vector<at::Tensor> layer_k(layers), layer_v(layers);
    for (int l = 0; l < layers; ++l) {
      const int64_t n = l < kk ? prompt_len : text_len;
      layer_k[l] = at::randn({kv, n, d}).to(dtype);
      layer_v[l] = at::randn({kv, n, d}).to(dtype);
    }
    for (int batch : o.batches) {
      const int64_t cache_bytes = cm.KvCacheBytes(text_len + steps_per_cache, n_img, kk);
      const int64_t need = cache_bytes * batch + (int64_t{1} << 30);
      const int64_t avail = MemAvailable();
      if (avail > 0 && need > avail) {
        Progress("decode batch " + std::to_string(batch) + " K=" + std::to_string(kk) +
                 " skipped: needs " + Fmt("%.1f", need * 1e-9) + " GB, " +
                 Fmt("%.1f", avail * 1e-9) + " GB available");
        decode.push_back({{"batch", batch}, {"k", kk}, {"skipped", "memory"}});
        continue;
      }
      std::vector<KvCache> caches;
      for (int i = 0; i < batch; ++i) {
        std::vector<int64_t> cap(layers);
        for (int l = 0; l < layers; ++l) cap[l] = layer_k[l].size(1) + steps_per_cache;
        caches.push_back(model.NewKvCache(cap));
        for (int l = 0; l < layers; ++l) caches.back().Append(l, layer_k[l], layer_v[l]);
      }
      int64_t pos = prompt_len;
      auto step = [&] {
        ForwardBatch b;
        for (int i = 0; i < batch; ++i) {
          b.token_ids.push_back(7 + i);
          b.kinds.push_back(TokenKind::kText);
          b.positions.push_back(pos);
          b.seqs.push_back({&caches[i], 1, kk, true});
        }
        model.Forward(b);
        ++pos;
      };
      std::vector<std::vector<double>> t(impls);
      for (const std::string& impl : o.decode_attention) {
        set_impl(impl);
        step();  // warm-up
      }
      for (int rep = 0; rep < o.decode_steps; ++rep) {
        for (int64_t m = 0; m < impls; ++m) {
          set_impl(o.decode_attention[m]);
          t[m].push_back(Time(0, 1, step)[0]);
        }
      }
      const int64_t kv_read = cm.KvCacheBytes(text_len, n_img, kk) * batch;
      for (int64_t m = 0; m < impls; ++m) {
        const std::string& impl = o.decode_attention[m];
        const double med = Median(t[m]);
        json dj = {{"batch", batch}, {"k", kk}, {"decode_attention", impl},
                   {"step_seconds", t[m]}, {"median_step_seconds", med},
                   {"tokens_per_s", batch / med}, {"kv_cache_bytes_read", kv_read},
                   {"bytes_read_per_step", decode_weight_bytes + kv_read}};
        Progress("decode batch " + std::to_string(batch) + " K=" + std::to_string(kk) + " " +
                 impl + " attention: " + Fmt("%.3f", med) + " s/step, " +
                 Fmt("%.2f", batch / med) + " tokens/s");
        if (o.profile && kk == layers) {
          Progress("profiling one decode step at batch " + std::to_string(batch) + " (" + impl +
                   " attention)");
          set_impl(impl);
          dj["profile"] = ProfileOps(step);
        }
        decode.push_back(dj);
      }
    }
  }
  model.set_decode_attention(DecodeAttentionImpl::kFused);
  j["decode_attention_isa"] = DecodeAttentionIsa();
  j["decode"] = decode;
  return j;
}

void PrintSummary(const Options& o, const json& all) {
  std::printf("\n== vtw_perf_bench summary: %s, %d threads, medians of %d reps ==\n",
              o.geometry.c_str(), all["threads"].get<int>(), o.reps);
  std::printf("machine: read %.1f GB/s, copy %.1f GB/s (read+write)\n",
              all["bandwidth"]["read_gbytes_per_s"].get<double>(),
              all["bandwidth"]["copy_gbytes_per_s"].get<double>());
  std::printf("%-26s %-5s %18s %10s\n", "GEMM", "dtype", "shape", "GFLOP/s");
  for (const json& g : all["gemm"]) {
    const std::string shape = std::to_string(g["m"].get<int64_t>()) + "x" +
                              std::to_string(g["k"].get<int64_t>()) + "x" +
                              std::to_string(g["n"].get<int64_t>());
    std::printf("%-26s %-5s %18s %10.1f\n", g["shape"].get<std::string>().c_str(),
                g["dtype"].get<std::string>().c_str(), shape.c_str(), g["gflops"].get<double>());
  }
  const double read_bw = all["bandwidth"]["read_gbytes_per_s"].get<double>() * 1e9;
  for (const auto& [dtype, m] : all["models"].items()) {
    const json& p = m["prefill"];
    const int k = m["k"].get<int>(), layers = m["layers"].get<int>();
    std::printf("\n-- %s %s: %.2f GB weights, prompt %d tokens (%d image), K=%d of %d --\n",
                all["geometry"].get<std::string>().c_str(), dtype.c_str(),
                m["weight_bytes"].get<int64_t>() * 1e-9, m["prompt_tokens"].get<int>(),
                m["image_tokens"].get<int>(), k, layers);
    std::printf("vision tower, 1 image        %9.3f s  %8.1f GFLOP/s\n",
                m["vision"]["median_seconds"].get<double>(), m["vision"]["gflops"].get<double>());
    std::printf("prefill VTW off              %9.3f s  %8.1f GFLOP/s  %5.1f%% of GEMM peak %.1f\n",
                p["median_off"].get<double>(), p["gflops_off"].get<double>(),
                100 * p["fraction_of_gemm_peak_off"].get<double>(),
                p["gemm_peak_gflops"].get<double>());
    std::printf("prefill VTW K=%-2d             %9.3f s  %8.1f GFLOP/s  %5.1f%% of GEMM peak\n", k,
                p["median_k"].get<double>(), p["gflops_k"].get<double>(),
                100 * p["fraction_of_gemm_peak_k"].get<double>());
    std::printf("prefill speed-up at K=%-2d     %9.2fx (FLOPs-ideal %.2fx: %.1f%% of ideal)\n", k,
                p["speedup"].get<double>(), p["flops_ideal_speedup"].get<double>(),
                100 * p["speedup_over_ideal"].get<double>());
    std::printf("vision + prefill speed-up    %9.2fx (FLOPs-ideal %.2fx)\n",
                p["with_vision_speedup"].get<double>(),
                p["with_vision_flops_ideal_speedup"].get<double>());
    std::printf("decode attention kernel: %s build\n",
                m.value("decode_attention_isa", std::string("?")).c_str());
    std::map<std::string, double> b1_off;  // per decode attention implementation
    for (const json& dj : m["decode"]) {
      if (dj.contains("skipped")) {
        std::printf("decode batch %-2d K=%-2d        skipped (%s)\n", dj["batch"].get<int>(),
                    dj["k"].get<int>(), dj["skipped"].get<std::string>().c_str());
        continue;
      }
      const int batch = dj["batch"].get<int>(), kk = dj["k"].get<int>();
      const std::string impl = dj.value("decode_attention", std::string("bmm"));
      const double tps = dj["tokens_per_s"].get<double>();
      if (batch == 1 && kk == layers) b1_off[impl] = tps;
      std::string extra;
      if (batch == 1) {
        const double limit = read_bw / dj["bytes_read_per_step"].get<double>();
        extra = "  memory-bound limit " + Fmt("%.2f", limit) + " tokens/s (" +
                Fmt("%.0f", 100 * tps / limit) + "%)";
      } else if (kk == layers && b1_off[impl] > 0) {
        extra = "  " + Fmt("%.1f", tps / b1_off[impl]) + "x batch 1";
      }
      std::printf("decode batch %-2d %-7s %-5s %9.3f s/step %7.2f tokens/s%s\n", batch,
                  kk == layers ? "VTW off" : ("K=" + std::to_string(kk)).c_str(), impl.c_str(),
                  dj["median_step_seconds"].get<double>(), tps, extra.c_str());
    }
    auto print_profile = [](const std::string& what, const json& p) {
      std::printf("profile, %s (top-level ops, %.1f ms total):\n", what.c_str(),
                  p["top_level_total_ms"].get<double>());
      int shown = 0;
      for (const json& op : p["top_level_ops"]) {
        if (shown++ == 12) break;
        std::printf("  %-28s %9.1f ms %6.1f%% %6d calls\n", op["op"].get<std::string>().c_str(),
                    op["ms"].get<double>(), 100 * op["share"].get<double>(),
                    op["calls"].get<int>());
      }
    };
    if (m.contains("profile_prefill_off")) {
      print_profile("one prefill VTW off", m["profile_prefill_off"]);
    }
    for (const json& dj : m["decode"]) {
      if (dj.contains("profile")) {
        print_profile("one decode step at batch " + std::to_string(dj["batch"].get<int>()) +
                          ", " + dj.value("decode_attention", std::string("bmm")) + " attention",
                      dj["profile"]);
      }
    }
  }
}

int Main(int argc, char** argv) {
  const Options o = ParseArgs(argc, argv);
  if (!o.write_model.empty()) return WriteServedModel(o);
  const int threads = o.threads > 0 ? o.threads : static_cast<int>(std::thread::hardware_concurrency());
  at::set_num_threads(threads);
  const LlavaConfig c = o.geometry == "llava7b" ? Llava7bConfig() : MediumConfig();
  json all;
  all["geometry"] = o.geometry;
  all["threads"] = threads;
  all["reps"] = o.reps;
  all["seed"] = o.seed;
  {
    std::string cmd;
    for (int i = 0; i < argc; ++i) cmd += (i ? " " : "") + std::string(argv[i]);
    all["command"] = cmd;
  }
  const char* omp = std::getenv("OMP_WAIT_POLICY");
  all["omp_wait_policy"] = omp ? omp : "";
  const int64_t rows = 5 + c.num_image_tokens() + o.tail;
  all["gemm"] = MeasureGemm(c, rows, 5 + o.tail, o.reps);
  all["bandwidth"] = MeasureBandwidth(o.reps);
  double peak_bf16 = 0, peak_fp32 = 0;
  for (const json& g : all["gemm"]) {
    if (g["m"].get<int64_t>() != rows) continue;
    double& peak = g["dtype"] == "bf16" ? peak_bf16 : peak_fp32;
    peak = std::max(peak, g["gflops"].get<double>());
  }
  all["gemm_peak_gflops"] = {{"bf16", peak_bf16}, {"fp32", peak_fp32}};
  for (const std::string& name : o.dtypes) {
    auto dtype = ParseDType(name);
    if (!dtype.ok()) Usage(dtype.status().ToString().c_str());
    const at::ScalarType dt = dtype.value();
    all["models"][DTypeName(dt)] = RunModel(o, c, dt, dt == at::kBFloat16 ? peak_bf16 : peak_fp32);
    if (!o.json_path.empty()) {  // write as we go: a later failure keeps what was measured
      std::ofstream(o.json_path) << all.dump(2) << "\n";
    }
  }
  if (!o.json_path.empty()) std::ofstream(o.json_path) << all.dump(2) << "\n";
  PrintSummary(o, all);
  return 0;
}

}  // namespace
}  // namespace vtw

int main(int argc, char** argv) { return vtw::Main(argc, argv); }
