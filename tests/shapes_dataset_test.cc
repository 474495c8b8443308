// Tests of the synthetic shapes VQA dataset generator (shapes/shapes_dataset.h) and the
// `vtw dataset` command: scene invariants, colour separability, question templates and answers
// recomputed from the scene, balance, rendering, determinism, split disjointness, output format.
#include "shapes/shapes_dataset.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "cli/commands.h"

namespace vtw {
namespace {

namespace fs = std::filesystem;

const char* const kColors = "(red|green|blue|yellow|purple|orange)";
const char* const kKinds = "(circle|square|triangle)";

// A fresh directory under the system temp dir, removed on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    path_ = fs::temp_directory_path() / ("vtw_shapes_" + tag + "_" + std::to_string(::getpid()) +
                                         "_" + std::to_string(counter_++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

std::string ReadAll(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<nlohmann::ordered_json> ReadJsonl(const fs::path& path) {
  std::vector<nlohmann::ordered_json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::ordered_json::parse(line));
  return out;
}

int KindFromName(const std::string& name) {
  for (int k = 0; k < kNumShapeKinds; ++k) {
    if (name == ShapeKindName(static_cast<ShapeKind>(k))) return k;
  }
  return -1;
}

int ColorFromName(const std::string& name) {
  for (int c = 0; c < kNumShapeColors; ++c) {
    if (name == ShapeColorName(static_cast<ShapeColor>(c))) return c;
  }
  return -1;
}

// Recomputes the answer of `qa` from the scene, independently of the generator. Fails the
// test (returns "") when the question does not match its type's template or is not askable.
std::string ExpectedAnswer(const Scene& scene, const QaExample& qa) {
  std::smatch m;
  auto count = [&](int color, int kind) {
    int n = 0;
    for (const Shape& s : scene.shapes) {
      if ((color < 0 || static_cast<int>(s.color) == color) &&
          (kind < 0 || static_cast<int>(s.kind) == kind)) {
        ++n;
      }
    }
    return n;
  };
  auto find = [&](int color, int kind) -> const Shape* {
    for (const Shape& s : scene.shapes) {
      if ((color < 0 || static_cast<int>(s.color) == color) &&
          (kind < 0 || static_cast<int>(s.kind) == kind)) {
        return &s;
      }
    }
    return nullptr;
  };
  if (qa.type == "color") {
    if (!std::regex_match(qa.question, m,
                          std::regex(std::string("What color is the ") + kKinds + "\\?"))) {
      ADD_FAILURE() << "bad color question: " << qa.question;
      return "";
    }
    const int kind = KindFromName(m[1]);
    EXPECT_EQ(count(-1, kind), 1) << "color question about a non-unique shape: " << qa.question;
    const Shape* s = find(-1, kind);
    return s ? ShapeColorName(s->color) : "";
  }
  if (qa.type == "shape") {
    if (!std::regex_match(qa.question, m,
                          std::regex(std::string("What shape is the ") + kColors + " object\\?"))) {
      ADD_FAILURE() << "bad shape question: " << qa.question;
      return "";
    }
    const int color = ColorFromName(m[1]);
    EXPECT_EQ(count(color, -1), 1) << "shape question about a non-unique colour: " << qa.question;
    const Shape* s = find(color, -1);
    return s ? ShapeKindName(s->kind) : "";
  }
  if (qa.type == "count_shape") {
    if (!std::regex_match(qa.question, m,
                          std::regex(std::string("How many ") + kKinds + "s are there\\?"))) {
      ADD_FAILURE() << "bad count_shape question: " << qa.question;
      return "";
    }
    return std::to_string(count(-1, KindFromName(m[1])));
  }
  if (qa.type == "count_all") {
    if (qa.question != "How many shapes are there?") {
      ADD_FAILURE() << "bad count_all question: " << qa.question;
      return "";
    }
    return std::to_string(scene.shapes.size());
  }
  if (qa.type == "exists") {
    if (!std::regex_match(
            qa.question, m,
            std::regex(std::string("Is there a ") + kColors + " " + kKinds + "\\?"))) {
      ADD_FAILURE() << "bad exists question: " << qa.question;
      return "";
    }
    return count(ColorFromName(m[1]), KindFromName(m[2])) > 0 ? "yes" : "no";
  }
  if (qa.type == "side") {
    if (!std::regex_match(
            qa.question, m,
            std::regex(std::string("Which side is the ") + kColors + " " + kKinds + " on\\?"))) {
      ADD_FAILURE() << "bad side question: " << qa.question;
      return "";
    }
    const int color = ColorFromName(m[1]), kind = KindFromName(m[2]);
    EXPECT_EQ(count(color, kind), 1) << "side question about a non-unique object: " << qa.question;
    const Shape* s = find(color, kind);
    if (s == nullptr) return "";
    const double dx = s->cx - scene.width / 2.0;
    EXPECT_GE(std::abs(dx), 0.15 * scene.CropSide() - 1e-3) << "too close to the middle";
    return dx < 0 ? "left" : "right";
  }
  ADD_FAILURE() << "unknown type " << qa.type;
  return "";
}

TEST(ShapesDatasetTest, JitteredColoursStayNearestToTheirBase) {
  // Nearest-base regions are convex and so is the jitter box (also after clamping to
  // [0, 255]), so checking the box corners covers every possible shade.
  for (int c = 0; c < kNumShapeColors; ++c) {
    const auto color = static_cast<ShapeColor>(c);
    const std::array<uint8_t, 3> base = BaseRgb(color);
    EXPECT_EQ(NearestBaseColor(base), color);
    for (int corner = 0; corner < 8; ++corner) {
      std::array<uint8_t, 3> rgb{};
      for (int ch = 0; ch < 3; ++ch) {
        const double f = (corner >> ch) & 1 ? 1 + kShadeJitter : 1 - kShadeJitter;
        rgb[ch] = static_cast<uint8_t>(std::clamp(std::lround(base[ch] * f), 0L, 255L));
      }
      EXPECT_EQ(NearestBaseColor(rgb), color) << ShapeColorName(color) << " corner " << corner
                                              << " -> " << ShapeColorName(NearestBaseColor(rgb));
      // And with a safety margin: the intended base is clearly nearer than any other.
      double own = 0, other = 1e9;
      for (int k = 0; k < kNumShapeColors; ++k) {
        double d = 0;
        for (int ch = 0; ch < 3; ++ch) {
          d += std::pow(static_cast<double>(rgb[ch]) - BaseRgb(static_cast<ShapeColor>(k))[ch], 2);
        }
        d = std::sqrt(d);
        if (k == c) {
          own = d;
        } else {
          other = std::min(other, d);
        }
      }
      EXPECT_GT(other - own, 15.0) << ShapeColorName(color) << " corner " << corner;
    }
  }
  // The sampled shades really are within the jitter box.
  std::mt19937_64 rng(7);
  for (int i = 0; i < 3000; ++i) {
    const Scene scene = RandomScene(rng);
    for (const Shape& s : scene.shapes) {
      ASSERT_EQ(NearestBaseColor(s.rgb), s.color);
      for (int ch = 0; ch < 3; ++ch) {
        const double base = BaseRgb(s.color)[ch];
        EXPECT_GE(s.rgb[ch], std::floor(base * (1 - kShadeJitter)) - 1);
        EXPECT_LE(s.rgb[ch], std::min(255.0, std::ceil(base * (1 + kShadeJitter)) + 1));
      }
    }
  }
}

TEST(ShapesDatasetTest, ScenesRespectCropSizeAndSpacing) {
  std::mt19937_64 rng(11);
  std::set<std::pair<int, int>> sizes;
  int non_square = 0, aa = 0, jpeg = 0, noisy = 0;
  std::map<size_t, int> shape_counts;
  for (int i = 0; i < 5000; ++i) {
    const Scene scene = RandomScene(rng);
    ASSERT_GE(scene.width, 48);
    ASSERT_LE(scene.width, 160);
    ASSERT_GE(scene.height, 48);
    ASSERT_LE(scene.height, 160);
    ASSERT_GE(scene.shapes.size(), 1u);
    ASSERT_LE(scene.shapes.size(), 4u);
    for (int ch = 0; ch < 3; ++ch) ASSERT_GE(scene.background[ch], 195);
    sizes.insert({scene.width, scene.height});
    non_square += scene.width != scene.height;
    aa += scene.antialiased;
    jpeg += scene.jpeg_quality > 0;
    noisy += scene.noise_sigma > 0;
    ++shape_counts[scene.shapes.size()];
    const double side = std::min(scene.width, scene.height);
    const double x0 = (scene.width - side) / 2, y0 = (scene.height - side) / 2;
    for (size_t a = 0; a < scene.shapes.size(); ++a) {
      const Shape& s = scene.shapes[a];
      // Visible at the model's input resolution: >= 14% of the crop side.
      EXPECT_GE(s.size, 0.14 * side);
      // Every point of the shape lies inside the central crop square, with a margin.
      std::vector<cv::Point2f> pts = ShapeVertices(s);
      if (s.kind == ShapeKind::kCircle) {
        const float r = s.size / 2;
        pts = {{s.cx - r, s.cy}, {s.cx + r, s.cy}, {s.cx, s.cy - r}, {s.cx, s.cy + r}};
      } else {
        ASSERT_EQ(pts.size(), s.kind == ShapeKind::kSquare ? 4u : 3u);
      }
      for (const cv::Point2f& p : pts) {
        EXPECT_GE(p.x, x0 + 1.5);
        EXPECT_LE(p.x, x0 + side - 1.5);
        EXPECT_GE(p.y, y0 + 1.5);
        EXPECT_LE(p.y, y0 + side - 1.5);
        EXPECT_LE(std::hypot(p.x - s.cx, p.y - s.cy), ShapeRadius(s) + 1e-3);
      }
      // Bounding circles separated by a small gap.
      for (size_t b = 0; b < a; ++b) {
        const Shape& o = scene.shapes[b];
        EXPECT_GE(std::hypot(s.cx - o.cx, s.cy - o.cy), ShapeRadius(s) + ShapeRadius(o) + 1.5);
      }
    }
  }
  EXPECT_GT(sizes.size(), 1000u);
  EXPECT_GT(non_square, 2000);
  EXPECT_GT(aa, 2000);
  EXPECT_LT(aa, 3000);
  EXPECT_GT(jpeg, 1200);
  EXPECT_LT(jpeg, 2300);
  EXPECT_GT(noisy, 1500);
  for (size_t n = 1; n <= 4; ++n) EXPECT_GT(shape_counts[n], 1000) << n;
}

TEST(ShapesDatasetTest, ExtremeSpecsStillTerminateInsideTheCrop) {
  SceneSpec spec;
  spec.min_side = spec.max_side = 20;
  spec.min_shapes = spec.max_shapes = 4;
  spec.min_size_frac = spec.max_size_frac = 0.9;  // cannot fit: shapes are dropped / shrunk
  std::mt19937_64 rng(3);
  for (int i = 0; i < 50; ++i) {
    const Scene scene = RandomScene(rng, spec);
    ASSERT_EQ(scene.shapes.size(), 1u);
    const Shape& s = scene.shapes[0];
    EXPECT_LE(ShapeRadius(s), 10.0f);
    EXPECT_NEAR(s.cx, 10.0f, 1e-3);
    EXPECT_NEAR(s.cy, 10.0f, 1e-3);
  }
}

TEST(ShapesDatasetTest, RenderedShapesDoNotTouch) {
  // Pixel-level check: each shape drawn alone (dilated by one pixel) shares no pixel with the
  // others, and the full render's pixel at each shape centre is exactly the shape's colour.
  std::mt19937_64 rng(13);
  for (int i = 0; i < 300; ++i) {
    Scene scene = RandomScene(rng);
    const cv::Mat image = RenderScene(scene);
    ASSERT_EQ(image.type(), CV_8UC3);
    ASSERT_EQ(image.cols, scene.width);
    ASSERT_EQ(image.rows, scene.height);
    cv::Mat occupied = cv::Mat::zeros(scene.height, scene.width, CV_8U);
    for (const Shape& s : scene.shapes) {
      const cv::Vec3b px = image.at<cv::Vec3b>(static_cast<int>(std::lround(s.cy)),
                                               static_cast<int>(std::lround(s.cx)));
      EXPECT_EQ(px, cv::Vec3b(s.rgb[2], s.rgb[1], s.rgb[0])) << "scene " << i;
      Scene alone = scene;
      alone.shapes = {s};
      alone.noise_sigma = 0;
      alone.background = {0, 0, 0};
      alone.shapes[0].rgb = {255, 255, 255};
      cv::Mat mask;
      cv::cvtColor(RenderScene(alone), mask, cv::COLOR_BGR2GRAY);
      cv::threshold(mask, mask, 0, 255, cv::THRESH_BINARY);
      cv::Mat dilated, both;
      cv::dilate(mask, dilated, cv::Mat::ones(3, 3, CV_8U));
      cv::bitwise_and(dilated, occupied, both);
      EXPECT_EQ(cv::countNonZero(both), 0) << "scene " << i;
      cv::bitwise_or(mask, occupied, occupied);
      // All of the shape's pixels are inside the centre crop square.
      const int side = scene.CropSide();
      const cv::Rect crop((scene.width - side) / 2, (scene.height - side) / 2, side, side);
      EXPECT_EQ(cv::countNonZero(mask), cv::countNonZero(mask(crop))) << "scene " << i;
    }
  }
}

TEST(ShapesDatasetTest, VariedStyleAddsBackgroundsAndOutlinesInsideTheCrop) {
  SceneSpec spec;
  spec.varied_style = true;
  std::mt19937_64 rng(17), rng_again(17);
  std::map<Scene::Background, int> backgrounds;
  int outlined = 0, white = 0, rotated_far = 0;
  for (int i = 0; i < 600; ++i) {
    const Scene scene = RandomScene(rng, spec);
    ++backgrounds[scene.background_style];
    white += scene.background == std::array<uint8_t, 3>{255, 255, 255};
    if (scene.outline != Scene::Outline::kNone) {
      ++outlined;
      EXPECT_GE(scene.outline_width, 1.0f);
      EXPECT_LE(scene.outline_width, 3.0f);
    }
    for (const Shape& s : scene.shapes) rotated_far += std::abs(s.angle_deg) > 15;
    const cv::Mat image = RenderScene(scene);
    // Deterministic: the same seed draws and renders the same scene.
    const cv::Mat again = RenderScene(RandomScene(rng_again, spec));
    ASSERT_EQ(cv::norm(image, again, cv::NORM_INF), 0) << "scene " << i;
    // The fill colour at every shape's centre; an outline only on the rim.
    for (const Shape& s : scene.shapes) {
      const cv::Vec3b px = image.at<cv::Vec3b>(static_cast<int>(std::lround(s.cy)),
                                               static_cast<int>(std::lround(s.cx)));
      EXPECT_EQ(px, cv::Vec3b(s.rgb[2], s.rgb[1], s.rgb[0])) << "scene " << i;
      // Inside the crop square, outline included (margin minus the render fringe).
      const double side = scene.CropSide();
      EXPECT_GE(s.cx - ShapeRadius(s), scene.CropX0() + 1.5) << "scene " << i;
      EXPECT_LE(s.cx + ShapeRadius(s), scene.CropX0() + side - 1.5) << "scene " << i;
    }
    if (scene.background_style == Scene::Background::kTwoTone && scene.background != scene.background2) {
      // Upper-left corner in the second tone, lower-right in the first (no shape is there:
      // shapes keep a margin from the crop border, and the corners are outside a non-square crop
      // or inside that margin).
      const cv::Vec3b ul = image.at<cv::Vec3b>(0, 0), lr = image.at<cv::Vec3b>(scene.height - 1, scene.width - 1);
      if (scene.noise_sigma == 0) {
        EXPECT_EQ(ul, cv::Vec3b(scene.background2[2], scene.background2[1], scene.background2[0])) << i;
        EXPECT_EQ(lr, cv::Vec3b(scene.background[2], scene.background[1], scene.background[0])) << i;
      }
    }
  }
  EXPECT_GT(backgrounds[Scene::Background::kFlat], 150);  // flat and white
  EXPECT_GT(backgrounds[Scene::Background::kGradient], 100);
  EXPECT_GT(backgrounds[Scene::Background::kTwoTone], 100);
  EXPECT_GT(white, 100);
  EXPECT_GT(outlined, 200);
  EXPECT_LT(outlined, 400);
  EXPECT_GT(rotated_far, 100);
  // The default spec draws none of it.
  std::mt19937_64 plain(17);
  for (int i = 0; i < 200; ++i) {
    const Scene scene = RandomScene(plain);
    EXPECT_EQ(scene.background_style, Scene::Background::kFlat);
    EXPECT_EQ(scene.outline, Scene::Outline::kNone);
    for (const Shape& s : scene.shapes) EXPECT_LE(std::abs(s.angle_deg), 15.0f);
  }
}

TEST(ShapesDatasetTest, EncodedImagesKeepTheAnswerColours) {
  std::mt19937_64 rng(17);
  int jpeg = 0;
  for (int i = 0; i < 400; ++i) {
    const Scene scene = RandomScene(rng);
    auto bytes = EncodeScene(scene, RenderScene(scene));
    ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
    const cv::Mat decoded = cv::imdecode(*bytes, cv::IMREAD_COLOR);
    ASSERT_EQ(decoded.cols, scene.width);
    ASSERT_EQ(decoded.rows, scene.height);
    jpeg += scene.jpeg_quality > 0;
    for (const Shape& s : scene.shapes) {
      const cv::Vec3b px = decoded.at<cv::Vec3b>(static_cast<int>(std::lround(s.cy)),
                                                 static_cast<int>(std::lround(s.cx)));
      const std::array<uint8_t, 3> rgb = {px[2], px[1], px[0]};
      EXPECT_EQ(NearestBaseColor(rgb), s.color)
          << "scene " << i << " q=" << scene.jpeg_quality << " " << ShapeColorName(s.color)
          << " decoded as " << ShapeColorName(NearestBaseColor(rgb));
      if (scene.jpeg_quality == 0) {
        EXPECT_EQ(rgb, s.rgb);
      } else {
        for (int ch = 0; ch < 3; ++ch) EXPECT_NEAR(rgb[ch], s.rgb[ch], 60);
      }
    }
  }
  EXPECT_GT(jpeg, 50);
}

TEST(ShapesDatasetTest, QuestionsMatchTemplatesAndScene) {
  std::mt19937_64 rng(19);
  QuestionBalancer balancer;
  for (int i = 0; i < 3000; ++i) {
    const Scene scene = RandomScene(rng);
    // Every candidate is valid.
    for (const QaExample& qa : AllQuestions(scene)) {
      EXPECT_EQ(qa.answer, ExpectedAnswer(scene, qa)) << qa.question;
    }
    const std::vector<QaExample> qs = QuestionsFor(scene, rng, 3, &balancer);
    ASSERT_EQ(qs.size(), 3u);
    std::set<std::string> seen;
    for (const QaExample& qa : qs) {
      EXPECT_TRUE(seen.insert(qa.question).second) << "repeated question " << qa.question;
      const std::vector<std::string> allowed = AllowedAnswers(qa.type);
      ASSERT_FALSE(allowed.empty()) << qa.type;
      EXPECT_NE(std::find(allowed.begin(), allowed.end(), qa.answer), allowed.end())
          << qa.type << ": " << qa.answer;
      EXPECT_EQ(qa.answer, ExpectedAnswer(scene, qa)) << qa.question;
    }
  }
  // The candidate lists are complete: 3 count_shape, 1 count_all, 18 exists.
  const Scene scene = RandomScene(rng);
  std::map<std::string, int> by_type;
  for (const QaExample& qa : AllQuestions(scene)) ++by_type[qa.type];
  EXPECT_EQ(by_type["count_shape"], 3);
  EXPECT_EQ(by_type["count_all"], 1);
  EXPECT_EQ(by_type["exists"], 18);
}

TEST(ShapesDatasetTest, QuestionTypesAndAnswersAreBalanced) {
  std::mt19937_64 rng(23);
  QuestionBalancer balancer;
  std::map<std::string, std::map<std::string, int>> answers;
  std::map<std::string, int> types;
  int total = 0;
  for (int i = 0; total < 2000; ++i) {
    const Scene scene = RandomScene(rng);
    for (const QaExample& qa : QuestionsFor(scene, rng, 3, &balancer)) {
      ++types[qa.type];
      ++answers[qa.type][qa.answer];
      ++total;
    }
  }
  for (const char* type : kQuestionTypes) {
    const double frac = static_cast<double>(types[type]) / total;
    EXPECT_GT(frac, 0.12) << type;
    EXPECT_LT(frac, 0.22) << type;
    const std::vector<std::string> allowed = AllowedAnswers(type);
    std::ostringstream dist;
    for (const std::string& a : allowed) dist << a << "=" << answers[type][a] << " ";
    std::cout << type << " (" << types[type] << "): " << dist.str() << "\n";
    for (const std::string& a : allowed) {
      const double share = static_cast<double>(answers[type][a]) / types[type];
      // No answer dominates and none is missing: within [0.4x, 1.8x] of an equal share.
      EXPECT_GT(share, 0.4 / allowed.size()) << type << " " << a;
      EXPECT_LT(share, 1.8 / allowed.size()) << type << " " << a;
    }
  }
  const double yes = static_cast<double>(answers["exists"]["yes"]) / types["exists"];
  EXPECT_NEAR(yes, 0.5, 0.05);
}

TEST(ShapesDatasetTest, GenerationIsDeterministic) {
  TempDir a("det_a"), b("det_b");
  DatasetOptions opts;
  opts.split = "train";
  opts.count = 301;  // not a multiple of questions_per_image: the last image gets fewer
  opts.seed = 5;
  opts.out_dir = a.path().string();
  opts.threads = 2;
  ASSERT_TRUE(GenerateDataset(opts, nullptr).ok());
  opts.out_dir = b.path().string();
  opts.threads = 1;
  ASSERT_TRUE(GenerateDataset(opts, nullptr).ok());
  const std::string ja = ReadAll(a.path() / "train.jsonl");
  ASSERT_FALSE(ja.empty());
  EXPECT_EQ(ja, ReadAll(b.path() / "train.jsonl"));
  EXPECT_EQ(std::count(ja.begin(), ja.end(), '\n'), 301);
  int files = 0;
  for (const auto& entry : fs::directory_iterator(a.path() / "images")) {
    const fs::path other = b.path() / "images" / entry.path().filename();
    ASSERT_TRUE(fs::exists(other)) << other;
    EXPECT_EQ(ReadAll(entry.path()), ReadAll(other)) << entry.path();
    ++files;
  }
  EXPECT_EQ(files, 101);
  EXPECT_FALSE(fs::exists(a.path() / "train.jsonl.tmp"));

  // A different seed gives different output.
  TempDir c("det_c");
  opts.out_dir = c.path().string();
  opts.seed = 6;
  ASSERT_TRUE(GenerateDataset(opts, nullptr).ok());
  EXPECT_NE(ja, ReadAll(c.path() / "train.jsonl"));
}

TEST(ShapesDatasetTest, SplitsAreDisjoint) {
  TempDir dir("splits");
  std::map<uint64_t, std::string> hashes;  // decoded pixel hash -> image
  for (const char* split : {"train", "val", "test"}) {
    DatasetOptions opts;
    opts.out_dir = dir.path().string();
    opts.split = split;
    opts.count = 900;
    opts.seed = 1;
    ASSERT_TRUE(GenerateDataset(opts, nullptr).ok()) << split;
    const auto lines = ReadJsonl(dir.path() / (std::string(split) + ".jsonl"));
    ASSERT_EQ(lines.size(), 900u);
    std::set<std::string> images;
    for (const auto& line : lines) images.insert(line["image"].get<std::string>());
    ASSERT_EQ(images.size(), 300u);
    for (const std::string& image : images) {
      const cv::Mat m = cv::imread((dir.path() / image).string(), cv::IMREAD_COLOR);
      ASSERT_FALSE(m.empty()) << image;
      const std::string pixels(reinterpret_cast<const char*>(m.data), m.total() * m.elemSize());
      const uint64_t h =
          std::hash<std::string>()(pixels) ^ (uint64_t(m.cols) << 48) ^ (uint64_t(m.rows) << 32);
      const auto [it, inserted] = hashes.emplace(h, image);
      EXPECT_TRUE(inserted) << image << " has the same pixels as " << it->second;
    }
  }
  EXPECT_EQ(hashes.size(), 900u);
  for (int64_t i = 0; i < 1000; ++i) {
    EXPECT_NE(ImageSeed(1, "train", i), ImageSeed(1, "val", i));
    EXPECT_NE(ImageSeed(1, "train", i), ImageSeed(1, "test", i));
  }
}

TEST(ShapesDatasetTest, OutputFormatAndVariety) {
  TempDir dir("format");
  DatasetOptions opts;
  opts.out_dir = (dir.path() / "nested" / "out").string();  // created on demand
  opts.split = "val";
  opts.count = 1200;
  opts.seed = 3;
  opts.questions_per_image = 4;
  std::ostringstream progress;
  ASSERT_TRUE(GenerateDataset(opts, &progress).ok());
  EXPECT_TRUE(std::regex_search(progress.str(), std::regex("dataset val: 1\\d{3}/1200 examples")))
      << progress.str();
  EXPECT_NE(progress.str().find("wrote 1200 examples, 300 images"), std::string::npos)
      << progress.str();
  const fs::path root = opts.out_dir;
  const auto lines = ReadJsonl(root / "val.jsonl");
  ASSERT_EQ(lines.size(), 1200u);
  const std::regex name_re("images/val_(\\d{6})\\.(png|jpg)");
  std::set<std::string> exts;
  std::set<std::pair<int, int>> dims;
  std::map<std::string, int> per_image;
  for (const auto& line : lines) {
    std::vector<std::string> keys;
    for (const auto& item : line.items()) keys.push_back(item.key());
    ASSERT_EQ(keys, (std::vector<std::string>{"image", "question", "answer", "type"}));
    const std::string image = line["image"];
    std::smatch m;
    ASSERT_TRUE(std::regex_match(image, m, name_re)) << image;
    exts.insert(m[2]);
    if (per_image[image]++ == 0) {
      const cv::Mat decoded = cv::imread((root / image).string(), cv::IMREAD_COLOR);
      ASSERT_FALSE(decoded.empty()) << image;
      dims.insert({decoded.cols, decoded.rows});
    }
    const std::vector<std::string> allowed = AllowedAnswers(line["type"]);
    EXPECT_NE(std::find(allowed.begin(), allowed.end(), line["answer"].get<std::string>()),
              allowed.end());
  }
  EXPECT_EQ(per_image.size(), 300u);
  for (const auto& [image, n] : per_image) EXPECT_EQ(n, 4) << image;
  EXPECT_EQ(exts, (std::set<std::string>{"png", "jpg"}));
  EXPECT_GT(dims.size(), 150u);
}

TEST(ShapesDatasetTest, RejectsBadOptions) {
  TempDir dir("bad");
  DatasetOptions opts;
  opts.out_dir = dir.path().string();
  opts.split = "dev";
  EXPECT_EQ(GenerateDataset(opts, nullptr).code(), StatusCode::kInvalidArgument);
  opts.split = "test";
  opts.count = 0;
  EXPECT_EQ(GenerateDataset(opts, nullptr).code(), StatusCode::kInvalidArgument);
  opts.count = 10;
  opts.questions_per_image = 0;
  EXPECT_EQ(GenerateDataset(opts, nullptr).code(), StatusCode::kInvalidArgument);
  opts.questions_per_image = 3;
  opts.out_dir = "";
  EXPECT_EQ(GenerateDataset(opts, nullptr).code(), StatusCode::kInvalidArgument);
  // An output "directory" that is a regular file.
  const fs::path file = dir.path() / "file";
  std::ofstream(file) << "x";
  opts.out_dir = file.string();
  EXPECT_EQ(GenerateDataset(opts, nullptr).code(), StatusCode::kInternal);
}

TEST(ShapesDatasetCommandDeathTest, RunsAndExits) {
  // "fast" (fork only): the child must see the parent's temp dir, whose name has the pid.
  GTEST_FLAG_SET(death_test_style, "fast");
  TempDir dir("cmd");
  auto run = [](std::vector<std::string> args) {
    CLI::App app{"vtw"};
    tools::RegisterDatasetCommand(app);
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    try {
      app.parse(static_cast<int>(argv.size()), argv.data());
    } catch (const CLI::ParseError& e) {
      std::exit(app.exit(e) == 0 ? 0 : 2);
    }
    std::exit(3);  // the callback must have exited already
  };
  const std::string out = dir.path().string();
  EXPECT_EXIT(run({"vtw", "dataset", "--out", out, "--split", "test", "--count", "20"}),
              ::testing::ExitedWithCode(0), "wrote 20 examples");
  EXPECT_EQ(ReadJsonl(dir.path() / "test.jsonl").size(), 20u);
  const std::string file = (dir.path() / "test.jsonl").string();
  EXPECT_EXIT(run({"vtw", "dataset", "--out", file, "--count", "5"}), ::testing::ExitedWithCode(1),
              "vtw dataset: INTERNAL");
  EXPECT_EXIT(run({"vtw", "dataset", "--out", out, "--split", "dev", "--count", "5"}),
              ::testing::ExitedWithCode(2), "");
}

}  // namespace
}  // namespace vtw
