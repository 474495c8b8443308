// CalibrateVqa: the VTW paper's "find K" on a JSON-lines set: mean KL(p_vtw(K) || p_full) of
// the next-token distribution at the last prompt position over the first N samples (or the
// first N of each question type), for every K in 0..num_layers; K = the first layer whose mean
// KL <= eta (vtw/calibration.h has the arithmetic). Single-threaded; reads the model only.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "eval/vqa_dataset.h"
#include "model/status.h"
#include "server/model_bundle.h"
#include "vtw/vtw_settings.h"

namespace vtw::tools {

struct CalibrateOptions {
  int samples = 20;               // first N lines, or first N per type with by_type
  std::vector<double> etas = {0.003};
  bool by_type = false;
  bool progress = true;
};

struct KlSummary {
  int num_samples = 0;
  std::vector<double> mean_kl;  // per K = 0..num_layers
  std::vector<int> picked;      // per eta: the first K with mean KL <= eta
};

struct CalibrationResult {
  int num_layers = 0;
  std::vector<double> etas;
  std::vector<VqaExample> samples;         // the samples used, in order
  std::vector<std::vector<double>> kl;     // kl[i][k]
  KlSummary overall;
  std::map<std::string, KlSummary> by_type;  // filled with by_type
};

// Runs the calibration. Errors: samples < 1 or no eta (InvalidArgument), an eta < 0, a sample
// without an image (naming its line), image or prompt errors.
StatusOr<CalibrationResult> CalibrateVqa(const ModelBundle& bundle,
                                         const std::vector<VqaExample>& examples,
                                         const CalibrateOptions& options);

// The settings `--write` stores: default K at the first eta, per-type profiles at the first eta
// (by_type only), eta, number of samples.
VtwSettings CalibrationSettings(const CalibrationResult& r);
nlohmann::json CalibrationResultJson(const CalibrationResult& r);
std::string CalibrationResultTable(const CalibrationResult& r);

}  // namespace vtw::tools
