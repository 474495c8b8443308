#include "model/llava_model.h"

#include <cmath>

#include <ATen/ATen.h>

#include "model/attention.h"
#include "model/batch_rows.h"

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

at::Tensor LongTensor(const std::vector<int64_t>& v) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong));
}

// RoPE tables of the batch's rows (gathered with them when rows are withdrawn).
struct Rope {
  at::Tensor cos, sin;  // [rows, D] model dtype

  // x: [rows, heads, D].
  at::Tensor Apply(const at::Tensor& x) const {
    return x * cos.unsqueeze(1) + RotateHalf(x) * sin.unsqueeze(1);
  }
};

// positions: [T] original position ids; inv_freq: [D / 2] fp32.
Rope RopeFor(const std::vector<int64_t>& positions, const at::Tensor& inv_freq,
             at::ScalarType dtype) {
  at::Tensor pos = LongTensor(positions).to(at::kFloat);
  at::Tensor freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0);  // [T, D/2]
  at::Tensor emb = at::cat({freqs, freqs}, -1);                 // [T, D] fp32
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

// Input embeddings [T, Ht]: text rows from embed_tokens, image rows from batch.image_embeds.
at::Tensor EmbedRows(const ForwardBatch& batch, const at::Tensor& embed_tokens,
                     at::ScalarType dtype) {
  const int64_t total = batch.num_tokens(), vocab = embed_tokens.size(0);
  std::vector<int64_t> image_rows, embed_ids(total);
  for (int64_t r = 0; r < total; ++r) {
    const bool image = batch.kinds[r] == TokenKind::kImage;
    if (image) image_rows.push_back(r);
    embed_ids[r] = image ? 0 : batch.token_ids[r];
    TORCH_CHECK(embed_ids[r] >= 0 && embed_ids[r] < vocab, "token id out of range");
  }
  at::Tensor x = embed_tokens.index_select(0, LongTensor(embed_ids));
  if (image_rows.empty()) return x;
  TORCH_CHECK(batch.image_embeds.defined() &&
                  batch.image_embeds.size(0) == static_cast<int64_t>(image_rows.size()),
              "ForwardBatch: image_embeds rows != image rows");
  return x.index_copy(0, LongTensor(image_rows), batch.image_embeds.to(dtype));
}

// The forward's one training switch: autograd records it (the trainer, whose weights require
// grad). Inference then works in place and uses the fused decode kernel; training does not.
bool RecordsGradient(const at::Tensor& embeddings, const LlamaWeights& w) {
  return at::GradMode::is_enabled() &&
         (embeddings.requires_grad() ||
          (!w.layers.empty() && w.layers[0].q_proj.weight.requires_grad()));
}

// SwiGLU MLP: down(silu(gate(h)) * up(h)); h: [n, Ht] -> [n, Ht].
at::Tensor Mlp(const at::Tensor& h, const LlamaLayerWeights& lw, bool training) {
  at::Tensor gate = Linear(h, lw.gate_proj);  // [n, I]
  if (training) {
    gate = at::silu(gate) * Linear(h, lw.up_proj);
  } else {
    // In place on the fresh projection: the same values, two fewer [n, I] temporaries.
    at::silu_(gate).mul_(Linear(h, lw.up_proj));
  }
  return Linear(gate, lw.down_proj);
}

// Logits of each sequence's last row (fp32), and what `trace` asks for after the last layer.
ForwardOutput OutputLogits(const TextConfig& tc, const LlamaWeights& w, const ForwardBatch& batch,
                           const BatchRows& rows, const at::Tensor& x, ForwardTrace* trace) {
  ForwardOutput out;
  std::vector<int64_t> logit_rows;
  for (int s = 0; s < static_cast<int>(batch.seqs.size()); ++s) {
    if (!batch.seqs[s].compute_logits || batch.seqs[s].num_tokens == 0) continue;
    logit_rows.push_back(rows.LastRowForLogits(s));
    out.logits_seq.push_back(s);
  }
  if (trace && (trace->all_logits || trace->hidden_states)) {
    at::Tensor normed = RmsNorm(x, w.norm, tc.rms_norm_eps);
    if (trace->hidden_states) trace->hidden.push_back(normed);
    if (trace->all_logits) trace->logits_all = at::linear(normed, w.lm_head).to(at::kFloat);
    trace->final_rows = rows.original_rows();
  }
  if (logit_rows.empty()) {
    out.logits = at::empty({0, tc.vocab_size}, at::kFloat);
    return out;
  }
  at::Tensor last = x.index_select(0, LongTensor(logit_rows));  // [seqs with logits, Ht]
  out.logits = at::linear(RmsNorm(last, w.norm, tc.rms_norm_eps), w.lm_head).to(at::kFloat);
  return out;
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
  const int64_t nh = tc.num_attention_heads, kvh = tc.num_key_value_heads, d = tc.head_dim;
  BatchRows rows(batch, tc.num_hidden_layers);
  at::Tensor x = EmbedRows(batch, w.embed_tokens, dtype_);     // [T, Ht]
  Rope rope = RopeFor(batch.positions, inv_freq_, dtype_);     // [T, D] each
  const AttentionSpec spec{nh, kvh, d, dtype_, decode_attention_, RecordsGradient(x, w)};
  const bool record_hidden = trace && trace->hidden_states;
  const bool record_attention = trace && trace->last_row_attention;
  if (record_attention) trace->attention.assign(tc.num_hidden_layers, {});
  if (record_hidden) trace->hidden.push_back(x);

  for (int layer = 0; layer < tc.num_hidden_layers; ++layer) {
    // VTW: image rows of the sequences whose K <= layer leave the batch (one row gather).
    rows.WithdrawImageRows(layer, {&x, &rope.cos, &rope.sin});
    const int64_t n = x.size(0);  // 0: every row withdrawn (a prefill chunk of image rows only)
    if (n > 0) {
      const LlamaLayerWeights& lw = w.layers[layer];
      at::Tensor h = RmsNorm(x, lw.input_layernorm, tc.rms_norm_eps);      // [n, Ht]
      at::Tensor q = rope.Apply(Linear(h, lw.q_proj).view({n, nh, d}));    // [n, H, D]
      at::Tensor k = rope.Apply(Linear(h, lw.k_proj).view({n, kvh, d}));   // [n, KV, D]
      at::Tensor v = Linear(h, lw.v_proj).view({n, kvh, d});               // [n, KV, D]
      at::Tensor attn = CausalAttention(spec, layer, q, k, v, rows.sequences(),
                                        record_attention ? &trace->attention[layer] : nullptr);
      x = x + Linear(attn, lw.o_proj);  // attn: [n, H * D]
      x = x + Mlp(RmsNorm(x, lw.post_attention_layernorm, tc.rms_norm_eps), lw, spec.training);
    }
    if (record_hidden) trace->hidden.push_back(x);
  }
  return OutputLogits(tc, w, batch, rows, x, trace);
}

}  // namespace vtw
