#include "train/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <memory>
#include <random>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#include <torch/types.h>  // before the other torch headers, which need it
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim.h>
#include <torch/serialize.h>

#include "train/model_writer.h"
#include "train/tokenizer_trainer.h"
#include "vtw/withdrawal.h"

namespace vtw::tools {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// Portable randomness on mt19937_64 output (as the dataset does: no std distributions).
double Uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }
int64_t UniformIndex(std::mt19937_64& rng, int64_t n) {
  int64_t v = static_cast<int64_t>(Uniform01(rng) * static_cast<double>(n));
  return v >= n ? n - 1 : v;
}

// The progress line's running averages (0.05 per step); a negative average is unset.
void UpdateEma(double* ema, double x) { *ema = *ema < 0 ? x : 0.95 * *ema + 0.05 * x; }

std::string FormatDuration(double s) {
  if (!(s >= 0) || s > 1e7) return "--:--";
  const int t = static_cast<int>(s + 0.5);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof(buf), "%d:%02d:%02d", t / 3600, t / 60 % 60, t % 60);
  else std::snprintf(buf, sizeof(buf), "%02d:%02d", t / 60, t % 60);
  return buf;
}

// Everything about a parameter tensor the trainer needs.
struct Param {
  std::string name;
  at::Tensor tensor;
  bool decay = false;
};

std::vector<Param> CollectParams(const LlavaConfig& config, LlavaWeights* weights) {
  std::vector<Param> params;
  ForEachLlavaTensor(config, weights, [&](const std::string& name, const std::vector<int64_t>&,
                                          at::Tensor* slot, InitKind) {
    if (slot == nullptr) return;
    Param p;
    p.name = name;
    p.tensor = *slot;
    p.decay = slot->dim() >= 2 && name.find("embed_tokens") == std::string::npos &&
              name.find("position_embedding") == std::string::npos;
    params.push_back(p);
  });
  return params;
}

json EvalJson(const EvalResult& r) {
  json by_type = json::object();
  for (const auto& [t, a] : r.exact_by_type) {
    by_type[t] = {{"accuracy", a}, {"count", r.count_by_type.at(t)}};
  }
  return {{"count", r.count},
          {"accuracy", r.exact_accuracy},
          {"first_token_accuracy", r.first_token_accuracy},
          {"loss", r.loss},
          {"by_type", by_type}};
}

std::string EvalLine(const EvalResult& r) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(3) << "acc " << r.exact_accuracy << " (first tok "
     << r.first_token_accuracy << ", loss " << std::setprecision(4) << r.loss << ")"
     << std::setprecision(3);
  for (const auto& [t, a] : r.exact_by_type) os << " " << t << "=" << a;
  return os.str();
}

json OptionsJson(const TrainOptions& o) {
  const Geometry& g = o.geometry;
  return {{"preset", o.preset},
          {"tokenizer_vocab", o.tokenizer_vocab},
          {"train_count", o.train_count},
          {"val_count", o.val_count},
          {"questions_per_image", o.questions_per_image},
          {"turns", o.turns},
          {"vision_steps", o.vision_steps},
          {"vision_batch", o.vision_batch},
          {"data_seed", o.data_seed},
          {"varied_style", o.varied_style},
          {"init_from", o.init_from},
          {"steps", o.steps},
          {"batch_size", o.batch_size},
          {"lr", o.lr},
          {"min_lr_ratio", o.min_lr_ratio},
          {"warmup", o.warmup},
          {"weight_decay", o.weight_decay},
          {"beta1", o.beta1},
          {"beta2", o.beta2},
          {"clip_norm", o.clip_norm},
          {"init_std", o.init_std},
          {"seed", o.seed},
          {"threads", o.threads},
          {"vtw_train_fraction", o.vtw_train_fraction},
          {"vtw_train_min_layer", o.vtw_train_min_layer},
          {"vtw_train_max_layer", o.vtw_train_max_layer},
          {"vtw_distill", o.vtw_distill},
          {"aux_patch_loss", o.aux_patch_loss},
          {"eval_every", o.eval_every},
          {"save_dtype", o.save_dtype},
          {"geometry_overrides",
           {{"image_size", g.image_size}, {"patch_size", g.patch_size},
            {"vision_hidden", g.vision_hidden}, {"vision_intermediate", g.vision_intermediate},
            {"vision_layers", g.vision_layers}, {"vision_heads", g.vision_heads},
            {"vision_feature_layer", g.vision_feature_layer}, {"text_hidden", g.text_hidden},
            {"text_intermediate", g.text_intermediate}, {"text_layers", g.text_layers},
            {"text_heads", g.text_heads}, {"text_kv_heads", g.text_kv_heads},
            {"max_positions", g.max_positions}}}};
}

// Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at the last step.
double LearningRate(const TrainOptions& o, int step) {
  if (o.warmup > 0 && step < o.warmup) return o.lr * (step + 1) / static_cast<double>(o.warmup);
  const int decay_steps = std::max(1, o.steps - o.warmup);
  const double t = std::min(1.0, (step - o.warmup) / static_cast<double>(decay_steps));
  const double min_lr = o.lr * o.min_lr_ratio;
  return min_lr + (o.lr - min_lr) * 0.5 * (1.0 + std::cos(M_PI * t));
}

