#include "model/llava_model.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <ATen/ATen.h>

#include "model/decode_attention.h"

namespace vtw {
namespace {

at::Tensor Linear(const at::Tensor& x, const LinearWeights& w) {
  return w.bias.defined() ? at::linear(x, w.weight, w.bias) : at::linear(x, w.weight);
}

// LayerNorm in fp32 (bf16 LayerNorm is slow and less exact in this LibTorch build).
at::Tensor LayerNorm(const at::Tensor& x, const LayerNormWeights& w, double eps) {
  const int64_t h = x.size(-1);
  return at::layer_norm(x.to(at::kFloat), {h}, w.weight.to(at::kFloat), w.bias.to(at::kFloat), eps)
      .to(x.scalar_type());
}

// HF LlamaRMSNorm: normalise in fp32, cast back, then scale.
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor x32 = x.to(at::kFloat);
  at::Tensor var = x32.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (x32 * at::rsqrt(var + eps)).to(x.scalar_type());
}

// rotate_half in HF's half-split convention: concat(-x[d/2:], x[:d/2]).
at::Tensor RotateHalf(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

// x: [n, heads, D]; cos, sin: [n, D].
at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return x * cos.unsqueeze(1) + RotateHalf(x) * sin.unsqueeze(1);
}

// Upper bound on the fp32 attention scores of one chunk of KV heads (see Forward).
constexpr int64_t kScoreChunkBytes = int64_t{16} << 20;

at::Tensor LongTensor(const std::vector<int64_t>& v) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong));
}

}  // namespace

StatusOr<at::ScalarType> ParseDType(const std::string& name) {
  if (name == "fp32" || name == "float32") return at::kFloat;
  if (name == "bf16" || name == "bfloat16") return at::kBFloat16;
  return InvalidArgument("unknown dtype '" + name + "' (use fp32 or bf16)");
}

const char* DTypeName(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? "bf16" : (dtype == at::kFloat ? "fp32" : "other");
}

LlavaModel::LlavaModel(LlavaConfig config, LlavaWeights weights, at::ScalarType dtype)
    : config_(std::move(config)), weights_(std::move(weights)), dtype_(dtype) {
  const int64_t d = config_.text.head_dim;
  // HF: 1 / theta ** (arange(0, d, 2).float() / d), in fp32.
  at::Tensor exponents = at::arange(0, d, 2, at::kLong).to(at::kFloat) / static_cast<double>(d);
  inv_freq_ = 1.0 / at::pow(at::scalar_tensor(config_.text.rope_theta, at::kFloat), exponents);
}

StatusOr<std::unique_ptr<LlavaModel>> LlavaModel::Load(const std::string& dir,
                                                       at::ScalarType dtype) {
  VTW_ASSIGN_OR_RETURN(LlavaConfig config, LoadLlavaConfig(dir + "/config.json"));
  VTW_ASSIGN_OR_RETURN(std::unique_ptr<WeightStore> store, WeightStore::OpenDirectory(dir));
  VTW_ASSIGN_OR_RETURN(LlavaWeights weights, LoadLlavaWeights(*store, config, dtype));
  return std::make_unique<LlavaModel>(std::move(config), std::move(weights), dtype);
}

KvCache LlavaModel::NewKvCache(const std::vector<int64_t>& capacity_hint) const {
  return KvCache(config_.text.num_hidden_layers, config_.text.num_key_value_heads,
                 config_.text.head_dim, dtype_, capacity_hint);
}

