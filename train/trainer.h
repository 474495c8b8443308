// The project's trainer: trains a LLaVA-architecture model on the synthetic shapes VQA task
// (shapes/shapes_dataset.h) with the runtime's own forward code (LlavaModel::EncodeImages and
// LlavaModel::Forward on weights that require grad, LibTorch autograd), so the trained weights
// are exactly what the runtime computes with. Writes an HF LlavaForConditionalGeneration
// directory. Optional VTW-aware training withdraws image tokens at a random layer for a
// fraction of the training sequences. Single process; uses LibTorch's intra-op threads and a
// few worker threads for data generation at start-up. Not thread-safe (one run at a time).
#pragma once

#include <cstdint>
#include <map>
#include <ostream>
#include <string>
#include <vector>

#include "model/llava_config.h"
#include "model/llava_model.h"
#include "model/status.h"
#include "model/tokenizer.h"
#include "shapes/shapes_dataset.h"
#include "train/teacher_forcing.h"
#include "train/train_data.h"

namespace vtw::tools {

// Model geometry; 0 fields take the preset's value.
struct Geometry {
  int image_size = 0, patch_size = 0;
  int vision_hidden = 0, vision_intermediate = 0, vision_layers = 0, vision_heads = 0;
  int vision_feature_layer = 0;  // 0: preset (-2)
  int text_hidden = 0, text_intermediate = 0, text_layers = 0, text_heads = 0, text_kv_heads = 0;
  int max_positions = 0;
};

struct TrainOptions {
  std::string out_dir;        // the HF model directory to write
  std::string tokenizer_dir;  // existing tokenizer files; empty: train one into out_dir
  // Start from this model directory's weights instead of random ones (fine-tuning; its
  // config.json must match the preset's geometry and the tokenizer's vocabulary).
  std::string init_from;
  int tokenizer_vocab = 512;
  std::string preset = "shipped";  // "tiny" (tests) | "shipped"
  Geometry geometry;
  // Data (generated in memory with the dataset library: split "train" / "val", data_seed).
  int64_t train_count = 60000;
  int64_t val_count = 600;
  int questions_per_image = 3;
  uint64_t data_seed = 1;
  // Training scenes with renderer variation (SceneSpec::varied_style: gradient / two-tone /
  // white backgrounds, outlines, wider rotations); validation stays the default style.
  bool varied_style = false;
  // Questions packed into one multi-turn training sequence over their shared image (the
  // llava-1.5 conversation form `USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>`):
  // the image rows are computed once for up to this many answers, and the first turn is exactly
  // the single-question prompt the runtime serves. 1: one question per sequence. With turns > 1
  // --batch-size counts sequences (images). Validation is always single-question.
  int turns = 1;
  // Optimisation.
  int steps = 1000;
  int batch_size = 48;       // sequences per step
  double lr = 1e-3;
  double min_lr_ratio = 0.05;  // the cosine decays to lr * min_lr_ratio
  int warmup = 100;          // linear warm-up steps
  double weight_decay = 0.05;  // AdamW, matrices only (not norms, biases, embeddings)
  double beta1 = 0.9, beta2 = 0.98;
  double clip_norm = 1.0;
  double init_std = 0.02;
  uint64_t seed = 0;         // weights init and batch sampling
  int threads = 2;
  // VTW-aware training: this fraction of training sequences withdraw their image rows before a
  // layer drawn uniformly from [vtw_train_min_layer, vtw_train_max_layer] (max -1: layers - 1).
  // A narrow range (e.g. 2..2) concentrates the training on the K a deployment will use.
  double vtw_train_fraction = 0.0;
  int vtw_train_min_layer = 1;
  int vtw_train_max_layer = -1;
  // Distillation from a frozen teacher (needs init_from: the teacher is that model, VTW off):
  // this weight times KL(teacher || student) of the answer-token distributions, over every
  // training sequence (withdrawn ones learn to answer as the full path did; full-path ones stay
  // near the teacher), is added to the loss. Costs one no-grad teacher forward per step. 0: off.
  double vtw_distill = 0.0;
  // Auxiliary patch-label loss (training only): a linear head on the projected image tokens
  // predicts, for every patch, the colour, the kind and the side (centre left or right of the
  // middle) of the shape covering it (or background), and the patch's own row and column; the
  // sum of the cross-entropies, times this weight, is added to the answer loss. The head is
  // discarded after training (not part of the model).
  double aux_patch_loss = 0.0;
  // Vision pre-training stage (needs aux_patch_loss > 0): before the main steps, this many
  // steps train only the vision tower, the projector and the patch-label head on the patch
  // labels (no decoder: cheap), with vision_batch images per step, the same peak lr, warm-up
  // and cosine decay. Like LLaVA's pre-trained CLIP tower, the decoder then starts from image
  // tokens that already tell shapes apart.
  int vision_steps = 0;
  int vision_batch = 64;
  // Monitoring and checkpoints.
  int eval_every = 200;      // validation every N steps (0: only at the end)
  int val_vtw_layer = -1;    // also validate with withdrawal at this K (-1: no)
  std::string checkpoint_dir;
  int checkpoint_every = 200;  // steps (0: only at the end when checkpoint_dir is set)
  bool resume = false;
  int stop_after = 0;        // > 0: stop (with a checkpoint) after this many steps in total
  std::string save_dtype = "fp32";
  bool final_eval_all_k = true;  // validation accuracy at every K at the end
};

struct TrainResult {
  int start_step = 0;            // > 0 when resumed
  int end_step = 0;
  std::vector<double> losses;    // training loss of each step run (start_step .. end_step - 1)
  EvalResult final_val;          // VTW off
  std::map<int, EvalResult> final_val_by_k;
  double seconds = 0;
};

// The model configuration for a preset with overrides; vocab from the tokenizer.
StatusOr<LlavaConfig> MakeTrainConfig(const std::string& preset, const Geometry& overrides,
                                      int sp_vocab_size);

// Runs training in stages: data (tokenizer, config, the train and val splits), model and
// optimizer, resume from a checkpoint, the vision pre-training stage, the main stage (one
// optimizer step per batch, validation and checkpoints on schedule), then the final
// validation and the model directory with training.json. Progress (a bar on a terminal, lines
// otherwise) goes to `log`.
StatusOr<TrainResult> RunTraining(const TrainOptions& options, std::ostream* log);

}  // namespace vtw::tools
