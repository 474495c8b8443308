#include "model/decode_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

// The inner loops are plain C++ written so that the compiler vectorises them (independent lanes,
// no reassociation needed), compiled once per instruction set (x86-64-v4 = AVX-512, x86-64-v3 =
// AVX2 + FMA, and the baseline) and picked once per process from what the CPU supports, so one
// binary runs everywhere and uses AVX-512 where the CPU has it. The chosen functions are entered
// once per (row, KV head), not per key. Tests force each set the CPU has
// (SetDecodeAttentionIsaForTesting), so all three are checked on an AVX-512 machine.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VTW_KERNEL_X86 1
#define VTW_TARGET(arch) __attribute__((target("arch=" arch)))
#endif
#define VTW_INLINE inline __attribute__((always_inline))

namespace vtw {
namespace {

constexpr int64_t kLanes = 16;  // independent fp32 accumulators per dot product
constexpr int64_t kKeys = 4;    // keys (or value rows) per step of the inner loops
// Smallest amount of cache (elements of K or of V) worth waking a second thread for: waking the
// OpenMP team costs tens of microseconds, more than a whole tiny model's attention (the oracle
// model's decode step took 0.59 ms threaded vs 0.31 ms with the batched matmuls).
constexpr int64_t kParallelMinElements = int64_t{1} << 16;

VTW_INLINE float Load(const float* p) { return *p; }
VTW_INLINE float Load(const uint16_t* p) {  // bf16 -> fp32 is exact: the high 16 bits
  const uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

VTW_INLINE void Store(float f, float* p) { *p = f; }
VTW_INLINE void Store(float f, uint16_t* p) {  // fp32 -> bf16, round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  *p = static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);  // NaN stays a (quiet) NaN
}

// s[j * s_stride] = q . k_j / sqrt_d for j < length; q is fp32 [d], k is [length, d].
template <typename T>
VTW_INLINE void ScoresImpl(const float* q, const T* k, int64_t length, int64_t d, float sqrt_d,
                           float* s, int64_t s_stride) {
  const int64_t d_vec = d / kLanes * kLanes;
  int64_t j = 0;
  for (; j + kKeys <= length; j += kKeys) {
    const T* k0 = k + j * d;
    float acc[kKeys][kLanes] = {};
    for (int64_t i = 0; i < d_vec; i += kLanes) {
      for (int64_t u = 0; u < kKeys; ++u) {
        for (int64_t l = 0; l < kLanes; ++l) acc[u][l] += q[i + l] * Load(k0 + u * d + i + l);
      }
    }
    // Horizontal sums as a tree (vector adds of halves), not a chain of kLanes dependent adds.
    for (int64_t w = kLanes / 2; w > 0; w /= 2) {
      for (int64_t u = 0; u < kKeys; ++u) {
        for (int64_t l = 0; l < w; ++l) acc[u][l] += acc[u][l + w];
      }
    }
    for (int64_t u = 0; u < kKeys; ++u) {
      float sum = acc[u][0];
      for (int64_t i = d_vec; i < d; ++i) sum += q[i] * Load(k0 + u * d + i);
      s[(j + u) * s_stride] = sum / sqrt_d;
    }
  }
  for (; j < length; ++j) {
    const T* kj = k + j * d;
    float acc[kLanes] = {};
    for (int64_t i = 0; i < d_vec; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += q[i + l] * Load(kj + i + l);
    }
    float sum = 0.0f;
    for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
    for (int64_t i = d_vec; i < d; ++i) sum += q[i] * Load(kj + i);
    s[j * s_stride] = sum / sqrt_d;
  }
}

// acc[0:d] = sum_j p[j] * v_j over j < length; v is [length, d].
template <typename T>
VTW_INLINE void WeightedSumImpl(const float* p, const T* v, int64_t length, int64_t d,
                                float* acc) {
  std::fill(acc, acc + d, 0.0f);
  int64_t j = 0;
  for (; j + kKeys <= length; j += kKeys) {
    const float p0 = p[j], p1 = p[j + 1], p2 = p[j + 2], p3 = p[j + 3];
    const T* v0 = v + j * d;
    for (int64_t i = 0; i < d; ++i) {
      acc[i] += p0 * Load(v0 + i) + p1 * Load(v0 + d + i) + p2 * Load(v0 + 2 * d + i) +
                p3 * Load(v0 + 3 * d + i);
    }
  }
  for (; j < length; ++j) {
    const float pj = p[j];
    const T* vj = v + j * d;
    for (int64_t i = 0; i < d; ++i) acc[i] += pj * Load(vj + i);
  }
}

// One set of the four inner functions per instruction set.
struct KernelSet {
  const char* isa;
  void (*scores_f32)(const float*, const float*, int64_t, int64_t, float, float*, int64_t);
  void (*scores_bf16)(const float*, const uint16_t*, int64_t, int64_t, float, float*, int64_t);
  void (*weighted_sum_f32)(const float*, const float*, int64_t, int64_t, float*);
  void (*weighted_sum_bf16)(const float*, const uint16_t*, int64_t, int64_t, float*);
};

#define VTW_DEFINE_KERNEL_SET(name, isa_name, attr)                                               \
  attr void name##ScoresF32(const float* q, const float* k, int64_t length, int64_t d,           \
                            float sqrt_d, float* s, int64_t s_stride) {                          \
    ScoresImpl(q, k, length, d, sqrt_d, s, s_stride);                                           \
  }                                                                                              \
  attr void name##ScoresBf16(const float* q, const uint16_t* k, int64_t length, int64_t d,       \
                             float sqrt_d, float* s, int64_t s_stride) {                         \
    ScoresImpl(q, k, length, d, sqrt_d, s, s_stride);                                           \
  }                                                                                              \
  attr void name##WeightedSumF32(const float* p, const float* v, int64_t length, int64_t d,      \
                                 float* acc) {                                                   \
    WeightedSumImpl(p, v, length, d, acc);                                                       \
  }                                                                                              \
  attr void name##WeightedSumBf16(const float* p, const uint16_t* v, int64_t length, int64_t d,  \
                                  float* acc) {                                                  \
    WeightedSumImpl(p, v, length, d, acc);                                                       \
  }                                                                                              \
  constexpr KernelSet k##name = {isa_name, name##ScoresF32, name##ScoresBf16,                    \
                                 name##WeightedSumF32, name##WeightedSumBf16};

