// `vtw generate`: one request through the model on this machine, with or without VTW.
#include <chrono>
#include <cstdio>
#include <iostream>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "server/generator.h"
#include "server/model_bundle.h"
#include "cli/commands.h"
#include "cli/tool_common.h"

namespace vtw::tools {
namespace {

struct GenerateFlags {
  std::string model_dir;
  std::string image;
  std::string prompt;
  bool raw_prompt = false;
  int max_new_tokens = 64;
  std::string vtw_layer = "auto";
  std::string dtype = "fp32";
  float temperature = 0.0f;
  float top_p = 1.0f;
  int top_k = 0;
  uint64_t seed = 0;
  bool ignore_eos = false;
  std::vector<std::string> stop;
  bool json = false;
  int threads = 0;
};

Status RunGenerate(const GenerateFlags& f) {
  ConfigureThreads(f.threads);
  if (f.max_new_tokens <= 0) return InvalidArgument("--max-new-tokens must be >= 1");
  VTW_ASSIGN_OR_RETURN(at::ScalarType dtype, ParseDType(f.dtype));
  const std::string model_dir = f.model_dir.empty() ? DefaultModelDir() : f.model_dir;
  auto t0 = std::chrono::steady_clock::now();
  VTW_ASSIGN_OR_RETURN(std::unique_ptr<ModelBundle> bundle, ModelBundle::Load(model_dir, dtype));
  const double load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const LlavaModel& model = *bundle->model;
  VTW_ASSIGN_OR_RETURN(int k, ParseVtwLayerFlag(f.vtw_layer, bundle->vtw, model.num_layers()));

  std::string image_bytes;
  if (!f.image.empty()) {
    VTW_ASSIGN_OR_RETURN(image_bytes, ReadImageFile(f.image));
    if (image_bytes.empty()) return InvalidArgument("image file '" + f.image + "' is empty");
  }
  VTW_ASSIGN_OR_RETURN(PreparedPrompt prepared,
                       PreparePrompt(*bundle, image_bytes, f.prompt, f.raw_prompt,
                                     f.max_new_tokens, ImageLimits{}));
  t0 = std::chrono::steady_clock::now();
  at::Tensor features;
  if (prepared.pixel_values.defined()) features = model.EncodeImages(prepared.pixel_values)[0];
  const double vision_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  GenerateOptions options;
  options.withdraw_layer = k;
  options.sampling = {f.temperature, f.top_k, f.top_p, f.seed};
  options.stop.max_new_tokens = f.max_new_tokens;
  options.stop.ignore_eos = f.ignore_eos;
  options.stop.eos_id = bundle->tokenizer->eos_id();
  options.stop.stop = f.stop;
  VTW_ASSIGN_OR_RETURN(GenerateResult r, GenerateOne(model, bundle->tokenizer.get(),
                                                     prepared.layout, features, options));
  const bool applied = k < model.num_layers() && prepared.layout.num_image_tokens > 0;
  const int64_t flops = r.vision_flops + r.prefill_flops.flops + r.decode_flops.flops;
  const int64_t flops_without =
      r.vision_flops + r.prefill_flops.flops_without_vtw + r.decode_flops.flops_without_vtw;
  if (!f.json) {
    std::cout << r.text << std::endl;
    std::fprintf(stderr,
                 "[vtw] %zu tokens (%s), VTW %s, %.3g GFLOP (%.1f%% saved), prefill %.3f s, "
                 "decode %.3f s\n",
                 r.token_ids.size(), FinishReasonName(r.finish_reason),
                 applied ? ("K=" + std::to_string(k)).c_str() : "off", flops / 1e9,
                 flops_without ? 100.0 * (flops_without - flops) / flops_without : 0.0,
                 r.prefill_seconds, r.decode_seconds);
    return Status::Ok();
  }
  std::vector<int32_t> unexpanded =
      bundle->tokenizer->Encode(f.raw_prompt ? f.prompt
                                             : ApplyLlavaChatTemplate(f.prompt, !image_bytes.empty()),
                                bundle->tokenizer->add_bos_token());
  at::Tensor first = r.first_logits;
  auto top = first.topk(std::min<int64_t>(10, first.size(0)));
  nlohmann::json top_pairs = nlohmann::json::array();
  for (int64_t i = 0; i < std::get<0>(top).size(0); ++i) {
    top_pairs.push_back({std::get<1>(top)[i].item<int64_t>(), std::get<0>(top)[i].item<double>()});
  }
  nlohmann::json out = {
      {"model", bundle->dir},
      {"dtype", DTypeName(dtype)},
      {"prompt_token_ids", unexpanded},
      {"token_ids", r.token_ids},
      {"text", r.text},
      {"finish_reason", FinishReasonName(r.finish_reason)},
      {"num_prompt_tokens", prepared.layout.size()},
      {"num_image_tokens", prepared.layout.num_image_tokens},
      {"vtw_layer", applied ? nlohmann::json(k) : nlohmann::json()},
      {"num_layers", model.num_layers()},
      {"flops", flops},
      {"flops_without_vtw", flops_without},
      {"flops_breakdown",
       {{"vision", r.vision_flops},
        {"prefill", r.prefill_flops.flops},
        {"prefill_without_vtw", r.prefill_flops.flops_without_vtw},
        {"decode", r.decode_flops.flops},
        {"decode_without_vtw", r.decode_flops.flops_without_vtw}}},
      {"kv_cache_bytes", r.kv_cache_bytes},
      {"kv_cache_bytes_without_vtw", r.kv_cache_bytes_without_vtw},
      {"first_step_top_logits", top_pairs},
      {"timings",
       {{"load_seconds", load_seconds},
        {"vision_seconds", vision_seconds},
        {"prefill_seconds", r.prefill_seconds},
        {"decode_seconds", r.decode_seconds}}}};
  std::cout << out.dump() << std::endl;
  return Status::Ok();
}

}  // namespace

void RegisterGenerateCommand(CLI::App& app) {
  auto flags = std::make_shared<GenerateFlags>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate text for an image and a prompt");
  cmd->add_option("--model", flags->model_dir, "Model directory (default: the shipped model)");
  cmd->add_option("--image", flags->image, "Image file (PNG, JPEG, WebP, BMP)");
  cmd->add_option("--prompt", flags->prompt, "The question; wrapped in the chat template")
      ->required();
  cmd->add_flag("--raw-prompt", flags->raw_prompt,
                "Use --prompt as the full text, with its own <image> placeholder");
  cmd->add_option("--max-new-tokens", flags->max_new_tokens, "Tokens to generate at most")
      ->capture_default_str();
  cmd->add_option("--vtw-layer", flags->vtw_layer,
                  "Withdrawal layer K, 'off', or 'auto' (the model's calibrated K)")
      ->capture_default_str();
  cmd->add_option("--dtype", flags->dtype, "fp32 or bf16")->capture_default_str();
  cmd->add_option("--temperature", flags->temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-p", flags->top_p, "Nucleus sampling mass (0, 1]")->capture_default_str();
  cmd->add_option("--top-k", flags->top_k, "Keep the k most likely tokens (0 = off)")
      ->capture_default_str();
  cmd->add_option("--seed", flags->seed, "Sampling seed")->capture_default_str();
  cmd->add_flag("--ignore-eos", flags->ignore_eos, "Do not stop at EOS");
  cmd->add_option("--stop", flags->stop, "Stop string (repeatable)");
  cmd->add_flag("--json", flags->json, "Print one JSON object");
  cmd->add_option("--threads", flags->threads, "CPU threads (0 = all cores)")
      ->capture_default_str();
  cmd->callback([flags] {
    Status st = RunGenerate(*flags);
    if (!st.ok()) ExitWithError(st);
  });
}

}  // namespace vtw::tools
