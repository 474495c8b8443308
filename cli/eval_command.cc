// `vtw eval`: accuracy and compute of a model on a JSON-lines VQA dataset, at one or every
// withdrawal layer K; and `vtw study`: the attention-sink statistics (where the last prompt
// token's attention goes, per layer). Logic in eval/vqa_eval.h.
#include <algorithm>
#include <iostream>
#include <memory>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/tool_common.h"
#include "eval/attention_study.h"
#include "eval/vqa_eval.h"
#include "server/model_bundle.h"

namespace vtw::tools {
namespace {

struct EvalFlags {
  std::string model_dir;
  std::string data;
  std::string vtw_layer = "auto";
  std::string image_mode = "withdraw";
  int limit = 0;
  int max_new_tokens = 4;
  bool json = false;
  bool no_progress = false;
  std::string dtype = "fp32";
  int threads = 0;
};

// "all", "by-type", or a comma-separated list of K / "off" / "auto".
StatusOr<EvalOptions> ParseLayers(const std::string& value, const ModelBundle& bundle,
                                  ImageMode mode) {
  const int num_layers = bundle.model->num_layers();
  EvalOptions options;
  options.mode = mode;
  if (value == "all") {
    for (int k = 0; k <= num_layers; ++k) options.layers.push_back(k);
    return options;
  }
  if (value == "by-type" || value == "profiles") {
    if (mode == ImageMode::kBlockTextToImage) {
      return InvalidArgument("--vtw-layer by-type applies to --image-mode withdraw or blank");
    }
    options.per_type_layers = bundle.vtw.profiles;
    options.default_layer = bundle.vtw.default_layer.value_or(num_layers);
    return options;
  }
  std::stringstream ss(value);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (mode == ImageMode::kBlockTextToImage && (item == "auto" || item == "default")) {
      return InvalidArgument("--image-mode block needs explicit layers (a number, a list, or all)");
    }
    if (mode == ImageMode::kBlockTextToImage && item == "off") {
      options.layers.push_back(0);  // no blocking: the full model
      continue;
    }
    VTW_ASSIGN_OR_RETURN(int k, ParseVtwLayerFlag(item, bundle.vtw, num_layers));
    if (std::find(options.layers.begin(), options.layers.end(), k) == options.layers.end()) {
      options.layers.push_back(k);
    }
  }
  if (options.layers.empty()) return InvalidArgument("--vtw-layer is empty");
  return options;
}

Status RunEval(const EvalFlags& f) {
  ConfigureThreads(f.threads);
  if (f.limit < 0) return InvalidArgument("--limit must be >= 0 (0 = all)");
  if (f.max_new_tokens < 1) return InvalidArgument("--max-new-tokens must be >= 1");
  VTW_ASSIGN_OR_RETURN(at::ScalarType dtype, ParseDType(f.dtype));
  VTW_ASSIGN_OR_RETURN(ImageMode mode, ParseImageMode(f.image_mode));
  VTW_ASSIGN_OR_RETURN(std::vector<VqaExample> examples, LoadVqaJsonl(f.data));
  if (f.limit > 0 && static_cast<int>(examples.size()) > f.limit) examples.resize(f.limit);
  const std::string model_dir = f.model_dir.empty() ? DefaultModelDir() : f.model_dir;
  VTW_ASSIGN_OR_RETURN(std::unique_ptr<ModelBundle> bundle, ModelBundle::Load(model_dir, dtype));
  VTW_ASSIGN_OR_RETURN(EvalOptions options, ParseLayers(f.vtw_layer, *bundle, mode));
  options.max_new_tokens = f.max_new_tokens;
  options.progress = !f.no_progress;
  VTW_ASSIGN_OR_RETURN(EvalResult result, EvaluateVqa(*bundle, examples, options));
  const int num_layers = bundle->model->num_layers();
  if (!f.json) {
    std::cout << EvalResultTable(result);
    std::cout << "model " << bundle->dir << " (" << DTypeName(dtype) << ", " << num_layers
              << " decoder layers, calibrated K "
              << (bundle->vtw.default_layer ? std::to_string(*bundle->vtw.default_layer)
                                            : std::string("none"))
              << "), data " << f.data << "\n";
    return Status::Ok();
  }
  nlohmann::json out = EvalResultJson(result);
  out["model"] = bundle->dir;
  out["data"] = f.data;
  out["dtype"] = DTypeName(dtype);
  out["vtw_layer_flag"] = f.vtw_layer;
  out["max_new_tokens"] = f.max_new_tokens;
  out["calibrated_layer"] =
      bundle->vtw.default_layer ? nlohmann::json(*bundle->vtw.default_layer) : nlohmann::json();
  out["num_image_tokens"] = bundle->model->config().num_image_tokens();
  if (result.layers.size() == 1) {
    // One K: its fields at the top level too.
    for (const auto& [key, value] : out["results"][0].items()) out[key] = value;
  }
  std::cout << out.dump() << std::endl;
  return Status::Ok();
}

struct StudyFlags {
  std::string model_dir;
  std::string data;
  int samples = 100;
  bool json = false;
  bool no_progress = false;
  std::string dtype = "fp32";
  int threads = 0;
};

Status RunStudy(const StudyFlags& f) {
  ConfigureThreads(f.threads);
  if (f.samples < 1) return InvalidArgument("--samples must be >= 1, got " + std::to_string(f.samples));
  VTW_ASSIGN_OR_RETURN(at::ScalarType dtype, ParseDType(f.dtype));
  VTW_ASSIGN_OR_RETURN(std::vector<VqaExample> examples, LoadVqaJsonl(f.data));
  const std::string model_dir = f.model_dir.empty() ? DefaultModelDir() : f.model_dir;
  VTW_ASSIGN_OR_RETURN(std::unique_ptr<ModelBundle> bundle, ModelBundle::Load(model_dir, dtype));
  VTW_ASSIGN_OR_RETURN(AttentionStudy study,
                       StudyAttention(*bundle, examples, f.samples, !f.no_progress));
  if (!f.json) {
    std::cout << AttentionStudyTable(study);
    return Status::Ok();
  }
  nlohmann::json out = AttentionStudyJson(study);
  out["model"] = bundle->dir;
  out["data"] = f.data;
  out["dtype"] = DTypeName(dtype);
  out["num_layers"] = bundle->model->num_layers();
  std::cout << out.dump() << std::endl;
  return Status::Ok();
}

void AddCommonFlags(CLI::App* cmd, std::string* model_dir, std::string* data, std::string* dtype,
                    int* threads, bool* json, bool* no_progress) {
  cmd->add_option("--model", *model_dir, "Model directory (default: the shipped model)");
  cmd->add_option("--data", *data,
                  "JSON-lines dataset: {\"image\", \"question\", \"answer\", \"type\"} per line")
      ->required();
  cmd->add_option("--dtype", *dtype, "fp32 or bf16")->capture_default_str();
  cmd->add_option("--threads", *threads, "CPU threads (0 = all cores)")->capture_default_str();
  cmd->add_flag("--json", *json, "Print one JSON object on stdout");
  cmd->add_flag("--no-progress", *no_progress, "No progress bar on stderr");
}

}  // namespace

