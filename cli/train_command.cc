// `vtw train`: trains the shapes model (train/trainer.h) and writes an HF model directory.
// With --eval-only it instead evaluates an existing model directory on a freshly generated
// split at VTW off and at every K (teacher-forced greedy exact match, batched).
// Owns only the command-line surface; registration is not thread-safe (call from main).
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include "model/llava_model.h"
#include "model/tokenizer.h"
#include "cli/commands.h"
#include "cli/tool_common.h"
#include "train/trainer.h"
#include "vtw/compute_model.h"

namespace vtw::tools {
namespace {

struct EvalOnlyFlags {
  bool enabled = false;
  std::string split = "test";
  uint64_t seed = 7;
  int64_t count = 1200;
  std::string json_out;
};

Status RunEvalOnly(const TrainOptions& o, const EvalOnlyFlags& e) {
  at::set_num_threads(std::max(1, o.threads));
  VTW_ASSIGN_OR_RETURN(std::unique_ptr<LlavaModel> model, LlavaModel::Load(o.out_dir, at::kFloat));
  VTW_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::Load(o.out_dir));
  VTW_ASSIGN_OR_RETURN(EncodedSplit data,
                       BuildSplit(e.split, e.count, e.seed, o.questions_per_image, *tokenizer,
                                  model->config(), std::max(1, o.threads), &std::cerr));
  const int layers = model->num_layers();
  nlohmann::json out = {{"model", o.out_dir}, {"split", e.split}, {"seed", e.seed},
                        {"count", data.examples.size()}, {"by_k", nlohmann::json::object()}};
  const ComputeModel compute(model->config(), 4);
  std::printf("%-6s %8s %10s %9s", "K", "acc", "first_tok", "prefill%");
  for (const char* t : kQuestionTypes) std::printf(" %11s", t);
  std::printf("\n");
  for (int k = layers; k >= 0; --k) {
    EvalResult r = Evaluate(*model, data, k);
    // Mean prefill FLOPs saved (decoder + the last row's lm_head), % of the full prefill.
    double saved = 0, full = 0;
    for (const TrainExample& ex : data.examples) {
      const Flops f = compute.ChunkFlops(ex.kinds, 0, static_cast<int64_t>(ex.kinds.size()), k,
                                         true);
      saved += static_cast<double>(f.saved());
      full += static_cast<double>(f.flops_without_vtw);
    }
    const double saved_pct = full > 0 ? 100.0 * saved / full : 0;
    std::printf("%-6s %8.4f %10.4f %9.1f", k == layers ? "off" : std::to_string(k).c_str(),
                r.exact_accuracy, r.first_token_accuracy, saved_pct);
    nlohmann::json by_type = nlohmann::json::object();
    for (const char* t : kQuestionTypes) {
      const double a = r.exact_by_type.count(t) ? r.exact_by_type.at(t) : 0.0;
      std::printf(" %11.4f", a);
      by_type[t] = a;
    }
    std::printf("\n");
    std::fflush(stdout);
    out["by_k"][k == layers ? "off" : std::to_string(k)] = {
        {"accuracy", r.exact_accuracy}, {"first_token_accuracy", r.first_token_accuracy},
        {"prefill_flops_saved_pct", saved_pct},
        {"loss", r.loss}, {"by_type", by_type}};
  }
  if (!e.json_out.empty()) {
    std::ofstream f(e.json_out);
    f << out.dump(2) << "\n";
    if (!f) return Internal("cannot write " + e.json_out);
  }
  return Status::Ok();
}

}  // namespace