Status CheckOptions(const TrainOptions& o) {
  if (o.out_dir.empty()) return InvalidArgument("--out is required");
  if (o.steps < 1 || o.batch_size < 1) return InvalidArgument("--steps and --batch-size must be >= 1");
  if (o.train_count < 1 || o.val_count < 1) return InvalidArgument("--train-count and --val-count must be >= 1");
  if (o.save_dtype != "fp32" && o.save_dtype != "float32" && o.save_dtype != "bf16" &&
      o.save_dtype != "bfloat16") {
    return InvalidArgument("--save-dtype must be fp32 or bf16");
  }
  if (o.resume && o.checkpoint_dir.empty()) return InvalidArgument("--resume needs --checkpoint-dir");
  if (o.turns < 1) return InvalidArgument("--turns must be >= 1");
  if (o.vtw_train_fraction < 0 || o.vtw_train_fraction > 1) {
    return InvalidArgument("--vtw-train-fraction must be in [0, 1]");
  }
  if (!(o.vtw_distill >= 0)) return InvalidArgument("--vtw-distill must be >= 0");
  if (o.vtw_distill > 0 && o.init_from.empty()) {
    return InvalidArgument("--vtw-distill needs --init-from: the teacher is the model training "
                           "starts from");
  }
  return Status::Ok();
}

// One training run: the state that the stages share. Run() calls the stages in order.
class TrainingRun {
 public:
  TrainingRun(const TrainOptions& o, std::ostream* log) : o_(o), log_(log) {}

  StatusOr<TrainResult> Run();

 private:
  Status PrepareData();   // tokenizer, model config, train and val splits
  Status InitModel();     // weights (random or --init-from), parameters, auxiliary head, optimizer
  Status Resume();        // from o_.checkpoint_dir when asked
  Status SaveCheckpoint(int at_step);
  EvalResult Validate(int at_step);
  // The patch-label loss of projected image tokens `features` [n, P, Ht] of split images
  // `images`; *kind_acc: kind accuracy on the patches a shape covers.
  at::Tensor AuxLoss(const at::Tensor& features, const std::vector<int64_t>& images,
                     double* kind_acc);
  Status VisionStage();
  Status MainStage();
  // The next batch's sequences (groups of examples over one image) and their K.
  std::vector<std::vector<int64_t>> SampleGroups();
  std::vector<int> DrawWithdrawLayers(size_t sequences);
  Status TrainStep(double lr);
  void LogStep(int done, int end_step, double lr, bool tty);
  Status Finish();

  const TrainOptions& o_;
  std::ostream* log_;
  const Clock::time_point start_ = Clock::now();
  std::string tokenizer_dir_;
  std::unique_ptr<Tokenizer> tokenizer_;
  int sp_vocab_ = 0;
  LlavaConfig config_;
  int layers_ = 0;
  int vtw_max_layer_ = 0;  // o_.vtw_train_max_layer resolved (-1: layers_ - 1)
  EncodedSplit train_, val_;
  std::vector<std::vector<int64_t>> by_image_;  // train examples of each image
  std::vector<Param> params_;
  std::map<std::string, at::Tensor> unused_;
  std::vector<at::Tensor> all_params_;
  at::Tensor aux_w_, aux_b_;    // the patch-label head: [7 colours + 4 kinds + 3 sides + 2 grid, Ht]
  int64_t aux_grid_ = 0;
  at::Tensor aux_row_, aux_col_;  // [P] row and column of each patch
  std::unique_ptr<LlavaModel> model_;
  std::unique_ptr<LlavaModel> teacher_;  // --vtw-distill: the --init-from model, frozen
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  std::mt19937_64 rng_;
  TrainResult result_;
  json curve_ = json::array();
  int step_ = 0;
  int first_step_ = 0;
  Clock::time_point loop_start_;  // reset after the vision stage: rates and ETA of the main steps
  double ema_loss_ = -1, ema_acc_ = -1, ema_aux_kind_ = -1, ema_distill_ = -1;
  int64_t tokens_done_ = 0;
};

StatusOr<TrainResult> TrainingRun::Run() {
  VTW_RETURN_IF_ERROR(CheckOptions(o_));
  at::set_num_threads(std::max(1, o_.threads));
  std::error_code ec;
  fs::create_directories(o_.out_dir, ec);
  VTW_RETURN_IF_ERROR(PrepareData());
  VTW_RETURN_IF_ERROR(InitModel());
  VTW_RETURN_IF_ERROR(Resume());
  if (log_) {
    *log_ << "[train] " << [&] {
      int64_t n = 0;
      for (const Param& p : params_) n += p.name.rfind("aux/", 0) == 0 ? 0 : p.tensor.numel();
      return n;
    }() << " parameters; " << layers_ << " decoder layers, "
          << config_.num_image_tokens() << " image tokens; steps " << o_.steps << " x batch "
          << o_.batch_size << "; VTW-aware fraction " << o_.vtw_train_fraction << " (K in ["
          << o_.vtw_train_min_layer << ", " << vtw_max_layer_ << "])\n";
  }
  loop_start_ = Clock::now();
  first_step_ = step_;
  if (o_.vision_steps > 0 && o_.aux_patch_loss > 0 && step_ == 0) {
    VTW_RETURN_IF_ERROR(VisionStage());
  }
  VTW_RETURN_IF_ERROR(MainStage());
  VTW_RETURN_IF_ERROR(Finish());
  return result_;
}

