// Calibration of the withdrawal layer K ("find K", VTW paper): on a few samples, compare the
// next-token distribution at the last prompt position of the full model with the model that
// withdraws image tokens at each K; mean KL(p_vtw || p_full) per K; K = the first layer whose
// mean KL <= eta. Single-threaded; reads the model only.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "model/llava_model.h"
#include "model/prompt_layout.h"

namespace vtw {

// KL(p || q) = sum p * (log p - log q) with p = softmax(logits_p), q = softmax(logits_q),
// computed in float64. Inputs: [V] logits.
double KlDivergence(const at::Tensor& logits_p, const at::Tensor& logits_q);

// Last-prompt-position logits ([V] fp32) of `layout` with withdrawal at `withdraw_layer`.
at::Tensor PrefillLastLogits(const LlavaModel& model, const PromptLayout& layout,
                             const at::Tensor& image_features, int withdraw_layer);

struct CalibrationSample {
  PromptLayout layout;
  at::Tensor image_features;  // [num_image_tokens, Ht]
  std::string type;           // question type (for per-type profiles)
};

// kl[i][k] = KL(p_vtw(K = k) || p_full) for sample i and every k in 0..num_layers.
// `progress(done, total)` is called after each sample when given.
std::vector<std::vector<double>> ComputeKlTable(
    const LlavaModel& model, const std::vector<CalibrationSample>& samples,
    const std::function<void(size_t, size_t)>& progress = {});

// Mean over samples per K.
std::vector<double> MeanKl(const std::vector<std::vector<double>>& kl_table);

// The first K whose mean KL <= eta (num_layers when none but the last is).
int PickWithdrawLayer(const std::vector<double>& mean_kl, double eta);

}  // namespace vtw
