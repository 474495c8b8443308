#include "eval/vqa_eval.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <ATen/ATen.h>
#include <opencv2/core.hpp>

#include "model/image_processor.h"
#include "model/sampler.h"
#include "model/tokenizer.h"
#include "server/generator.h"
#include "vtw/calibration.h"
#include "vtw/withdrawal.h"

namespace vtw::tools {
namespace {

namespace fs = std::filesystem;

double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

std::string Format(const char* fmt, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

std::string FormatDuration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  if (s < 60) return Format("%.1f s", s);
  if (s < 3600) return Format("%.0f min ", std::floor(s / 60)) + Format("%02.0f s", std::fmod(s, 60));
  return Format("%.0f h ", std::floor(s / 3600)) + Format("%02.0f min", std::fmod(s, 3600) / 60);
}

std::string Where(const std::string& path, int line) {
  return path + ":" + std::to_string(line);
}

// Per-channel median of the border pixels of an RGB u8 image.
cv::Vec3b BorderMedian(const cv::Mat& rgb) {
  std::vector<uint8_t> ch[3];
  auto add = [&](int y, int x) {
    const cv::Vec3b& p = rgb.at<cv::Vec3b>(y, x);
    for (int c = 0; c < 3; ++c) ch[c].push_back(p[c]);
  };
  for (int x = 0; x < rgb.cols; ++x) {
    add(0, x);
    add(rgb.rows - 1, x);
  }
  for (int y = 0; y < rgb.rows; ++y) {
    add(y, 0);
    add(y, rgb.cols - 1);
  }
  cv::Vec3b out;
  for (int c = 0; c < 3; ++c) {
    auto mid = ch[c].begin() + ch[c].size() / 2;
    std::nth_element(ch[c].begin(), mid, ch[c].end());
    out[c] = *mid;
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Dataset

StatusOr<std::vector<VqaExample>> LoadVqaJsonl(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return NotFound("data file '" + path + "' does not exist");
  if (fs::is_directory(path, ec)) {
    return InvalidArgument("data file '" + path + "' is a directory (pass the .jsonl file)");
  }
  std::ifstream in(path);
  if (!in) return InvalidArgument("cannot read data file '" + path + "'");
  const fs::path base = fs::path(path).parent_path();
  std::vector<VqaExample> out;
  std::string text;
  int line = 0;
  while (std::getline(in, text)) {
    ++line;
    if (!text.empty() && text.back() == '\r') text.pop_back();
    if (text.find_first_not_of(" \t") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return InvalidArgument(Where(path, line) + ": malformed JSON line");
    if (!j.is_object()) return InvalidArgument(Where(path, line) + ": not a JSON object");
    VqaExample e;
    e.line = line;
    auto get = [&](const char* key, std::string* value, bool required) -> Status {
      auto it = j.find(key);
      if (it == j.end() || it->is_null()) {
        if (required) {
          return InvalidArgument(Where(path, line) + ": missing field \"" + key + "\"");
        }
        return Status::Ok();
      }
      if (!it->is_string()) {
        return InvalidArgument(Where(path, line) + ": field \"" + key + "\" must be a string");
      }
      *value = it->get<std::string>();
      return Status::Ok();
    };
    VTW_RETURN_IF_ERROR(get("question", &e.question, true));
    VTW_RETURN_IF_ERROR(get("answer", &e.answer, false));
    VTW_RETURN_IF_ERROR(get("type", &e.type, false));
    VTW_RETURN_IF_ERROR(get("image", &e.image, false));
    if (e.question.empty()) return InvalidArgument(Where(path, line) + ": empty question");
    if (e.type.empty()) e.type = "unknown";
    if (!e.image.empty()) {
      fs::path p(e.image);
      if (p.is_relative()) p = base / p;
      e.image = p.lexically_normal().string();
      if (!fs::is_regular_file(e.image, ec)) {
        return NotFound(Where(path, line) + ": image file '" + e.image + "' does not exist");
      }
    }
    out.push_back(std::move(e));
  }
  if (in.bad()) return Internal("error reading data file '" + path + "'");
  if (out.empty()) return InvalidArgument("data file '" + path + "' holds no examples");
  return out;
}

std::vector<VqaExample> SelectFirst(const std::vector<VqaExample>& examples, int n,
                                    bool per_type) {
  std::vector<VqaExample> out;
  if (n <= 0) return out;
  std::map<std::string, int> taken;
  for (const VqaExample& e : examples) {
    if (!per_type) {
      if (static_cast<int>(out.size()) >= n) break;
      out.push_back(e);
    } else if (taken[e.type] < n) {
      ++taken[e.type];
      out.push_back(e);
    }
  }
  return out;
}

std::string NormalizeAnswer(const std::string& text) {
  size_t b = 0;
  while (b < text.size() && std::isspace(static_cast<unsigned char>(text[b]))) ++b;
  size_t e = b;
  while (e < text.size() && !std::isspace(static_cast<unsigned char>(text[e]))) ++e;
  std::string word;
  for (size_t i = b; i < e; ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (std::ispunct(c)) continue;
    word.push_back(static_cast<char>(std::tolower(c)));
  }
  return word;
}

// ---------------------------------------------------------------------------------------------
// Prompts and image features

StatusOr<PromptLayout> QuestionLayout(const ModelBundle& bundle, const std::string& question,
                                      bool has_image, int max_new_tokens) {
  return BuildPromptLayout(bundle, question, /*raw=*/false, has_image, max_new_tokens);
}

StatusOr<at::Tensor> ImageFeatureCache::Get(const std::string& path, bool blank) {
  const std::string key = (blank ? "blank:" : "image:") + path;
  if (auto it = cache_.find(key); it != cache_.end()) return it->second;
  const auto t0 = std::chrono::steady_clock::now();
  ++misses_;
  VTW_ASSIGN_OR_RETURN(std::string bytes, ReadImageFile(path));
  auto rgb = DecodeImage(bytes, ImageLimits{});
  if (!rgb.ok()) return InvalidArgument("image '" + path + "': " + rgb.status().message());
  cv::Mat image = *rgb;
  if (blank) image = cv::Mat(image.rows, image.cols, CV_8UC3, BorderMedian(image));
  auto chw = PreprocessImage(image, bundle_.image_config);
  if (!chw.ok()) return InvalidArgument("image '" + path + "': " + chw.status().message());
  const int64_t h = bundle_.image_config.crop_height, w = bundle_.image_config.crop_width;
  at::Tensor pixels = at::tensor(*chw, at::kFloat).view({1, 3, h, w});
  at::Tensor features = bundle_.model->EncodeImages(pixels)[0];
  if (cache_.size() >= capacity_) cache_.clear();
  cache_.emplace(key, features);
  seconds_ += SecondsSince(t0);
  return features;
}

// ---------------------------------------------------------------------------------------------
// Progress

ProgressBar::ProgressBar(std::string label, size_t total, bool enabled)
    : label_(std::move(label)),
      total_(total),
      enabled_(enabled),
      tty_(isatty(fileno(stderr)) != 0),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_ - std::chrono::seconds(1)) {}

void ProgressBar::Update(size_t done, const std::string& extra) {
  if (!enabled_ || finished_) return;
  const auto now = std::chrono::steady_clock::now();
  if (tty_) {
    if (done < total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
    Draw(done, extra, false);
    return;
  }
  const int decile = total_ ? static_cast<int>(10 * done / total_) : 10;
  if (decile == last_decile_ || done >= total_) return;  // the final line comes from Finish
  last_decile_ = decile;
  Draw(done, extra, true);
}

void ProgressBar::Finish(const std::string& extra) {
  if (!enabled_ || finished_) return;
  finished_ = true;
  Draw(total_, extra, true);
}

void ProgressBar::Draw(size_t done, const std::string& extra, bool final_line) {
  const int width = 24;
  const double frac = total_ ? std::min(1.0, static_cast<double>(done) / total_) : 1.0;
  const int filled = static_cast<int>(frac * width + 1e-9);
  const double elapsed = SecondsSince(start_);
  std::string bar(filled, '#');
  bar += std::string(width - filled, '.');
  std::string line = label_ + " [" + bar + "] " + std::to_string(done) + "/" +
                     std::to_string(total_);
  if (!extra.empty()) line += "  " + extra;
  line += "  " + FormatDuration(elapsed);
  if (done < total_) {
    line += ", ETA " + (done ? FormatDuration(elapsed / done * (total_ - done)) : std::string("?"));
  }
  if (tty_) {
    std::fprintf(stderr, "\r\033[K%s%s", line.c_str(), final_line && done >= total_ ? "\n" : "");
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  std::fflush(stderr);
}

// ---------------------------------------------------------------------------------------------
// Evaluation

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

StatusOr<BlockedGeneration> GenerateBlocked(const ModelBundle& bundle, const PromptLayout& layout,
                                            const at::Tensor& image_features, int block_layers,
                                            int max_new_tokens) {
  const LlavaModel& model = *bundle.model;
  const int num_layers = model.num_layers();
  if (block_layers < 0 || block_layers > num_layers) {
    return InvalidArgument("block layer " + std::to_string(block_layers) + " is outside [0, " +
                           std::to_string(num_layers) + "]");
  }
  if (max_new_tokens < 1) return InvalidArgument("max_new_tokens must be >= 1");
  if (layout.size() + max_new_tokens > model.config().text.max_position_embeddings) {
    return InvalidArgument("prompt + max_new_tokens exceed the context length");
  }
  const int kOff = WithdrawalOff(num_layers);
  BlockedGeneration out;
  // Cache `c` is what the text rows and generated tokens attend to.
  KvCache c = model.NewKvCache();
  int64_t text_begin = 0;
  if (layout.num_image_tokens > 0) {
    const int64_t prefix = layout.image_start;
    const int64_t image_end = layout.image_start + layout.num_image_tokens;
    if (image_end >= layout.size()) {
      return InvalidArgument("the prompt ends with the image: no text row to block");
    }
    // 1. Rows up to the end of the image, full model (they never see later text anyway).
    KvCache a = model.NewKvCache();
    ForwardBatch b;
    for (int64_t i = 0; i < image_end; ++i) {
      b.token_ids.push_back(layout.token_ids[i]);
      b.positions.push_back(i);
      b.kinds.push_back(layout.kinds[i]);
    }
    b.image_embeds = image_features;
    b.seqs.push_back({&a, static_cast<int>(image_end), kOff, false});
    model.Forward(b);
    // 2. Layers < block_layers keep only the rows before the image.
    for (int l = 0; l < num_layers; ++l) {
      const int64_t n = l < block_layers ? prefix : image_end;
      c.Append(l, a.keys(l).narrow(1, 0, n), a.values(l).narrow(1, 0, n));
    }
    text_begin = image_end;
  }
  // 3. The text rows after the image.
  ForwardBatch b;
  for (int64_t i = text_begin; i < layout.size(); ++i) {
    b.token_ids.push_back(layout.token_ids[i]);
    b.positions.push_back(i);
    b.kinds.push_back(layout.kinds[i]);
  }
  if (layout.num_image_tokens > 0 && text_begin == 0) b.image_embeds = image_features;
  b.seqs.push_back({&c, static_cast<int>(layout.size() - text_begin), kOff, true});
  at::Tensor logits = model.Forward(b).logits[0];
  // 4. Greedy decoding on the same cache.
  Sampler sampler(SamplingParams{});
  const int32_t eos = bundle.tokenizer->eos_id();
  const int64_t vocab = model.config().text.vocab_size;
  std::vector<int32_t> text_ids;
  for (int step = 0; step < max_new_tokens; ++step) {
    at::Tensor row = logits.contiguous();
    if (step == 0) out.first_logits = row;
    const int32_t token = sampler.Sample(row.data_ptr<float>(), vocab);
    out.token_ids.push_back(token);
    if (token == eos) break;
    text_ids.push_back(token);
    if (step + 1 == max_new_tokens) break;
    ForwardBatch d;
    d.token_ids = {token};
    d.positions = {layout.size() + step};
    d.kinds = {TokenKind::kText};
    d.seqs.push_back({&c, 1, kOff, true});
    logits = model.Forward(d).logits[0];
  }
  out.text = bundle.tokenizer->Decode(text_ids, /*skip_special_tokens=*/true);
  return out;
}

namespace {

double Pct(int64_t part, int64_t whole) {
  return whole ? 100.0 * static_cast<double>(part) / static_cast<double>(whole) : 0.0;
}

double Mean(int64_t sum, int64_t n) { return n ? static_cast<double>(sum) / n : 0.0; }

std::string LayerName(int k, int num_layers) {
  if (k < 0) return "by-type";
  if (k >= num_layers) return "off";
  return std::to_string(k);
}

}  // namespace

StatusOr<EvalResult> EvaluateVqa(const ModelBundle& bundle, const std::vector<VqaExample>& examples,
                                 const EvalOptions& options) {
  const LlavaModel& model = *bundle.model;
  const int num_layers = model.num_layers();
  if (options.max_new_tokens < 1) return InvalidArgument("--max-new-tokens must be >= 1");
  for (int k : options.layers) {
    if (k < 0 || k > num_layers) {
      return InvalidArgument("VTW layer " + std::to_string(k) + " is outside [0, " +
                             std::to_string(num_layers) + "]");
    }
  }
  for (const VqaExample& e : examples) {
    if (e.answer.empty()) {
      return InvalidArgument("line " + std::to_string(e.line) + ": no \"answer\" to score");
    }
  }
  const bool by_type = options.layers.empty();
  const std::vector<int> layers = by_type ? std::vector<int>{-1} : options.layers;
  const int reference = options.mode == ImageMode::kBlockTextToImage ? 0 : num_layers;
  int ref_index = -1;
  for (size_t j = 0; j < layers.size(); ++j) {
    if (layers[j] == reference) ref_index = static_cast<int>(j);
  }

  const auto start = std::chrono::steady_clock::now();
  const ComputeModel compute(model.config(), c10::elementSize(model.dtype()));
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
  const int show = ref_index >= 0 ? ref_index : 0;
  // Running accuracy shown: the full model's when it is among the layers, else the first.
  std::string label = "acc ";
  if (layers.size() > 1) {
    label = options.mode == ImageMode::kBlockTextToImage
                ? "acc(block<" + std::to_string(layers[show]) + ") "
                : "acc(" + LayerName(layers[show], num_layers) + ") ";
  }
  for (size_t i = 0; i < examples.size(); ++i) {
    const VqaExample& e = examples[i];
    const bool has_image = !e.image.empty();
    auto layout_or = QuestionLayout(bundle, e.question, has_image, options.max_new_tokens);
    if (!layout_or.ok()) {
      return InvalidArgument("line " + std::to_string(e.line) + ": " +
                             layout_or.status().message());
    }
    const PromptLayout& layout = *layout_or;
    at::Tensor features;
    if (has_image) {
      images.insert(e.image);
      VTW_ASSIGN_OR_RETURN(features,
                           features_cache.Get(e.image, options.mode == ImageMode::kBlank));
    }
    const std::string want = NormalizeAnswer(e.answer);
    std::vector<at::Tensor> first(layers.size());
    for (size_t j = 0; j < layers.size(); ++j) {
      int k = layers[j];
      if (k < 0) {
        auto it = options.per_type_layers.find(e.type);
        k = it != options.per_type_layers.end() ? it->second : options.default_layer;
        k = std::clamp(k, 0, num_layers);
      }
      LayerEval& r = result.layers[j];
      const auto t0 = std::chrono::steady_clock::now();
      std::string text;
      Flops prefill_flops;
      if (options.mode == ImageMode::kBlockTextToImage) {
        VTW_ASSIGN_OR_RETURN(BlockedGeneration g,
                             GenerateBlocked(bundle, layout, features, k, options.max_new_tokens));
        text = g.text;
        first[j] = g.first_logits;
        r.generated_tokens += static_cast<int64_t>(g.token_ids.size());
        // The work is the full model's (blocking removes no rows).
        Flops prefill = compute.ChunkFlops(layout.kinds, 0, layout.size(), num_layers, true);
        Flops total = prefill;
        const int64_t vision = has_image ? compute.VisionFlops() : 0;
        total.flops += vision;
        total.flops_without_vtw += vision;
        for (size_t s = 1; s < g.token_ids.size(); ++s) {
          const int64_t cached_text = layout.num_text_tokens() + static_cast<int64_t>(s) - 1;
          total += compute.DecodeStepFlops(cached_text, layout.num_image_tokens, num_layers);
        }
        prefill_flops = prefill;
        r.total += total;
      } else {
        GenerateOptions go;
        go.withdraw_layer = k;
        go.stop.max_new_tokens = options.max_new_tokens;
        go.stop.eos_id = bundle.tokenizer->eos_id();
        auto g = GenerateOne(model, bundle.tokenizer.get(), layout, features, go);
        if (!g.ok()) {
          return InvalidArgument("line " + std::to_string(e.line) + ": " + g.status().message());
        }
        text = g->text;
        first[j] = g->first_logits;
        r.generated_tokens += static_cast<int64_t>(g->token_ids.size());
        prefill_flops = g->prefill_flops;
        Flops total = g->prefill_flops;
        total += g->decode_flops;
        total.flops += g->vision_flops;
        total.flops_without_vtw += g->vision_flops;
        r.total += total;
      }
      r.prefill += prefill_flops;
      r.seconds += SecondsSince(t0);
      const bool ok = NormalizeAnswer(text) == want;
      ++r.count;
      r.correct += ok;
      TypeScore& ts = r.per_type[e.type];
      ++ts.count;
      ts.correct += ok;
      ts.prefill += prefill_flops;
    }
    if (ref_index >= 0) {
      for (size_t j = 0; j < layers.size(); ++j) {
        kl_sum[j] += static_cast<int>(j) == ref_index ? 0.0 : KlDivergence(first[j], first[ref_index]);
      }
    }
    const LayerEval& s = result.layers[show];
    bar.Update(i + 1, label + Format("%.1f%%", 100.0 * s.accuracy()));
  }
  if (ref_index >= 0 && !examples.empty()) {
    for (size_t j = 0; j < layers.size(); ++j) {
      result.layers[j].mean_kl = kl_sum[j] / static_cast<double>(examples.size());
    }
  }
  result.num_images = static_cast<int64_t>(images.size());
  result.encode_seconds = features_cache.seconds();
  result.total_seconds = SecondsSince(start);
  const LayerEval& s = result.layers[show];
  bar.Finish(label + Format("%.1f%%", 100.0 * s.accuracy()));
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

// ---------------------------------------------------------------------------------------------
// Calibration

StatusOr<CalibrationResult> CalibrateVqa(const ModelBundle& bundle,
                                         const std::vector<VqaExample>& examples,
                                         const CalibrateOptions& options) {
  if (options.samples < 1) {
    return InvalidArgument("--samples must be >= 1, got " + std::to_string(options.samples));
  }
  if (options.etas.empty()) return InvalidArgument("give at least one --eta");
  for (double eta : options.etas) {
    if (!(eta >= 0) || !std::isfinite(eta)) {
      return InvalidArgument("--eta must be a finite number >= 0, got " + Format("%g", eta));
    }
  }
  const LlavaModel& model = *bundle.model;
  const int num_layers = model.num_layers();
  CalibrationResult result;
  result.num_layers = num_layers;
  result.etas = options.etas;
  result.samples = SelectFirst(examples, options.samples, options.by_type);
  if (result.samples.empty()) return InvalidArgument("no calibration samples");

  ImageFeatureCache cache(bundle);
  std::vector<CalibrationSample> samples;
  samples.reserve(result.samples.size());
  for (const VqaExample& e : result.samples) {
    if (e.image.empty()) {
      return InvalidArgument("line " + std::to_string(e.line) +
                             ": calibration needs an image in every sample");
    }
    auto layout = QuestionLayout(bundle, e.question, true, 1);
    if (!layout.ok()) {
      return InvalidArgument("line " + std::to_string(e.line) + ": " + layout.status().message());
    }
    VTW_RETURN_IF_ERROR(CheckWithdrawLayer(*layout, 0, num_layers));
    VTW_ASSIGN_OR_RETURN(at::Tensor features, cache.Get(e.image));
    samples.push_back({*layout, features, e.type});
  }
  ProgressBar bar("calibrate", samples.size(), options.progress);
  result.kl = ComputeKlTable(model, samples, [&](size_t done, size_t) { bar.Update(done); });
  bar.Finish();

  auto summarize = [&](const std::vector<std::vector<double>>& rows) {
    KlSummary s;
    s.num_samples = static_cast<int>(rows.size());
    s.mean_kl = MeanKl(rows);
    for (double eta : options.etas) s.picked.push_back(PickWithdrawLayer(s.mean_kl, eta));
    return s;
  };
  result.overall = summarize(result.kl);
  if (options.by_type) {
    std::map<std::string, std::vector<std::vector<double>>> rows;
    for (size_t i = 0; i < samples.size(); ++i) rows[samples[i].type].push_back(result.kl[i]);
    for (const auto& [type, r] : rows) result.by_type[type] = summarize(r);
  }
  return result;
}

VtwSettings CalibrationSettings(const CalibrationResult& r) {
  VtwSettings s;
  s.default_layer = r.overall.picked.at(0);
  for (const auto& [type, summary] : r.by_type) s.profiles[type] = summary.picked.at(0);
  s.eta = r.etas.at(0);
  s.num_samples = r.overall.num_samples;
  return s;
}

nlohmann::json CalibrationResultJson(const CalibrationResult& r) {
  auto summary = [&](const KlSummary& s) {
    nlohmann::json picked = nlohmann::json::array();
    for (size_t i = 0; i < r.etas.size(); ++i) {
      picked.push_back({{"eta", r.etas[i]},
                        {"layer", s.picked[i]},
                        {"vtw_off", s.picked[i] >= r.num_layers}});
    }
    return nlohmann::json{{"num_samples", s.num_samples}, {"mean_kl", s.mean_kl},
                          {"picked", picked}};
  };
  nlohmann::json samples = nlohmann::json::array();
  for (size_t i = 0; i < r.samples.size(); ++i) {
    samples.push_back({{"line", r.samples[i].line},
                       {"type", r.samples[i].type},
                       {"question", r.samples[i].question},
                       {"kl", r.kl[i]}});
  }
  nlohmann::json j = summary(r.overall);
  j["num_layers"] = r.num_layers;
  j["etas"] = r.etas;
  j["samples"] = samples;
  if (!r.by_type.empty()) {
    nlohmann::json bt = nlohmann::json::object();
    for (const auto& [type, s] : r.by_type) bt[type] = summary(s);
    j["by_type"] = bt;
  }
  return j;
}

std::string CalibrationResultTable(const CalibrationResult& r) {
  std::ostringstream os;
  char buf[256];
  std::snprintf(buf, sizeof buf, "%-4s %13s", "K", "mean KL");
  os << buf;
  for (const auto& [type, s] : r.by_type) {
    std::snprintf(buf, sizeof buf, " %13.13s", type.c_str());
    os << buf;
  }
  os << "\n";
  for (int k = 0; k <= r.num_layers; ++k) {
    std::snprintf(buf, sizeof buf, "%-4s %13.6e", k == r.num_layers ? "off" : std::to_string(k).c_str(),
                  r.overall.mean_kl[k]);
    os << buf;
    for (const auto& [type, s] : r.by_type) {
      std::snprintf(buf, sizeof buf, " %13.6e", s.mean_kl[k]);
      os << buf;
    }
    os << "\n";
  }
  auto name = [&](int k) {
    return k >= r.num_layers ? std::string("off (") + std::to_string(k) + ")" : std::to_string(k);
  };
  for (size_t i = 0; i < r.etas.size(); ++i) {
    os << "eta " << Format("%g", r.etas[i]) << ": K = " << name(r.overall.picked[i]);
    for (const auto& [type, s] : r.by_type) os << ", " << type << " " << name(s.picked[i]);
    os << "\n";
  }
  os << r.overall.num_samples << " samples, " << r.num_layers << " decoder layers\n";
  return os.str();
}

// ---------------------------------------------------------------------------------------------
// Attention study

StatusOr<AttentionStudy> StudyAttention(const ModelBundle& bundle,
                                        const std::vector<VqaExample>& examples, int samples,
                                        bool progress) {
  if (samples < 1) return InvalidArgument("--samples must be >= 1, got " + std::to_string(samples));
  const LlavaModel& model = *bundle.model;
  const int num_layers = model.num_layers();
  std::vector<const VqaExample*> chosen;
  for (const VqaExample& e : examples) {
    if (static_cast<int>(chosen.size()) >= samples) break;
    if (!e.image.empty()) chosen.push_back(&e);
  }
  if (chosen.empty()) return InvalidArgument("no example with an image");
  AttentionStudy study;
  study.layers.resize(num_layers);
  ImageFeatureCache cache(bundle);
  ProgressBar bar("attention", chosen.size(), progress);
  const int32_t bos = bundle.tokenizer->bos_id();
  int64_t image_tokens = 0;
  double text_tokens = 0;
  for (size_t i = 0; i < chosen.size(); ++i) {
    const VqaExample& e = *chosen[i];
    auto layout_or = QuestionLayout(bundle, e.question, true, 1);
    if (!layout_or.ok()) {
      return InvalidArgument("line " + std::to_string(e.line) + ": " +
                             layout_or.status().message());
    }
    const PromptLayout& layout = *layout_or;
    VTW_ASSIGN_OR_RETURN(at::Tensor features, cache.Get(e.image));
    ForwardBatch b;
    b.AppendRows(layout.token_ids, layout.kinds, 0, layout.size());
    b.image_embeds = features;
    b.seqs.push_back({nullptr, static_cast<int>(layout.size()), WithdrawalOff(num_layers), true});
    ForwardTrace trace;
    trace.last_row_attention = true;
    model.Forward(b, &trace);
    const int64_t n = layout.size();
    const int64_t last = n - 1;
    image_tokens += layout.num_image_tokens;
    text_tokens += static_cast<double>(layout.num_text_tokens());
    for (int l = 0; l < num_layers; ++l) {
      at::Tensor probs = trace.attention[l][0].to(at::kDouble).mean(0).contiguous();  // [keys]
      TORCH_CHECK(probs.size(0) == n, "attention keys != prompt length");
      const double* p = probs.data_ptr<double>();
      AttentionLayerStats& s = study.layers[l];
      double img = 0, text = 0;
      for (int64_t key = 0; key < n; ++key) {
        if (layout.kinds[key] == TokenKind::kImage) {
          s.image += p[key];
          img += p[key];
          continue;
        }
        text += p[key];
        if (key == last) {
          s.self += p[key];
        } else if (key == 0 && layout.token_ids[0] == bos) {
          s.bos += p[key];
        } else if (layout.image_start < 0 || key < layout.image_start) {
          s.prefix_text += p[key];
        } else {
          s.question_text += p[key];
        }
      }
      if (layout.num_image_tokens > 0) s.image_per_token += img / layout.num_image_tokens;
      s.text_per_token += text / static_cast<double>(layout.num_text_tokens());
    }
    bar.Update(i + 1);
  }
  bar.Finish();
  const double m = static_cast<double>(chosen.size());
  for (AttentionLayerStats& s : study.layers) {
    s.bos /= m;
    s.prefix_text /= m;
    s.image /= m;
    s.question_text /= m;
    s.self /= m;
    s.image_per_token /= m;
    s.text_per_token /= m;
  }
  study.num_samples = static_cast<int>(chosen.size());
  study.mean_image_tokens = image_tokens / static_cast<int64_t>(chosen.size());
  study.mean_text_tokens = text_tokens / m;
  return study;
}

nlohmann::json AttentionStudyJson(const AttentionStudy& s) {
  nlohmann::json layers = nlohmann::json::array();
  for (size_t l = 0; l < s.layers.size(); ++l) {
    const AttentionLayerStats& a = s.layers[l];
    layers.push_back({{"layer", l},
                      {"bos", a.bos},
                      {"prefix_text", a.prefix_text},
                      {"image", a.image},
                      {"question_text", a.question_text},
                      {"self", a.self},
                      {"text", a.bos + a.prefix_text + a.question_text + a.self},
                      {"image_per_token", a.image_per_token},
                      {"text_per_token", a.text_per_token}});
  }
  return {{"num_samples", s.num_samples},
          {"mean_image_tokens", s.mean_image_tokens},
          {"mean_text_tokens", s.mean_text_tokens},
          {"layers", layers}};
}

std::string AttentionStudyTable(const AttentionStudy& s) {
  std::ostringstream os;
  char buf[256];
  std::snprintf(buf, sizeof buf, "%-5s %7s %7s %7s %7s %7s %11s %11s\n", "layer", "BOS", "prefix",
                "image", "quest.", "self", "img/token", "text/token");
  os << buf;
  for (size_t l = 0; l < s.layers.size(); ++l) {
    const AttentionLayerStats& a = s.layers[l];
    std::snprintf(buf, sizeof buf, "%-5zu %7.3f %7.3f %7.3f %7.3f %7.3f %11.5f %11.5f\n", l, a.bos,
                  a.prefix_text, a.image, a.question_text, a.self, a.image_per_token,
                  a.text_per_token);
    os << buf;
  }
  os << "last prompt token's attention mass (mean over heads and " << s.num_samples
     << " samples; " << s.mean_image_tokens << " image tokens, "
     << Format("%.1f", s.mean_text_tokens) << " text tokens per prompt)\n";
  return os.str();
}

}  // namespace vtw::tools
