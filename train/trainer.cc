#include "train/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <random>
#include <sstream>
#include <thread>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#include <torch/types.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim.h>
#include <torch/serialize.h>

#include <opencv2/imgproc.hpp>

#include "model/image_processor.h"
#include "model/prompt_layout.h"
#include "model/safetensors.h"
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

int TypeIndexOf(const std::string& type) {
  for (size_t t = 0; t < kQuestionTypes.size(); ++t) {
    if (type == kQuestionTypes[t]) return static_cast<int>(t);
  }
  return -1;
}

ImageProcessorConfig ProcessorFor(const LlavaConfig& config) {
  ImageProcessorConfig ipc;  // OpenAI CLIP mean/std, bicubic, rescale 1/255
  ipc.shortest_edge = config.vision.image_size;
  ipc.crop_height = ipc.crop_width = config.vision.image_size;
  return ipc;
}

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

// One assembled batch: the forward batch and where its targets are.
struct Batch {
  ForwardBatch fb;
  std::vector<int64_t> target_rows;  // original batch row whose logits predict each target
  std::vector<int64_t> targets;
  std::vector<int> target_seq;       // sequence of each target
  std::vector<int64_t> first_target; // index into targets of each sequence's first target
  int64_t tokens = 0;
  at::Tensor features;               // [n_img, P, Ht] projected image tokens
  std::vector<int64_t> images;       // split image index of each features row
};

// A batch of sequences; each sequence is a group of examples over one image: the first in its
// single-question form, the others as later conversation turns.
Batch AssembleBatch(const LlavaModel& model, const EncodedSplit& data,
                    const std::vector<std::vector<int64_t>>& groups,
                    const std::vector<int>& withdraw) {
  Batch b;
  // Unique images, in first-use order.
  std::vector<int64_t> images;
  std::vector<int64_t> seq_image(groups.size());
  std::map<int32_t, int64_t> image_slot;
  for (size_t s = 0; s < groups.size(); ++s) {
    const int32_t img = data.examples[groups[s].front()].image;
    auto it = image_slot.find(img);
    if (it == image_slot.end()) {
      it = image_slot.emplace(img, static_cast<int64_t>(images.size())).first;
      images.push_back(img);
    }
    seq_image[s] = it->second;
  }
  at::Tensor features = model.EncodeImages(data.Pixels(images));  // [n_img, P, Ht]
  b.features = features;
  b.images = images;
  const int64_t p = features.size(1), ht = features.size(2);
  at::Tensor idx = at::tensor(seq_image, at::TensorOptions().dtype(at::kLong));
  b.fb.image_embeds = features.index_select(0, idx).reshape({-1, ht});
  int64_t base = 0;
  for (size_t s = 0; s < groups.size(); ++s) {
    // The sequence: turn 0's prompt (with the image rows) and answer + EOS, then each later
    // turn's prompt and answer + EOS; the final EOS is only a target, never an input.
    std::vector<int64_t> ids;
    std::vector<TokenKind> kinds;
    b.first_target.push_back(static_cast<int64_t>(b.targets.size()));
    for (size_t t = 0; t < groups[s].size(); ++t) {
      const TrainExample& ex = data.examples[groups[s][t]];
      if (t == 0) {
        ids.insert(ids.end(), ex.prompt_ids.begin(), ex.prompt_ids.end());
        kinds.insert(kinds.end(), ex.kinds.begin(), ex.kinds.end());
      } else {
        ids.insert(ids.end(), ex.turn_ids.begin(), ex.turn_ids.end());
        kinds.resize(ids.size(), TokenKind::kText);
      }
      for (size_t j = 0; j < ex.target_ids.size(); ++j) {
        b.target_rows.push_back(base + static_cast<int64_t>(ids.size()) - 1);
        b.targets.push_back(ex.target_ids[j]);
        b.target_seq.push_back(static_cast<int>(s));
        ids.push_back(ex.target_ids[j]);
        kinds.push_back(TokenKind::kText);
      }
    }
    const int64_t n = static_cast<int64_t>(ids.size()) - 1;
    int64_t image_rows = 0;
    for (int64_t i = 0; i < n; ++i) {
      b.fb.token_ids.push_back(ids[i]);
      b.fb.kinds.push_back(kinds[i]);
      b.fb.positions.push_back(i);
      image_rows += kinds[i] == TokenKind::kImage;
    }
    TORCH_CHECK(image_rows == p, "example image rows differ from the model's image tokens");
    b.fb.seqs.push_back({/*cache=*/nullptr, static_cast<int>(n), withdraw[s], /*compute_logits=*/false});
    base += n;
  }
  b.tokens = base;
  return b;
}

// Logits [targets, V] of the batch's target rows.
at::Tensor TargetLogits(const LlavaModel& model, const Batch& b) {
  ForwardTrace trace;
  trace.all_logits = true;
  model.Forward(b.fb, &trace);
  std::vector<int64_t> final_index(b.fb.num_tokens(), -1);
  for (size_t i = 0; i < trace.final_rows.size(); ++i) {
    final_index[trace.final_rows[i]] = static_cast<int64_t>(i);
  }
  std::vector<int64_t> gather(b.target_rows.size());
  for (size_t i = 0; i < gather.size(); ++i) {
    gather[i] = final_index[b.target_rows[i]];
    TORCH_CHECK(gather[i] >= 0, "a target row was withdrawn");
  }
  return trace.logits_all.index_select(0, at::tensor(gather, at::TensorOptions().dtype(at::kLong)));
}

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

