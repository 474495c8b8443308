#include "model/llava_weights.h"

#include <set>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

namespace vtw {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

bool StartsWith(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

at::ScalarType ToScalarType(SafetensorsDType dtype) {
  switch (dtype) {
    case SafetensorsDType::kF32: return at::kFloat;
    case SafetensorsDType::kF16: return at::kHalf;
    case SafetensorsDType::kBF16: return at::kBFloat16;
    default: return at::kFloat;
  }
}

}  // namespace

void ResizeLlavaWeights(const LlavaConfig& c, LlavaWeights* w) {
  w->vision.layers.resize(c.vision_layers_used());
  w->text.layers.resize(c.text.num_hidden_layers);
}

void ForEachLlavaTensor(const LlavaConfig& c, LlavaWeights* w, const TensorVisitor& fn) {
  const auto& v = c.vision;
  const auto& t = c.text;
  const int64_t hv = v.hidden_size, iv = v.intermediate_size, ht = t.hidden_size;
  const std::string vp = "vision_tower.vision_model.";
  fn(vp + "embeddings.class_embedding", {hv}, &w->vision.class_embedding, InitKind::kNormal);
  fn(vp + "embeddings.patch_embedding.weight", {hv, v.num_channels, v.patch_size, v.patch_size},
     &w->vision.patch_embedding, InitKind::kNormal);
  fn(vp + "embeddings.position_embedding.weight", {v.num_patches() + 1, hv},
     &w->vision.position_embedding, InitKind::kNormal);
  fn(vp + "pre_layrnorm.weight", {hv}, &w->vision.pre_layrnorm.weight, InitKind::kOnes);
  fn(vp + "pre_layrnorm.bias", {hv}, &w->vision.pre_layrnorm.bias, InitKind::kZeros);
  for (int i = 0; i < v.num_hidden_layers; ++i) {
    const bool used = i < c.vision_layers_used();
    ClipLayerWeights* l = used ? &w->vision.layers[i] : nullptr;
    const std::string p = vp + "encoder.layers." + std::to_string(i) + ".";
    auto linear = [&](const std::string& name, LinearWeights* lw, int64_t out, int64_t in) {
      fn(p + name + ".weight", {out, in}, used ? &lw->weight : nullptr, InitKind::kNormal);
      fn(p + name + ".bias", {out}, used ? &lw->bias : nullptr, InitKind::kZeros);
    };
    auto norm = [&](const std::string& name, LayerNormWeights* nw) {
      fn(p + name + ".weight", {hv}, used ? &nw->weight : nullptr, InitKind::kOnes);
      fn(p + name + ".bias", {hv}, used ? &nw->bias : nullptr, InitKind::kZeros);
    };
    ClipLayerWeights dummy;
    ClipLayerWeights& lr = used ? *l : dummy;
    linear("self_attn.q_proj", &lr.q_proj, hv, hv);
    linear("self_attn.k_proj", &lr.k_proj, hv, hv);
    linear("self_attn.v_proj", &lr.v_proj, hv, hv);
    linear("self_attn.out_proj", &lr.out_proj, hv, hv);
    norm("layer_norm1", &lr.layer_norm1);
    linear("mlp.fc1", &lr.fc1, iv, hv);
    linear("mlp.fc2", &lr.fc2, hv, iv);
    norm("layer_norm2", &lr.layer_norm2);
  }
  fn(vp + "post_layernorm.weight", {hv}, nullptr, InitKind::kOnes);
  fn(vp + "post_layernorm.bias", {hv}, nullptr, InitKind::kZeros);

  fn("multi_modal_projector.linear_1.weight", {ht, hv}, &w->projector.linear_1.weight,
     InitKind::kNormal);
  fn("multi_modal_projector.linear_1.bias", {ht}, &w->projector.linear_1.bias, InitKind::kZeros);
  fn("multi_modal_projector.linear_2.weight", {ht, ht}, &w->projector.linear_2.weight,
     InitKind::kNormal);
  fn("multi_modal_projector.linear_2.bias", {ht}, &w->projector.linear_2.bias, InitKind::kZeros);

  const std::string tp = "language_model.model.";
  fn(tp + "embed_tokens.weight", {t.vocab_size, ht}, &w->text.embed_tokens, InitKind::kNormal);
  for (int i = 0; i < t.num_hidden_layers; ++i) {
    LlamaLayerWeights& l = w->text.layers[i];
    const std::string p = tp + "layers." + std::to_string(i) + ".";
    fn(p + "self_attn.q_proj.weight", {t.q_size(), ht}, &l.q_proj.weight, InitKind::kNormal);
    fn(p + "self_attn.k_proj.weight", {t.kv_size(), ht}, &l.k_proj.weight, InitKind::kNormal);
    fn(p + "self_attn.v_proj.weight", {t.kv_size(), ht}, &l.v_proj.weight, InitKind::kNormal);
    fn(p + "self_attn.o_proj.weight", {ht, t.q_size()}, &l.o_proj.weight, InitKind::kNormal);
    fn(p + "mlp.gate_proj.weight", {t.intermediate_size, ht}, &l.gate_proj.weight,
       InitKind::kNormal);
    fn(p + "mlp.up_proj.weight", {t.intermediate_size, ht}, &l.up_proj.weight,
       InitKind::kNormal);
    fn(p + "mlp.down_proj.weight", {ht, t.intermediate_size}, &l.down_proj.weight,
       InitKind::kNormal);
    fn(p + "input_layernorm.weight", {ht}, &l.input_layernorm, InitKind::kOnes);
    fn(p + "post_attention_layernorm.weight", {ht}, &l.post_attention_layernorm,
       InitKind::kOnes);
  }
  fn(tp + "norm.weight", {ht}, &w->text.norm, InitKind::kOnes);
  fn("language_model.lm_head.weight", {t.vocab_size, ht},
     t.tie_word_embeddings ? nullptr : &w->text.lm_head, InitKind::kNormal);
}

std::string CanonicalTensorName(const std::string& name) {
  static const std::pair<const char*, const char*> kRenames[] = {
      {"model.language_model.", "language_model.model."},
      {"model.vision_tower.", "vision_tower."},
      {"model.multi_modal_projector.", "multi_modal_projector."},
  };
  for (const auto& [from, to] : kRenames) {
    if (StartsWith(name, from)) return to + name.substr(std::string(from).size());
  }
  if (name == "lm_head.weight") return "language_model.lm_head.weight";
  return name;
}

StatusOr<LlavaWeights> LoadLlavaWeights(const WeightStore& store, const LlavaConfig& config,
                                        at::ScalarType dtype) {
  // Canonical name -> checkpoint view.
  std::map<std::string, const TensorView*> by_canonical;
  for (const std::string& name : store.Names()) {
    by_canonical[CanonicalTensorName(name)] = store.Find(name);
  }
  LlavaWeights w;
  ResizeLlavaWeights(config, &w);
  std::set<std::string> known;
  Status status;
  ForEachLlavaTensor(config, &w, [&](const std::string& name, const std::vector<int64_t>& shape,
                                     at::Tensor* slot, InitKind) {
    known.insert(name);
    if (!status.ok()) return;
    auto it = by_canonical.find(name);
    if (it == by_canonical.end()) {
      if (slot == nullptr) return;  // unused by the runtime: may be absent
      status = DataLoss("checkpoint is missing tensor '" + name + "' (expected shape " +
                        ShapeString(shape) + ")");
      return;
    }
    const TensorView& view = *it->second;
    if (view.shape != shape) {
      status = DataLoss(*view.file + ": tensor '" + view.name + "' has shape " +
                        ShapeString(view.shape) + " but config.json implies " +
                        ShapeString(shape));
      return;
    }
    if (slot == nullptr) return;
    if (view.dtype != SafetensorsDType::kF32 && view.dtype != SafetensorsDType::kF16 &&
        view.dtype != SafetensorsDType::kBF16) {
      status = InvalidArgument(*view.file + ": tensor '" + view.name + "' has dtype " +
                               SafetensorsDTypeName(view.dtype) +
                               " (only F32, F16 and BF16 are supported)");
      return;
    }
    // The mapping is read-only and may be unaligned: copy the bytes into an owned tensor first.
    at::Tensor raw = at::empty(shape, at::TensorOptions().dtype(ToScalarType(view.dtype)));
    std::memcpy(raw.data_ptr(), view.data, view.nbytes);
    *slot = raw.to(dtype);
  });
  VTW_RETURN_IF_ERROR(status);
  if (config.text.tie_word_embeddings) w.text.lm_head = w.text.embed_tokens;
  std::vector<std::string> unexpected;
  for (const auto& [name, view] : by_canonical) {
    if (known.count(name)) continue;
    if (name.find("rotary_emb.inv_freq") != std::string::npos) continue;  // old buffers
    if (name.find("position_ids") != std::string::npos) continue;
    unexpected.push_back(*view->file + ": " + view->name);
  }
  if (!unexpected.empty()) {
    std::string list;
    for (size_t i = 0; i < unexpected.size() && i < 5; ++i) list += "\n  " + unexpected[i];
    return DataLoss("checkpoint has " + std::to_string(unexpected.size()) +
                    " tensor(s) the model does not know (wrong architecture?):" + list);
  }
  return w;
}

LlavaWeights RandomLlavaWeights(const LlavaConfig& config, at::ScalarType dtype, uint64_t seed,
                                double init_std) {
  LlavaWeights w;
  ResizeLlavaWeights(config, &w);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  ForEachLlavaTensor(config, &w, [&](const std::string&, const std::vector<int64_t>& shape,
                                     at::Tensor* slot, InitKind init) {
    if (slot == nullptr) return;
    switch (init) {
      case InitKind::kNormal:
        *slot = at::empty(shape, at::kFloat).normal_(0.0, init_std, gen).to(dtype);
        break;
      case InitKind::kOnes: *slot = at::ones(shape, at::TensorOptions().dtype(dtype)); break;
      case InitKind::kZeros: *slot = at::zeros(shape, at::TensorOptions().dtype(dtype)); break;
    }
  });
  if (config.text.tie_word_embeddings) w.text.lm_head = w.text.embed_tokens;
  return w;
}

int64_t LlavaWeightsBytes(const LlavaConfig& config, LlavaWeights& weights) {
  int64_t bytes = 0;
  ForEachLlavaTensor(config, &weights, [&](const std::string&, const std::vector<int64_t>&,
                                           at::Tensor* slot, InitKind) {
    if (slot != nullptr && slot->defined()) bytes += slot->numel() * slot->element_size();
  });
  return bytes;
}

}  // namespace vtw
