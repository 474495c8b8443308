// Attention: the causal self-attention of one Llama decoder layer over a flat, ragged batch of
// rows from many sequences. Each sequence's rows are contiguous; they attend to the sequence's
// KV-cache entries of this layer (earlier steps) and then to their own rows, causally. The new
// keys and values are appended to the cache. Three paths, chosen per sequence:
//   - a decode row (one new row of a sequence with a cache), in inference with kFused: all such
//     rows of the layer in one call of the fused CPU kernel (model/decode_attention.h);
//   - a decode row otherwise (kBmm, or no fused kernel on this device): two batched matmuls;
//   - several rows (a prefill chunk, or training): scores per KV-head chunk, causal mask,
//     softmax in fp32 (bf16 inference: LibTorch's bf16 softmax, which computes in fp32), p.V.
// Withdrawal is invisible here: a withdrawn row is simply not in the batch, and a cache holds
// whatever rows reached this layer.
// Pure computation; not thread-safe for shared caches (the engine thread owns them).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "model/kv_cache.h"

namespace vtw {

// How decode rows attend in inference. kFused (the default): model/decode_attention.h, all decode
// rows of a layer in one threaded pass over their caches. kBmm: LibTorch batched matmuls per
// sequence (the code before the fused kernel; kept as the reference for tests and the benchmark).
enum class DecodeAttentionImpl { kFused, kBmm };

struct AttentionSpec {
  int64_t heads = 0;     // query heads H
  int64_t kv_heads = 0;  // KV heads (GQA: query head h uses KV head h / (H / KV))
  int64_t head_dim = 0;  // D
  at::ScalarType dtype;  // the model dtype (q, k, v, caches, output)
  DecodeAttentionImpl decode = DecodeAttentionImpl::kFused;
  // Autograd records the forward (training): out-of-place ops, fp32 softmax, no fused kernel.
  bool training = false;
};

// One sequence's rows at this layer.
struct AttentionSequence {
  KvCache* cache = nullptr;  // nullptr: attend within the rows only (training)
  int64_t first_row = 0;     // first row in q / k / v
  int64_t num_rows = 0;      // 0: the sequence has no row at this layer
};

// q: [n, H, D], k and v: [n, KV, D] (RoPE applied to q and k); `seqs` cover rows 0..n-1 in order.
// Returns the attention output [n, H * D] in row order (heads in HF order). If `last_row_probs`
// is non-null it is resized to seqs.size() and entry s receives the attention probabilities of
// sequence s's last row over its keys (cache entries, then its rows), [H, keys] fp32.
at::Tensor CausalAttention(const AttentionSpec& spec, int layer, at::Tensor q, at::Tensor k,
                           at::Tensor v, const std::vector<AttentionSequence>& seqs,
                           std::vector<at::Tensor>* last_row_probs = nullptr);

}  // namespace vtw
