// Synthetic shapes VQA dataset: scene sampling, rendering, questions and split writing.
// See shapes_dataset.h for the contract. Thread-safety: as documented in the header;
// GenerateDataset runs its own worker threads for rendering and encoding only.
#include "shapes/shapes_dataset.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <thread>
#include <utility>

namespace vtw {
namespace {

// ---- Portable randomness: plain arithmetic on mt19937_64 output. ----

double Uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

double UniformReal(std::mt19937_64& rng, double lo, double hi) {
  return lo + (hi - lo) * Uniform01(rng);
}

// Uniform integer in [lo, hi] (inclusive).
int UniformInt(std::mt19937_64& rng, int lo, int hi) {
  const int64_t span = static_cast<int64_t>(hi) - lo + 1;
  int64_t v = static_cast<int64_t>(Uniform01(rng) * static_cast<double>(span));
  if (v >= span) v = span - 1;
  return lo + static_cast<int>(v);
}

bool Bernoulli(std::mt19937_64& rng, double p) { return Uniform01(rng) < p; }

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

uint64_t Fnv1a64(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

// ---- Names and colours. ----

constexpr const char* kKindNames[kNumShapeKinds] = {"circle", "square", "triangle"};
constexpr const char* kColorNames[kNumShapeColors] = {"red",    "green",  "blue",
                                                      "yellow", "purple", "orange"};
// Chosen so that +-15% per-channel shade jitter never moves a colour nearer another base
// (purple is red-heavy and dark, blue is dark red-free; orange sits halfway between red and
// yellow in green).
constexpr std::array<uint8_t, 3> kBaseRgb[kNumShapeColors] = {
    {{215, 35, 35}},   // red
    {{40, 165, 55}},   // green
    {{35, 75, 215}},   // blue
    {{235, 215, 35}},  // yellow
    {{135, 45, 185}},  // purple
    {{240, 120, 25}},  // orange
};

std::array<uint8_t, 3> JitterShade(std::mt19937_64& rng, ShapeColor color) {
  const std::array<uint8_t, 3>& base = kBaseRgb[static_cast<int>(color)];
  std::array<uint8_t, 3> out{};
  for (int c = 0; c < 3; ++c) {
    const double f = UniformReal(rng, 1.0 - kShadeJitter, 1.0 + kShadeJitter);
    out[c] = static_cast<uint8_t>(std::clamp(std::lround(base[c] * f), 0L, 255L));
  }
  return out;
}

cv::Scalar Bgr(const std::array<uint8_t, 3>& rgb) { return cv::Scalar(rgb[2], rgb[1], rgb[0]); }

// ---- Scene sampling. ----

void SampleImageSize(std::mt19937_64& rng, const SceneSpec& spec, int* width, int* height) {
  const int short_side = UniformInt(rng, spec.min_side, spec.max_side);
  int long_side = short_side;
  if (!Bernoulli(rng, spec.square_image_prob)) {
    const double aspect = UniformReal(rng, 1.05, spec.max_aspect);
    long_side = std::min(spec.max_side, static_cast<int>(std::lround(short_side * aspect)));
    long_side = std::max(long_side, short_side);
  }
  if (Bernoulli(rng, 0.5)) {
    *width = long_side;
    *height = short_side;
  } else {
    *width = short_side;
    *height = long_side;
  }
}

// Samples kind-specific geometry of `shape` (all but the position) with the given size.
// `wide_rotation` (varied style): squares and triangles turned by up to 25 degrees, more often.
void SampleGeometry(std::mt19937_64& rng, double size, Shape* shape, bool wide_rotation) {
  shape->size = static_cast<float>(size);
  shape->angle_deg = 0;
  shape->aspect = 1;
  shape->skew = 0;
  switch (shape->kind) {
    case ShapeKind::kCircle:
      break;
    case ShapeKind::kSquare:
      if (wide_rotation) {
        if (Bernoulli(rng, 0.5)) shape->angle_deg = static_cast<float>(UniformReal(rng, -25, 25));
      } else if (Bernoulli(rng, 0.3)) {
        shape->angle_deg = static_cast<float>(UniformReal(rng, -12, 12));
      }
      break;
    case ShapeKind::kTriangle:
      // A triangle covers less area than a circle of the same width: make it a bit wider.
      shape->size = static_cast<float>(size * 1.15);
      shape->aspect = static_cast<float>(UniformReal(rng, 0.8, 1.05));
      shape->skew = static_cast<float>(UniformReal(rng, -0.12, 0.12));
      if (Bernoulli(rng, wide_rotation ? 0.5 : 0.4)) {
        const double a = wide_rotation ? 25 : 15;
        shape->angle_deg = static_cast<float>(UniformReal(rng, -a, a));
      }
      break;
  }
}

constexpr double kRenderFringe = 1.5;

// Tries to place shapes with the given kinds/colours; false if some shape did not fit.
bool PlaceShapes(std::mt19937_64& rng, const SceneSpec& spec, const Scene& scene, double lo_frac,
                 double hi_frac, std::vector<Shape>* shapes) {
  const double side = scene.CropSide();
  const double x0 = scene.CropX0();
  const double y0 = scene.CropY0();
  const double margin = std::max(2.0, spec.margin_frac * side);
  const double gap = std::max(3.0, spec.gap_frac * side);
  for (size_t i = 0; i < shapes->size(); ++i) {
    Shape& s = (*shapes)[i];
    SampleGeometry(rng, side * UniformReal(rng, lo_frac, hi_frac), &s, spec.varied_style);
    // Anti-aliased drawing reaches up to ~1.5 px past the geometric outline: keep that clear too.
    const double r = ShapeRadius(s) + kRenderFringe;
    const double lo_x = x0 + margin + r, hi_x = x0 + side - margin - r;
    const double lo_y = y0 + margin + r, hi_y = y0 + side - margin - r;
    if (lo_x > hi_x || lo_y > hi_y) return false;
    bool placed = false;
    for (int attempt = 0; attempt < 100 && !placed; ++attempt) {
      s.cx = static_cast<float>(UniformReal(rng, lo_x, hi_x));
      s.cy = static_cast<float>(UniformReal(rng, lo_y, hi_y));
      placed = true;
      for (size_t j = 0; j < i && placed; ++j) {
        const Shape& o = (*shapes)[j];
        const double d = std::hypot(double{s.cx} - o.cx, double{s.cy} - o.cy);
        placed = d >= r + ShapeRadius(o) + kRenderFringe + gap;
      }
    }
    if (!placed) return false;
  }
  return true;
}

}  // namespace

const char* ShapeKindName(ShapeKind kind) { return kKindNames[static_cast<int>(kind)]; }
const char* ShapeColorName(ShapeColor color) { return kColorNames[static_cast<int>(color)]; }
std::array<uint8_t, 3> BaseRgb(ShapeColor color) { return kBaseRgb[static_cast<int>(color)]; }

ShapeColor NearestBaseColor(const std::array<uint8_t, 3>& rgb) {
  int best = 0;
  int best_d = -1;
  for (int k = 0; k < kNumShapeColors; ++k) {
    int d = 0;
    for (int c = 0; c < 3; ++c) {
      const int diff = static_cast<int>(rgb[c]) - kBaseRgb[k][c];
      d += diff * diff;
    }
    if (best_d < 0 || d < best_d) {
      best_d = d;
      best = k;
    }
  }
  return static_cast<ShapeColor>(best);
}

std::vector<cv::Point2f> ShapeVertices(const Shape& shape) {
  std::vector<cv::Point2f> local;
  const float w = shape.size;
  switch (shape.kind) {
    case ShapeKind::kCircle:
      return {};
    case ShapeKind::kSquare:
      local = {{-w / 2, -w / 2}, {w / 2, -w / 2}, {w / 2, w / 2}, {-w / 2, w / 2}};
      break;
    case ShapeKind::kTriangle: {
      // Centroid at the origin: apex 2h/3 above it, base h/3 below (apex shifted by skew).
      const float h = w * shape.aspect;
      const float apex_x = shape.skew * w;
      const float centroid_x = apex_x / 3;
      local = {{apex_x - centroid_x, -2 * h / 3},
               {w / 2 - centroid_x, h / 3},
               {-w / 2 - centroid_x, h / 3}};
      break;
    }
  }
  const double a = shape.angle_deg * M_PI / 180.0;
  const float ca = static_cast<float>(std::cos(a)), sa = static_cast<float>(std::sin(a));
  std::vector<cv::Point2f> out;
  out.reserve(local.size());
  for (const cv::Point2f& p : local) {
    out.emplace_back(shape.cx + ca * p.x - sa * p.y, shape.cy + sa * p.x + ca * p.y);
  }
  return out;
}

float ShapeRadius(const Shape& shape) {
  if (shape.kind == ShapeKind::kCircle) return shape.size / 2;
  float r = 0;
  for (const cv::Point2f& p : ShapeVertices(shape)) {
    r = std::max(r, std::hypot(p.x - shape.cx, p.y - shape.cy));
  }
  return r;
}

Scene RandomScene(std::mt19937_64& rng, const SceneSpec& spec) {
  Scene scene;
  SampleImageSize(rng, spec, &scene.width, &scene.height);

  // Light background: grey 205..250, optionally tinted, every channel >= 195.
  const int grey = UniformInt(rng, 205, 250);
  const bool tinted = Bernoulli(rng, 0.5);
  for (int c = 0; c < 3; ++c) {
    const int v = grey + (tinted ? UniformInt(rng, -10, 10) : 0);
    scene.background[c] = static_cast<uint8_t>(std::clamp(v, 195, 255));
  }
  if (Bernoulli(rng, spec.noise_prob)) {
    scene.noise_sigma = static_cast<float>(UniformReal(rng, 2.0, spec.max_noise_sigma));
    scene.noise_seed = rng();
  }
  scene.antialiased = Bernoulli(rng, spec.antialias_prob);
  if (Bernoulli(rng, spec.jpeg_prob)) {
    scene.jpeg_quality = UniformInt(rng, spec.min_jpeg_quality, spec.max_jpeg_quality);
  }

  int n = UniformInt(rng, spec.min_shapes, spec.max_shapes);
  // Kinds: a dominant kind repeats often, so counts of 3 and 4 occur.
  const auto dominant = static_cast<ShapeKind>(UniformInt(rng, 0, kNumShapeKinds - 1));
  const bool same_kind = Bernoulli(rng, spec.same_kind_prob);
  std::vector<Shape> shapes(n);
  for (int i = 0; i < n; ++i) {
    Shape& s = shapes[i];
    s.kind = same_kind || Bernoulli(rng, spec.repeat_kind_prob)
                 ? dominant
                 : static_cast<ShapeKind>(UniformInt(rng, 0, kNumShapeKinds - 1));
    if (i > 0 && Bernoulli(rng, spec.repeat_color_prob)) {
      s.color = shapes[UniformInt(rng, 0, i - 1)].color;
    } else {
      s.color = static_cast<ShapeColor>(UniformInt(rng, 0, kNumShapeColors - 1));
    }
    s.rgb = JitterShade(rng, s.color);
  }

  // Sizes: crowded scenes get smaller shapes; on failure shrink towards the minimum, and as a
  // last resort drop a shape (never needed with the default spec, but guarantees termination).
  const double crowd = n <= 2 ? 1.0 : (n == 3 ? 0.9 : 0.82);
  const double lo = spec.min_size_frac;
  double hi = std::max(lo, spec.max_size_frac * crowd);
  for (int round = 0;; ++round) {
    if (PlaceShapes(rng, spec, scene, lo, hi, &shapes)) break;
    hi = std::max(lo, lo + (hi - lo) * 0.8);
    if (round < 20) continue;
    if (shapes.size() > 1) {
      shapes.pop_back();
      round = 0;
      continue;
    }
    // A single shape that does not fit (only with extreme specs): centre it, scaled to fit.
    Shape& s = shapes[0];
    s.cx = scene.CropX0() + scene.CropSide() * 0.5f;
    s.cy = scene.CropY0() + scene.CropSide() * 0.5f;
    const double room = scene.CropSide() * (0.5 - spec.margin_frac) - kRenderFringe;
    s.size = static_cast<float>(std::max(1.0, s.size * std::max(0.0, room) / ShapeRadius(s)));
    break;
  }
  scene.shapes = std::move(shapes);
  if (spec.varied_style) {  // drawn last: the default stream above is the same either way
    const int style = UniformInt(rng, 0, 3);  // flat, gradient, two-tone, white
    if (style == 3) {
      scene.background = {255, 255, 255};
    } else if (style > 0) {
      scene.background_style = style == 1 ? Scene::Background::kGradient : Scene::Background::kTwoTone;
      const int grey = UniformInt(rng, 200, 250);
      for (int c = 0; c < 3; ++c) {
        scene.background2[c] = static_cast<uint8_t>(std::clamp(grey + UniformInt(rng, -12, 12), 190, 255));
      }
      scene.background_angle = static_cast<float>(UniformReal(rng, 0, M_PI));
    }
    const int outline = UniformInt(rng, 0, 3);  // none, none, darker, dark
    if (outline >= 2) {
      scene.outline = outline == 2 ? Scene::Outline::kDarker : Scene::Outline::kDark;
      scene.outline_width = static_cast<float>(UniformReal(rng, 1.0, 2 * kRenderFringe));
    }
  }
  return scene;
}

namespace {

// The varied-style background (gradient or two-tone) as float BGR.
cv::Mat StyledBackground(const Scene& scene) {
  cv::Mat out(scene.height, scene.width, CV_32FC3, Bgr(scene.background));
  const cv::Vec3f a(scene.background[2], scene.background[1], scene.background[0]);
  const cv::Vec3f b(scene.background2[2], scene.background2[1], scene.background2[0]);
  const double w = scene.width, h = scene.height;
  if (scene.background_style == Scene::Background::kGradient) {
    const double dx = std::cos(scene.background_angle), dy = std::sin(scene.background_angle);
    const double half = 0.5 * (std::abs(dx) * w + std::abs(dy) * h);
    for (int y = 0; y < scene.height; ++y) {
      for (int x = 0; x < scene.width; ++x) {
        const double t = std::clamp(((x + 0.5 - w / 2) * dx + (y + 0.5 - h / 2) * dy) / (2 * half) + 0.5, 0.0, 1.0);
        out.at<cv::Vec3f>(y, x) = a * static_cast<float>(1 - t) + b * static_cast<float>(t);
      }
    }
  } else if (scene.background_style == Scene::Background::kTwoTone) {
    for (int y = 0; y < scene.height; ++y) {  // the upper-left triangle in the second tone
      for (int x = 0; x < scene.width; ++x) {
        if ((x + 0.5) / w + (y + 0.5) / h < 1.0) out.at<cv::Vec3f>(y, x) = b;
      }
    }
  }
  return out;
}

}  // namespace

cv::Mat RenderScene(const Scene& scene) {
  const cv::Scalar bg = Bgr(scene.background);
  cv::Mat image;
  if (scene.background_style != Scene::Background::kFlat) {
    cv::Mat base = StyledBackground(scene);
    if (scene.noise_sigma > 0) {
      cv::Mat noise(scene.height, scene.width, CV_32FC3);
      cv::RNG noise_rng(scene.noise_seed);
      noise_rng.fill(noise, cv::RNG::NORMAL, 0.0, scene.noise_sigma);
      base += noise;
    }
    base.convertTo(image, CV_8UC3);
  } else if (scene.noise_sigma > 0) {
    cv::Mat noisy(scene.height, scene.width, CV_32FC3, bg);
    cv::Mat noise(scene.height, scene.width, CV_32FC3);
    cv::RNG noise_rng(scene.noise_seed);
    noise_rng.fill(noise, cv::RNG::NORMAL, 0.0, scene.noise_sigma);
    noisy += noise;
    noisy.convertTo(image, CV_8UC3);
  } else {
    image = cv::Mat(scene.height, scene.width, CV_8UC3, bg);
  }
  constexpr int kShift = 4;  // sub-pixel coordinates: 1/16 pixel
  constexpr float kScale = 1 << kShift;
  const int line_type = scene.antialiased ? cv::LINE_AA : cv::LINE_8;
  for (const Shape& s : scene.shapes) {
    const cv::Scalar color = Bgr(s.rgb);
    if (s.kind == ShapeKind::kCircle) {
      const cv::Point center(static_cast<int>(std::lround(s.cx * kScale)),
                             static_cast<int>(std::lround(s.cy * kScale)));
      cv::circle(image, center, static_cast<int>(std::lround(s.size / 2 * kScale)), color,
                 cv::FILLED, line_type, kShift);
    } else {
      std::vector<cv::Point> pts;
      for (const cv::Point2f& p : ShapeVertices(s)) {
        pts.emplace_back(static_cast<int>(std::lround(p.x * kScale)),
                         static_cast<int>(std::lround(p.y * kScale)));
      }
      cv::fillConvexPoly(image, pts, color, line_type, kShift);
    }
    if (scene.outline != Scene::Outline::kNone) {
      const cv::Scalar rim = scene.outline == Scene::Outline::kDark
                                 ? cv::Scalar(30, 30, 30)
                                 : Bgr({static_cast<uint8_t>(s.rgb[0] * 0.6), static_cast<uint8_t>(s.rgb[1] * 0.6),
                                        static_cast<uint8_t>(s.rgb[2] * 0.6)});
      // A rim, not a ring: at most 12% of the shape's size (as in the independent set).
      const int thickness = std::max(
          1, static_cast<int>(std::lround(std::min<double>(scene.outline_width, 0.12 * s.size))));
      if (s.kind == ShapeKind::kCircle) {
        const cv::Point center(static_cast<int>(std::lround(s.cx * kScale)),
                               static_cast<int>(std::lround(s.cy * kScale)));
        cv::circle(image, center, static_cast<int>(std::lround(s.size / 2 * kScale)), rim, thickness,
                   line_type, kShift);
      } else {
        std::vector<cv::Point> pts;
        for (const cv::Point2f& p : ShapeVertices(s)) {
          pts.emplace_back(static_cast<int>(std::lround(p.x * kScale)),
                           static_cast<int>(std::lround(p.y * kScale)));
        }
        cv::polylines(image, pts, /*isClosed=*/true, rim, thickness, line_type, kShift);
      }
    }
  }
  return image;
}

StatusOr<std::vector<uint8_t>> EncodeScene(const Scene& scene, const cv::Mat& image) {
  std::vector<uint8_t> bytes;
  bool ok = false;
  try {
    if (scene.jpeg_quality > 0) {
      ok = cv::imencode(".jpg", image, bytes, {cv::IMWRITE_JPEG_QUALITY, scene.jpeg_quality});
    } else {
      // Fast settings: RLE deflate is as small as default zlib here at ~2/3 of the time.
      ok = cv::imencode(
          ".png", image, bytes,
          {cv::IMWRITE_PNG_COMPRESSION, 1, cv::IMWRITE_PNG_STRATEGY, cv::IMWRITE_PNG_STRATEGY_RLE});
    }
  } catch (const cv::Exception& e) {
    return Internal(std::string("image encoding failed: ") + e.what());
  }
  if (!ok) return Internal("image encoding failed");
  return bytes;
}

const char* SceneFileExtension(const Scene& scene) {
  return scene.jpeg_quality > 0 ? ".jpg" : ".png";
}

// ---- Questions. ----

const std::array<const char*, 6> kQuestionTypes = {"color",     "shape",  "count_shape",
                                                   "count_all", "exists", "side"};

namespace {

const std::array<std::vector<std::string>, 6>& AnswersByType() {
  static const auto* answers = new std::array<std::vector<std::string>, 6>{{
      {"red", "green", "blue", "yellow", "purple", "orange"},
      {"circle", "square", "triangle"},
      {"0", "1", "2", "3", "4"},
      {"1", "2", "3", "4"},
      {"yes", "no"},
      {"left", "right"},
  }};
  return *answers;
}

int TypeIndex(const std::string& type) {
  for (int t = 0; t < 6; ++t) {
    if (type == kQuestionTypes[t]) return t;
  }
  return -1;
}

int AnswerIndex(int type_index, const std::string& answer) {
  const std::vector<std::string>& answers = AnswersByType()[type_index];
  for (size_t a = 0; a < answers.size(); ++a) {
    if (answers[a] == answer) return static_cast<int>(a);
  }
  return -1;
}

QaExample Qa(std::string question, std::string answer, const char* type) {
  return QaExample{"", std::move(question), std::move(answer), type};
}

}  // namespace

std::vector<std::string> AllowedAnswers(const std::string& type) {
  const int t = TypeIndex(type);
  if (t < 0) return {};
  return AnswersByType()[t];
}

std::vector<QaExample> AllQuestions(const Scene& scene) {
  int kind_count[kNumShapeKinds] = {};
  int color_count[kNumShapeColors] = {};
  int combo_count[kNumShapeColors][kNumShapeKinds] = {};
  for (const Shape& s : scene.shapes) {
    ++kind_count[static_cast<int>(s.kind)];
    ++color_count[static_cast<int>(s.color)];
    ++combo_count[static_cast<int>(s.color)][static_cast<int>(s.kind)];
  }
  std::vector<QaExample> out;
  for (const Shape& s : scene.shapes) {
    if (kind_count[static_cast<int>(s.kind)] == 1) {
      out.push_back(Qa(std::string("What color is the ") + ShapeKindName(s.kind) + "?",
                       ShapeColorName(s.color), "color"));
    }
  }
  for (const Shape& s : scene.shapes) {
    if (color_count[static_cast<int>(s.color)] == 1) {
      out.push_back(Qa(std::string("What shape is the ") + ShapeColorName(s.color) + " object?",
                       ShapeKindName(s.kind), "shape"));
    }
  }
  for (int k = 0; k < kNumShapeKinds; ++k) {
    out.push_back(Qa(std::string("How many ") + kKindNames[k] + "s are there?",
                     std::to_string(kind_count[k]), "count_shape"));
  }
  out.push_back(Qa("How many shapes are there?", std::to_string(scene.shapes.size()), "count_all"));
  for (int c = 0; c < kNumShapeColors; ++c) {
    for (int k = 0; k < kNumShapeKinds; ++k) {
      out.push_back(Qa(std::string("Is there a ") + kColorNames[c] + " " + kKindNames[k] + "?",
                       combo_count[c][k] > 0 ? "yes" : "no", "exists"));
    }
  }
  const double side = scene.CropSide();
  for (const Shape& s : scene.shapes) {
    if (combo_count[static_cast<int>(s.color)][static_cast<int>(s.kind)] != 1) continue;
    const double dx = s.cx - scene.CropCenterX();
    if (std::abs(dx) < kSideMinOffset * side) continue;
    out.push_back(Qa(std::string("Which side is the ") + ShapeColorName(s.color) + " " +
                         ShapeKindName(s.kind) + " on?",
                     dx < 0 ? "left" : "right", "side"));
  }
  return out;
}

QuestionBalancer::QuestionBalancer() {
  for (int t = 0; t < 6; ++t) answer_counts_[t].assign(AnswersByType()[t].size(), 0);
}

void QuestionBalancer::Add(const QaExample& example) {
  const int t = TypeIndex(example.type);
  if (t < 0) return;
  const int a = AnswerIndex(t, example.answer);
  ++total_;
  ++type_counts_[t];
  if (a >= 0) ++answer_counts_[t][a];
}

int64_t QuestionBalancer::AnswerCount(int type_index, int answer_index) const {
  return answer_counts_[type_index][answer_index];
}

double QuestionBalancer::Score(int type_index, int answer_index) const {
  const double type_deficit = (total_ + 1) / 6.0 - type_counts_[type_index];
  const double answer_deficit =
      (type_counts_[type_index] + 1) / static_cast<double>(answer_counts_[type_index].size()) -
      answer_counts_[type_index][answer_index];
  return type_deficit + answer_deficit;
}

std::vector<QaExample> QuestionsFor(const Scene& scene, std::mt19937_64& rng, int n,
                                    QuestionBalancer* balancer) {
  QuestionBalancer local;
  if (balancer == nullptr) balancer = &local;
  std::vector<QaExample> candidates = AllQuestions(scene);
  // Presence of colours and kinds, for hard negatives of "exists".
  bool color_present[kNumShapeColors] = {};
  bool kind_present[kNumShapeKinds] = {};
  for (const Shape& s : scene.shapes) {
    color_present[static_cast<int>(s.color)] = true;
    kind_present[static_cast<int>(s.kind)] = true;
  }
  auto is_hard_negative = [&](const QaExample& q) {
    for (int c = 0; c < kNumShapeColors; ++c) {
      for (int k = 0; k < kNumShapeKinds; ++k) {
        const std::string text =
            std::string("Is there a ") + kColorNames[c] + " " + kKindNames[k] + "?";
        if (q.question == text) return color_present[c] || kind_present[k];
      }
    }
    return false;
  };

  std::vector<QaExample> out;
  while (static_cast<int>(out.size()) < n && !candidates.empty()) {
    // Best (type, answer) pairs among the remaining candidates.
    std::vector<std::pair<int, int>> best;
    double best_score = -1e300;
    std::vector<std::pair<int, int>> keys(candidates.size());
    for (size_t i = 0; i < candidates.size(); ++i) {
      const int t = TypeIndex(candidates[i].type);
      keys[i] = {t, AnswerIndex(t, candidates[i].answer)};
      const double score = balancer->Score(keys[i].first, keys[i].second);
      if (score > best_score + 1e-9) {
        best_score = score;
        best.clear();
      }
      if (score > best_score - 1e-9 && std::find(best.begin(), best.end(), keys[i]) == best.end()) {
        best.push_back(keys[i]);
      }
    }
    const std::pair<int, int> pick = best[UniformInt(rng, 0, static_cast<int>(best.size()) - 1)];
    std::vector<size_t> pool;
    for (size_t i = 0; i < candidates.size(); ++i) {
      if (keys[i] == pick) pool.push_back(i);
    }
    if (kQuestionTypes[pick.first] == std::string("exists") &&
        AnswersByType()[pick.first][pick.second] == "no" && Bernoulli(rng, 0.7)) {
      std::vector<size_t> hard;
      for (size_t i : pool) {
        if (is_hard_negative(candidates[i])) hard.push_back(i);
      }
      if (!hard.empty()) pool = std::move(hard);
    }
    const size_t chosen = pool[UniformInt(rng, 0, static_cast<int>(pool.size()) - 1)];
    balancer->Add(candidates[chosen]);
    out.push_back(std::move(candidates[chosen]));
    candidates.erase(candidates.begin() + static_cast<std::ptrdiff_t>(chosen));
  }
  return out;
}

uint64_t ImageSeed(uint64_t seed, const std::string& split, int64_t index) {
  const uint64_t split_seed = SplitMix64(seed ^ SplitMix64(Fnv1a64(split)));
  return SplitMix64(split_seed + 0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(index + 1));
}

// ---- Writing a split. ----

namespace {

struct ImageJob {
  Scene scene;
  std::string relative_path;
  std::vector<QaExample> questions;
  Status status;
};

Status WriteFile(const std::filesystem::path& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return Internal("cannot open " + path.string() + " for writing");
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) return Internal("cannot write " + path.string());
  return Status::Ok();
}

Status RenderAndWrite(const std::filesystem::path& out_dir, ImageJob* job) {
  const cv::Mat image = RenderScene(job->scene);
  VTW_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, EncodeScene(job->scene, image));
  return WriteFile(out_dir / job->relative_path, bytes);
}

}  // namespace