// Tensors a checkpoint holds that the runtime never uses (post_layernorm, vision layers past
// the feature layer), initialised as HF would (deterministically from `seed`).
std::map<std::string, at::Tensor> UnusedTensors(const LlavaConfig& config, uint64_t seed,
                                                double init_std) {
  std::map<std::string, at::Tensor> out;
  LlavaWeights dummy;
  ResizeLlavaWeights(config, &dummy);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  ForEachLlavaTensor(config, &dummy, [&](const std::string& name,
                                         const std::vector<int64_t>& shape, at::Tensor* slot,
                                         InitKind init) {
    if (slot != nullptr) return;
    if (name == "language_model.lm_head.weight") return;  // tied: not stored separately
    switch (init) {
      case InitKind::kNormal: out[name] = at::empty(shape, at::kFloat).normal_(0.0, init_std, gen); break;
      case InitKind::kOnes: out[name] = at::ones(shape, at::kFloat); break;
      case InitKind::kZeros: out[name] = at::zeros(shape, at::kFloat); break;
    }
  });
  return out;
}

Status WriteJson(const fs::path& path, const json& j) {
  std::ofstream out(path);
  out << j.dump(2) << "\n";
  if (!out) return Internal("cannot write " + path.string());
  return Status::Ok();
}

Status WriteModelDirectory(const TrainOptions& o, const LlavaConfig& config, LlavaWeights& weights,
                           const std::map<std::string, at::Tensor>& unused,
                           const std::string& tokenizer_dir, int sp_vocab) {
  const fs::path dir(o.out_dir);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Internal("cannot create " + dir.string() + ": " + ec.message());
  const bool bf16 = o.save_dtype == "bf16" || o.save_dtype == "bfloat16";
  json cfg = LlavaConfigToJson(config);
  cfg["torch_dtype"] = bf16 ? "bfloat16" : "float32";
  cfg["pad_token_id"] = sp_vocab + 1;
  cfg["ignore_index"] = -100;
  cfg["transformers_version"] = "4.45.2";
  cfg["text_config"]["torch_dtype"] = cfg["torch_dtype"];
  cfg["text_config"]["pad_token_id"] = sp_vocab + 1;
  VTW_RETURN_IF_ERROR(WriteJson(dir / "config.json", cfg));

  std::vector<at::Tensor> keep;
  std::vector<TensorToWrite> tensors;
  Status status;
  ForEachLlavaTensor(config, &weights, [&](const std::string& name,
                                           const std::vector<int64_t>& shape, at::Tensor* slot,
                                           InitKind) {
    at::Tensor t;
    if (slot != nullptr) {
      t = *slot;
    } else {
      auto it = unused.find(name);
      if (it == unused.end()) return;
      t = it->second;
    }
    t = t.detach().to(bf16 ? at::kBFloat16 : at::kFloat).contiguous();
    if (t.sizes().vec() != shape) status = Internal("tensor " + name + " has the wrong shape");
    keep.push_back(t);
    TensorToWrite w;
    w.name = name;
    w.dtype = bf16 ? SafetensorsDType::kBF16 : SafetensorsDType::kF32;
    w.shape = shape;
    w.data = t.data_ptr();
    w.nbytes = static_cast<size_t>(t.numel() * t.element_size());
    tensors.push_back(w);
  });
  VTW_RETURN_IF_ERROR(status);
  VTW_RETURN_IF_ERROR(
      WriteSafetensors((dir / "model.safetensors").string(), tensors, {{"format", "pt"}}));

  if (fs::weakly_canonical(tokenizer_dir, ec) != fs::weakly_canonical(dir, ec)) {
    for (const char* f : {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                          "added_tokens.json"}) {
      fs::copy_file(fs::path(tokenizer_dir) / f, dir / f, fs::copy_options::overwrite_existing, ec);
      if (ec) return Internal("cannot copy " + std::string(f) + " to " + dir.string());
    }
  }
  const int s = config.vision.image_size;
  const ImageProcessorConfig ipc = ProcessorFor(config);
  json pre = {{"crop_size", {{"height", s}, {"width", s}}},
              {"do_center_crop", true},
              {"do_convert_rgb", true},
              {"do_normalize", true},
              {"do_rescale", true},
              {"do_resize", true},
              {"image_mean", {ipc.image_mean[0], ipc.image_mean[1], ipc.image_mean[2]}},
              {"image_std", {ipc.image_std[0], ipc.image_std[1], ipc.image_std[2]}},
              {"image_processor_type", "CLIPImageProcessor"},
              {"processor_class", "LlavaProcessor"},
              {"resample", 3},
              {"rescale_factor", 1.0 / 255.0},
              {"size", {{"shortest_edge", s}}}};
  VTW_RETURN_IF_ERROR(WriteJson(dir / "preprocessor_config.json", pre));
  json proc = {{"image_token", "<image>"},
               {"num_additional_image_tokens", 1},
               {"patch_size", config.vision.patch_size},
               {"processor_class", "LlavaProcessor"},
               {"vision_feature_select_strategy", config.vision_feature_select_strategy}};
  VTW_RETURN_IF_ERROR(WriteJson(dir / "processor_config.json", proc));
  json gen = {{"_from_model_config", true},
              {"bos_token_id", config.text.bos_token_id},
              {"eos_token_id", config.text.eos_token_id},
              {"pad_token_id", sp_vocab + 1},
              {"transformers_version", "4.45.2"}};
  VTW_RETURN_IF_ERROR(WriteJson(dir / "generation_config.json", gen));
  return Status::Ok();
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

}  // namespace

at::Tensor EncodedSplit::Pixels(const std::vector<int64_t>& idx) const {
  at::Tensor lut_t = at::from_blob(const_cast<float*>(lut.data()), {3 * 256}, at::kFloat);
  at::Tensor px = pixels_u8.index_select(0, at::tensor(idx, at::TensorOptions().dtype(at::kLong)))
                      .to(at::kLong);
  at::Tensor offset = (at::arange(3, at::kLong) * 256).view({1, 3, 1, 1});
  return lut_t.index_select(0, (px + offset).flatten()).view(px.sizes());
}

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