at::Tensor LlavaModel::EncodeImages(const at::Tensor& pixel_values,
                                    std::vector<at::Tensor>* vision_hidden) const {
  const VisionConfig& vc = config_.vision;
  const ClipWeights& w = weights_.vision;
  const int64_t n = pixel_values.size(0), hv = vc.hidden_size, heads = vc.num_attention_heads;
  const int64_t dh = vc.head_dim();
  at::Tensor x = pixel_values.to(dtype_);
  // Patch embedding: [N, Hv, g, g] -> [N, P, Hv].
  at::Tensor patches = at::conv2d(x, w.patch_embedding, {}, vc.patch_size).flatten(2).transpose(1, 2);
  at::Tensor cls = w.class_embedding.view({1, 1, hv}).expand({n, 1, hv});
  at::Tensor h = at::cat({cls, patches}, 1) + w.position_embedding.unsqueeze(0);  // [N, L, Hv]
  h = LayerNorm(h, w.pre_layrnorm, vc.layer_norm_eps);
  if (vision_hidden) vision_hidden->push_back(h);
  const int64_t len = h.size(1);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
  for (const ClipLayerWeights& layer : w.layers) {
    at::Tensor residual = h;
    at::Tensor a = LayerNorm(h, layer.layer_norm1, vc.layer_norm_eps);
    at::Tensor q = (Linear(a, layer.q_proj) * scale).view({n, len, heads, dh}).transpose(1, 2);
    at::Tensor k = Linear(a, layer.k_proj).view({n, len, heads, dh}).transpose(1, 2);
    at::Tensor v = Linear(a, layer.v_proj).view({n, len, heads, dh}).transpose(1, 2);
    at::Tensor probs = at::softmax(at::matmul(q, k.transpose(-1, -2)), -1, at::kFloat).to(dtype_);
    at::Tensor o = at::matmul(probs, v).transpose(1, 2).reshape({n, len, hv});  // [N, L, Hv]
    h = residual + Linear(o, layer.out_proj);
    residual = h;
    a = Linear(LayerNorm(h, layer.layer_norm2, vc.layer_norm_eps), layer.fc1);
    a = vc.hidden_act == "quick_gelu" ? a * at::sigmoid(1.702 * a) : at::gelu(a);
    h = residual + Linear(a, layer.fc2);
    if (vision_hidden) vision_hidden->push_back(h);
  }
  if (config_.vision_feature_select_strategy == "default") h = h.narrow(1, 1, len - 1);
  at::Tensor p = at::gelu(Linear(h, weights_.projector.linear_1));
  return Linear(p, weights_.projector.linear_2);  // [N, num_image_tokens, Ht]
}