Status GenerateDataset(const DatasetOptions& opts, std::ostream* progress) {
  namespace fs = std::filesystem;
  if (opts.out_dir.empty()) return InvalidArgument("dataset: out_dir is empty");
  if (opts.split != "train" && opts.split != "val" && opts.split != "test") {
    return InvalidArgument("dataset: split must be train, val or test, got '" + opts.split + "'");
  }
  if (opts.count < 1) return InvalidArgument("dataset: count must be >= 1");
  if (opts.questions_per_image < 1 || opts.questions_per_image > 16) {
    return InvalidArgument("dataset: questions_per_image must be in 1..16");
  }
  if (opts.threads < 0) return InvalidArgument("dataset: threads must be >= 0");
  const SceneSpec& spec = opts.scene;
  if (spec.min_side < 16 || spec.max_side < spec.min_side || spec.min_shapes < 1 ||
      spec.max_shapes > 4 || spec.max_shapes < spec.min_shapes || spec.min_size_frac <= 0 ||
      spec.max_size_frac < spec.min_size_frac || spec.max_size_frac > 0.5) {
    return InvalidArgument("dataset: invalid scene spec");
  }

  const fs::path out_dir(opts.out_dir);
  std::error_code ec;
  fs::create_directories(out_dir / "images", ec);
  if (ec) return Internal("cannot create " + (out_dir / "images").string() + ": " + ec.message());
  const fs::path jsonl_path = out_dir / (opts.split + ".jsonl");
  const fs::path tmp_path = out_dir / (opts.split + ".jsonl.tmp");
  std::ofstream jsonl(tmp_path, std::ios::binary | std::ios::trunc);
  if (!jsonl) return Internal("cannot open " + tmp_path.string() + " for writing");

  const int threads = opts.threads > 0
                          ? opts.threads
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const auto start = std::chrono::steady_clock::now();
  QuestionBalancer balancer;
  int64_t done = 0;
  int64_t image_index = 0;
  int64_t images_png = 0, images_jpeg = 0;
  int64_t next_report = 1000;
  constexpr int kBatchImages = 256;
  std::vector<ImageJob> batch;
  while (done < opts.count) {
    // Sample scenes and questions sequentially (the balancer is sequential state).
    batch.clear();
    int64_t batch_examples = 0;
    while (static_cast<int>(batch.size()) < kBatchImages && done + batch_examples < opts.count) {
      std::mt19937_64 rng(ImageSeed(opts.seed, opts.split, image_index));
      ImageJob job;
      job.scene = RandomScene(rng, spec);
      const int64_t want =
          std::min<int64_t>(opts.questions_per_image, opts.count - done - batch_examples);
      job.questions = QuestionsFor(job.scene, rng, static_cast<int>(want), &balancer);
      char name[64];
      std::snprintf(name, sizeof(name), "images/%s_%06lld%s", opts.split.c_str(),
                    static_cast<long long>(image_index), SceneFileExtension(job.scene));
      job.relative_path = name;
      for (QaExample& q : job.questions) q.image = job.relative_path;
      batch_examples += static_cast<int64_t>(job.questions.size());
      (job.scene.jpeg_quality > 0 ? images_jpeg : images_png) += 1;
      batch.push_back(std::move(job));
      ++image_index;
    }
    // Render, encode and write images in parallel; each job is independent.
    std::atomic<size_t> next{0};
    auto worker = [&]() {
      for (size_t i = next++; i < batch.size(); i = next++) {
        batch[i].status = RenderAndWrite(out_dir, &batch[i]);
      }
    };
    const int n_threads = std::min<int>(threads, static_cast<int>(batch.size()));
    std::vector<std::thread> pool;
    for (int t = 1; t < n_threads; ++t) pool.emplace_back(worker);
    worker();
    for (std::thread& t : pool) t.join();
    for (const ImageJob& job : batch) {
      VTW_RETURN_IF_ERROR(job.status);
      for (const QaExample& q : job.questions) {
        nlohmann::ordered_json line;
        line["image"] = q.image;
        line["question"] = q.question;
        line["answer"] = q.answer;
        line["type"] = q.type;
        jsonl << line.dump() << '\n';
      }
    }
    done += batch_examples;
    if (progress != nullptr && done >= next_report && done < opts.count) {
      *progress << "dataset " << opts.split << ": " << done << "/" << opts.count << " examples\n";
      progress->flush();
      while (next_report <= done) next_report += 1000;
    }
  }
  jsonl.close();
  if (!jsonl) return Internal("cannot write " + tmp_path.string());
  fs::rename(tmp_path, jsonl_path, ec);
  if (ec) return Internal("cannot rename to " + jsonl_path.string() + ": " + ec.message());

  if (progress != nullptr) {
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    *progress << "dataset " << opts.split << ": wrote " << done << " examples, " << image_index
              << " images (" << images_png << " png, " << images_jpeg << " jpeg) to "
              << jsonl_path.string() << " in " << secs << " s\n";
    *progress << "  types:";
    for (int t = 0; t < 6; ++t)
      *progress << " " << kQuestionTypes[t] << "=" << balancer.TypeCount(t);
    *progress << "\n";
    progress->flush();
  }
  return Status::Ok();
}

}  // namespace vtw