Status TrainingRun::PrepareData() {
  tokenizer_dir_ = o_.tokenizer_dir;
  if (tokenizer_dir_.empty()) {
    tokenizer_dir_ = o_.out_dir;
    TokenizerTrainOptions to;
    to.out_dir = o_.out_dir;
    to.vocab_size = o_.tokenizer_vocab;
    VTW_RETURN_IF_ERROR(TrainTokenizer(to, log_));
  }
  VTW_ASSIGN_OR_RETURN(tokenizer_, Tokenizer::Load(tokenizer_dir_));
  VTW_RETURN_IF_ERROR(CheckTaskTokenization(*tokenizer_, nullptr));
  sp_vocab_ = tokenizer_->sp_vocab_size();
  if (tokenizer_->image_token_id() != sp_vocab_) {
    return InvalidArgument(tokenizer_dir_ + ": <image> must be the first id after the "
                           "SentencePiece vocabulary");
  }
  VTW_ASSIGN_OR_RETURN(config_, MakeTrainConfig(o_.preset, o_.geometry, sp_vocab_));
  layers_ = config_.text.num_hidden_layers;
  vtw_max_layer_ = o_.vtw_train_max_layer < 0 ? layers_ - 1 : o_.vtw_train_max_layer;
  if (o_.vtw_train_fraction > 0 && (o_.vtw_train_min_layer < 0 || o_.vtw_train_min_layer >= layers_)) {
    return InvalidArgument("--vtw-train-min-layer must be in [0, layers - 1] (this model has " +
                           std::to_string(layers_) + " decoder layers)");
  }
  if (o_.vtw_train_fraction > 0 &&
      (vtw_max_layer_ < o_.vtw_train_min_layer || vtw_max_layer_ >= layers_)) {
    return InvalidArgument("--vtw-train-max-layer must be in [--vtw-train-min-layer, layers - 1] "
                           "(this model has " + std::to_string(layers_) +
                           " decoder layers; -1 means the last)");
  }
  const int data_threads = std::max(1, o_.threads);
  SceneSpec train_spec;
  train_spec.varied_style = o_.varied_style;
  VTW_ASSIGN_OR_RETURN(train_, BuildSplit("train", o_.train_count, o_.data_seed,
                                          o_.questions_per_image, *tokenizer_, config_,
                                          data_threads, log_, train_spec));
  // Validation: at most 3 questions per image (comparable across runs with different
  // --questions-per-image).
  VTW_ASSIGN_OR_RETURN(val_, BuildSplit("val", o_.val_count, o_.data_seed,
                                        std::min(3, o_.questions_per_image), *tokenizer_, config_,
                                        data_threads, log_));
  if (o_.turns > 1) {
    size_t longest_prompt = 0, longest_turn = 0;
    for (const TrainExample& ex : train_.examples) {
      longest_prompt = std::max(longest_prompt, ex.prompt_ids.size() + ex.target_ids.size());
      longest_turn = std::max(longest_turn, ex.turn_ids.size() + ex.target_ids.size());
    }
    const size_t longest =
        longest_prompt + (std::min(o_.turns, o_.questions_per_image) - 1) * longest_turn;
    if (longest > static_cast<size_t>(config_.text.max_position_embeddings) + 1) {
      return InvalidArgument("--turns " + std::to_string(o_.turns) + ": a sequence can take up to " +
                             std::to_string(longest) + " positions, more than the model's " +
                             std::to_string(config_.text.max_position_embeddings) +
                             " (lower --turns)");
    }
  }
  by_image_.assign(train_.pixels_u8.size(0), {});
  for (size_t i = 0; i < train_.examples.size(); ++i) {
    by_image_[train_.examples[i].image].push_back(static_cast<int64_t>(i));
  }
  return Status::Ok();
}

