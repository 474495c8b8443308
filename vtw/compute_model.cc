#include "vtw/compute_model.h"

#include "vtw/withdrawal.h"

namespace vtw {

ComputeModel::ComputeModel(const LlavaConfig& c, int64_t element_size)
    : num_layers_(c.text.num_hidden_layers),
      hidden_(c.text.hidden_size),
      q_size_(c.text.q_size()),
      kv_size_(c.text.kv_size()),
      intermediate_(c.text.intermediate_size),
      vocab_(c.text.vocab_size),
      heads_(c.text.num_attention_heads),
      head_dim_(c.text.head_dim),
      entry_bytes_(2LL * c.text.kv_size() * element_size) {
  const VisionConfig& v = c.vision;
  const int64_t patches = v.num_patches(), len = patches + 1, hv = v.hidden_size;
  int64_t flops = 2 * patches * hv * (v.num_channels * v.patch_size * v.patch_size);
  const int64_t per_layer = 4 * 2 * len * hv * hv + 2 * 2 * len * len * hv +
                            2 * 2 * len * hv * v.intermediate_size;
  flops += per_layer * c.vision_layers_used();
  const int64_t n = c.num_image_tokens(), ht = c.text.hidden_size;
  flops += 2 * n * (hv * ht + ht * ht);
  vision_flops_ = flops;
}

int64_t ComputeModel::VisionFlops() const { return vision_flops_; }

int64_t ComputeModel::LayerFlops(int64_t rows, int64_t sum_keys) const {
  const int64_t proj = 2 * rows * hidden_ * (q_size_ + 2 * kv_size_) + 2 * rows * q_size_ * hidden_;
  const int64_t attn = 2 * 2 * heads_ * head_dim_ * sum_keys;
  const int64_t mlp = 3 * 2 * rows * hidden_ * intermediate_;
  return proj + attn + mlp;
}

int64_t ComputeModel::LmHeadFlops(int64_t rows) const { return 2 * rows * hidden_ * vocab_; }

Flops ComputeModel::ChunkFlops(const std::vector<TokenKind>& kinds, int64_t begin, int64_t end,
                               int withdraw_layer, bool logits) const {
  // Full layers (< K): every row, keys = index + 1. Withdrawn layers: text rows only, keys =
  // text tokens up to and including the row.
  int64_t rows_all = end - begin, keys_all = 0, rows_text = 0, keys_text = 0, text_seen = 0;
  for (int64_t i = 0; i < end; ++i) {
    const bool text = kinds[i] == TokenKind::kText;
    text_seen += text;
    if (i < begin) continue;
    keys_all += i + 1;
    if (text) {
      ++rows_text;
      keys_text += text_seen;
    }
  }
  const int64_t full_layers = LayersWithImageRows(withdraw_layer, num_layers_);
  const int64_t lm = logits ? LmHeadFlops(1) : 0;
  Flops f;
  f.flops_without_vtw = num_layers_ * LayerFlops(rows_all, keys_all) + lm;
  f.flops = full_layers * LayerFlops(rows_all, keys_all) +
            (num_layers_ - full_layers) * LayerFlops(rows_text, keys_text) + lm;
  return f;
}

Flops ComputeModel::DecodeStepFlops(int64_t cached_text, int64_t cached_image,
                                    int withdraw_layer) const {
  const int64_t full_layers = LayersWithImageRows(withdraw_layer, num_layers_);
  const int64_t keys_all = cached_text + cached_image + 1, keys_text = cached_text + 1;
  Flops f;
  f.flops_without_vtw = num_layers_ * LayerFlops(1, keys_all) + LmHeadFlops(1);
  f.flops = full_layers * LayerFlops(1, keys_all) +
            (num_layers_ - full_layers) * LayerFlops(1, keys_text) + LmHeadFlops(1);
  return f;
}

int64_t ComputeModel::KvCacheBytes(int64_t num_text, int64_t num_image, int withdraw_layer) const {
  int64_t entries = 0;
  for (int l = 0; l < num_layers_; ++l) {
    entries += KvEntriesAtLayer(l, withdraw_layer, num_text, num_image);
  }
  return entry_bytes_ * entries;
}

}  // namespace vtw
