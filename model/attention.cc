#include "model/attention.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "model/decode_attention.h"

namespace vtw {
namespace {

// Upper bound on the fp32 attention scores of one chunk of KV heads (see PrefillAttention).
constexpr int64_t kScoreChunkBytes = int64_t{16} << 20;

constexpr double kNegInf = -std::numeric_limits<float>::infinity();

// Address of row `row` of a contiguous tensor whose first dimension is rows.
const char* RowAddress(const at::Tensor& t, int64_t row) {
  return static_cast<const char*>(t.data_ptr()) + row * t.stride(0) * t.element_size();
}

// What a sequence's rows attend to at one layer, once their keys and values are in the cache.
struct KeyValues {
  at::Tensor k, v;   // [KV, cols, D]
  int64_t past = 0;  // entries before the rows
  int64_t keys = 0;  // entries the rows see in all: past + rows
  int64_t cols = 0;  // columns multiplied (> keys: the cache's zero padding, masked out)
};

// Appends the rows' keys and values ([KV, ns, D]) to `cache` (if any) and returns what they
// attend to.
KeyValues AppendToCache(KvCache* cache, int layer, const at::Tensor& ks, const at::Tensor& vs) {
  const int64_t ns = ks.size(1);
  if (!cache) return {ks, vs, 0, ns, ns};
  KeyValues kv;
  kv.past = cache->length(layer);
  cache->Append(layer, ks, vs);
  kv.keys = kv.past + ns;
  const int64_t cap = cache->capacity(layer);
  if (ns == 1 && cap <= 2 * kv.keys) {
    // A decode row multiplies the cache's whole contiguous buffer (zeros past `keys`, given
    // probability 0): LibTorch's bf16 batched matmul copies a non-contiguous operand (the
    // [KV, keys, D] view of a longer buffer) first, which made q.K^T of a 7B decode row 2.6x
    // slower (0.75 vs 0.29 ms per layer). Past 2x the entries, reading the spare zeros would
    // cost more than the copy.
    kv.k = cache->key_buffer(layer);  // [KV, cap, D]
    kv.v = cache->value_buffer(layer);
    kv.cols = cap;
  } else {
    kv.k = cache->keys(layer);  // [KV, past + ns, D]
    kv.v = cache->values(layer);
    kv.cols = kv.keys;
  }
  return kv;
}

// One decode row by batched matmuls (inference): a third of the ops of PrefillAttention, no
// mask tensor, no head chunks. q_row: [H, D]. Returns [1, H * D].
at::Tensor DecodeRowAttention(const AttentionSpec& spec, const at::Tensor& q_row,
                              const KeyValues& kv, at::Tensor* last_row_probs) {
  const int64_t group = spec.heads / spec.kv_heads;
  at::Tensor sc = at::bmm(q_row.view({spec.kv_heads, group, spec.head_dim}), kv.k.transpose(1, 2));
  sc.div_(std::sqrt(static_cast<double>(spec.head_dim)));  // [KV, g, cols]
  if (kv.cols > kv.keys) sc.narrow(-1, kv.keys, kv.cols - kv.keys).fill_(kNegInf);
  at::Tensor probs = spec.dtype == at::kBFloat16 ? at::softmax(sc, -1)
                                                 : at::softmax(sc, -1, at::kFloat).to(spec.dtype);
  if (last_row_probs) {
    *last_row_probs = probs.narrow(-1, 0, kv.keys).to(at::kFloat).reshape({spec.heads, kv.keys});
  }
  return at::bmm(probs, kv.v).view({1, spec.heads * spec.head_dim});  // heads: kv * g + i
}

// Rows of a prefill chunk (or of training): qs [H, ns, D]. Returns [ns, H * D].
at::Tensor PrefillAttention(const AttentionSpec& spec, const at::Tensor& qs, const KeyValues& kv,
                            at::Tensor* last_row_probs) {
  const int64_t ns = qs.size(1), kvh = spec.kv_heads, d = spec.head_dim;
  const int64_t group = spec.heads / kvh;
  const double sqrt_d = std::sqrt(static_cast<double>(d));
  at::Tensor mask;  // row i may see keys j <= past + i (never the zeros past `keys`)
  if (ns > 1 || kv.cols > kv.keys) {
    mask = at::ones({ns, kv.cols}, at::TensorOptions().dtype(at::kBool)).triu(kv.past + 1);
  }
  // KV heads in chunks whose fp32 scores stay under kScoreChunkBytes: heads are independent, so
  // the result is the same, and the temporaries stay small enough for the allocator to reuse
  // them instead of mapping fresh pages per layer (a prefill of 576 image tokens on 32 heads
  // would otherwise fault in ~100 MB of new pages per layer).
  const int64_t head_bytes = group * ns * kv.cols * static_cast<int64_t>(sizeof(float));
  const int64_t chunks =
      std::clamp<int64_t>((kvh * head_bytes + kScoreChunkBytes - 1) / kScoreChunkBytes, 1, kvh);
  const int64_t per_chunk = (kvh + chunks - 1) / chunks;
  // In place on fresh products when no gradient flows (inference): the same values, fewer
  // large temporaries. Training (autograd) keeps the out-of-place ops.
  const bool inplace = !spec.training;
  std::vector<at::Tensor> head_outs, head_probs;
  for (int64_t h0 = 0; h0 < kvh; h0 += per_chunk) {
    const int64_t hc = std::min(per_chunk, kvh - h0);
    at::Tensor qc = qs.narrow(0, h0 * group, hc * group).reshape({hc, group * ns, d});
    at::Tensor scores = at::bmm(qc, kv.k.narrow(0, h0, hc).transpose(1, 2));
    scores = inplace ? scores.div_(sqrt_d) : scores / sqrt_d;
    scores = scores.view({hc, group, ns, kv.cols});
    if (mask.defined()) {
      scores = inplace ? scores.masked_fill_(mask, kNegInf) : scores.masked_fill(mask, kNegInf);
    }
    // HF: softmax in fp32, then cast to the model dtype. In bf16 inference, LibTorch's bf16
    // softmax does the same arithmetic in fp32 and rounds once, ~5x faster than converting the
    // scores to fp32 first (16% of a profiled 7B prefill before); about 1 probability in 10^5
    // differs from the convert-then-cast result, by 1 bf16 ulp. Training keeps fp32.
    at::Tensor probs = inplace && spec.dtype == at::kBFloat16
                           ? at::softmax(scores, -1)
                           : at::softmax(scores, -1, at::kFloat);  // [hc, g, ns, cols]
    if (last_row_probs) {
      head_probs.push_back(probs.select(2, ns - 1)
                               .narrow(-1, 0, kv.keys)
                               .to(at::kFloat)
                               .reshape({hc * group, kv.keys}));
    }
    head_outs.push_back(
        at::bmm(probs.to(spec.dtype).view({hc, group * ns, kv.cols}), kv.v.narrow(0, h0, hc)));
  }
  if (last_row_probs) {
    *last_row_probs = head_probs.size() == 1 ? head_probs[0] : at::cat(head_probs, 0);
  }
  at::Tensor o = head_outs.size() == 1 ? head_outs[0] : at::cat(head_outs, 0);  // [H, ns, D]
  return o.view({spec.heads, ns, d}).permute({1, 0, 2}).reshape({ns, spec.heads * d});
}

// Appends decode row `row`'s key and value (k, v contiguous [n, KV, D]) to `cache` and describes
// the row for the fused kernel (its output address is set later).
DecodeAttentionRow AppendDecodeRow(const AttentionSpec& spec, int layer, KvCache* cache,
                                   const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   int64_t row) {
  TORCH_CHECK(cache->dtype() == spec.dtype, "Forward: a KV cache of dtype ", cache->dtype(),
              " given to a model of dtype ", spec.dtype);
  cache->AppendOne(layer, RowAddress(k, row), RowAddress(v, row));
  return {RowAddress(q, row),
          cache->key_buffer(layer).data_ptr(),
          cache->value_buffer(layer).data_ptr(),
          cache->capacity(layer) * spec.head_dim,
          cache->length(layer),
          /*out=*/nullptr};
}

}  // namespace

at::Tensor CausalAttention(const AttentionSpec& spec, int layer, at::Tensor q, at::Tensor k,
                           at::Tensor v, const std::vector<AttentionSequence>& seqs,
                           std::vector<at::Tensor>* last_row_probs) {
  // Decode rows in inference go to the fused kernel after the loop, all at once; every other
  // sequence's output is computed in the loop, in order.
  const bool fused =
      !spec.training && q.device().is_cpu() && spec.decode == DecodeAttentionImpl::kFused;
  if (fused) {
    q = q.contiguous();
    k = k.contiguous();
    v = v.contiguous();
  }
  if (last_row_probs) last_row_probs->assign(seqs.size(), at::Tensor());
  std::vector<at::Tensor> outs;   // per sequence with rows; undefined for fused decode rows
  std::vector<int64_t> out_rows;  // first row of each entry of outs
  std::vector<DecodeAttentionRow> decode_rows;
  std::vector<size_t> decode_seqs;
  outs.reserve(seqs.size());
  for (size_t s = 0; s < seqs.size(); ++s) {
    const auto [cache, r0, ns] = seqs[s];
    if (ns == 0) continue;
    out_rows.push_back(r0);
    if (ns == 1 && cache && fused) {
      decode_rows.push_back(AppendDecodeRow(spec, layer, cache, q, k, v, r0));
      decode_seqs.push_back(s);
      outs.emplace_back();  // filled by DecodeAttention below
      continue;
    }
    at::Tensor* probs = last_row_probs ? &(*last_row_probs)[s] : nullptr;
    const KeyValues kv = AppendToCache(cache, layer, k.narrow(0, r0, ns).permute({1, 0, 2}),
                                       v.narrow(0, r0, ns).permute({1, 0, 2}));
    outs.push_back(ns == 1 && !spec.training
                       ? DecodeRowAttention(spec, q.select(0, r0), kv, probs)
                       : PrefillAttention(spec, q.narrow(0, r0, ns).permute({1, 0, 2}), kv, probs));
  }
  if (decode_rows.empty()) return outs.size() == 1 ? outs[0] : at::cat(outs, 0);

  const int64_t row_elems = spec.heads * spec.head_dim;
  at::Tensor attn = at::empty({q.size(0), row_elems}, q.options());  // [n, H * D]
  for (size_t i = 0, di = 0; i < outs.size(); ++i) {
    if (outs[i].defined()) {
      attn.narrow(0, out_rows[i], outs[i].size(0)).copy_(outs[i]);
    } else {
      decode_rows[di++].out = const_cast<char*>(RowAddress(attn, out_rows[i]));
    }
  }
  at::Tensor probs;  // [decode rows, H, max keys] fp32
  DecodeAttention(decode_rows, spec.heads, spec.kv_heads, spec.head_dim, spec.dtype,
                  last_row_probs ? &probs : nullptr);
  if (last_row_probs) {
    for (size_t i = 0; i < decode_rows.size(); ++i) {
      (*last_row_probs)[decode_seqs[i]] =
          probs[static_cast<int64_t>(i)].narrow(-1, 0, decode_rows[i].length);
    }
  }
  return attn;
}

}  // namespace vtw
