// Model benchmarks (not tests): GEMM rate of this machine, and prefill / decode of the oracle
// model and of a larger random-weight LLaVA geometry, fp32 and bf16, VTW off and on. Reports
// achieved GFLOP/s from the compute model next to the GEMM rate measured in the same run.
//   build/model_bench [--benchmark_filter=...] ; threads: VTW_BENCH_THREADS (default: all cores)
#include <cstdlib>
#include <memory>
#include <thread>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>

#include "bench/bench_common.h"
#include "model/llava_model.h"
#include "vtw/compute_model.h"

namespace vtw {
namespace {

using bench::MediumConfig;


LlavaModel& Model(const std::string& which, at::ScalarType dtype) {
  static std::map<std::pair<std::string, int>, std::unique_ptr<LlavaModel>> cache;
  auto key = std::make_pair(which, static_cast<int>(dtype));
  auto& slot = cache[key];
  if (!slot) {
    if (which == "oracle") {
      auto m = LlavaModel::Load(std::string(VTW_SOURCE_DIR) + "/tests/data/oracle/tiny-llava", dtype);
      if (!m.ok()) std::abort();
      slot = std::move(m).value();
    } else {
      LlavaConfig c = MediumConfig();
      slot = std::make_unique<LlavaModel>(c, RandomLlavaWeights(c, dtype, 1), dtype);
    }
  }
  return *slot;
}

// A prompt shaped like LLaVA-1.5's: 5 text tokens, the image, then `tail` text tokens.
ForwardBatch Prompt(const LlavaModel& m, int tail, int k, KvCache* cache, at::Tensor* features) {
  const int64_t n_img = m.config().num_image_tokens();
  ForwardBatch b;
  for (int64_t i = 0; i < 5 + n_img + tail; ++i) {
    const bool image = i >= 5 && i < 5 + n_img;
    b.token_ids.push_back(image ? m.config().image_token_index : 100 + i % 50);
    b.kinds.push_back(image ? TokenKind::kImage : TokenKind::kText);
    b.positions.push_back(i);
  }
  if (!features->defined()) {
    *features = at::randn({n_img, m.config().text.hidden_size}).to(m.dtype());
  }
  b.image_embeds = *features;
  b.seqs.push_back({cache, static_cast<int>(b.token_ids.size()), k, true});
  return b;
}

void SetThreads() {
  const char* env = std::getenv("VTW_BENCH_THREADS");
  at::set_num_threads(env ? std::atoi(env) : std::thread::hardware_concurrency());
}

void BM_Gemm(benchmark::State& state, at::ScalarType dtype) {
  SetThreads();
  const int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  at::Tensor a = at::randn({m, k}).to(dtype), b = at::randn({n, k}).to(dtype);
  for (auto _ : state) benchmark::DoNotOptimize(at::linear(a, b));
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * m * k * n * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Prefill(benchmark::State& state, const std::string& which, at::ScalarType dtype) {
  SetThreads();
  const LlavaModel& m = Model(which, dtype);
  const int layers = m.num_layers();
  const int k = state.range(0) < 0 ? layers : static_cast<int>(state.range(0));
  at::Tensor features;
  ComputeModel cm(m.config(), c10::elementSize(dtype));
  ForwardBatch probe = Prompt(m, 40, k, nullptr, &features);
  const Flops f = cm.ChunkFlops(probe.kinds, 0, probe.num_tokens(), k, true);
  for (auto _ : state) {
    KvCache cache = m.NewKvCache();
    ForwardBatch b = Prompt(m, 40, k, &cache, &features);
    benchmark::DoNotOptimize(m.Forward(b).logits);
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(f.flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP"] = f.flops * 1e-9;
  state.counters["flops_ideal_speedup"] = static_cast<double>(f.flops_without_vtw) / f.flops;
}

// Args: batch, K (-1: VTW off), decode attention (0: fused kernel, 1: batched matmuls).
void BM_Decode(benchmark::State& state, const std::string& which, at::ScalarType dtype) {
  SetThreads();
  LlavaModel& m = Model(which, dtype);
  m.set_decode_attention(state.range(2) == 1 ? DecodeAttentionImpl::kBmm
                                             : DecodeAttentionImpl::kFused);
  const int batch = static_cast<int>(state.range(0));
  const int layers = m.num_layers();
  const int k = state.range(1) < 0 ? layers : static_cast<int>(state.range(1));
  at::Tensor features;
  std::vector<KvCache> caches;
  int64_t prompt_len = 0;
  for (int i = 0; i < batch; ++i) {
    caches.push_back(m.NewKvCache());
    ForwardBatch b = Prompt(m, 40, k, &caches.back(), &features);
    prompt_len = b.num_tokens();
    m.Forward(b);
  }
  int64_t pos = prompt_len;
  for (auto _ : state) {
    ForwardBatch b;
    for (int i = 0; i < batch; ++i) {
      b.token_ids.push_back(7);
      b.kinds.push_back(TokenKind::kText);
      b.positions.push_back(pos);
      b.seqs.push_back({&caches[i], 1, k, true});
    }
    benchmark::DoNotOptimize(m.Forward(b).logits);
    ++pos;
    if (pos > prompt_len + 200) {  // keep the context bounded
      state.PauseTiming();
      state.SkipWithError("decode ran past 200 tokens; lower --benchmark_min_time");
      break;
    }
  }
  state.counters["tokens/s"] =
      benchmark::Counter(batch, benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK_CAPTURE(BM_Gemm, fp32, at::kFloat)->Args({512, 1024, 1024})->Args({620, 1024, 2816})
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Gemm, bf16, at::kBFloat16)->Args({512, 1024, 1024})->Args({620, 1024, 2816})
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Prefill, oracle_fp32, "oracle", at::kFloat)->Arg(-1)->Arg(2)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Prefill, medium_fp32, "medium", at::kFloat)->Arg(-1)->Arg(4)
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);
BENCHMARK_CAPTURE(BM_Prefill, medium_bf16, "medium", at::kBFloat16)->Arg(-1)->Arg(4)
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);
BENCHMARK_CAPTURE(BM_Decode, oracle_fp32, "oracle", at::kFloat)->Args({1, -1, 0})
    ->Args({1, -1, 1})->Args({8, -1, 0})->Args({8, -1, 1})
    ->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(100);
BENCHMARK_CAPTURE(BM_Decode, medium_fp32, "medium", at::kFloat)->Args({1, -1, 0})
    ->Args({1, -1, 1})->Args({1, 4, 0})->Args({8, -1, 0})->Args({8, -1, 1})
    ->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(100);

}  // namespace
}  // namespace vtw

BENCHMARK_MAIN();
