// Synthetic "shapes" visual question answering dataset: the task the project's own small LLaVA
// model is trained and evaluated on. Owns scene sampling (1-4 non-overlapping circles, squares
// and triangles in six colours on light plain or mildly noisy backgrounds, with varied shade,
// size, position, edge anti-aliasing, image size / aspect ratio and PNG/JPEG encoding), rendering,
// question generation from fixed templates with one-word answers, and writing a split to disk
// as images plus a JSON-lines index.
//
// Every shape lies inside the centred SxS square of a WxH image (S = min(W, H)): the model's
// preprocessor resizes the shortest edge and centre-crops, so nothing an answer depends on is
// ever cropped away.
//
// Determinism: all randomness comes from std::mt19937_64 (whose output sequence is fixed by the
// standard) through the arithmetic helpers in the .cc file, never std::*_distribution, so the
// same (split, seed, count, questions_per_image) gives byte-identical output with a given
// OpenCV build. Image i of a split depends only on (seed, split, i).
//
// Thread-safety: free functions are thread-safe as long as callers do not share an rng or a
// QuestionBalancer between threads; QuestionBalancer is thread-compatible.
#pragma once

#include <array>
#include <cstdint>
#include <opencv2/core.hpp>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "model/status.h"

namespace vtw {

enum class ShapeKind { kCircle = 0, kSquare = 1, kTriangle = 2 };
enum class ShapeColor { kRed = 0, kGreen = 1, kBlue = 2, kYellow = 3, kPurple = 4, kOrange = 5 };

inline constexpr int kNumShapeKinds = 3;
inline constexpr int kNumShapeColors = 6;

// Lowercase English names as used in questions and answers: "circle", "red", ...
const char* ShapeKindName(ShapeKind kind);
const char* ShapeColorName(ShapeColor color);
// Base (un-jittered) RGB of a colour.
std::array<uint8_t, 3> BaseRgb(ShapeColor color);
// The base colour nearest (Euclidean RGB) to `rgb`.
ShapeColor NearestBaseColor(const std::array<uint8_t, 3>& rgb);
// Relative per-channel shade jitter: a shape's channel c is round(base_c * f), f in
// [1 - kShadeJitter, 1 + kShadeJitter], clamped to [0, 255].
inline constexpr double kShadeJitter = 0.15;
// Minimum distance of a "side" question's shape centre from the crop's vertical centre line,
// as a fraction of the crop side.
inline constexpr double kSideMinOffset = 0.15;

// One filled shape. Coordinates are in pixels of the full image, sub-pixel.
struct Shape {
  ShapeKind kind = ShapeKind::kCircle;
  ShapeColor color = ShapeColor::kRed;
  float cx = 0;                  // centre x (circle/square centre, triangle centroid)
  float cy = 0;                  // centre y
  float size = 0;                // circle diameter, square side, triangle base width
  std::array<uint8_t, 3> rgb{};  // actual fill colour (shade-jittered base colour), RGB
  float angle_deg = 0;           // rotation (square, triangle) about (cx, cy)
  float aspect = 1;              // triangle height / base width
  float skew = 0;                // triangle apex x offset, fraction of the base width
};

// Vertices (image pixels) of a square or triangle; empty for a circle.
std::vector<cv::Point2f> ShapeVertices(const Shape& shape);
// Radius of the smallest circle around (cx, cy) that contains the shape.
float ShapeRadius(const Shape& shape);

// A concrete scene: everything RenderScene and EncodeScene need; no randomness is left.
struct Scene {
  int width = 0;
  int height = 0;
  std::array<uint8_t, 3> background{};  // RGB
  float noise_sigma = 0;                // 0: plain background; else Gaussian noise stddev
  uint64_t noise_seed = 0;
  bool antialiased = true;  // cv::LINE_AA edges, else cv::LINE_8
  int jpeg_quality = 0;     // 0: PNG, else JPEG at this quality (1..100)
  std::vector<Shape> shapes;
  // Style variation (SceneSpec::varied_style; all off in the default dataset):
  enum class Background { kFlat, kGradient, kTwoTone };
  Background background_style = Background::kFlat;
  std::array<uint8_t, 3> background2{};  // RGB: the gradient's other end / the second tone
  float background_angle = 0;            // radians: the gradient's direction
  enum class Outline { kNone, kDarker, kDark };
  Outline outline = Outline::kNone;      // a rim around every shape: 0.6x its fill, or near-black
  float outline_width = 0;               // pixels (<= 2 * the render fringe, so shapes stay clear)