Status TrainingRun::InitModel() {
  LlavaWeights weights = RandomLlavaWeights(config_, at::kFloat, o_.seed, o_.init_std);
  if (!o_.init_from.empty()) {
    VTW_ASSIGN_OR_RETURN(std::unique_ptr<WeightStore> store, WeightStore::OpenDirectory(o_.init_from));
    VTW_ASSIGN_OR_RETURN(LlavaWeights loaded, LoadLlavaWeights(*store, config_, at::kFloat));
    // Owned, writable copies (the loaded tensors may share the file mapping).
    std::vector<Param> from = CollectParams(config_, &loaded);
    std::vector<Param> to = CollectParams(config_, &weights);
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < to.size(); ++i) to[i].tensor.copy_(from[i].tensor);
    if (o_.vtw_distill > 0) {  // the teacher: its own copy of the starting weights, frozen
      LlavaWeights teacher = weights;
      ForEachLlavaTensor(config_, &teacher, [](const std::string&, const std::vector<int64_t>&,
                                              at::Tensor* slot, InitKind) {
        if (slot != nullptr) *slot = slot->clone();
      });
      teacher_ = std::make_unique<LlavaModel>(config_, std::move(teacher), at::kFloat);
    }
    if (log_) *log_ << "[train] initialised from " << o_.init_from << " (" << to.size() << " tensors)\n";
  }
  params_ = CollectParams(config_, &weights);
  unused_ = UnusedTensors(config_, o_.seed + 1, o_.init_std);
  std::vector<at::Tensor> decay, no_decay;
  for (Param& p : params_) {
    p.tensor.requires_grad_(true);
    (p.decay ? decay : no_decay).push_back(p.tensor);
  }
  if (o_.aux_patch_loss > 0) {
    aux_grid_ = config_.vision.image_size / config_.vision.patch_size;
    const int64_t aux_outputs = 7 + 4 + 3 + 2 * aux_grid_;
    at::Generator aux_gen = at::make_generator<at::CPUGeneratorImpl>(o_.seed + 2);
    aux_w_ = at::empty({aux_outputs, config_.text.hidden_size}, at::kFloat)
                 .normal_(0.0, o_.init_std, aux_gen);
    aux_b_ = at::zeros({aux_outputs}, at::kFloat);
    aux_row_ = at::arange(aux_grid_ * aux_grid_, at::kLong).floor_divide(aux_grid_);
    aux_col_ = at::arange(aux_grid_ * aux_grid_, at::kLong).remainder(aux_grid_);
    aux_w_.requires_grad_(true);
    aux_b_.requires_grad_(true);
    params_.push_back({"aux/patch_head.weight", aux_w_, true});
    params_.push_back({"aux/patch_head.bias", aux_b_, false});
    decay.push_back(aux_w_);
    no_decay.push_back(aux_b_);
  }
  model_ = std::make_unique<LlavaModel>(config_, weights, at::kFloat);
  using torch::optim::AdamWOptions;
  auto decay_opts = std::make_unique<AdamWOptions>(o_.lr);
  decay_opts->betas({o_.beta1, o_.beta2}).weight_decay(o_.weight_decay).eps(1e-8);
  auto no_decay_opts = std::make_unique<AdamWOptions>(o_.lr);
  no_decay_opts->betas({o_.beta1, o_.beta2}).weight_decay(0.0).eps(1e-8);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::move(decay_opts));
  groups.emplace_back(no_decay, std::move(no_decay_opts));
  optimizer_ = std::make_unique<torch::optim::AdamW>(groups, AdamWOptions(o_.lr));
  all_params_ = decay;
  all_params_.insert(all_params_.end(), no_decay.begin(), no_decay.end());
  rng_.seed(o_.seed * 0x9E3779B97F4A7C15ULL + 0x5eed);
  return Status::Ok();
}

Status TrainingRun::Resume() {
  std::error_code ec;
  const fs::path ckpt_dir = o_.checkpoint_dir;
  const fs::path ckpt_json = ckpt_dir / "checkpoint.json";
  if (!o_.resume || !fs::exists(ckpt_json, ec)) {
    if (o_.resume && log_) {
      *log_ << "[train] no checkpoint in " << ckpt_dir.string() << ": starting from step 0\n";
    }
    result_.start_step = step_;
    return Status::Ok();
  }
  std::ifstream in(ckpt_json);
  json j = json::parse(in, nullptr, false);
  if (j.is_discarded()) return DataLoss(ckpt_json.string() + ": not valid JSON");
  if (j["config"] != LlavaConfigToJson(config_)) {
    return FailedPrecondition(ckpt_json.string() + ": the checkpoint's model config differs "
                              "from this run's (same flags and tokenizer needed to resume)");
  }
  step_ = j["step"].get<int>();
  std::istringstream rs(j["rng"].get<std::string>());
  rs >> rng_;
  curve_ = j.value("curve", json::array());
  torch::serialize::InputArchive archive;
  archive.load_from((ckpt_dir / "checkpoint.pt").string());
  {
    at::NoGradGuard no_grad;
    for (Param& p : params_) {
      at::Tensor t;
      archive.read("w/" + p.name, t);
      p.tensor.copy_(t);
    }
  }
  torch::serialize::InputArchive opt_archive;
  archive.read("optimizer", opt_archive);
  optimizer_->load(opt_archive);
  if (log_) *log_ << "[train] resumed from " << ckpt_dir.string() << " at step " << step_ << "\n";
  result_.start_step = step_;
  return Status::Ok();
}

Status TrainingRun::SaveCheckpoint(int at_step) {
  const fs::path ckpt_dir = o_.checkpoint_dir;
  const fs::path ckpt_pt = ckpt_dir / "checkpoint.pt";
  const fs::path ckpt_json = ckpt_dir / "checkpoint.json";
  std::error_code e;
  fs::create_directories(ckpt_dir, e);
  torch::serialize::OutputArchive archive;
  for (const Param& p : params_) archive.write("w/" + p.name, p.tensor.detach());
  torch::serialize::OutputArchive opt_archive;
  optimizer_->save(opt_archive);
  archive.write("optimizer", opt_archive);
  archive.save_to((ckpt_dir / "checkpoint.pt.tmp").string());
  fs::rename(ckpt_dir / "checkpoint.pt.tmp", ckpt_pt, e);
  if (e) return Internal("cannot write " + ckpt_pt.string());
  std::ostringstream rs;
  rs << rng_;
  json j = {{"step", at_step}, {"rng", rs.str()}, {"config", LlavaConfigToJson(config_)},
            {"options", OptionsJson(o_)}, {"curve", curve_}};
  VTW_RETURN_IF_ERROR(WriteJson(ckpt_dir / "checkpoint.json.tmp", j));
  fs::rename(ckpt_dir / "checkpoint.json.tmp", ckpt_json, e);
  if (e) return Internal("cannot write " + ckpt_json.string());
  return Status::Ok();
}

