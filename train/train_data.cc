#include "train/train_data.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iomanip>
#include <map>
#include <random>
#include <thread>

#include <ATen/ATen.h>
#include <opencv2/imgproc.hpp>

#include "model/prompt_layout.h"
#include "train/tokenizer_trainer.h"

namespace vtw::tools {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

int TypeIndexOf(const std::string& type) {
  for (size_t t = 0; t < kQuestionTypes.size(); ++t) {
    if (type == kQuestionTypes[t]) return static_cast<int>(t);
  }
  return -1;
}

// Renders, encodes, decodes and preprocesses every scene into out->pixels_u8 (byte values that
// reproduce PreprocessImage's float output exactly through out->lut).
Status RenderImages(const std::vector<Scene>& scenes, const LlavaConfig& config, int threads,
                    EncodedSplit* out_ptr) {
  EncodedSplit& out = *out_ptr;
  const int64_t n = static_cast<int64_t>(scenes.size());
  const int s = config.vision.image_size;
  const ImageProcessorConfig ipc = TrainImageProcessor(config);
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

  return Status::Ok();
}

// Patch labels: the shape covering most of a patch (>= 2 of 4x4 sample points), mapped back
// from the preprocessed crop to the original image (shortest-edge resize + centre crop).
void PatchLabels(const std::vector<Scene>& scenes, const LlavaConfig& config, EncodedSplit* out_ptr) {
  EncodedSplit& out = *out_ptr;
  const int64_t n = static_cast<int64_t>(scenes.size());
  const int s = config.vision.image_size;
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

}

// The examples of image i's questions, tokenized (prompt, answer + EOS, later-turn form).
Status TokenizeQuestions(const std::vector<std::vector<QaExample>>& questions,
                         const Tokenizer& tokenizer, const LlavaConfig& config,
                         EncodedSplit* out_ptr) {
  EncodedSplit& out = *out_ptr;
  const int64_t n = static_cast<int64_t>(questions.size());
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
  return Status::Ok();
}

}  // namespace

ImageProcessorConfig TrainImageProcessor(const LlavaConfig& config) {
  ImageProcessorConfig ipc;  // OpenAI CLIP mean/std, bicubic, rescale 1/255
  ipc.shortest_edge = config.vision.image_size;
  ipc.crop_height = ipc.crop_width = config.vision.image_size;
  return ipc;
}

at::Tensor EncodedSplit::Pixels(const std::vector<int64_t>& idx) const {
  at::Tensor lut_t = at::from_blob(const_cast<float*>(lut.data()), {3 * 256}, at::kFloat);
  at::Tensor px = pixels_u8.index_select(0, at::tensor(idx, at::TensorOptions().dtype(at::kLong)))
                      .to(at::kLong);
  at::Tensor offset = (at::arange(3, at::kLong) * 256).view({1, 3, 1, 1});
  return lut_t.index_select(0, (px + offset).flatten()).view(px.sizes());
}

StatusOr<EncodedSplit> BuildSplit(const std::string& split, int64_t count, uint64_t seed,
                                  int questions_per_image, const Tokenizer& tokenizer,
                                  const LlavaConfig& config, int threads, std::ostream* log,
                                  const SceneSpec& spec) {
  const auto start = Clock::now();
  // Scenes and questions sequentially, exactly as GenerateDataset (the balancer is sequential).
  std::vector<Scene> scenes;
  std::vector<std::vector<QaExample>> questions;
  QuestionBalancer balancer;
  int64_t done = 0;
  for (int64_t image = 0; done < count; ++image) {
    std::mt19937_64 rng(ImageSeed(seed, split, image));
    scenes.push_back(RandomScene(rng, spec));
    const int64_t want = std::min<int64_t>(questions_per_image, count - done);
    questions.push_back(QuestionsFor(scenes.back(), rng, static_cast<int>(want), &balancer));
    done += static_cast<int64_t>(questions.back().size());
  }
  EncodedSplit out;
  VTW_RETURN_IF_ERROR(RenderImages(scenes, config, threads, &out));
  PatchLabels(scenes, config, &out);
  VTW_RETURN_IF_ERROR(TokenizeQuestions(questions, tokenizer, config, &out));
  const int64_t n = static_cast<int64_t>(scenes.size());
  if (log) {
    *log << "[data] " << split << ": " << out.examples.size() << " questions on " << n
         << " images (seed " << seed << ") in " << std::fixed << std::setprecision(1)
         << Seconds(start) << " s\n" << std::defaultfloat;
  }
  return out;
}
}  // namespace vtw::tools