void RegisterTrainCommand(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  auto e = std::make_shared<EvalOnlyFlags>();
  CLI::App* cmd = app.add_subcommand(
      "train", "Train the shapes VQA model with the project's own model code; writes an HF "
               "LlavaForConditionalGeneration directory");
  cmd->add_option("--out", o->out_dir, "Model directory to write")->required();
  cmd->add_option("--tokenizer", o->tokenizer_dir,
                  "Directory with tokenizer.model and HF tokenizer files (default: train one "
                  "with spm_train into --out)");
  cmd->add_option("--tokenizer-vocab", o->tokenizer_vocab, "SentencePiece vocab size when "
                  "training the tokenizer")->capture_default_str();
  cmd->add_option("--preset", o->preset, "Geometry preset")
      ->check(CLI::IsMember({"tiny", "shipped"}))->capture_default_str();
  Geometry& g = o->geometry;
  cmd->add_option("--image-size", g.image_size, "Vision input size (px)");
  cmd->add_option("--patch-size", g.patch_size, "Vision patch size (px)");
  cmd->add_option("--vision-hidden", g.vision_hidden, "Vision hidden size");
  cmd->add_option("--vision-intermediate", g.vision_intermediate, "Vision MLP size");
  cmd->add_option("--vision-layers", g.vision_layers, "Vision encoder layers");
  cmd->add_option("--vision-heads", g.vision_heads, "Vision attention heads");
  cmd->add_option("--vision-feature-layer", g.vision_feature_layer, "vision_feature_layer");
  cmd->add_option("--text-hidden", g.text_hidden, "Decoder hidden size");
  cmd->add_option("--text-intermediate", g.text_intermediate, "Decoder MLP size");
  cmd->add_option("--text-layers", g.text_layers, "Decoder layers");
  cmd->add_option("--text-heads", g.text_heads, "Decoder attention heads");
  cmd->add_option("--text-kv-heads", g.text_kv_heads, "Decoder key/value heads (GQA)");
  cmd->add_option("--max-positions", g.max_positions, "max_position_embeddings");
  cmd->add_option("--train-count", o->train_count, "Training questions (generated in memory)")
      ->capture_default_str();
  cmd->add_option("--val-count", o->val_count, "Validation questions")->capture_default_str();
  cmd->add_option("--questions-per-image", o->questions_per_image, "Questions per image")
      ->check(CLI::Range(1, 16))->capture_default_str();
  cmd->add_option("--turns", o->turns,
                  "Questions of one image packed into one multi-turn training sequence "
                  "(1: one question per sequence)")
      ->check(CLI::Range(1, 16))->capture_default_str();
  cmd->add_option("--data-seed", o->data_seed, "Dataset seed of the train/val splits")
      ->capture_default_str();
  cmd->add_flag("--varied-scenes", o->varied_style,
                "Training scenes with renderer variation (as `vtw dataset --scene-style varied`); "
                "validation stays the default style");
  cmd->add_option("--init-from", o->init_from,
                  "Start from this model directory's weights (fine-tuning; same geometry and "
                  "tokenizer, e.g. --tokenizer DIR)");
  cmd->add_option("--steps", o->steps, "Optimizer steps")->capture_default_str();
  cmd->add_option("--batch-size", o->batch_size,
                  "Questions per step (--turns 1) or sequences = images per step (--turns > 1)")
      ->capture_default_str();
  cmd->add_option("--lr", o->lr, "Peak learning rate")->capture_default_str();
  cmd->add_option("--min-lr-ratio", o->min_lr_ratio, "Final lr / peak lr")->capture_default_str();
  cmd->add_option("--warmup", o->warmup, "Linear warm-up steps")->capture_default_str();
  cmd->add_option("--weight-decay", o->weight_decay, "AdamW weight decay (matrices)")
      ->capture_default_str();
  cmd->add_option("--clip", o->clip_norm, "Gradient norm clip (0: off)")->capture_default_str();
  cmd->add_option("--threads", o->threads, "LibTorch threads")->capture_default_str();
  cmd->add_option("--seed", o->seed, "Init and batch-sampling seed")->capture_default_str();
  cmd->add_option("--vtw-train-fraction", o->vtw_train_fraction,
                  "VTW-aware training: fraction of training sequences whose image tokens are "
                  "withdrawn at a random layer")->capture_default_str();
  cmd->add_option("--vtw-train-min-layer", o->vtw_train_min_layer,
                  "VTW-aware training: smallest withdrawal layer drawn")->capture_default_str();
  cmd->add_option("--vtw-train-max-layer", o->vtw_train_max_layer,
                  "VTW-aware training: largest withdrawal layer drawn (-1: the last layer); "
                  "e.g. --vtw-train-min-layer 2 --vtw-train-max-layer 2 trains for K = 2 only")
      ->capture_default_str();
  cmd->add_option("--vtw-distill", o->vtw_distill,
                  "Distillation weight (needs --init-from, the frozen teacher with VTW off): adds "
                  "weight x KL(teacher || student) of the answer tokens to the loss, so withdrawn "
                  "sequences learn to answer as the full model does (0: off)")
      ->capture_default_str();
  cmd->add_option("--vision-steps", o->vision_steps,
                  "Vision pre-training steps on the patch labels before the main steps (needs "
                  "--aux-patch-loss > 0)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  cmd->add_option("--vision-batch", o->vision_batch, "Images per vision pre-training step")
      ->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--aux-patch-loss", o->aux_patch_loss,
                  "Weight of the auxiliary patch-label loss (training-only head on the image "
                  "tokens: colour and kind of the shape under each patch)")->capture_default_str();
  cmd->add_option("--eval-every", o->eval_every, "Validate every N steps (0: at the end only)")
      ->capture_default_str();
  cmd->add_option("--val-vtw-layer", o->val_vtw_layer, "Also validate with withdrawal at K");
  cmd->add_option("--checkpoint-dir", o->checkpoint_dir, "Where to save resumable checkpoints");
  cmd->add_option("--checkpoint-every", o->checkpoint_every, "Checkpoint every N steps")
      ->capture_default_str();
  cmd->add_flag("--resume", o->resume, "Resume from --checkpoint-dir");
  cmd->add_option("--stop-after", o->stop_after, "Stop after this many steps (checkpointed)");
  cmd->add_option("--save-dtype", o->save_dtype, "fp32 or bf16")
      ->check(CLI::IsMember({"fp32", "bf16"}))->capture_default_str();
  cmd->add_flag("--eval-only", e->enabled,
                "Evaluate the model in --out on a generated split at VTW off and every K");
  cmd->add_option("--eval-split", e->split, "Split for --eval-only")
      ->check(CLI::IsMember({"train", "val", "test"}))->capture_default_str();
  cmd->add_option("--eval-seed", e->seed, "Dataset seed for --eval-only")->capture_default_str();
  cmd->add_option("--eval-count", e->count, "Questions for --eval-only")->capture_default_str();
  cmd->add_option("--eval-json", e->json_out, "Write --eval-only results as JSON here");
  cmd->callback([o, e]() {
    if (e->enabled) {
      const Status s = RunEvalOnly(*o, *e);
      if (!s.ok()) ExitWithError(s);
      std::exit(0);
    }
    auto r = RunTraining(*o, &std::cerr);
    if (!r.ok()) ExitWithError(r.status());
    std::exit(0);
  });
}

}  // namespace vtw::tools