EvalResult TrainingRun::Validate(int at_step) {
  const bool tty = isatty(fileno(stderr)) && log_ == &std::cerr;
  EvalResult v = Evaluate(*model_, val_, layers_);
  json point = {{"step", at_step}, {"train_loss_ema", ema_loss_}, {"train_acc_ema", ema_acc_},
                {"val", EvalJson(v)}};
  std::string line = "[val] step " + std::to_string(at_step) + " VTW off: " + EvalLine(v);
  if (o_.val_vtw_layer >= 0 && o_.val_vtw_layer < layers_) {
    EvalResult vk = Evaluate(*model_, val_, o_.val_vtw_layer);
    point["val_k"] = {{"k", o_.val_vtw_layer}, {"result", EvalJson(vk)}};
    line += "\n[val] step " + std::to_string(at_step) + " K=" + std::to_string(o_.val_vtw_layer) +
            ": " + EvalLine(vk);
  }
  curve_.push_back(point);
  if (log_) *log_ << (tty ? "\n" : "") << line << "\n" << std::flush;
  return v;
}

at::Tensor TrainingRun::AuxLoss(const at::Tensor& features, const std::vector<int64_t>& images,
                                double* kind_acc) {
  at::Tensor img = at::tensor(images, at::TensorOptions().dtype(at::kLong));
  at::Tensor aux = at::linear(features.reshape({-1, features.size(2)}), aux_w_, aux_b_);
  at::Tensor color = train_.patch_color.index_select(0, img).flatten();
  at::Tensor kind = train_.patch_kind.index_select(0, img).flatten();
  at::Tensor side = train_.patch_side.index_select(0, img).flatten();
  const int64_t n_img = img.size(0);
  at::Tensor rows = aux_row_.repeat({n_img}), cols = aux_col_.repeat({n_img});
  at::Tensor kind_logits = aux.narrow(1, 7, 4);
  at::Tensor l = at::cross_entropy_loss(aux.narrow(1, 0, 7), color) +
                 at::cross_entropy_loss(kind_logits, kind) +
                 at::cross_entropy_loss(aux.narrow(1, 11, 3), side) +
                 at::cross_entropy_loss(aux.narrow(1, 14, aux_grid_), rows) +
                 at::cross_entropy_loss(aux.narrow(1, 14 + aux_grid_, aux_grid_), cols);
  at::Tensor covered = kind > 0;
  const double n_covered = covered.sum().item<double>();
  if (kind_acc && n_covered > 0) {
    *kind_acc =
        ((kind_logits.detach().argmax(-1) == kind) & covered).sum().item<double>() / n_covered;
  }
  return l;
}

// Vision pre-training: only the tower, the projector and the patch-label head, on the patch
// labels (no decoder: cheap). Like LLaVA's pre-trained CLIP tower, the decoder then starts from
// image tokens that already tell shapes apart. Its own optimizer: the main stage's starts fresh.
Status TrainingRun::VisionStage() {
  using torch::optim::AdamWOptions;
  std::vector<at::Tensor> vision_params;
  for (const Param& p : params_) {
    if (p.name.rfind("language_model.", 0) != 0) vision_params.push_back(p.tensor);
  }
  auto vopts = std::make_unique<AdamWOptions>(o_.lr);
  vopts->betas({o_.beta1, o_.beta2}).weight_decay(o_.weight_decay).eps(1e-8);
  std::vector<torch::optim::OptimizerParamGroup> vgroups;
  vgroups.emplace_back(vision_params, std::move(vopts));
  torch::optim::AdamW vopt(vgroups, AdamWOptions(o_.lr));
  TrainOptions vo = o_;
  vo.steps = o_.vision_steps;
  vo.warmup = std::min(o_.warmup, o_.vision_steps / 4);
  const auto vstart = Clock::now();
  double ema_l = -1, ema_k = -1;
  for (int vs = 0; vs < o_.vision_steps; ++vs) {
    std::vector<int64_t> images;
    for (int i = 0; i < o_.vision_batch; ++i) {
      images.push_back(UniformIndex(rng_, static_cast<int64_t>(by_image_.size())));
    }
    const double lr = LearningRate(vo, vs);
    for (auto& group : vopt.param_groups()) static_cast<AdamWOptions&>(group.options()).lr(lr);
    at::Tensor features = model_->EncodeImages(train_.Pixels(images));
    double kind_acc = -1;
    at::Tensor l = AuxLoss(features, images, &kind_acc);
    vopt.zero_grad();
    l.backward();
    if (o_.clip_norm > 0) torch::nn::utils::clip_grad_norm_(vision_params, o_.clip_norm);
    vopt.step();
    const double lv = l.item<double>();
    if (!std::isfinite(lv)) return Internal("vision pre-training diverged at step " + std::to_string(vs));
    UpdateEma(&ema_l, lv);
    if (kind_acc >= 0) UpdateEma(&ema_k, kind_acc);
    const int done = vs + 1;
    if (log_ && (done % 50 == 0 || done == o_.vision_steps || done == 1)) {
      const double el = Seconds(vstart);
      char buf[200];
      std::snprintf(buf, sizeof(buf),
                    "[vision] step %d/%d patch-label loss %.4f kind acc %.3f lr %.2e elapsed %s "
                    "ETA %s",
                    done, o_.vision_steps, ema_l, ema_k, lr, FormatDuration(el).c_str(),
                    FormatDuration(el / done * (o_.vision_steps - done)).c_str());
      *log_ << buf << "\n" << std::flush;
    }
  }
  loop_start_ = Clock::now();
  return Status::Ok();
}