  int CropSide() const { return width < height ? width : height; }
  float CropX0() const { return (width - CropSide()) * 0.5f; }
  float CropY0() const { return (height - CropSide()) * 0.5f; }
  // x of the crop's vertical centre line (equals the image's).
  float CropCenterX() const { return width * 0.5f; }
};

// Knobs of RandomScene. Defaults are the dataset's.
struct SceneSpec {
  int min_side = 48;  // image width and height range, pixels
  int max_side = 160;
  double max_aspect = 1.6;  // long side / short side upper bound
  double square_image_prob = 0.4;
  int min_shapes = 1;
  int max_shapes = 4;
  double min_size_frac = 0.16;  // shape `size` range as a fraction of the crop side
  double max_size_frac = 0.32;
  double margin_frac = 0.04;        // min distance to the crop border, fraction of crop side
  double gap_frac = 0.03;           // min gap between shapes' bounding circles
  double same_kind_prob = 0.25;     // chance every shape has the scene's dominant kind
  double repeat_kind_prob = 0.5;    // else, chance a shape copies the dominant kind
  double repeat_color_prob = 0.25;  // chance a shape reuses a colour already in the scene
  double noise_prob = 0.4;
  double max_noise_sigma = 8;
  double antialias_prob = 0.5;
  double jpeg_prob = 0.35;
  int min_jpeg_quality = 40;
  int max_jpeg_quality = 95;
  // Renderer variation for robustness to images drawn by other programs (`--scene-style
  // varied`): gradient or two-tone light backgrounds, outlines (a darker shade or near-black,
  // 1-3 px), wider rotations. Off by default, and the default stream of random draws is
  // unchanged by this field, so existing splits stay byte-identical.
  bool varied_style = false;
};

// Samples a scene. Always succeeds: shapes are placed by rejection sampling and shrunk if
// they do not fit. Invariants (tested): every shape's bounding circle lies inside the centred
// crop square with the spec's margin and bounding circles are separated by the spec's gap.
Scene RandomScene(std::mt19937_64& rng, const SceneSpec& spec = {});

// Draws `scene` as an 8-bit, 3-channel image in OpenCV's BGR order (ready for cv::imwrite /
// cv::imencode), size height x width.
cv::Mat RenderScene(const Scene& scene);

// Encodes `image` (BGR) as the scene asks: PNG when jpeg_quality == 0, else JPEG.
// Returns the encoded bytes, or Internal if OpenCV fails.
StatusOr<std::vector<uint8_t>> EncodeScene(const Scene& scene, const cv::Mat& image);
// ".png" or ".jpg".
const char* SceneFileExtension(const Scene& scene);

// One question about one image. `image` is a path relative to the dataset's jsonl directory
// (empty when produced by QuestionsFor). `type` is one of kQuestionTypes.
struct QaExample {
  std::string image;
  std::string question;
  std::string answer;
  std::string type;
};

// "color", "shape", "count_shape", "count_all", "exists", "side".
extern const std::array<const char*, 6> kQuestionTypes;
// The allowed answers of a type; empty for an unknown type.
std::vector<std::string> AllowedAnswers(const std::string& type);

// Every valid question about `scene` (image left empty), in a fixed order. The templates:
//   color:       "What color is the {shape}?"            (exactly one {shape} present)
//   shape:       "What shape is the {color} object?"     (exactly one {color} object)
//   count_shape: "How many {shape}s are there?"          -> "0".."4"
//   count_all:   "How many shapes are there?"            -> "1".."4"
//   exists:      "Is there a {color} {shape}?"           -> "yes"/"no" (all 18 combinations)
//   side:        "Which side is the {color} {shape} on?" -> "left"/"right" (combination unique
//                and its centre >= kSideMinOffset * crop side from the centre line)
std::vector<QaExample> AllQuestions(const Scene& scene);

// Keeps running counts of emitted (type, answer) pairs so that question selection across many
// images balances question types and answers within a type.
class QuestionBalancer {
 public:
  QuestionBalancer();
  // Records one emitted example.
  void Add(const QaExample& example);
  int64_t total() const { return total_; }
  int64_t TypeCount(int type_index) const { return type_counts_[type_index]; }
  int64_t AnswerCount(int type_index, int answer_index) const;
  // Preference score of emitting (type, answer) next: higher when the type and the answer are
  // behind their equal shares.
  double Score(int type_index, int answer_index) const;

 private:
  int64_t total_ = 0;
  std::array<int64_t, 6> type_counts_{};
  std::array<std::vector<int64_t>, 6> answer_counts_;
};

// Picks up to `n` distinct questions about `scene` (fewer only if the scene has fewer valid
// questions, which never happens for n <= 22). Types and answers are chosen to keep `balancer`
// balanced (a fresh local one when null), which is updated. For "exists" with answer "no",
// hard negatives (colour or shape present in the image) are preferred.
std::vector<QaExample> QuestionsFor(const Scene& scene, std::mt19937_64& rng, int n,
                                    QuestionBalancer* balancer = nullptr);

// Seed of the scene stream of image `index` of `split` under dataset seed `seed`; different
// splits give unrelated streams.
uint64_t ImageSeed(uint64_t seed, const std::string& split, int64_t index);

struct DatasetOptions {
  std::string out_dir;
  std::string split = "train";  // "train" | "val" | "test"
  int64_t count = 1000;         // number of QA examples
  uint64_t seed = 1;
  int questions_per_image = 3;  // 1..16; the last image may get fewer
  int threads = 0;              // render/encode threads; 0: hardware concurrency
  SceneSpec scene;
};

// Writes OUT/images/{split}_{index:06d}.{png|jpg} and OUT/{split}.jsonl (one
// {"image","question","answer","type"} object per line, image relative to OUT), creating
// directories as needed and replacing an existing jsonl. Output is byte-identical for equal
// options, whatever `threads`. Writes a progress line to `progress` (may be null) about every
// 1000 examples and a summary at the end. Errors: InvalidArgument for bad options, Internal for
// I/O or encoding failures.
Status GenerateDataset(const DatasetOptions& opts, std::ostream* progress);

}  // namespace vtw