StatusOr<EncodedSplit> BuildSplit(const std::string& split, int64_t count, uint64_t seed,
                                  int questions_per_image, const Tokenizer& tokenizer,
                                  const LlavaConfig& config, int threads, std::ostream* log) {
  const auto start = Clock::now();
  // Scenes and questions sequentially, exactly as GenerateDataset (the balancer is sequential).
  std::vector<Scene> scenes;
  std::vector<std::vector<QaExample>> questions;
  QuestionBalancer balancer;
  int64_t done = 0;
  for (int64_t image = 0; done < count; ++image) {
    std::mt19937_64 rng(ImageSeed(seed, split, image));
    scenes.push_back(RandomScene(rng));
    const int64_t want = std::min<int64_t>(questions_per_image, count - done);
    questions.push_back(QuestionsFor(scenes.back(), rng, static_cast<int>(want), &balancer));
    done += static_cast<int64_t>(questions.back().size());
  }
  const int64_t n = static_cast<int64_t>(scenes.size());
  const int s = config.vision.image_size;
  const ImageProcessorConfig ipc = ProcessorFor(config);
  EncodedSplit out;
  // The float PreprocessImage gives byte value b of channel c (its exact arithmetic).
  out.lut.resize(3 * 256);
  for (int c = 0; c < 3; ++c) {
    for (int b = 0; b < 256; ++b) {
      const float x = static_cast<float>(static_cast<double>(b) * ipc.rescale_factor);
      out.lut[c * 256 + b] =
          (x - static_cast<float>(ipc.image_mean[c])) / static_cast<float>(ipc.image_std[c]);
    }
  }
  out.pixels_u8 = at::empty({n, 3, s, s}, at::kByte);
  uint8_t* dst = out.pixels_u8.data_ptr<uint8_t>();
  const int64_t per_image = 3LL * s * s;
  std::vector<Status> errors(std::max(1, threads));
  std::vector<std::thread> workers;
  for (int w = 0; w < std::max(1, threads); ++w) {
    workers.emplace_back([&, w]() {
      for (int64_t i = w; i < n; i += std::max(1, threads)) {
        cv::Mat bgr = RenderScene(scenes[i]);
        auto bytes = EncodeScene(scenes[i], bgr);
        if (!bytes.ok()) { errors[w] = bytes.status(); return; }
        auto rgb = DecodeImage(std::string_view(reinterpret_cast<const char*>(bytes->data()),
                                                bytes->size()), ImageLimits{});
        if (!rgb.ok()) { errors[w] = rgb.status(); return; }
        auto chw = PreprocessImage(*rgb, ipc);
        if (!chw.ok()) { errors[w] = chw.status(); return; }
        for (int64_t j = 0; j < per_image; ++j) {
          const int c = static_cast<int>(j / (static_cast<int64_t>(s) * s));
          const float* row = &out.lut[c * 256];
          const float v = (*chw)[j];
          const int64_t b = std::lower_bound(row, row + 256, v) - row;
          if (b >= 256 || row[b] != v) {
            errors[w] = Internal("preprocessed pixel is not a byte value");
            return;
          }
          dst[i * per_image + j] = static_cast<uint8_t>(b);
        }
      }
    });
  }
  for (auto& t : workers) t.join();
  for (const Status& e : errors) VTW_RETURN_IF_ERROR(e);

  // Patch labels: the shape covering most of a patch (>= 2 of 4x4 sample points), mapped back
  // from the preprocessed crop to the original image (shortest-edge resize + centre crop).
  const int patch = config.vision.patch_size, grid = s / patch;
  out.patch_color = at::zeros({n, grid * grid}, at::kLong);
  out.patch_kind = at::zeros({n, grid * grid}, at::kLong);
  out.patch_side = at::zeros({n, grid * grid}, at::kLong);
  int64_t* pc = out.patch_color.data_ptr<int64_t>();
  int64_t* pk = out.patch_kind.data_ptr<int64_t>();
  int64_t* ps = out.patch_side.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const Scene& sc = scenes[i];
    const ImageSize rs = ShortestEdgeResizeSize(sc.height, sc.width, s);
    const double left = static_cast<double>((rs.width - s) / 2);
    const double top = static_cast<double>((rs.height - s) / 2);
    const double fx = static_cast<double>(sc.width) / rs.width;
    const double fy = static_cast<double>(sc.height) / rs.height;
    std::vector<std::vector<cv::Point2f>> polys;
    for (const Shape& sh : sc.shapes) polys.push_back(ShapeVertices(sh));
    for (int gy = 0; gy < grid; ++gy) {
      for (int gx = 0; gx < grid; ++gx) {
        std::vector<int> hits(sc.shapes.size(), 0);
        for (int sy = 0; sy < 4; ++sy) {
          for (int sx = 0; sx < 4; ++sx) {
            const double u = gx * patch + (sx + 0.5) * patch / 4.0;
            const double v = gy * patch + (sy + 0.5) * patch / 4.0;
            const cv::Point2f pt(static_cast<float>((left + u) * fx),
                                 static_cast<float>((top + v) * fy));
            for (size_t k = 0; k < sc.shapes.size(); ++k) {
              const Shape& sh = sc.shapes[k];
              bool inside;
              if (polys[k].empty()) {
                inside = std::hypot(pt.x - sh.cx, pt.y - sh.cy) <= sh.size * 0.5;
              } else {
                inside = cv::pointPolygonTest(polys[k], pt, false) >= 0;
              }
              hits[k] += inside;
            }
          }
        }
        int best = -1;
        for (size_t k = 0; k < hits.size(); ++k) {
          if (hits[k] >= 2 && (best < 0 || hits[k] > hits[best])) best = static_cast<int>(k);
        }
        if (best >= 0) {
          pc[i * grid * grid + gy * grid + gx] = 1 + static_cast<int>(sc.shapes[best].color);
          pk[i * grid * grid + gy * grid + gx] = 1 + static_cast<int>(sc.shapes[best].kind);
          ps[i * grid * grid + gy * grid + gx] = sc.shapes[best].cx < sc.width * 0.5f ? 1 : 2;
        }
      }
    }
  }

  struct Tokenized {
    std::vector<int32_t> ids, answer, turn;
  };
  std::map<std::string, Tokenized> cache;
  for (int64_t i = 0; i < n; ++i) {
    for (const QaExample& q : questions[i]) {
      auto it = cache.find(q.question + "\x01" + q.answer);
      if (it == cache.end()) {
        const std::string prompt = ApplyLlavaChatTemplate(q.question, true);
        std::vector<int32_t> ids = tokenizer.Encode(prompt, tokenizer.add_bos_token());
        VTW_ASSIGN_OR_RETURN(std::vector<int32_t> answer,
                             AnswerTokenIds(tokenizer, ids, prompt, q.answer));
        // The same question as a later turn of a conversation (after the previous `</s>`).
        std::vector<int32_t> turn =
            tokenizer.Encode("USER: " + q.question + " ASSISTANT:", /*add_bos=*/false);
        it = cache.emplace(q.question + "\x01" + q.answer, Tokenized{ids, answer, turn}).first;
      }
      const auto& [ids, answer, turn] = it->second;
      VTW_ASSIGN_OR_RETURN(PromptLayout layout,
                           ExpandPrompt(ids, config.image_token_index, 1,
                                        config.num_image_tokens(),
                                        config.text.max_position_embeddings));
      TrainExample ex;
      ex.image = static_cast<int32_t>(i);
      ex.prompt_ids = layout.token_ids;
      ex.kinds = layout.kinds;
      ex.target_ids.assign(answer.begin(), answer.end());
      ex.target_ids.push_back(tokenizer.eos_id());
      ex.turn_ids.assign(turn.begin(), turn.end());
      if (layout.size() + static_cast<int64_t>(ex.target_ids.size()) >
          config.text.max_position_embeddings) {
        return InvalidArgument("example longer than max_position_embeddings");
      }
      ex.type = TypeIndexOf(q.type);
      out.examples.push_back(std::move(ex));
    }
  }
  if (log) {
    *log << "[data] " << split << ": " << out.examples.size() << " questions on " << n
         << " images (seed " << seed << ") in " << std::fixed << std::setprecision(1)
         << Seconds(start) << " s\n" << std::defaultfloat;
  }
  return out;
}