void RegisterEvalCommand(CLI::App& app) {
  auto flags = std::make_shared<EvalFlags>();
  CLI::App* cmd = app.add_subcommand(
      "eval", "Accuracy (overall and per question type) and FLOPs on a VQA dataset");
  AddCommonFlags(cmd, &flags->model_dir, &flags->data, &flags->dtype, &flags->threads,
                 &flags->json, &flags->no_progress);
  cmd->add_option("--vtw-layer", flags->vtw_layer,
                  "Withdrawal layer K, 'off', 'auto' (the calibrated K), a list 'K1,K2,...', "
                  "'all' (every K from 0 to the layer count, images encoded once) or 'by-type' "
                  "(each question type at its calibrated profile)")
      ->capture_default_str();
  cmd->add_option("--image-mode", flags->image_mode,
                  "withdraw: image tokens withdrawn at K (VTW); block: image tokens kept but the "
                  "text cannot attend to them in layers < K (information-migration check); "
                  "blank: the image replaced by its background colour")
      ->capture_default_str();
  cmd->add_option("--limit", flags->limit, "Evaluate the first N examples only (0 = all)")
      ->capture_default_str();
  cmd->add_option("--max-new-tokens", flags->max_new_tokens,
                  "Tokens generated per question at most (the prediction is the first word)")
      ->capture_default_str();
  cmd->callback([flags] {
    Status st = RunEval(*flags);
    if (!st.ok()) ExitWithError(st);
  });

  auto study = std::make_shared<StudyFlags>();
  CLI::App* scmd = app.add_subcommand(
      "study", "Attention-sink study: the last prompt token's attention mass on BOS, image and "
               "text tokens per decoder layer (full model, mean over heads and samples)");
  AddCommonFlags(scmd, &study->model_dir, &study->data, &study->dtype, &study->threads,
                 &study->json, &study->no_progress);
  scmd->add_option("--samples", study->samples, "Use the first N examples with an image")
      ->capture_default_str();
  scmd->callback([study] {
    Status st = RunStudy(*study);
    if (!st.ok()) ExitWithError(st);
  });
}

}  // namespace vtw::tools
