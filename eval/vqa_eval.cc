#include "eval/vqa_eval.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <set>
#include <sstream>

#include <ATen/ATen.h>

#include "eval/blocked_generation.h"
#include "eval/format.h"
#include "eval/image_features.h"
#include "eval/progress_bar.h"
#include "server/generator.h"
#include "vtw/calibration.h"
#include "vtw/withdrawal.h"

namespace vtw::tools {

const char* ImageModeName(ImageMode mode) {
  switch (mode) {
    case ImageMode::kWithdraw: return "withdraw";
    case ImageMode::kBlockTextToImage: return "block";
    case ImageMode::kBlank: return "blank";
  }
  return "?";
}

StatusOr<ImageMode> ParseImageMode(const std::string& name) {
  if (name == "withdraw") return ImageMode::kWithdraw;
  if (name == "block") return ImageMode::kBlockTextToImage;
  if (name == "blank") return ImageMode::kBlank;
  return InvalidArgument("--image-mode must be withdraw, block or blank, got '" + name + "'");
}

namespace {

// One question answered at one K (or with the text blocked from the image below K).
struct Answer {
  std::string text;
  at::Tensor first_logits;  // [V] fp32
  int64_t generated_tokens = 0;
  Flops prefill, total;     // total = vision + prefill + decode
};

StatusOr<Answer> AnswerQuestion(const ModelBundle& bundle, const ComputeModel& compute,
                                const PromptLayout& layout, const at::Tensor& features, int k,
                                const EvalOptions& options) {
  Answer a;
  if (options.mode == ImageMode::kBlockTextToImage) {
    VTW_ASSIGN_OR_RETURN(BlockedGeneration g,
                         GenerateBlocked(bundle, layout, features, k, options.max_new_tokens));
    a.text = g.text;
    a.first_logits = g.first_logits;
    a.generated_tokens = static_cast<int64_t>(g.token_ids.size());
    // The work is the full model's (blocking removes no rows).
    const int off = WithdrawalOff(compute.num_layers());
    a.prefill = compute.ChunkFlops(layout.kinds, 0, layout.size(), off, true);
    a.total = a.prefill;
    const int64_t vision = features.defined() ? compute.VisionFlops() : 0;
    a.total += Flops{vision, vision};
    for (size_t s = 1; s < g.token_ids.size(); ++s) {
      const int64_t cached_text = layout.num_text_tokens() + static_cast<int64_t>(s) - 1;
      a.total += compute.DecodeStepFlops(cached_text, layout.num_image_tokens, off);
    }
    return a;
  }
  GenerateOptions go;
  go.withdraw_layer = k;
  go.stop.max_new_tokens = options.max_new_tokens;
  go.stop.eos_id = bundle.tokenizer->eos_id();
  VTW_ASSIGN_OR_RETURN(GenerateResult g,
                       GenerateOne(*bundle.model, bundle.tokenizer.get(), layout, features, go));
  a.text = g.text;
  a.first_logits = g.first_logits;
  a.generated_tokens = static_cast<int64_t>(g.token_ids.size());
  a.prefill = g.prefill_flops;
  a.total = g.total_flops();
  return a;
}

// The layers to evaluate (one entry, -1, for the per-type run) and the index of the reference
// (the full model) among them, -1 when it is not evaluated.
std::pair<std::vector<int>, int> LayersToRun(const EvalOptions& options, int num_layers) {
  const std::vector<int> layers = options.layers.empty() ? std::vector<int>{-1} : options.layers;
  const int reference = options.mode == ImageMode::kBlockTextToImage ? 0 : num_layers;
  int ref_index = -1;
  for (size_t j = 0; j < layers.size(); ++j) {
    if (layers[j] == reference) ref_index = static_cast<int>(j);
  }
  return {layers, ref_index};
}

Status CheckEvalOptions(const std::vector<VqaExample>& examples, const EvalOptions& options,
                        int num_layers) {
  if (options.max_new_tokens < 1) return InvalidArgument("--max-new-tokens must be >= 1");
  for (int k : options.layers) VTW_RETURN_IF_ERROR(CheckWithdrawLayerRange(k, num_layers));
  for (const VqaExample& e : examples) {
    if (e.answer.empty()) {
      return InvalidArgument("line " + std::to_string(e.line) + ": no \"answer\" to score");
    }
  }
  return Status::Ok();
}

}  // namespace

StatusOr<EvalResult> EvaluateVqa(const ModelBundle& bundle, const std::vector<VqaExample>& examples,
                                 const EvalOptions& options) {
  const int num_layers = bundle.model->num_layers();
  VTW_RETURN_IF_ERROR(CheckEvalOptions(examples, options, num_layers));
  const auto [layers, ref_index] = LayersToRun(options, num_layers);
  const auto start = std::chrono::steady_clock::now();
  const ComputeModel compute(bundle.model->config(), c10::elementSize(bundle.model->dtype()));
  EvalResult result;
  result.num_layers = num_layers;
  result.mode = options.mode;
  result.num_examples = static_cast<int64_t>(examples.size());
  result.layers.resize(layers.size());
  std::vector<double> kl_sum(layers.size(), 0.0);
  for (size_t j = 0; j < layers.size(); ++j) result.layers[j].layer = layers[j];

  ImageFeatureCache features_cache(bundle);
  std::set<std::string> images;
  ProgressBar bar(std::string("eval (") + ImageModeName(options.mode) + ")", examples.size(),
                  options.progress);
  // Running accuracy shown: the full model's when it is among the layers, else the first.
  const int show = ref_index >= 0 ? ref_index : 0;
  std::string label = "acc ";
  if (layers.size() > 1) {
    label = options.mode == ImageMode::kBlockTextToImage
                ? "acc(block<" + std::to_string(layers[show]) + ") "
                : "acc(" + LayerName(layers[show], num_layers) + ") ";
  }
  for (size_t i = 0; i < examples.size(); ++i) {
    const VqaExample& e = examples[i];
    const std::string line = "line " + std::to_string(e.line) + ": ";
    auto layout = QuestionLayout(bundle, e.question, !e.image.empty(), options.max_new_tokens);
    if (!layout.ok()) return InvalidArgument(line + layout.status().message());
    at::Tensor features;
    if (!e.image.empty()) {
      images.insert(e.image);
      VTW_ASSIGN_OR_RETURN(features,
                           features_cache.Get(e.image, options.mode == ImageMode::kBlank));
    }
    const std::string want = NormalizeAnswer(e.answer);
    std::vector<at::Tensor> first(layers.size());
    for (size_t j = 0; j < layers.size(); ++j) {
      int k = layers[j];
      if (k < 0) {  // the per-type run
        auto it = options.per_type_layers.find(e.type);
        k = std::clamp(it != options.per_type_layers.end() ? it->second : options.default_layer, 0,
                       num_layers);
      }
      const auto t0 = std::chrono::steady_clock::now();
      auto answer = AnswerQuestion(bundle, compute, *layout, features, k, options);
      if (!answer.ok()) return InvalidArgument(line + answer.status().message());
      LayerEval& r = result.layers[j];
      r.seconds += SecondsSince(t0);
      first[j] = answer->first_logits;
      r.generated_tokens += answer->generated_tokens;
      r.prefill += answer->prefill;
      r.total += answer->total;
      const bool ok = NormalizeAnswer(answer->text) == want;
      ++r.count;
      r.correct += ok;
      TypeScore& ts = r.per_type[e.type];
      ++ts.count;
      ts.correct += ok;
      ts.prefill += answer->prefill;
    }
    for (size_t j = 0; ref_index >= 0 && j < layers.size(); ++j) {
      if (static_cast<int>(j) != ref_index) kl_sum[j] += KlDivergence(first[j], first[ref_index]);
    }
    bar.Update(i + 1, label + Format("%.1f%%", 100.0 * result.layers[show].accuracy()));
  }
  if (ref_index >= 0 && !examples.empty()) {
    for (size_t j = 0; j < layers.size(); ++j) {
      result.layers[j].mean_kl = kl_sum[j] / static_cast<double>(examples.size());
    }
  }
  result.num_images = static_cast<int64_t>(images.size());
  result.encode_seconds = features_cache.seconds();
  result.total_seconds = SecondsSince(start);
  bar.Finish(label + Format("%.1f%%", 100.0 * result.layers[show].accuracy()));
  return result;
}

nlohmann::json LayerEvalJson(const LayerEval& r, int num_layers, ImageMode mode) {
  nlohmann::json per_type = nlohmann::json::object();
  for (const auto& [type, s] : r.per_type) {
    per_type[type] = {{"count", s.count},
                      {"correct", s.correct},
                      {"accuracy", s.accuracy()},
                      {"mean_prefill_flops", Mean(s.prefill.flops, s.count)},
                      {"mean_prefill_flops_without_vtw", Mean(s.prefill.flops_without_vtw, s.count)},
                      {"prefill_flops_saved_pct", Pct(s.prefill.saved(), s.prefill.flops_without_vtw)}};
  }
  nlohmann::json j = {
      {"vtw_layer", r.layer < 0 ? nlohmann::json("by-type")
                    : (r.layer >= num_layers || mode == ImageMode::kBlockTextToImage)
                        ? nlohmann::json()
                        : nlohmann::json(r.layer)},
      {"layer", r.layer < 0 ? nlohmann::json() : nlohmann::json(std::min(r.layer, num_layers))},
      {"count", r.count},
      {"correct", r.correct},
      {"accuracy", r.accuracy()},
      {"per_type", per_type},
      {"mean_prefill_flops", Mean(r.prefill.flops, r.count)},
      {"mean_prefill_flops_without_vtw", Mean(r.prefill.flops_without_vtw, r.count)},
      {"prefill_flops_saved_pct", Pct(r.prefill.saved(), r.prefill.flops_without_vtw)},
      {"mean_flops", Mean(r.total.flops, r.count)},
      {"mean_flops_without_vtw", Mean(r.total.flops_without_vtw, r.count)},
      {"flops_saved_pct", Pct(r.total.saved(), r.total.flops_without_vtw)},
      {"mean_generated_tokens", Mean(r.generated_tokens, r.count)},
      {"mean_kl", r.mean_kl ? nlohmann::json(*r.mean_kl) : nlohmann::json()},
      {"seconds", r.seconds},
      {"seconds_per_example", r.count ? r.seconds / r.count : 0.0},
  };
  if (mode == ImageMode::kBlockTextToImage) j["block_layers"] = r.layer;
  return j;
}

nlohmann::json EvalResultJson(const EvalResult& r) {
  nlohmann::json layers = nlohmann::json::array();
  for (const LayerEval& l : r.layers) layers.push_back(LayerEvalJson(l, r.num_layers, r.mode));
  return {{"mode", ImageModeName(r.mode)},
          {"num_layers", r.num_layers},
          {"num_examples", r.num_examples},
          {"num_images", r.num_images},
          {"encode_seconds", r.encode_seconds},
          {"total_seconds", r.total_seconds},
          {"results", layers}};
}

std::string EvalResultTable(const EvalResult& r) {
  std::set<std::string> types;
  for (const LayerEval& l : r.layers) {
    for (const auto& [t, s] : l.per_type) types.insert(t);
  }
  std::ostringstream os;
  char buf[256];
  std::snprintf(buf, sizeof buf, "%-8s %6s %7s",
                r.mode == ImageMode::kBlockTextToImage ? "blocked" : "K", "n", "acc%");
  os << buf;
  for (const std::string& t : types) {
    std::snprintf(buf, sizeof buf, " %11.11s", t.c_str());
    os << buf;
  }
  std::snprintf(buf, sizeof buf, " %13s %8s %11s %8s %9s\n", "prefill GFLOP", "saved%",
                "total saved", "mean KL", "s/ex");
  os << buf;
  for (const LayerEval& l : r.layers) {
    const std::string name = r.mode == ImageMode::kBlockTextToImage
                                 ? "<" + std::to_string(l.layer)
                                 : LayerName(l.layer, r.num_layers);
    std::snprintf(buf, sizeof buf, "%-8s %6lld %7.2f", name.c_str(),
                  static_cast<long long>(l.count), 100.0 * l.accuracy());
    os << buf;
    for (const std::string& t : types) {
      auto it = l.per_type.find(t);
      if (it == l.per_type.end()) {
        std::snprintf(buf, sizeof buf, " %11s", "-");
      } else {
        std::snprintf(buf, sizeof buf, " %11.2f", 100.0 * it->second.accuracy());
      }
      os << buf;
    }
    std::snprintf(buf, sizeof buf, " %13.4f %8.2f %10.2f%% %8s %9.4f\n",
                  Mean(l.prefill.flops, l.count) / 1e9,
                  Pct(l.prefill.saved(), l.prefill.flops_without_vtw),
                  Pct(l.total.saved(), l.total.flops_without_vtw),
                  l.mean_kl ? Format("%.2e", *l.mean_kl).c_str() : "-",
                  l.count ? l.seconds / l.count : 0.0);
    os << buf;
  }
  std::snprintf(buf, sizeof buf,
                "%lld examples, %lld images (mode %s); image encoding %.2f s, total %.2f s\n",
                static_cast<long long>(r.num_examples), static_cast<long long>(r.num_images),
                ImageModeName(r.mode), r.encode_seconds, r.total_seconds);
  os << buf;
  if (r.mode == ImageMode::kBlockTextToImage) {
    os << "blocked <K: the text cannot attend to the image tokens in layers < K (they stay "
          "present); FLOPs are the full model's\n";
  }
  return os.str();
}

}  // namespace vtw::tools