ForwardOutput LlavaModel::Forward(const ForwardBatch& batch, ForwardTrace* trace) const {
  const TextConfig& tc = config_.text;
  const LlamaWeights& w = weights_.text;
  const int64_t total = batch.num_tokens();
  const int num_seqs = static_cast<int>(batch.seqs.size());
  TORCH_CHECK(static_cast<int64_t>(batch.positions.size()) == total &&
                  static_cast<int64_t>(batch.kinds.size()) == total,
              "ForwardBatch: token_ids, positions and kinds differ in length");

  // Row bookkeeping (CPU): the sequence of each row, and which image rows exist.
  std::vector<int> row_seq(total);
  std::vector<int64_t> image_rows, embed_ids(total), seq_end(num_seqs);
  {
    int64_t r = 0;
    for (int s = 0; s < num_seqs; ++s) {
      seq_end[s] = r + batch.seqs[s].num_tokens;
      for (int i = 0; i < batch.seqs[s].num_tokens; ++i, ++r) {
        TORCH_CHECK(r < total, "ForwardBatch: sequence rows exceed the token count");
        row_seq[r] = s;
      }
    }
    TORCH_CHECK(r == total, "ForwardBatch: sequence rows do not add up to the token count");
  }
  for (int64_t r = 0; r < total; ++r) {
    const bool image = batch.kinds[r] == TokenKind::kImage;
    if (image) image_rows.push_back(r);
    embed_ids[r] = image ? 0 : batch.token_ids[r];
    TORCH_CHECK(embed_ids[r] >= 0 && embed_ids[r] < tc.vocab_size, "token id out of range");
  }

  // Input embeddings: [T, Ht].
  at::Tensor x = w.embed_tokens.index_select(0, LongTensor(embed_ids));
  if (!image_rows.empty()) {
    TORCH_CHECK(batch.image_embeds.defined() &&
                    batch.image_embeds.size(0) == static_cast<int64_t>(image_rows.size()),
                "ForwardBatch: image_embeds rows != image rows");
    x = x.index_copy(0, LongTensor(image_rows), batch.image_embeds.to(dtype_));
  }

  // RoPE tables for the rows: [T, D] fp32 -> model dtype.
  at::Tensor pos = LongTensor(batch.positions).to(at::kFloat);
  at::Tensor freqs = pos.unsqueeze(1) * inv_freq_.unsqueeze(0);  // [T, D/2]
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  at::Tensor cos = emb.cos().to(dtype_), sin = emb.sin().to(dtype_);

  // Active rows (indices into the original batch), in order.
  std::vector<int64_t> active(total);
  for (int64_t r = 0; r < total; ++r) active[r] = r;

  if (trace && trace->hidden_states) trace->hidden.push_back(x);
  if (trace && trace->last_row_attention) trace->attention.assign(tc.num_hidden_layers, {});

  const int64_t nh = tc.num_attention_heads, kvh = tc.num_key_value_heads, d = tc.head_dim;
  const int64_t group = nh / kvh;
  const double sqrt_d = std::sqrt(static_cast<double>(d));
  std::vector<int64_t> seq_start(num_seqs), seq_len(num_seqs);

  for (int layer = 0; layer < tc.num_hidden_layers; ++layer) {
    // Withdrawal: image rows of sequences whose K <= layer leave the batch (a row gather).
    std::vector<int64_t> keep_local;
    keep_local.reserve(active.size());
    for (size_t i = 0; i < active.size(); ++i) {
      const int64_t r = active[i];
      const bool withdraw = batch.kinds[r] == TokenKind::kImage &&
                            batch.seqs[row_seq[r]].withdraw_layer <= layer;
      if (!withdraw) keep_local.push_back(static_cast<int64_t>(i));
    }
    if (keep_local.size() != active.size()) {
      at::Tensor idx = LongTensor(keep_local);
      x = x.index_select(0, idx);
      cos = cos.index_select(0, idx);
      sin = sin.index_select(0, idx);
      std::vector<int64_t> next(keep_local.size());
      for (size_t i = 0; i < keep_local.size(); ++i) next[i] = active[keep_local[i]];
      active = std::move(next);
    }
    std::fill(seq_len.begin(), seq_len.end(), 0);
    for (size_t i = active.size(); i-- > 0;) seq_start[row_seq[active[i]]] = i;
    for (int64_t r : active) ++seq_len[row_seq[r]];

    const LlamaLayerWeights& lw = w.layers[layer];
    const int64_t n = x.size(0);
    if (n == 0) {  // every row withdrawn (a prefill chunk of image rows only)
      if (trace && trace->hidden_states) trace->hidden.push_back(x);
      continue;
    }
    at::Tensor h = RmsNorm(x, lw.input_layernorm, tc.rms_norm_eps);
    at::Tensor q = ApplyRope(Linear(h, lw.q_proj).view({n, nh, d}), cos, sin);   // [n, H, D]
    at::Tensor k = ApplyRope(Linear(h, lw.k_proj).view({n, kvh, d}), cos, sin);  // [n, KV, D]
    at::Tensor v = Linear(h, lw.v_proj).view({n, kvh, d});                       // [n, KV, D]

    // Decode rows (one new token of a sequence with a cache) in inference go to the fused kernel
    // after this loop, all at once; every other sequence's output is computed here, in order.
    const bool fused_decode = !q.requires_grad() && q.device().is_cpu() &&
                              decode_attention_ == DecodeAttentionImpl::kFused;
    if (fused_decode) {
      q = q.contiguous();
      k = k.contiguous();
      v = v.contiguous();
    }
    const int64_t elem = q.element_size();
    std::vector<at::Tensor> outs;
    std::vector<int64_t> out_rows;  // first row of each entry of outs
    std::vector<DecodeAttentionRow> decode_rows;
    std::vector<int> decode_seqs;
    outs.reserve(num_seqs);
    for (int s = 0; s < num_seqs; ++s) {
      const int64_t ns = seq_len[s];
      if (ns == 0) continue;
      const int64_t r0 = seq_start[s];
      if (KvCache* cache = batch.seqs[s].cache; ns == 1 && cache && fused_decode) {
        // A decode row: append its key and value, attend below with the other decode rows.
        TORCH_CHECK(cache->dtype() == dtype_, "Forward: a KV cache of dtype ",
                    cache->dtype(), " given to a ", DTypeName(dtype_), " model");
        cache->AppendOne(layer, static_cast<const char*>(k.data_ptr()) + r0 * kvh * d * elem,
                         static_cast<const char*>(v.data_ptr()) + r0 * kvh * d * elem);
        decode_rows.push_back({static_cast<const char*>(q.data_ptr()) + r0 * nh * d * elem,
                               cache->key_buffer(layer).data_ptr(),
                               cache->value_buffer(layer).data_ptr(),
                               cache->capacity(layer) * d, cache->length(layer), /*out=*/nullptr});
        decode_seqs.push_back(s);
        out_rows.push_back(r0);
        outs.emplace_back();  // filled by DecodeAttention below
        continue;
      }
      at::Tensor qs = q.narrow(0, r0, ns).permute({1, 0, 2});  // [H, ns, D]
      at::Tensor ks = k.narrow(0, r0, ns).permute({1, 0, 2});  // [KV, ns, D]
      at::Tensor vs = v.narrow(0, r0, ns).permute({1, 0, 2});
      int64_t past = 0, keys = ns, cols = ns;  // keys: entries seen; cols: columns multiplied
      if (KvCache* cache = batch.seqs[s].cache) {
        past = cache->length(layer);
        cache->Append(layer, ks, vs);
        keys = past + ns;
        const int64_t cap = cache->capacity(layer);
        if (ns == 1 && cap <= 2 * keys) {
          // A decode row multiplies the cache's whole contiguous buffer (zeros past `keys`,
          // given probability 0): LibTorch's bf16 batched matmul copies a non-contiguous
          // operand (the [KV, keys, D] view of a longer buffer) first, which made q.K^T of a
          // 7B decode row 2.6x slower (0.75 vs 0.29 ms per layer). Past 2x the entries, reading
          // the spare zeros would cost more than the copy.
          ks = cache->key_buffer(layer);  // [KV, cap, D]
          vs = cache->value_buffer(layer);
          cols = cap;
        } else {
          ks = cache->keys(layer);  // [KV, past + ns, D]
          vs = cache->values(layer);
          cols = keys;
        }
      }
      if (ns == 1 && !q.requires_grad()) {
        // One decode row (inference): the same arithmetic as below with a third of the ops
        // (a 7B decode step at batch 16 runs this 512 times), no mask tensor, no head chunks.
        at::Tensor sc = at::bmm(q.select(0, r0).view({kvh, group, d}), ks.transpose(1, 2));
        sc.div_(sqrt_d);  // [KV, g, cols]
        if (cols > keys) {
          sc.narrow(-1, keys, cols - keys).fill_(-std::numeric_limits<float>::infinity());
        }
        at::Tensor probs = dtype_ == at::kBFloat16 ? at::softmax(sc, -1)
                                                   : at::softmax(sc, -1, at::kFloat).to(dtype_);
        if (trace && trace->last_row_attention) {
          trace->attention[layer].resize(num_seqs);
          trace->attention[layer][s] = probs.narrow(-1, 0, keys).to(at::kFloat).reshape({nh, keys});
        }
        out_rows.push_back(r0);
        outs.push_back(at::bmm(probs, vs).view({1, nh * d}));  // heads in HF order kv * g + i
        continue;
      }
      at::Tensor mask;  // row i may see keys j <= past + i (never the zeros past `keys`)
      if (ns > 1 || cols > keys) {
        mask = at::ones({ns, cols}, at::TensorOptions().dtype(at::kBool)).triu(past + 1);
      }
      // KV heads in chunks whose fp32 scores stay under kScoreChunkBytes: heads are independent,
      // so the result is the same, and the temporaries stay small enough for the allocator to
      // reuse them instead of mapping fresh pages per layer (a prefill of 576 image tokens on
      // 32 heads would otherwise fault in ~100 MB of new pages per layer).
      const int64_t head_bytes = group * ns * cols * static_cast<int64_t>(sizeof(float));
      const int64_t chunks =
          std::clamp<int64_t>((kvh * head_bytes + kScoreChunkBytes - 1) / kScoreChunkBytes, 1, kvh);
      const int64_t per_chunk = (kvh + chunks - 1) / chunks;
      std::vector<at::Tensor> head_outs, head_attn;
      for (int64_t h0 = 0; h0 < kvh; h0 += per_chunk) {
        const int64_t hc = std::min(per_chunk, kvh - h0);
        at::Tensor qc = qs.narrow(0, h0 * group, hc * group).reshape({hc, group * ns, d});
        at::Tensor scores = at::bmm(qc, ks.narrow(0, h0, hc).transpose(1, 2));
        // In place on the fresh product when no gradient flows (inference): the same values,
        // fewer large temporaries. Training (autograd) keeps the out-of-place ops.
        const bool inplace = !scores.requires_grad();
        scores = inplace ? scores.div_(sqrt_d) : scores / sqrt_d;
        scores = scores.view({hc, group, ns, cols});
        if (mask.defined()) {
          const double ninf = -std::numeric_limits<float>::infinity();
          scores = inplace ? scores.masked_fill_(mask, ninf) : scores.masked_fill(mask, ninf);
        }
        // HF: softmax in fp32, then cast to the model dtype. In bf16 inference, LibTorch's bf16
        // softmax does the same arithmetic in fp32 and rounds once, ~5x faster than converting
        // the scores to fp32 first (16% of a profiled 7B prefill before); about 1 probability in
        // 10^5 differs from the convert-then-cast result, by 1 bf16 ulp. Training keeps fp32.
        at::Tensor probs = inplace && dtype_ == at::kBFloat16
                               ? at::softmax(scores, -1)
                               : at::softmax(scores, -1, at::kFloat);  // [hc, g, ns, cols]
        if (trace && trace->last_row_attention) {
          head_attn.push_back(probs.select(2, ns - 1).narrow(-1, 0, keys).to(at::kFloat)
                                  .reshape({hc * group, keys}));
        }
        head_outs.push_back(
            at::bmm(probs.to(dtype_).view({hc, group * ns, cols}), vs.narrow(0, h0, hc)));
      }
      if (trace && trace->last_row_attention) {
        trace->attention[layer].resize(num_seqs);
        trace->attention[layer][s] = head_attn.size() == 1 ? head_attn[0] : at::cat(head_attn, 0);
      }
      at::Tensor o = head_outs.size() == 1 ? head_outs[0] : at::cat(head_outs, 0);
      out_rows.push_back(r0);
      outs.push_back(o.view({nh, ns, d}).permute({1, 0, 2}).reshape({ns, nh * d}));
    }
    at::Tensor attn;  // [n, H*D], rows in batch order
    if (decode_rows.empty()) {
      attn = outs.size() == 1 ? outs[0] : at::cat(outs, 0);
    } else {
      attn = at::empty({n, nh * d}, q.options());
      const int64_t row_bytes = nh * d * attn.element_size();
      for (size_t i = 0, di = 0; i < outs.size(); ++i) {
        if (outs[i].defined()) {
          attn.narrow(0, out_rows[i], outs[i].size(0)).copy_(outs[i]);
        } else {
          decode_rows[di++].out = static_cast<char*>(attn.data_ptr()) + out_rows[i] * row_bytes;
        }
      }
      const bool want_probs = trace && trace->last_row_attention;
      at::Tensor probs;  // [decode rows, H, max keys] fp32
      DecodeAttention(decode_rows, nh, kvh, d, dtype_, want_probs ? &probs : nullptr);
      if (want_probs) {
        trace->attention[layer].resize(num_seqs);
        for (size_t i = 0; i < decode_rows.size(); ++i) {
          trace->attention[layer][decode_seqs[i]] =
              probs[static_cast<int64_t>(i)].narrow(-1, 0, decode_rows[i].length);
        }
      }
    }
    x = x + Linear(attn, lw.o_proj);
    h = RmsNorm(x, lw.post_attention_layernorm, tc.rms_norm_eps);
    // silu and the product in place on the fresh projection when no gradient flows: the same
    // values, two fewer [rows, I] temporaries per layer.
    at::Tensor gate = Linear(h, lw.gate_proj);
    if (gate.requires_grad()) {
      gate = at::silu(gate) * Linear(h, lw.up_proj);
    } else {
      at::silu_(gate).mul_(Linear(h, lw.up_proj));
    }
    x = x + Linear(gate, lw.down_proj);
    if (trace && trace->hidden_states) trace->hidden.push_back(x);
  }

  ForwardOutput out;
  std::vector<int64_t> logit_rows;
  for (int s = 0; s < num_seqs; ++s) {
    if (!batch.seqs[s].compute_logits || batch.seqs[s].num_tokens == 0) continue;
    TORCH_CHECK(seq_len[s] > 0, "Forward: every row of a sequence needing logits was withdrawn");
    const int64_t last = seq_start[s] + seq_len[s] - 1;
    // The sequence's last original row must have survived withdrawal.
    TORCH_CHECK(active[last] == seq_end[s] - 1,
                "Forward: the last row of a sequence needing logits was withdrawn");
    logit_rows.push_back(last);
    out.logits_seq.push_back(s);
  }
  if (trace && (trace->all_logits || trace->hidden_states)) {
    at::Tensor normed = RmsNorm(x, w.norm, tc.rms_norm_eps);
    if (trace->hidden_states) trace->hidden.push_back(normed);
    if (trace->all_logits) trace->logits_all = at::linear(normed, w.lm_head).to(at::kFloat);
    trace->final_rows = active;
  }
  if (!logit_rows.empty()) {
    at::Tensor rows = x.index_select(0, LongTensor(logit_rows));
    out.logits = at::linear(RmsNorm(rows, w.norm, tc.rms_norm_eps), w.lm_head).to(at::kFloat);
  } else {
    out.logits = at::empty({0, tc.vocab_size}, at::kFloat);
  }
  return out;
}

}  // namespace vtw