VTW_DEFINE_KERNEL_SET(Baseline, "default", )
#ifdef VTW_KERNEL_X86
VTW_DEFINE_KERNEL_SET(X86V3, "x86-64-v3", VTW_TARGET("x86-64-v3"))
VTW_DEFINE_KERNEL_SET(X86V4, "x86-64-v4", VTW_TARGET("x86-64-v4"))
#endif

// The kernel sets this CPU can run, best first. x86-64-v3 is recognised by AVX2, FMA, BMI1 and
// BMI2 (clang 14's __builtin_cpu_supports cannot name the rest of the level: F16C, MOVBE,
// LZCNT, which every CPU with those four has).
std::vector<const KernelSet*> Supported() {
  std::vector<const KernelSet*> out;
#ifdef VTW_KERNEL_X86
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512cd");
  if (v4) out.push_back(&kX86V4);
  if (v3) out.push_back(&kX86V3);
#endif
  out.push_back(&kBaseline);
  return out;
}

std::atomic<const KernelSet*>& Selected() {
  static std::atomic<const KernelSet*> selected{Supported().front()};
  return selected;
}

// The typed kernel: T is float or uint16_t (bf16 bits).
template <typename T>
void Run(const std::vector<DecodeAttentionRow>& rows, int64_t heads, int64_t kv_heads, int64_t d,
         at::Tensor* probs_out) {
  constexpr bool kBf16 = std::is_same_v<T, uint16_t>;
  const KernelSet& kernels = *Selected().load();
  const int64_t n = static_cast<int64_t>(rows.size());
  const int64_t group = heads / kv_heads;
  int64_t max_len = 0, total_len = 0;
  for (const DecodeAttentionRow& r : rows) {
    max_len = std::max(max_len, r.length);
    total_len += r.length;
  }
  // Divided, not multiplied by the reciprocal: HF's `scores / sqrt(head_dim)` in fp32.
  const float sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(d)));

  // The fewest (row, KV head) pairs a thread takes (the work of a pair: its keys x the group's
  // queries); with grain pairs or fewer in all, everything runs on the calling thread.
  const int64_t pair_elements = std::max<int64_t>(1, total_len / n * group * d);
  const int64_t grain = std::max<int64_t>(1, kParallelMinElements / pair_elements);

  // Scores: [n, heads, max_len] fp32, -inf past each row's length (probability 0 after softmax).
  at::Tensor scores = at::empty({n, heads, max_len}, at::kFloat);
  float* const sc = scores.data_ptr<float>();
  at::parallel_for(0, n * kv_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * d);
    for (int64_t pair = begin; pair < end; ++pair) {
      const DecodeAttentionRow& r = rows[pair / kv_heads];
      const int64_t kv = pair % kv_heads;
      const T* q = static_cast<const T*>(r.q) + kv * group * d;
      for (int64_t i = 0; i < group * d; ++i) qf[i] = Load(q + i);
      const T* k = static_cast<const T*>(r.keys) + kv * r.head_stride;
      for (int64_t g = 0; g < group; ++g) {
        float* s = sc + ((pair / kv_heads) * heads + kv * group + g) * max_len;
        if constexpr (kBf16) {
          kernels.scores_bf16(qf.data() + g * d, k, r.length, d, sqrt_d, s, 1);
        } else {
          kernels.scores_f32(qf.data() + g * d, k, r.length, d, sqrt_d, s, 1);
        }
        std::fill(s + r.length, s + max_len, -std::numeric_limits<float>::infinity());
      }
    }
  });

  at::Tensor p = at::softmax(scores, -1);  // fp32, vectorised and threaded by LibTorch
  const float* const pp = p.data_ptr<float>();

  at::parallel_for(0, n * kv_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(d);
    for (int64_t pair = begin; pair < end; ++pair) {
      const DecodeAttentionRow& r = rows[pair / kv_heads];
      const int64_t kv = pair % kv_heads;
      const T* v = static_cast<const T*>(r.values) + kv * r.head_stride;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kv * group + g;
        const float* ph = pp + ((pair / kv_heads) * heads + h) * max_len;
        if constexpr (kBf16) {
          kernels.weighted_sum_bf16(ph, v, r.length, d, acc.data());
        } else {
          kernels.weighted_sum_f32(ph, v, r.length, d, acc.data());
        }
        T* out = static_cast<T*>(r.out) + h * d;
        for (int64_t i = 0; i < d; ++i) Store(acc[i], out + i);
      }
    }
  });
  if (probs_out) *probs_out = p;
}

}  // namespace

