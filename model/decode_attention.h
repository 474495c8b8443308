// DecodeAttention: the attention of decode rows (one new token per sequence) over their KV caches,
// for all such rows of a batch in one call: one pass over each sequence's keys and one over its
// values per KV head, fp32 accumulation, the (row, KV head) pairs spread over LibTorch's
// intra-op threads (small caches stay on the calling thread: waking threads would cost more).
//
// Why not at::bmm: a 7B decode step at batch 16 made 1,024 small bf16 batched matmuls (q.K^T and
// p.V per sequence and layer) that read the cache at ~19 GB/s, 40-50% of this machine's memory
// bandwidth, and they were a third of the step (docs/PERFORMANCE.md, "Decode").
//
// Arithmetic: scores q.k / sqrt(D) and the softmax in fp32 (HF rounds the bf16 scores and the
// probabilities to bf16 in a bf16 model; this is the more exact result of the same formula),
// p.V accumulated in fp32 and rounded once (round-to-nearest-even) to the model dtype.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace vtw {

struct DecodeAttentionRow {
  const void* q;        // [heads, head_dim] of this row, contiguous, model dtype
  const void* keys;     // the cache's key buffer of this layer: [kv_heads, capacity, head_dim]
  const void* values;   // the value buffer, same layout
  int64_t head_stride;  // elements between KV heads in keys/values (capacity * head_dim)
  int64_t length;       // entries to attend to (the first `length` of each head), >= 1
  void* out;            // [heads * head_dim] of this row, model dtype (heads in HF order)
};

// Runs every row; heads = kv_heads * group (query head h uses KV head h / group). `dtype` is
// at::kFloat or at::kBFloat16. If `probs` is non-null it receives the attention weights,
// [rows, heads, max length] fp32 (zeros past each row's length).
void DecodeAttention(const std::vector<DecodeAttentionRow>& rows, int64_t heads, int64_t kv_heads,
                     int64_t head_dim, at::ScalarType dtype, at::Tensor* probs = nullptr);

// Which vector instruction set the kernel runs with ("x86-64-v4", "x86-64-v3" or "default"):
// the best this CPU supports, for the benchmarks' reports.
const char* DecodeAttentionIsa();

// Tests: run the kernel with `isa` from now on (process-wide). False, and no change, when this
// CPU cannot run it.
bool SetDecodeAttentionIsaForTesting(const std::string& isa);

}  // namespace vtw