// Random training images. One question per sequence: all of each image's questions, until the
// batch is full. Multi-turn: one sequence per image, its questions in random order (so every
// question type is the first, single-question-form turn equally often).
std::vector<std::vector<int64_t>> TrainingRun::SampleGroups() {
  std::vector<std::vector<int64_t>> groups;
  int64_t questions = 0;
  while (o_.turns > 1 ? static_cast<int>(groups.size()) < o_.batch_size
                      : questions < o_.batch_size) {
    std::vector<int64_t> qs = by_image_[UniformIndex(rng_, static_cast<int64_t>(by_image_.size()))];
    if (o_.turns > 1) {
      for (size_t i = qs.size(); i > 1; --i) {
        std::swap(qs[i - 1], qs[UniformIndex(rng_, static_cast<int64_t>(i))]);
      }
      if (static_cast<int>(qs.size()) > o_.turns) qs.resize(o_.turns);
      questions += static_cast<int64_t>(qs.size());
      groups.push_back(std::move(qs));
      continue;
    }
    for (int64_t e : qs) {
      if (questions < o_.batch_size) {
        groups.push_back({e});
        ++questions;
      }
    }
  }
  return groups;
}

// VTW-aware training: a fraction of the sequences withdraw their image rows before a layer
// drawn uniformly from [vtw_train_min_layer, vtw_train_max_layer]; the rest run the full model.
std::vector<int> TrainingRun::DrawWithdrawLayers(size_t sequences) {
  std::vector<int> withdraw(sequences, WithdrawalOff(layers_));
  for (size_t s = 0; s < sequences; ++s) {
    if (o_.vtw_train_fraction > 0 && Uniform01(rng_) < o_.vtw_train_fraction) {
      withdraw[s] = o_.vtw_train_min_layer +
                    static_cast<int>(UniformIndex(rng_, vtw_max_layer_ - o_.vtw_train_min_layer + 1));
    }
  }
  return withdraw;
}

Status TrainingRun::TrainStep(double lr) {
  using torch::optim::AdamWOptions;
  const std::vector<std::vector<int64_t>> groups = SampleGroups();
  const std::vector<int> withdraw = DrawWithdrawLayers(groups.size());
  for (auto& group : optimizer_->param_groups()) {
    static_cast<AdamWOptions&>(group.options()).lr(lr);
  }
  const bool profile = std::getenv("VTW_TRAIN_PROFILE") != nullptr;
  const auto t0 = Clock::now();
  Batch b = AssembleBatch(*model_, train_, groups, withdraw);
  const auto t1 = Clock::now();
  at::Tensor logits = TargetLogits(*model_, b);
  at::Tensor tgt = at::tensor(b.targets, at::TensorOptions().dtype(at::kLong));
  at::Tensor answer_loss = at::cross_entropy_loss(logits, tgt);
  at::Tensor loss = answer_loss;
  if (teacher_) {
    // KL(teacher || student) per answer token, the teacher with VTW off on the same sequences.
    at::Tensor teacher_logp;
    {
      at::NoGradGuard no_grad;
      const Batch tb = AssembleBatch(*teacher_, train_, groups,
                                     std::vector<int>(groups.size(), WithdrawalOff(layers_)));
      teacher_logp = at::log_softmax(TargetLogits(*teacher_, tb), -1);
    }
    at::Tensor kl = (teacher_logp.exp() * (teacher_logp - at::log_softmax(logits, -1)))
                        .sum(-1).mean();
    loss = loss + o_.vtw_distill * kl;
    UpdateEma(&ema_distill_, kl.item<double>());
  }
  if (o_.aux_patch_loss > 0) {
    double kind_acc = -1;
    loss = loss + o_.aux_patch_loss * AuxLoss(b.features, b.images, &kind_acc);
    if (kind_acc >= 0) {
      UpdateEma(&ema_aux_kind_, kind_acc);
    }
  }
  const auto t2 = Clock::now();
  optimizer_->zero_grad();
  loss.backward();
  const auto t3 = Clock::now();
  if (o_.clip_norm > 0) torch::nn::utils::clip_grad_norm_(all_params_, o_.clip_norm);
  optimizer_->step();
  if (profile && log_) {
    auto sec = [](Clock::time_point a, Clock::time_point b2) {
      return std::chrono::duration<double>(b2 - a).count();
    };
    *log_ << "[profile] vision " << sec(t0, t1) << " s, decoder fwd " << sec(t1, t2)
          << " s, backward " << sec(t2, t3) << " s, optimizer " << sec(t3, Clock::now())
          << " s, rows " << b.tokens << "\n";
  }
  const double l = answer_loss.item<double>();  // the answer loss (without the auxiliary)
  if (!std::isfinite(l)) {
    return Internal("training diverged: loss " + std::to_string(l) + " at step " +
                    std::to_string(step_));
  }
  at::Tensor first_idx = at::tensor(b.first_target, at::TensorOptions().dtype(at::kLong));
  const double acc = (logits.detach().index_select(0, first_idx).argmax(-1) ==
                      tgt.index_select(0, first_idx))
                         .to(at::kFloat).mean().item<double>();
  result_.losses.push_back(l);
  UpdateEma(&ema_loss_, l);
  UpdateEma(&ema_acc_, acc);
  tokens_done_ += b.tokens;
  return Status::Ok();
}

