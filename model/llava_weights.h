// LlavaWeights: every tensor of a LLaVA model (CLIP tower, projector, Llama decoder) as LibTorch
// tensors in one dtype, plus loading from an HF checkpoint, random initialisation and the one
// list of tensor names and shapes (ForEachLlavaTensor) that loading, saving and training share.
// Thread-compatible: tensors are read-only during inference.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "model/llava_config.h"
#include "model/safetensors.h"
#include "model/status.h"

namespace vtw {

struct LinearWeights {
  at::Tensor weight;  // [out, in]
  at::Tensor bias;    // [out], undefined when the layer has no bias
};

struct LayerNormWeights {
  at::Tensor weight;  // [hidden]
  at::Tensor bias;    // [hidden]
};

struct ClipLayerWeights {
  LayerNormWeights layer_norm1, layer_norm2;
  LinearWeights q_proj, k_proj, v_proj, out_proj, fc1, fc2;
};

struct ClipWeights {
  at::Tensor patch_embedding;     // [Hv, C, p, p], no bias
  at::Tensor class_embedding;     // [Hv]
  at::Tensor position_embedding;  // [num_patches + 1, Hv]
  LayerNormWeights pre_layrnorm;
  std::vector<ClipLayerWeights> layers;  // only the layers the feature layer needs
};

struct ProjectorWeights {
  LinearWeights linear_1;  // [Ht, Hv]
  LinearWeights linear_2;  // [Ht, Ht]
};

struct LlamaLayerWeights {
  at::Tensor input_layernorm;           // [Ht]
  at::Tensor post_attention_layernorm;  // [Ht]
  LinearWeights q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
};

struct LlamaWeights {
  at::Tensor embed_tokens;  // [V, Ht]
  std::vector<LlamaLayerWeights> layers;
  at::Tensor norm;     // [Ht]
  at::Tensor lm_head;  // [V, Ht]; the same tensor as embed_tokens when tied
};

struct LlavaWeights {
  ClipWeights vision;
  ProjectorWeights projector;
  LlamaWeights text;
};

// How a tensor is initialised when not loaded: normal(0, std), ones, or zeros.
enum class InitKind { kNormal, kOnes, kZeros };

// Calls fn(name, shape, slot, init) for every tensor of the canonical (llava-hf, pre-4.52)
// naming: `vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`,
// `language_model.lm_head.weight`. `slot` is nullptr for tensors a checkpoint holds that the
// runtime never uses (vision layers past the feature layer, post_layernorm, a tied lm_head).
// `weights` must have its layer vectors sized (ResizeLlavaWeights).
using TensorVisitor = std::function<void(const std::string& name,
                                         const std::vector<int64_t>& shape,
                                         at::Tensor* slot, InitKind init)>;
void ForEachLlavaTensor(const LlavaConfig& config, LlavaWeights* weights,
                        const TensorVisitor& fn);

// Sizes the layer vectors of `weights` for `config`.
void ResizeLlavaWeights(const LlavaConfig& config, LlavaWeights* weights);

// Maps a checkpoint tensor name in either llava-hf scheme (old `language_model.model.*`, or
// transformers >= 4.52 `model.language_model.*` / `model.vision_tower.*` /
// `model.multi_modal_projector.*` / `lm_head.weight`) to the canonical name.
std::string CanonicalTensorName(const std::string& name);

// Loads every tensor the runtime needs from `store`, converted to `dtype` (kFloat or kBFloat16).
// Errors name the file and tensor: a missing tensor, a shape different from the config's, an
// unsupported element type, or tensors the model does not know (unexpected).
StatusOr<LlavaWeights> LoadLlavaWeights(const WeightStore& store, const LlavaConfig& config,
                                        at::ScalarType dtype);

// Random weights for `config` (normal(0, init_std) matrices, unit norms, zero biases), drawn
// from a generator seeded with `seed`: the same seed gives the same weights.
LlavaWeights RandomLlavaWeights(const LlavaConfig& config, at::ScalarType dtype, uint64_t seed,
                                double init_std = 0.02);

// Bytes held by the weights the runtime uses.
int64_t LlavaWeightsBytes(const LlavaConfig& config, LlavaWeights& weights);

}  // namespace vtw