void DecodeAttention(const std::vector<DecodeAttentionRow>& rows, int64_t heads, int64_t kv_heads,
                     int64_t head_dim, at::ScalarType dtype, at::Tensor* probs) {
  // One named range in LibTorch's profiler (vtw_perf_bench --profile).
  RECORD_FUNCTION("vtw::decode_attention", c10::ArrayRef<const c10::IValue>{});
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "DecodeAttention: heads ", heads,
              " is not a multiple of kv_heads ", kv_heads);
  for (const DecodeAttentionRow& r : rows) {
    TORCH_CHECK(r.length >= 1, "DecodeAttention: a row attends to no entries");
  }
  if (rows.empty()) {
    if (probs) *probs = at::empty({0, heads, 0}, at::kFloat);
    return;
  }
  if (dtype == at::kBFloat16) {
    Run<uint16_t>(rows, heads, kv_heads, head_dim, probs);
  } else {
    TORCH_CHECK(dtype == at::kFloat, "DecodeAttention: dtype must be fp32 or bf16");
    Run<float>(rows, heads, kv_heads, head_dim, probs);
  }
}

const char* DecodeAttentionIsa() { return Selected().load()->isa; }

bool SetDecodeAttentionIsaForTesting(const std::string& isa) {
  for (const KernelSet* k : Supported()) {
    if (isa == k->isa) {
      Selected().store(k);
      return true;
    }
  }
  return false;
}

}  // namespace vtw