void TrainingRun::LogStep(int done, int end_step, double lr, bool tty) {
  const double elapsed = Seconds(loop_start_);
  const double per_step = elapsed / (done - first_step_);
  const bool line_due = !tty && (done % 10 == 0 || done == end_step || done == first_step_ + 1);
  if (!log_ || !(tty || line_due)) return;
  char buf[320];
  char aux_text[24] = "", kl_text[24] = "";
  if (ema_aux_kind_ >= 0) std::snprintf(aux_text, sizeof(aux_text), " aux-kind %.3f", ema_aux_kind_);
  if (ema_distill_ >= 0) std::snprintf(kl_text, sizeof(kl_text), " kl %.4f", ema_distill_);
  const int width = 24;
  const int filled = static_cast<int>(width * static_cast<double>(done) / o_.steps);
  std::string bar(filled, '=');
  bar.resize(width, ' ');
  std::snprintf(buf, sizeof(buf),
                "%sstep %d/%d [%s] loss %.4f acc %.3f%s%s lr %.2e %.0f tok/s elapsed %s ETA %s",
                tty ? "\r" : "", done, o_.steps, bar.c_str(), ema_loss_, ema_acc_, aux_text,
                kl_text, lr,
                tokens_done_ / elapsed, FormatDuration(elapsed).c_str(),
                FormatDuration(per_step * (end_step - done)).c_str());
  *log_ << buf << (tty ? "" : "\n") << std::flush;
}

Status TrainingRun::MainStage() {
  const bool tty = isatty(fileno(stderr)) && log_ == &std::cerr;
  const int end_step = o_.stop_after > 0 ? std::min(o_.steps, o_.stop_after) : o_.steps;
  for (; step_ < end_step; ++step_) {
    const double lr = LearningRate(o_, step_);
    VTW_RETURN_IF_ERROR(TrainStep(lr));
    const int done = step_ + 1;
    LogStep(done, end_step, lr, tty);
    if (o_.eval_every > 0 && done % o_.eval_every == 0 && done != end_step) Validate(done);
    if (!o_.checkpoint_dir.empty() && o_.checkpoint_every > 0 && done % o_.checkpoint_every == 0) {
      VTW_RETURN_IF_ERROR(SaveCheckpoint(done));
    }
  }
  result_.end_step = step_;
  if (log_ && tty) *log_ << "\n";
  if (!o_.checkpoint_dir.empty()) VTW_RETURN_IF_ERROR(SaveCheckpoint(step_));
  for (auto& p : params_) p.tensor.requires_grad_(false);
  return Status::Ok();
}

