// LlavaModel: the LLaVA forward pass (CLIP vision tower -> projector -> Llama decoder) over a
// flat ragged batch, with per-sequence withdrawal of image rows (the mechanism behind Visual
// Tokens Withdrawal; the policy that picks K lives in vtw/). Pure computation: no threads, no
// I/O except Load. Device-agnostic (tensors follow the weights' device).
// Thread-safety: const methods may run concurrently if their KV caches are distinct; the
// server runs the model on one engine thread only.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "model/attention.h"
#include "model/forward_batch.h"
#include "model/kv_cache.h"
#include "model/llava_config.h"
#include "model/llava_weights.h"
#include "model/status.h"

namespace vtw {

class LlavaModel {
 public:
  LlavaModel(LlavaConfig config, LlavaWeights weights, at::ScalarType dtype);
  LlavaModel(const LlavaModel&) = delete;
  LlavaModel& operator=(const LlavaModel&) = delete;

  // Loads DIR/config.json and the safetensors weights (single file or sharded) in `dtype`
  // (at::kFloat or at::kBFloat16). Errors name the file and the tensor or field at fault.
  static StatusOr<std::unique_ptr<LlavaModel>> Load(const std::string& dir, at::ScalarType dtype);

  const LlavaConfig& config() const { return config_; }
  at::ScalarType dtype() const { return dtype_; }
  const LlavaWeights& weights() const { return weights_; }
  LlavaWeights& mutable_weights() { return weights_; }
  int num_layers() const { return config_.text.num_hidden_layers; }

  // pixel_values: [N, 3, S, S] float32 (preprocessed). Returns the projected image features
  // [N, num_image_tokens, Ht] in the model dtype. If `vision_hidden` is given it receives the
  // tower's hidden states ([0] = pre_layrnorm(embeddings), [i] = after layer i - 1), [N, P+1, Hv].
  at::Tensor EncodeImages(const at::Tensor& pixel_values,
                          std::vector<at::Tensor>* vision_hidden = nullptr) const;

  // Runs the decoder over `batch`: per layer, withdraw (model/batch_rows.h), RMSNorm, q/k/v with
  // RoPE, attention (model/attention.h), o_proj, MLP. For each sequence, its new keys/values are
  // appended to its cache (layers >= its withdrawal layer receive no image rows) and, if
  // compute_logits, the logits of its last row are returned (fp32). `trace` (optional) records
  // more. Preconditions (programmer errors, checked): row counts add up; withdrawal layers in
  // [0, num_layers]; image_embeds has one row per image row; a sequence's last row is not
  // withdrawn when it needs logits.
  ForwardOutput Forward(const ForwardBatch& batch, ForwardTrace* trace = nullptr) const;

  // A cache for one sequence, pre-sized per layer.
  KvCache NewKvCache(const std::vector<int64_t>& capacity_hint = {}) const;

  DecodeAttentionImpl decode_attention() const { return decode_attention_; }
  void set_decode_attention(DecodeAttentionImpl impl) { decode_attention_ = impl; }

 private:
  LlavaConfig config_;
  LlavaWeights weights_;
  at::ScalarType dtype_;
  at::Tensor inv_freq_;  // [head_dim / 2] fp32 RoPE inverse frequencies
  DecodeAttentionImpl decode_attention_ = DecodeAttentionImpl::kFused;
};

// Parses "fp32" / "float32" / "bf16" / "bfloat16".
StatusOr<at::ScalarType> ParseDType(const std::string& name);
const char* DTypeName(at::ScalarType dtype);

}  // namespace vtw
