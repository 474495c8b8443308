// decode_attention_bench: the attention of decode rows alone, at the LLaVA-1.5-7B shape (32 heads
// x 128, bf16), fused kernel (model/decode_attention.h) vs the batched-matmul path it replaced
// (per sequence: bmm, scale, -inf on spare columns, softmax, bmm, as LlavaModel's kBmm path), vs a
// plain read of the same buffers (64-bit words summed by as many std::threads). Every "layer" has its own KV buffers, and the working set (GBs) is
// far larger than the caches, so each call reads its KV from memory as in a real decode step.
//
//   build-perf/decode_attention_bench [--threads 1,2] [--batch 16] [--length 628] [--layers 16]
//                                     [--reps 5]
// Prints ms per layer (all `batch` rows) and the KV bytes read per second; medians of --reps.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "bench/bench_common.h"
#include "model/decode_attention.h"

namespace vtw {
namespace {

using bench::Now;

double MedianSeconds(int reps, const std::function<void()>& fn) {
  fn();  // warm-up
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double s = Now();
    fn();
    t.push_back(Now() - s);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::vector<int> Ints(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(std::atoi(item.c_str()));
  return out;
}

int Main(int argc, char** argv) {
  std::vector<int> threads = {1, 2};
  int64_t batch = 16, length = 628, layers = 16;
  int reps = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--threads") threads = Ints(v);
    else if (a == "--batch") batch = std::atoll(v.c_str());
    else if (a == "--length") length = std::atoll(v.c_str());
    else if (a == "--layers") layers = std::atoll(v.c_str());
    else if (a == "--reps") reps = std::atoi(v.c_str());
    else {
      std::fprintf(stderr, "usage: decode_attention_bench [--threads 1,2] [--batch 16] "
                           "[--length 628] [--layers 16] [--reps 5]\n");
      return 2;
    }
  }
  if (argc % 2 == 0 || batch < 1 || length < 1 || layers < 1 || reps < 1) {
    std::fprintf(stderr, "error: arguments come in pairs and must be positive\n");
    return 2;
  }
  const int64_t heads = 32, kv_heads = 32, d = 128, cap = length + 12;  // 7B heads; a few spare
  bench::Progress("filling " + std::to_string(layers * batch * 2) + " KV buffers (" +
                  std::to_string((2 * layers * batch * kv_heads * cap * d * 2) >> 20) + " MiB)");
  std::vector<at::Tensor> keys, values;
  for (int64_t i = 0; i < layers * batch; ++i) {
    keys.push_back(at::zeros({kv_heads, cap, d}, at::kBFloat16));
    values.push_back(at::zeros({kv_heads, cap, d}, at::kBFloat16));
    keys.back().narrow(1, 0, length).normal_();
    values.back().narrow(1, 0, length).normal_();
  }
  at::Tensor q = at::randn({batch, heads, d}).to(at::kBFloat16);
  at::Tensor out = at::empty({batch, heads * d}, at::kBFloat16);
  const double kv_bytes = 2.0 * layers * batch * kv_heads * length * d * 2;

  auto fused = [&] {
    for (int64_t l = 0; l < layers; ++l) {
      std::vector<DecodeAttentionRow> rows;
      for (int64_t b = 0; b < batch; ++b) {
        rows.push_back({static_cast<char*>(q.data_ptr()) + b * heads * d * 2,
                        keys[l * batch + b].data_ptr(), values[l * batch + b].data_ptr(),
                        cap * d, length, static_cast<char*>(out.data_ptr()) + b * heads * d * 2});
      }
      DecodeAttention(rows, heads, kv_heads, d, at::kBFloat16);
    }
  };
  const double sqrt_d = std::sqrt(static_cast<double>(d));
  auto bmm = [&] {
    for (int64_t l = 0; l < layers; ++l) {
      for (int64_t b = 0; b < batch; ++b) {
        at::Tensor sc = at::bmm(q[b].view({kv_heads, 1, d}), keys[l * batch + b].transpose(1, 2));
        sc.div_(sqrt_d);
        sc.narrow(-1, length, cap - length).fill_(-std::numeric_limits<float>::infinity());
        at::bmm(at::softmax(sc, -1), values[l * batch + b]);
      }
    }
  };
  // The memory-read limit for the same access pattern: the same buffers read as 64-bit words
  // (an integer sum the compiler vectorises) by `read_threads` std::threads, buffers split evenly.
  int read_threads = 1;
  std::vector<uint64_t> sinks;  // one sum per thread, so the reads are not optimised away
  auto read = [&] {
    sinks.assign(read_threads, 0);
    std::vector<std::thread> pool;
    const int64_t n = layers * batch;
    for (int t = 0; t < read_threads; ++t) {
      pool.emplace_back([&, t] {
        uint64_t acc = 0;
        for (int64_t i = t; i < n; i += read_threads) {
          for (const at::Tensor* buf : {&keys[i], &values[i]}) {
            const uint64_t* w = static_cast<const uint64_t*>(buf->data_ptr());
            const int64_t words = buf->nbytes() / 8;
            for (int64_t j = 0; j < words; ++j) acc += w[j];
          }
        }
        sinks[t] = acc;
      });
    }
    for (std::thread& th : pool) th.join();
  };
  // The sum reads the spare entries too; the attention paths read `length` entries per head.
  auto fn_reads_spare = [](const char* what) { return std::string(what) == "read of the KV"; };
  std::printf("decode attention, 7B shape (32 heads x 128, bf16), %lld rows x %lld entries, "
              "%lld layers; kernel build %s; medians of %d\n",
              static_cast<long long>(batch), static_cast<long long>(length),
              static_cast<long long>(layers), DecodeAttentionIsa(), reps);
  std::printf("%-8s %-22s %12s %10s\n", "threads", "what", "ms/layer", "GB/s");
  for (int t : threads) {
    at::set_num_threads(t);
    read_threads = t;
    const std::pair<const char*, std::function<void()>> runs[] = {
        {"fused kernel", fused}, {"bmm + softmax + bmm", bmm}, {"read of the KV", read}};
    for (const auto& [what, fn] : runs) {
      const double s = MedianSeconds(reps, fn);
      const double bytes = fn_reads_spare(what) ? kv_bytes * cap / length : kv_bytes;
      std::printf("%-8d %-22s %12.2f %10.1f\n", t, what, s / layers * 1e3, bytes / s * 1e-9);
    }
  }
  return 0;
}

}  // namespace
}  // namespace vtw

int main(int argc, char** argv) { return vtw::Main(argc, argv); }