// Final validation (VTW off, and at every K when asked), the model directory, training.json.
Status TrainingRun::Finish() {
  result_.final_val = Validate(step_);
  json by_k = json::object();
  if (o_.final_eval_all_k) {
    for (int k = 0; k < layers_; ++k) {
      result_.final_val_by_k[k] = Evaluate(*model_, val_, k);
      by_k[std::to_string(k)] = EvalJson(result_.final_val_by_k[k]);
      if (log_) *log_ << "[val] final K=" << k << ": " << EvalLine(result_.final_val_by_k[k]) << "\n";
    }
  }
  const bool bf16 = o_.save_dtype == "bf16" || o_.save_dtype == "bfloat16";
  VTW_RETURN_IF_ERROR(WriteModelDirectory(o_.out_dir, bf16, config_, model_->mutable_weights(),
                                          unused_, tokenizer_dir_, sp_vocab_));
  result_.seconds = Seconds(start_);
  int64_t num_params = 0;
  for (const Param& p : params_) num_params += p.name.rfind("aux/", 0) == 0 ? 0 : p.tensor.numel();
  json training = {{"trainer", "vtw train (train/trainer.cc)"},
                   {"options", OptionsJson(o_)},
                   {"config", LlavaConfigToJson(config_)},
                   {"parameters", num_params},
                   {"data",
                    {{"train", {{"split", "train"}, {"seed", o_.data_seed},
                                {"questions", train_.examples.size()},
                                {"images", train_.pixels_u8.size(0)}}},
                     {"val", {{"split", "val"}, {"seed", o_.data_seed},
                              {"questions", val_.examples.size()},
                              {"images", val_.pixels_u8.size(0)}}}}},
                   {"vtw_aware_training",
                    {{"fraction", o_.vtw_train_fraction},
                     {"min_layer", o_.vtw_train_min_layer},
                     {"max_layer", vtw_max_layer_},
                     {"description",
                      "this fraction of training sequences withdrew their image tokens before a "
                      "decoder layer drawn uniformly from [min_layer, max_layer]"}}},
                   {"distillation",
                    {{"weight", o_.vtw_distill},
                     {"teacher", o_.vtw_distill > 0 ? o_.init_from : ""},
                     {"final_kl_ema", ema_distill_},
                     {"description",
                      "weight times KL(teacher || student) of the answer tokens, the teacher "
                      "(the --init-from model, frozen, VTW off) on the same sequences, was added "
                      "to the loss"}}},
                   {"auxiliary_patch_loss",
                    {{"weight", o_.aux_patch_loss},
                     {"description",
                      "training only: a linear head (discarded) on the projected image tokens "
                      "predicted each patch's shape colour and kind (or background) from the "
                      "scene geometry; weight times its cross-entropy was added to the loss"}}},
                   {"start_step", result_.start_step},
                   {"end_step", result_.end_step},
                   {"final_train_loss_ema", ema_loss_},
                   {"final_val", EvalJson(result_.final_val)},
                   {"final_val_by_k", by_k},
                   {"curve", curve_},
                   {"seconds", result_.seconds},
                   {"threads", o_.threads}};
  VTW_RETURN_IF_ERROR(WriteJson(fs::path(o_.out_dir) / "training.json", training));
  if (log_) {
    *log_ << "[train] wrote " << o_.out_dir << " in " << FormatDuration(result_.seconds)
          << "; val VTW off: " << EvalLine(result_.final_val) << "\n";
  }
  return Status::Ok();
}

}  // namespace

StatusOr<LlavaConfig> MakeTrainConfig(const std::string& preset, const Geometry& g,
                                      int sp_vocab_size) {
  LlavaConfig c;
  VisionConfig& v = c.vision;
  TextConfig& t = c.text;
  v.hidden_act = "quick_gelu";
  v.layer_norm_eps = 1e-5;
  t.rms_norm_eps = 1e-5;
  t.rope_theta = 10000.0;
  c.vision_feature_layer = -2;
  c.vision_feature_select_strategy = "default";
  if (preset == "tiny") {
    v.image_size = 32; v.patch_size = 8; v.hidden_size = 32; v.intermediate_size = 64;
    v.num_hidden_layers = 2; v.num_attention_heads = 2;
    t.hidden_size = 32; t.intermediate_size = 64; t.num_hidden_layers = 2;
    t.num_attention_heads = 2; t.num_key_value_heads = 1; t.max_position_embeddings = 128;
  } else if (preset == "shipped") {
    v.image_size = 64; v.patch_size = 8; v.hidden_size = 192; v.intermediate_size = 768;
    v.num_hidden_layers = 3; v.num_attention_heads = 4;
    t.hidden_size = 192; t.intermediate_size = 512; t.num_hidden_layers = 6;
    t.num_attention_heads = 4; t.num_key_value_heads = 2; t.max_position_embeddings = 256;
  } else {
    return InvalidArgument("unknown preset '" + preset + "' (tiny or shipped)");
  }
  auto set = [](int value, int* field) { if (value > 0) *field = value; };
  set(g.image_size, &v.image_size);
  set(g.patch_size, &v.patch_size);
  set(g.vision_hidden, &v.hidden_size);
  set(g.vision_intermediate, &v.intermediate_size);
  set(g.vision_layers, &v.num_hidden_layers);
  set(g.vision_heads, &v.num_attention_heads);
  if (g.vision_feature_layer != 0) c.vision_feature_layer = g.vision_feature_layer;
  set(g.text_hidden, &t.hidden_size);
  set(g.text_intermediate, &t.intermediate_size);
  set(g.text_layers, &t.num_hidden_layers);
  set(g.text_heads, &t.num_attention_heads);
  set(g.text_kv_heads, &t.num_key_value_heads);
  set(g.max_positions, &t.max_position_embeddings);
  if (v.image_size % v.patch_size != 0 || v.hidden_size % v.num_attention_heads != 0 ||
      t.hidden_size % t.num_attention_heads != 0 ||
      t.num_attention_heads % t.num_key_value_heads != 0) {
    return InvalidArgument("geometry: image size must be a multiple of the patch size, hidden "
                           "sizes of the head counts, heads of kv heads");
  }
  t.head_dim = t.hidden_size / t.num_attention_heads;
  if (t.head_dim % 2 != 0) return InvalidArgument("geometry: text head_dim must be even");
  t.vocab_size = sp_vocab_size + 2;  // + <image>, <pad>
  t.bos_token_id = 1;
  t.eos_token_id = 2;
  c.image_token_index = sp_vocab_size;
  const int used = c.vision_layers_used();
  if (used < 1 || used > v.num_hidden_layers) {
    return InvalidArgument("geometry: vision_feature_layer out of range");
  }
  c.name = "vtw-shapes";
  return c;
}

StatusOr<TrainResult> RunTraining(const TrainOptions& options, std::ostream* log) {
  TrainingRun run(options, log);
  return run.Run();
}

}  // namespace vtw::tools