EvalResult Evaluate(const LlavaModel& model, const EncodedSplit& data, int withdraw_layer,
                    int batch_size) {
  at::NoGradGuard no_grad;
  EvalResult r;
  const int64_t n = static_cast<int64_t>(data.examples.size());
  std::vector<int64_t> correct_type(kQuestionTypes.size(), 0), count_type(kQuestionTypes.size(), 0);
  int64_t exact = 0, first = 0, targets = 0;
  double loss_sum = 0;
  for (int64_t b0 = 0; b0 < n; b0 += batch_size) {
    std::vector<int64_t> idx;
    for (int64_t i = b0; i < std::min(n, b0 + batch_size); ++i) idx.push_back(i);
    std::vector<std::vector<int64_t>> groups;
    for (int64_t i : idx) groups.push_back({i});
    Batch b = AssembleBatch(model, data, groups, std::vector<int>(idx.size(), withdraw_layer));
    at::Tensor logits = TargetLogits(model, b);
    at::Tensor tgt = at::tensor(b.targets, at::TensorOptions().dtype(at::kLong));
    loss_sum += at::cross_entropy_loss(logits, tgt, {}, at::Reduction::Sum).item<double>();
    targets += static_cast<int64_t>(b.targets.size());
    at::Tensor pred = logits.argmax(-1).contiguous();
    const int64_t* p = pred.data_ptr<int64_t>();
    std::vector<bool> ok(idx.size(), true);
    for (size_t t = 0; t < b.targets.size(); ++t) {
      if (p[t] != b.targets[t]) ok[b.target_seq[t]] = false;
    }
    for (size_t s = 0; s < idx.size(); ++s) {
      const int type = data.examples[idx[s]].type;
      first += p[b.first_target[s]] == b.targets[b.first_target[s]];
      exact += ok[s];
      if (type >= 0) {
        ++count_type[type];
        correct_type[type] += ok[s];
      }
    }
  }
  r.count = n;
  r.exact_accuracy = n ? static_cast<double>(exact) / n : 0;
  r.first_token_accuracy = n ? static_cast<double>(first) / n : 0;
  r.loss = targets ? loss_sum / targets : 0;
  for (size_t t = 0; t < kQuestionTypes.size(); ++t) {
    if (count_type[t] == 0) continue;
    r.exact_by_type[kQuestionTypes[t]] = static_cast<double>(correct_type[t]) / count_type[t];
    r.count_by_type[kQuestionTypes[t]] = count_type[t];
  }
  return r;
}

