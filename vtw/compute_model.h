// ComputeModel: exact FLOPs and KV-cache bytes of LLaVA inference with and without Visual
// Tokens Withdrawal. Pure arithmetic on the config; immutable and thread-safe.
//
// Counting convention: every matrix product of an [m, k] by [k, n] operand counts 2*m*k*n FLOPs
// (one multiply and one add per term). Element-wise work (norms, RoPE, softmax, activations,
// residual adds, bias adds) is not counted; it is < 1% of the total at LLaVA geometries.
// Per decoder layer, for `rows` rows whose attention sees `keys_i` keys each:
//   projections  2*rows*Ht*(q + 2*kv) + 2*rows*q*Ht        (q = heads*D, kv = kv_heads*D)
//   attention    2*2*heads*D*sum_i(keys_i)                 (scores Q.K^T and probs.V)
//   MLP          3 * 2*rows*Ht*I                           (gate, up, down)
// lm_head: 2*Ht*V per row whose logits are computed. Vision (per image, L = patches + 1 tokens,
// only the layers the feature layer needs): patch conv 2*P*Hv*(3*p*p); per layer 4 projections
// 2*L*Hv*Hv each, attention 2*2*L*L*Hv, MLP 2*2*L*Hv*Iv; projector 2*N*(Hv*Ht + Ht*Ht).
// With withdrawal at K, layers >= K see only the text rows and only text keys; the difference
// flops_without_vtw - flops is exactly the work of the withdrawn rows at those layers (their
// projections, MLP and attention) plus the text rows' attention to image keys there.
//
// KV cache: each layer holds one entry per token it processed: 2*kv_heads*D*element_size bytes.
#pragma once

#include <cstdint>
#include <vector>

#include "model/forward_batch.h"
#include "model/llava_config.h"

namespace vtw {

struct Flops {
  int64_t flops = 0;              // work done
  int64_t flops_without_vtw = 0;  // the same work without withdrawal
  int64_t saved() const { return flops_without_vtw - flops; }
  Flops& operator+=(const Flops& o) {
    flops += o.flops;
    flops_without_vtw += o.flops_without_vtw;
    return *this;
  }
};

class ComputeModel {
 public:
  ComputeModel(const LlavaConfig& config, int64_t element_size);

  int num_layers() const { return num_layers_; }

  // One image through the vision tower and projector.
  int64_t VisionFlops() const;
  // One decoder layer over `rows` rows whose key counts add up to `sum_keys`.
  int64_t LayerFlops(int64_t rows, int64_t sum_keys) const;
  // lm_head over `rows` rows.
  int64_t LmHeadFlops(int64_t rows) const;

  // Decoder FLOPs (with and without withdrawal at `withdraw_layer`) of processing positions
  // [begin, end) of a sequence whose token kinds are `kinds` (prompt then generated tokens),
  // positions before `begin` already cached; `logits` adds one lm_head row.
  Flops ChunkFlops(const std::vector<TokenKind>& kinds, int64_t begin, int64_t end,
                   int withdraw_layer, bool logits) const;
  // Same for a sequence of `num_text_before` text and `num_image` image tokens already in the
  // cache (all before) and one new text token: a decode step, O(1).
  Flops DecodeStepFlops(int64_t cached_text, int64_t cached_image, int withdraw_layer) const;

  // KV-cache bytes held by a sequence with `num_text` text and `num_image` image tokens.
  int64_t KvCacheBytes(int64_t num_text, int64_t num_image, int withdraw_layer) const;
  int64_t KvEntryBytes() const { return entry_bytes_; }

 private:
  int num_layers_;
  int64_t hidden_, q_size_, kv_size_, intermediate_, vocab_, heads_, head_dim_;
  int64_t entry_bytes_;
  int64_t vision_flops_;
};

}  // namespace vtw
