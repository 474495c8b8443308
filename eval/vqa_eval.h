// Visual question answering evaluation and VTW studies on a JSON-lines dataset: the shared logic
// behind `vtw eval`, `vtw calibrate` and `vtw study` (and the report script that runs them).
//
// Dataset: one JSON object per line, {"image", "question", "answer", "type"} (shapes/
// shapes_dataset.h writes it); "image" is a path relative to the JSON-lines file's directory (or
// absolute); "answer" is needed by evaluation only; "type" names the question type (task
// profile) and defaults to "unknown". Blank lines are skipped.
//
// Evaluation runs every question greedily through the chat template with image tokens handled
// in one of three ways (ImageMode), at one or many withdrawal layers K, and scores the first word
// of the generated text (lowercased, punctuation removed) against the answer. Image features
// are computed once per image file and reused for every question and every K.
//
// Calibration is the VTW paper's "find K": mean KL(p_vtw(K) || p_full) at the last prompt
// position over the first N samples (or the first N of each question type), for every K in
// 0..num_layers; K = the first layer whose mean KL <= eta.
//
// Everything here is single-threaded (LibTorch's intra-op threads aside) and reads the model only.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include "model/prompt_layout.h"
#include "model/status.h"
#include "server/model_bundle.h"
#include "vtw/compute_model.h"
#include "vtw/vtw_settings.h"

namespace vtw::tools {

// ---------------------------------------------------------------------------------------------
// Dataset

struct VqaExample {
  std::string image;     // resolved path (relative entries joined to the jsonl's directory);
                         // empty: a text-only question
  std::string question;
  std::string answer;    // may be empty when the file has none (calibration needs none)
  std::string type;      // "unknown" when the line has none
  int line = 0;          // 1-based line number in the file
};

// Reads a JSON-lines dataset. Errors name the file and, for a bad line, the line number:
// NotFound for a missing file or a missing image file; InvalidArgument for a malformed line,
// a line that is not an object, a missing or non-string "question", or a non-string field; an
// empty dataset is InvalidArgument too.
StatusOr<std::vector<VqaExample>> LoadVqaJsonl(const std::string& path);

// The first `n` examples in file order; with `per_type`, the first `n` of every question type
// (still in file order). n must be >= 1.
std::vector<VqaExample> SelectFirst(const std::vector<VqaExample>& examples, int n, bool per_type);

// The prediction scored against the answer: the first whitespace-separated word of `text`,
// lowercased, with ASCII punctuation removed ("  Red." -> "red"; "" when there is none).
std::string NormalizeAnswer(const std::string& text);

// ---------------------------------------------------------------------------------------------
// Prompts and image features

// The layout of `question` wrapped in the LLaVA chat template, with or without an image, exactly
// as PreparePrompt builds it (same errors), leaving room for `max_new_tokens`.
StatusOr<PromptLayout> QuestionLayout(const ModelBundle& bundle, const std::string& question,
                                      bool has_image, int max_new_tokens);

// Projected image features ([num_image_tokens, Ht], model dtype) per image file, computed once.
// With `blank`, the features of a "blanked" copy of the image: same size, every pixel set to the
// per-channel median of the image's border pixels (the background in the shapes dataset, where
// shapes never touch the border). Holds at most `capacity` images (then starts over).
class ImageFeatureCache {
 public:
  explicit ImageFeatureCache(const ModelBundle& bundle, size_t capacity = 4096)
      : bundle_(bundle), capacity_(capacity) {}
  StatusOr<at::Tensor> Get(const std::string& path, bool blank = false);
  size_t misses() const { return misses_; }
  double seconds() const { return seconds_; }  // time spent decoding and encoding images

 private:
  const ModelBundle& bundle_;
  size_t capacity_;
  std::unordered_map<std::string, at::Tensor> cache_;
  size_t misses_ = 0;
  double seconds_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Progress on stderr: "label [#####.....] 120/600 acc 93.3% 12.1 s, ETA 48 s". Redrawn in place
// (at most 10 times a second) when stderr is a terminal, else one line per 10% and at the end.

class ProgressBar {
 public:
  ProgressBar(std::string label, size_t total, bool enabled = true);
  // `extra` is appended (e.g. "acc 93.3%").
  void Update(size_t done, const std::string& extra = "");
  void Finish(const std::string& extra = "");

 private:
  void Draw(size_t done, const std::string& extra, bool final_line);
  std::string label_;
  size_t total_;
  bool enabled_, tty_;
  std::chrono::steady_clock::time_point start_, last_draw_;
  int last_decile_ = -1;
  bool finished_ = false;
};

// ---------------------------------------------------------------------------------------------
// Evaluation

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

// Greedy generation with text->image attention blocked in layers < `block_layers` (the
// kBlockTextToImage mode): prefill of the rows up to the end of the image with a KV cache, a
// second cache whose layers < block_layers hold no image entries, then the text rows and the
// generated tokens on it. Stops at EOS (not included in the text) or after max_new_tokens.
struct BlockedGeneration {
  std::vector<int32_t> token_ids;
  std::string text;
  at::Tensor first_logits;  // [V] fp32, last prompt position
};
StatusOr<BlockedGeneration> GenerateBlocked(const ModelBundle& bundle, const PromptLayout& layout,
                                            const at::Tensor& image_features, int block_layers,
                                            int max_new_tokens);

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

// ---------------------------------------------------------------------------------------------
// Calibration ("find K")

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

// ---------------------------------------------------------------------------------------------
// Attention-sink study: where the last prompt token's attention goes, per decoder layer, in the
// full model (no withdrawal), averaged over heads and samples.

struct AttentionLayerStats {
  // Mass (sums to 1): the BOS token, other text before the image, the image tokens, the text
  // after the image except the last token, the last token itself.
  double bos = 0, prefix_text = 0, image = 0, question_text = 0, self = 0;
  // Mass per token: image mass / image tokens and text mass / text keys (all text incl. BOS).
  double image_per_token = 0, text_per_token = 0;
};

struct AttentionStudy {
  int num_samples = 0;
  int64_t mean_image_tokens = 0;
  double mean_text_tokens = 0;
  std::vector<AttentionLayerStats> layers;  // per decoder layer
};

// Uses the first `samples` examples that have an image.
StatusOr<AttentionStudy> StudyAttention(const ModelBundle& bundle,
                                        const std::vector<VqaExample>& examples, int samples,
                                        bool progress = true);
nlohmann::json AttentionStudyJson(const AttentionStudy& s);
std::string AttentionStudyTable(const AttentionStudy& s);

}  // namespace vtw::tools