StatusOr<TrainResult> RunTraining(const TrainOptions& o, std::ostream* log) {
  const auto start = Clock::now();
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
  at::set_num_threads(std::max(1, o.threads));
  std::error_code ec;
  fs::create_directories(o.out_dir, ec);

  // Tokenizer.
  std::string tokenizer_dir = o.tokenizer_dir;
  if (tokenizer_dir.empty()) {
    tokenizer_dir = o.out_dir;
    TokenizerTrainOptions to;
    to.out_dir = o.out_dir;
    to.vocab_size = o.tokenizer_vocab;
    VTW_RETURN_IF_ERROR(TrainTokenizer(to, log));
  }
  VTW_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::Load(tokenizer_dir));
  VTW_RETURN_IF_ERROR(CheckTaskTokenization(*tokenizer, nullptr));
  const int sp_vocab = tokenizer->sp_vocab_size();
  if (tokenizer->image_token_id() != sp_vocab) {
    return InvalidArgument(tokenizer_dir + ": <image> must be the first id after the "
                           "SentencePiece vocabulary");
  }
  VTW_ASSIGN_OR_RETURN(LlavaConfig config, MakeTrainConfig(o.preset, o.geometry, sp_vocab));
  const int layers = config.text.num_hidden_layers;
  if (o.vtw_train_fraction > 0 && (o.vtw_train_min_layer < 0 || o.vtw_train_min_layer >= layers)) {
    return InvalidArgument("--vtw-train-min-layer must be in [0, layers - 1]");
  }

  // Data.
  const int data_threads = std::max(1, o.threads);
  VTW_ASSIGN_OR_RETURN(EncodedSplit train, BuildSplit("train", o.train_count, o.data_seed,
                                                      o.questions_per_image, *tokenizer, config,
                                                      data_threads, log));
  // Validation: at most 3 questions per image (comparable across runs with different
  // --questions-per-image).
  VTW_ASSIGN_OR_RETURN(EncodedSplit val, BuildSplit("val", o.val_count, o.data_seed,
                                                    std::min(3, o.questions_per_image),
                                                    *tokenizer, config,
                                                    data_threads, log));
  if (o.turns > 1) {
    size_t longest_prompt = 0, longest_turn = 0;
    for (const TrainExample& ex : train.examples) {
      longest_prompt = std::max(longest_prompt, ex.prompt_ids.size() + ex.target_ids.size());
      longest_turn = std::max(longest_turn, ex.turn_ids.size() + ex.target_ids.size());
    }
    const size_t longest = longest_prompt + (std::min(o.turns, o.questions_per_image) - 1) *
                                                longest_turn;
    if (longest > static_cast<size_t>(config.text.max_position_embeddings) + 1) {
      return InvalidArgument("--turns " + std::to_string(o.turns) + ": a sequence can take up to " +
                             std::to_string(longest) + " positions, more than the model's " +
                             std::to_string(config.text.max_position_embeddings) +
                             " (lower --turns)");
    }
  }
  std::vector<std::vector<int64_t>> by_image(train.pixels_u8.size(0));
  for (size_t i = 0; i < train.examples.size(); ++i) {
    by_image[train.examples[i].image].push_back(static_cast<int64_t>(i));
  }

  // Model and optimizer.
  LlavaWeights weights = RandomLlavaWeights(config, at::kFloat, o.seed, o.init_std);
  std::vector<Param> params = CollectParams(config, &weights);
  const std::map<std::string, at::Tensor> unused = UnusedTensors(config, o.seed + 1, o.init_std);
  std::vector<at::Tensor> decay, no_decay;
  int64_t num_params = 0;
  for (Param& p : params) {
    p.tensor.requires_grad_(true);
    (p.decay ? decay : no_decay).push_back(p.tensor);
    num_params += p.tensor.numel();
  }
  // The auxiliary patch-label head (training only): [7 colours + 4 kinds + 3 sides + grid rows
  // + grid columns, Ht].
  at::Tensor aux_w, aux_b;
  const int64_t aux_grid = config.vision.image_size / config.vision.patch_size;
  const int64_t aux_outputs = 7 + 4 + 3 + 2 * aux_grid;
  at::Tensor aux_row, aux_col;  // [P] row and column of each patch
  if (o.aux_patch_loss > 0) {
    at::Generator aux_gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 2);
    aux_w = at::empty({aux_outputs, config.text.hidden_size}, at::kFloat)
                .normal_(0.0, o.init_std, aux_gen);
    aux_b = at::zeros({aux_outputs}, at::kFloat);
    aux_row = at::arange(aux_grid * aux_grid, at::kLong).floor_divide(aux_grid);
    aux_col = at::arange(aux_grid * aux_grid, at::kLong).remainder(aux_grid);
    aux_w.requires_grad_(true);
    aux_b.requires_grad_(true);
    params.push_back({"aux/patch_head.weight", aux_w, true});
    params.push_back({"aux/patch_head.bias", aux_b, false});
    decay.push_back(aux_w);
    no_decay.push_back(aux_b);
  }
  LlavaModel model(config, weights, at::kFloat);
  using torch::optim::AdamWOptions;
  auto decay_opts = std::make_unique<AdamWOptions>(o.lr);
  decay_opts->betas({o.beta1, o.beta2}).weight_decay(o.weight_decay).eps(1e-8);
  auto no_decay_opts = std::make_unique<AdamWOptions>(o.lr);
  no_decay_opts->betas({o.beta1, o.beta2}).weight_decay(0.0).eps(1e-8);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::move(decay_opts));
  groups.emplace_back(no_decay, std::move(no_decay_opts));
  torch::optim::AdamW optimizer(groups, AdamWOptions(o.lr));
  std::vector<at::Tensor> all_params = decay;
  all_params.insert(all_params.end(), no_decay.begin(), no_decay.end());

  std::mt19937_64 rng(o.seed * 0x9E3779B97F4A7C15ULL + 0x5eed);
  TrainResult result;
  json curve = json::array();
  int step = 0;
  const fs::path ckpt_dir = o.checkpoint_dir;
  const fs::path ckpt_pt = ckpt_dir / "checkpoint.pt";
  const fs::path ckpt_json = ckpt_dir / "checkpoint.json";
  if (o.resume && fs::exists(ckpt_json, ec)) {
    std::ifstream in(ckpt_json);
    json j = json::parse(in, nullptr, false);
    if (j.is_discarded()) return DataLoss(ckpt_json.string() + ": not valid JSON");
    if (j["config"] != LlavaConfigToJson(config)) {
      return FailedPrecondition(ckpt_json.string() + ": the checkpoint's model config differs "
                                "from this run's (same flags and tokenizer needed to resume)");
    }
    step = j["step"].get<int>();
    std::istringstream rs(j["rng"].get<std::string>());
    rs >> rng;
    curve = j.value("curve", json::array());
    torch::serialize::InputArchive archive;
    archive.load_from(ckpt_pt.string());
    {
      at::NoGradGuard no_grad;
      for (Param& p : params) {
        at::Tensor t;
        archive.read("w/" + p.name, t);
        p.tensor.copy_(t);
      }
    }
    torch::serialize::InputArchive opt_archive;
    archive.read("optimizer", opt_archive);
    optimizer.load(opt_archive);
    if (log) *log << "[train] resumed from " << ckpt_dir.string() << " at step " << step << "\n";
  } else if (o.resume && log) {
    *log << "[train] no checkpoint in " << ckpt_dir.string() << ": starting from step 0\n";
  }
  result.start_step = step;

  auto save_checkpoint = [&](int at_step) -> Status {
    std::error_code e;
    fs::create_directories(ckpt_dir, e);
    torch::serialize::OutputArchive archive;
    for (const Param& p : params) archive.write("w/" + p.name, p.tensor.detach());
    torch::serialize::OutputArchive opt_archive;
    optimizer.save(opt_archive);
    archive.write("optimizer", opt_archive);
    archive.save_to((ckpt_dir / "checkpoint.pt.tmp").string());
    fs::rename(ckpt_dir / "checkpoint.pt.tmp", ckpt_pt, e);
    if (e) return Internal("cannot write " + ckpt_pt.string());
    std::ostringstream rs;
    rs << rng;
    json j = {{"step", at_step}, {"rng", rs.str()}, {"config", LlavaConfigToJson(config)},
              {"options", OptionsJson(o)}, {"curve", curve}};
    VTW_RETURN_IF_ERROR(WriteJson(ckpt_dir / "checkpoint.json.tmp", j));
    fs::rename(ckpt_dir / "checkpoint.json.tmp", ckpt_json, e);
    if (e) return Internal("cannot write " + ckpt_json.string());
    return Status::Ok();
  };

  if (log) {
    *log << "[train] " << num_params << " parameters; " << layers << " decoder layers, "
         << config.num_image_tokens() << " image tokens; steps " << o.steps << " x batch "
         << o.batch_size << "; VTW-aware fraction " << o.vtw_train_fraction << " (K in ["
         << o.vtw_train_min_layer << ", " << layers - 1 << "])\n";
  }
  const bool tty = isatty(fileno(stderr)) && log == &std::cerr;
  const bool profile = std::getenv("VTW_TRAIN_PROFILE") != nullptr;
  const int end_step = o.stop_after > 0 ? std::min(o.steps, o.stop_after) : o.steps;
  auto loop_start = Clock::now();  // reset after the vision stage: rates and ETA of the main steps
  const int first_step = step;
  double ema_loss = -1, ema_acc = -1, ema_aux_kind = -1;
  int64_t tokens_done = 0;
  auto validate = [&](int at_step) -> EvalResult {
    EvalResult v = Evaluate(model, val, layers);
    json point = {{"step", at_step}, {"train_loss_ema", ema_loss}, {"train_acc_ema", ema_acc},
                  {"val", EvalJson(v)}};
    std::string line = "[val] step " + std::to_string(at_step) + " VTW off: " + EvalLine(v);
    if (o.val_vtw_layer >= 0 && o.val_vtw_layer < layers) {
      EvalResult vk = Evaluate(model, val, o.val_vtw_layer);
      point["val_k"] = {{"k", o.val_vtw_layer}, {"result", EvalJson(vk)}};
      line += "\n[val] step " + std::to_string(at_step) + " K=" +
              std::to_string(o.val_vtw_layer) + ": " + EvalLine(vk);
    }
    curve.push_back(point);
    if (log) *log << (tty ? "\n" : "") << line << "\n" << std::flush;
    return v;
  };

  // The patch-label loss of projected image tokens `features` [n, P, Ht] of split images
  // `images`; *kind_acc: kind accuracy on the patches a shape covers.
  auto aux_loss = [&](const at::Tensor& features, const std::vector<int64_t>& images,
                      double* kind_acc) -> at::Tensor {
    at::Tensor img = at::tensor(images, at::TensorOptions().dtype(at::kLong));
    at::Tensor aux = at::linear(features.reshape({-1, features.size(2)}), aux_w, aux_b);
    at::Tensor color = train.patch_color.index_select(0, img).flatten();
    at::Tensor kind = train.patch_kind.index_select(0, img).flatten();
    at::Tensor side = train.patch_side.index_select(0, img).flatten();
    const int64_t n_img = img.size(0);
    at::Tensor rows = aux_row.repeat({n_img}), cols = aux_col.repeat({n_img});
    at::Tensor kind_logits = aux.narrow(1, 7, 4);
    at::Tensor l = at::cross_entropy_loss(aux.narrow(1, 0, 7), color) +
                   at::cross_entropy_loss(kind_logits, kind) +
                   at::cross_entropy_loss(aux.narrow(1, 11, 3), side) +
                   at::cross_entropy_loss(aux.narrow(1, 14, aux_grid), rows) +
                   at::cross_entropy_loss(aux.narrow(1, 14 + aux_grid, aux_grid), cols);
    at::Tensor covered = kind > 0;
    const double n_covered = covered.sum().item<double>();
    if (kind_acc && n_covered > 0) {
      *kind_acc = ((kind_logits.detach().argmax(-1) == kind) & covered).sum().item<double>() /
                  n_covered;
    }
    return l;
  };

  // Vision pre-training stage (skipped when resuming past it: step > 0).
  if (o.vision_steps > 0 && o.aux_patch_loss > 0 && step == 0) {
    std::vector<at::Tensor> vision_params;
    for (const Param& p : params) {
      if (p.name.rfind("language_model.", 0) != 0) vision_params.push_back(p.tensor);
    }
    auto vopts = std::make_unique<AdamWOptions>(o.lr);
    vopts->betas({o.beta1, o.beta2}).weight_decay(o.weight_decay).eps(1e-8);
    std::vector<torch::optim::OptimizerParamGroup> vgroups;
    vgroups.emplace_back(vision_params, std::move(vopts));
    torch::optim::AdamW vopt(vgroups, AdamWOptions(o.lr));
    TrainOptions vo = o;
    vo.steps = o.vision_steps;
    vo.warmup = std::min(o.warmup, o.vision_steps / 4);
    const auto vstart = Clock::now();
    double ema_l = -1, ema_k = -1;
    for (int vs = 0; vs < o.vision_steps; ++vs) {
      std::vector<int64_t> images;
      for (int i = 0; i < o.vision_batch; ++i) {
        images.push_back(UniformIndex(rng, static_cast<int64_t>(by_image.size())));
      }
      const double lr = LearningRate(vo, vs);
      for (auto& group : vopt.param_groups()) static_cast<AdamWOptions&>(group.options()).lr(lr);
      at::Tensor features = model.EncodeImages(train.Pixels(images));
      double kind_acc = -1;
      at::Tensor l = aux_loss(features, images, &kind_acc);
      vopt.zero_grad();
      l.backward();
      if (o.clip_norm > 0) torch::nn::utils::clip_grad_norm_(vision_params, o.clip_norm);
      vopt.step();
      const double lv = l.item<double>();
      if (!std::isfinite(lv)) {
        return Internal("vision pre-training diverged at step " + std::to_string(vs));
      }
      ema_l = ema_l < 0 ? lv : 0.95 * ema_l + 0.05 * lv;
      if (kind_acc >= 0) ema_k = ema_k < 0 ? kind_acc : 0.95 * ema_k + 0.05 * kind_acc;
      const int done = vs + 1;
      if (log && (done % 50 == 0 || done == o.vision_steps || done == 1)) {
        const double el = Seconds(vstart);
        char buf[200];
        std::snprintf(buf, sizeof(buf),
                      "[vision] step %d/%d patch-label loss %.4f kind acc %.3f lr %.2e elapsed %s "
                      "ETA %s",
                      done, o.vision_steps, ema_l, ema_k, lr, FormatDuration(el).c_str(),
                      FormatDuration(el / done * (o.vision_steps - done)).c_str());
        *log << buf << "\n" << std::flush;
      }
    }
    // The main stage's optimizer starts fresh (its moments would otherwise be empty for the
    // decoder and stale for the vision side alike).
    loop_start = Clock::now();
  }

  for (; step < end_step; ++step) {
    // Batch: random training images. One question per sequence: all of each image's questions,
    // until the batch is full. Multi-turn: one sequence per image, its questions in random order
    // (so every question type is the first, single-question-form turn equally often).
    std::vector<std::vector<int64_t>> groups;
    int64_t questions = 0;
    while (o.turns > 1 ? static_cast<int>(groups.size()) < o.batch_size
                       : questions < o.batch_size) {
      std::vector<int64_t> qs = by_image[UniformIndex(rng, static_cast<int64_t>(by_image.size()))];
      if (o.turns > 1) {
        for (size_t i = qs.size(); i > 1; --i) {
          std::swap(qs[i - 1], qs[UniformIndex(rng, static_cast<int64_t>(i))]);
        }
        if (static_cast<int>(qs.size()) > o.turns) qs.resize(o.turns);
        questions += static_cast<int64_t>(qs.size());
        groups.push_back(std::move(qs));
        continue;
      }
      for (int64_t e : qs) {
        if (questions < o.batch_size) {
          groups.push_back({e});
          ++questions;
        }
      }
    }
    std::vector<int> withdraw(groups.size(), WithdrawalOff(layers));
    for (size_t s = 0; s < groups.size(); ++s) {
      if (o.vtw_train_fraction > 0 && Uniform01(rng) < o.vtw_train_fraction) {
        withdraw[s] = o.vtw_train_min_layer +
                      static_cast<int>(UniformIndex(rng, layers - o.vtw_train_min_layer));
      }
    }
    const double lr = LearningRate(o, step);
    for (auto& group : optimizer.param_groups()) {
      static_cast<AdamWOptions&>(group.options()).lr(lr);
    }
    const auto t0 = Clock::now();
    Batch b = AssembleBatch(model, train, groups, withdraw);
    const auto t1 = Clock::now();
    at::Tensor logits = TargetLogits(model, b);
    at::Tensor tgt = at::tensor(b.targets, at::TensorOptions().dtype(at::kLong));
    at::Tensor answer_loss = at::cross_entropy_loss(logits, tgt);
    at::Tensor loss = answer_loss;
    if (o.aux_patch_loss > 0) {
      double kind_acc = -1;
      loss = loss + o.aux_patch_loss * aux_loss(b.features, b.images, &kind_acc);
      if (kind_acc >= 0) {
        ema_aux_kind = ema_aux_kind < 0 ? kind_acc : 0.95 * ema_aux_kind + 0.05 * kind_acc;
      }
    }
    const auto t2 = Clock::now();
    optimizer.zero_grad();
    loss.backward();
    const auto t3 = Clock::now();
    if (o.clip_norm > 0) torch::nn::utils::clip_grad_norm_(all_params, o.clip_norm);
    optimizer.step();
    if (profile && log) {
      auto sec = [](Clock::time_point a, Clock::time_point b2) {
        return std::chrono::duration<double>(b2 - a).count();
      };
      *log << "[profile] vision " << sec(t0, t1) << " s, decoder fwd " << sec(t1, t2)
           << " s, backward " << sec(t2, t3) << " s, optimizer " << sec(t3, Clock::now())
           << " s, rows " << b.tokens << "\n";
    }

    const double l = answer_loss.item<double>();  // the answer loss (without the auxiliary)
    if (!std::isfinite(l)) return Internal("training diverged: loss " + std::to_string(l) +
                                           " at step " + std::to_string(step));
    at::Tensor first_idx = at::tensor(b.first_target, at::TensorOptions().dtype(at::kLong));
    const double acc = (logits.detach().index_select(0, first_idx).argmax(-1) ==
                        tgt.index_select(0, first_idx))
                           .to(at::kFloat).mean().item<double>();
    result.losses.push_back(l);
    ema_loss = ema_loss < 0 ? l : 0.95 * ema_loss + 0.05 * l;
    ema_acc = ema_acc < 0 ? acc : 0.95 * ema_acc + 0.05 * acc;
    tokens_done += b.tokens;
    const int done = step + 1;
    const double elapsed = Seconds(loop_start);
    const double per_step = elapsed / (done - first_step);
    const bool line_due = !tty && (done % 10 == 0 || done == end_step || done == first_step + 1);
    if (log && (tty || line_due)) {
      char buf[320];
      char aux_text[48] = "";
      if (ema_aux_kind >= 0) {
        std::snprintf(aux_text, sizeof(aux_text), " aux-kind %.3f", ema_aux_kind);
      }
      const int width = 24;
      const int filled = static_cast<int>(width * static_cast<double>(done) / o.steps);
      std::string bar(filled, '=');
      bar.resize(width, ' ');
      std::snprintf(buf, sizeof(buf),
                    "%sstep %d/%d [%s] loss %.4f acc %.3f%s lr %.2e %.0f tok/s elapsed %s ETA %s",
                    tty ? "\r" : "", done, o.steps, bar.c_str(), ema_loss, ema_acc, aux_text, lr,
                    tokens_done / elapsed, FormatDuration(elapsed).c_str(),
                    FormatDuration(per_step * (end_step - done)).c_str());
      *log << buf << (tty ? "" : "\n") << std::flush;
    }
    if (o.eval_every > 0 && done % o.eval_every == 0 && done != end_step) validate(done);
    if (!o.checkpoint_dir.empty() && o.checkpoint_every > 0 && done % o.checkpoint_every == 0) {
      VTW_RETURN_IF_ERROR(save_checkpoint(done));
    }
  }
  result.end_step = step;
  if (log && tty) *log << "\n";
  if (!o.checkpoint_dir.empty()) VTW_RETURN_IF_ERROR(save_checkpoint(step));
  for (auto& p : params) p.tensor.requires_grad_(false);

  // Final validation and the model directory.
  result.final_val = validate(step);
  json by_k = json::object();
  if (o.final_eval_all_k) {
    for (int k = 0; k < layers; ++k) {
      result.final_val_by_k[k] = Evaluate(model, val, k);
      by_k[std::to_string(k)] = EvalJson(result.final_val_by_k[k]);
      if (log) *log << "[val] final K=" << k << ": " << EvalLine(result.final_val_by_k[k]) << "\n";
    }
  }
  VTW_RETURN_IF_ERROR(WriteModelDirectory(o, config, model.mutable_weights(), unused,
                                          tokenizer_dir, sp_vocab));
  result.seconds = Seconds(start);
  json training = {{"trainer", "vtw train (train/trainer.cc)"},
                   {"options", OptionsJson(o)},
                   {"config", LlavaConfigToJson(config)},
                   {"parameters", num_params},
                   {"data",
                    {{"train", {{"split", "train"}, {"seed", o.data_seed},
                                {"questions", train.examples.size()},
                                {"images", train.pixels_u8.size(0)}}},
                     {"val", {{"split", "val"}, {"seed", o.data_seed},
                              {"questions", val.examples.size()},
                              {"images", val.pixels_u8.size(0)}}}}},
                   {"vtw_aware_training",
                    {{"fraction", o.vtw_train_fraction},
                     {"min_layer", o.vtw_train_min_layer},
                     {"max_layer", layers - 1},
                     {"description",
                      "this fraction of training sequences withdrew their image tokens before a "
                      "decoder layer drawn uniformly from [min_layer, max_layer]"}}},
                   {"auxiliary_patch_loss",
                    {{"weight", o.aux_patch_loss},
                     {"description",
                      "training only: a linear head (discarded) on the projected image tokens "
                      "predicted each patch's shape colour and kind (or background) from the "
                      "scene geometry; weight times its cross-entropy was added to the loss"}}},
                   {"start_step", result.start_step},
                   {"end_step", result.end_step},
                   {"final_train_loss_ema", ema_loss},
                   {"final_val", EvalJson(result.final_val)},
                   {"final_val_by_k", by_k},
                   {"curve", curve},
                   {"seconds", result.seconds},
                   {"threads", o.threads}};
  VTW_RETURN_IF_ERROR(WriteJson(fs::path(o.out_dir) / "training.json", training));
  if (log) {
    *log << "[train] wrote " << o.out_dir << " in " << FormatDuration(result.seconds)
         << "; val VTW off: " << EvalLine(result.final_val) << "\n";
  }
  return result;
}

}  // namespace vtw::tools
