#include "train/model_writer.h"

#include <fstream>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "model/safetensors.h"
#include "train/train_data.h"

namespace vtw::tools {

namespace fs = std::filesystem;
using json = nlohmann::json;

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

Status WriteModelDirectory(const std::string& out_dir, bool bf16, const LlavaConfig& config,
                           LlavaWeights& weights,
                           const std::map<std::string, at::Tensor>& unused,
                           const std::string& tokenizer_dir, int sp_vocab) {
  const fs::path dir(out_dir);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Internal("cannot create " + dir.string() + ": " + ec.message());
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
  const ImageProcessorConfig ipc = TrainImageProcessor(config);
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

}  // namespace vtw::tools
