#include "vtw/calibration.h"

#include <ATen/ATen.h>

namespace vtw {

double KlDivergence(const at::Tensor& logits_p, const at::Tensor& logits_q) {
  at::Tensor lp = at::log_softmax(logits_p.to(at::kDouble), -1);
  at::Tensor lq = at::log_softmax(logits_q.to(at::kDouble), -1);
  return (lp.exp() * (lp - lq)).sum().item<double>();
}

at::Tensor PrefillLastLogits(const LlavaModel& model, const PromptLayout& layout,
                             const at::Tensor& image_features, int withdraw_layer) {
  ForwardBatch batch;
  batch.AppendRows(layout.token_ids, layout.kinds, 0, layout.size());
  if (layout.num_image_tokens > 0) batch.image_embeds = image_features;
  batch.seqs.push_back({nullptr, static_cast<int>(layout.size()), withdraw_layer, true});
  return model.Forward(batch).logits[0];
}

std::vector<std::vector<double>> ComputeKlTable(
    const LlavaModel& model, const std::vector<CalibrationSample>& samples,
    const std::function<void(size_t, size_t)>& progress) {
  const int num_layers = model.num_layers();
  std::vector<std::vector<double>> table;
  table.reserve(samples.size());
  for (size_t i = 0; i < samples.size(); ++i) {
    const CalibrationSample& s = samples[i];
    at::Tensor full = PrefillLastLogits(model, s.layout, s.image_features, num_layers);
    std::vector<double> row(num_layers + 1, 0.0);
    for (int k = 0; k < num_layers; ++k) {
      row[k] = KlDivergence(PrefillLastLogits(model, s.layout, s.image_features, k), full);
    }
    table.push_back(std::move(row));
    if (progress) progress(i + 1, samples.size());
  }
  return table;
}

std::vector<double> MeanKl(const std::vector<std::vector<double>>& kl_table) {
  if (kl_table.empty()) return {};
  std::vector<double> mean(kl_table[0].size(), 0.0);
  for (const auto& row : kl_table) {
    for (size_t k = 0; k < row.size(); ++k) mean[k] += row[k];
  }
  for (double& m : mean) m /= static_cast<double>(kl_table.size());
  return mean;
}

int PickWithdrawLayer(const std::vector<double>& mean_kl, double eta) {
  for (size_t k = 0; k < mean_kl.size(); ++k) {
    if (mean_kl[k] <= eta) return static_cast<int>(k);
  }
  return static_cast<int>(mean_kl.size()) - 1;
}

}  // namespace vtw
