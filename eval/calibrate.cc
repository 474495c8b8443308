#include "eval/calibrate.h"

#include <cmath>
#include <cstdio>
#include <sstream>

#include "eval/format.h"
#include "eval/image_features.h"
#include "eval/progress_bar.h"
#include "vtw/calibration.h"
#include "vtw/withdrawal.h"

namespace vtw::tools {

StatusOr<CalibrationResult> CalibrateVqa(const ModelBundle& bundle,
                                         const std::vector<VqaExample>& examples,
                                         const CalibrateOptions& options) {
  if (options.samples < 1) {
    return InvalidArgument("--samples must be >= 1, got " + std::to_string(options.samples));
  }
  if (options.etas.empty()) return InvalidArgument("give at least one --eta");
  for (double eta : options.etas) {
    if (!(eta >= 0) || !std::isfinite(eta)) {
      return InvalidArgument("--eta must be a finite number >= 0, got " + Format("%g", eta));
    }
  }
  const LlavaModel& model = *bundle.model;
  const int num_layers = model.num_layers();
  CalibrationResult result;
  result.num_layers = num_layers;
  result.etas = options.etas;
  result.samples = SelectFirst(examples, options.samples, options.by_type);
  if (result.samples.empty()) return InvalidArgument("no calibration samples");

  ImageFeatureCache cache(bundle);
  std::vector<CalibrationSample> samples;
  samples.reserve(result.samples.size());
  for (const VqaExample& e : result.samples) {
    if (e.image.empty()) {
      return InvalidArgument("line " + std::to_string(e.line) +
                             ": calibration needs an image in every sample");
    }
    auto layout = QuestionLayout(bundle, e.question, true, 1);
    if (!layout.ok()) {
      return InvalidArgument("line " + std::to_string(e.line) + ": " + layout.status().message());
    }
    VTW_RETURN_IF_ERROR(CheckWithdrawLayer(*layout, 0, num_layers));
    VTW_ASSIGN_OR_RETURN(at::Tensor features, cache.Get(e.image));
    samples.push_back({*layout, features, e.type});
  }
  ProgressBar bar("calibrate", samples.size(), options.progress);
  result.kl = ComputeKlTable(model, samples, [&](size_t done, size_t) { bar.Update(done); });
  bar.Finish();

  auto summarize = [&](const std::vector<std::vector<double>>& rows) {
    KlSummary s;
    s.num_samples = static_cast<int>(rows.size());
    s.mean_kl = MeanKl(rows);
    for (double eta : options.etas) s.picked.push_back(PickWithdrawLayer(s.mean_kl, eta));
    return s;
  };
  result.overall = summarize(result.kl);
  if (options.by_type) {
    std::map<std::string, std::vector<std::vector<double>>> rows;
    for (size_t i = 0; i < samples.size(); ++i) rows[samples[i].type].push_back(result.kl[i]);
    for (const auto& [type, r] : rows) result.by_type[type] = summarize(r);
  }
  return result;
}

VtwSettings CalibrationSettings(const CalibrationResult& r) {
  VtwSettings s;
  s.default_layer = r.overall.picked.at(0);
  for (const auto& [type, summary] : r.by_type) s.profiles[type] = summary.picked.at(0);
  s.eta = r.etas.at(0);
  s.num_samples = r.overall.num_samples;
  return s;
}

nlohmann::json CalibrationResultJson(const CalibrationResult& r) {
  auto summary = [&](const KlSummary& s) {
    nlohmann::json picked = nlohmann::json::array();
    for (size_t i = 0; i < r.etas.size(); ++i) {
      picked.push_back({{"eta", r.etas[i]},
                        {"layer", s.picked[i]},
                        {"vtw_off", s.picked[i] >= r.num_layers}});
    }
    return nlohmann::json{{"num_samples", s.num_samples}, {"mean_kl", s.mean_kl},
                          {"picked", picked}};
  };
  nlohmann::json samples = nlohmann::json::array();
  for (size_t i = 0; i < r.samples.size(); ++i) {
    samples.push_back({{"line", r.samples[i].line},
                       {"type", r.samples[i].type},
                       {"question", r.samples[i].question},
                       {"kl", r.kl[i]}});
  }
  nlohmann::json j = summary(r.overall);
  j["num_layers"] = r.num_layers;
  j["etas"] = r.etas;
  j["samples"] = samples;
  if (!r.by_type.empty()) {
    nlohmann::json bt = nlohmann::json::object();
    for (const auto& [type, s] : r.by_type) bt[type] = summary(s);
    j["by_type"] = bt;
  }
  return j;
}

std::string CalibrationResultTable(const CalibrationResult& r) {
  std::ostringstream os;
  char buf[256];
  std::snprintf(buf, sizeof buf, "%-4s %13s", "K", "mean KL");
  os << buf;
  for (const auto& [type, s] : r.by_type) {
    std::snprintf(buf, sizeof buf, " %13.13s", type.c_str());
    os << buf;
  }
  os << "\n";
  for (int k = 0; k <= r.num_layers; ++k) {
    std::snprintf(buf, sizeof buf, "%-4s %13.6e", k == r.num_layers ? "off" : std::to_string(k).c_str(),
                  r.overall.mean_kl[k]);
    os << buf;
    for (const auto& [type, s] : r.by_type) {
      std::snprintf(buf, sizeof buf, " %13.6e", s.mean_kl[k]);
      os << buf;
    }
    os << "\n";
  }
  auto name = [&](int k) {
    return k >= r.num_layers ? std::string("off (") + std::to_string(k) + ")" : std::to_string(k);
  };
  for (size_t i = 0; i < r.etas.size(); ++i) {
    os << "eta " << Format("%g", r.etas[i]) << ": K = " << name(r.overall.picked[i]);
    for (const auto& [type, s] : r.by_type) os << ", " << type << " " << name(s.picked[i]);
    os << "\n";
  }
  os << r.overall.num_samples << " samples, " << r.num_layers << " decoder layers\n";
  return os.str();
}

}  // namespace vtw::tools
