// EvaluateVqa: accuracy per question type and FLOPs (done and saved by VTW) of the model on a
// JSON-lines VQA set (eval/vqa_dataset.h), at one or many withdrawal layers K: the logic behind
// `vtw eval`. Every question runs greedily through the chat template with the image tokens
// handled in one of three ways (ImageMode); the first word of the generated text (lowercased,
// punctuation removed) is scored against the answer. Image features are computed once per image
// file and reused for every question and every K. Calibration is eval/calibrate.h, the
// attention study eval/attention_study.h.
// Single-threaded (LibTorch's intra-op threads aside); reads the model only.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "eval/vqa_dataset.h"
#include "model/status.h"
#include "server/model_bundle.h"
#include "vtw/compute_model.h"

namespace vtw::tools {

enum class ImageMode {
  // Image tokens withdrawn before layer K (VTW); K = num_layers: the full model.
  kWithdraw,
  // The information-migration check: the image tokens stay at every layer, but in layers < K the
  // text tokens (question and generated tokens) cannot attend to them; from layer K on they can.
  // K = 0: the full model; K = num_layers: text never sees the image (as withdrawal at K = 0).
  kBlockTextToImage,
  // The image replaced by a blank (background-only) image (see ImageFeatureCache), withdrawn at K.
  kBlank,
};
const char* ImageModeName(ImageMode mode);  // "withdraw", "block", "blank"
StatusOr<ImageMode> ParseImageMode(const std::string& name);

struct EvalOptions {
  // Layers to evaluate; each entry is K (num_layers = off). Empty: use per-example layers from
  // `per_type_layers` / `default_layer` (one result, labelled "by-type").
  std::vector<int> layers;
  std::map<std::string, int> per_type_layers;  // used only when `layers` is empty
  int default_layer = 0;                       // used only when `layers` is empty
  ImageMode mode = ImageMode::kWithdraw;
  int max_new_tokens = 4;
  bool progress = true;
};

struct TypeScore {
  int64_t count = 0, correct = 0;
  Flops prefill;  // sum over the type's examples
  double accuracy() const { return count ? static_cast<double>(correct) / count : 0.0; }
};

struct LayerEval {
  int layer = 0;                  // K (num_layers = off); -1 for the per-type ("by-type") run
  int64_t count = 0, correct = 0;
  std::map<std::string, TypeScore> per_type;
  Flops prefill, total;           // sums; total = vision + prefill + decode
  int64_t generated_tokens = 0;
  // Mean KL(p(K) || p(off)) of the first generated step's distribution: set only when the
  // layers evaluated include num_layers (the reference).
  std::optional<double> mean_kl;
  double seconds = 0;             // generation time at this K (image encoding excluded)
  double accuracy() const { return count ? static_cast<double>(correct) / count : 0.0; }
};

struct EvalResult {
  int num_layers = 0;
  ImageMode mode = ImageMode::kWithdraw;
  int64_t num_examples = 0, num_images = 0;
  double encode_seconds = 0, total_seconds = 0;
  std::vector<LayerEval> layers;
};

// Evaluates `examples` (every one needs an answer). Errors: an example without an answer
// (naming its line), image or prompt errors (naming the image / line), a layer outside
// [0, num_layers].
StatusOr<EvalResult> EvaluateVqa(const ModelBundle& bundle, const std::vector<VqaExample>& examples,
                                 const EvalOptions& options);

nlohmann::json LayerEvalJson(const LayerEval& r, int num_layers, ImageMode mode);
nlohmann::json EvalResultJson(const EvalResult& r);
// A fixed-width table: K, accuracy, per-type accuracy, prefill GFLOP, saved %, KL, seconds.
std::string EvalResultTable(const EvalResult& r);

}  // namespace vtw::tools
