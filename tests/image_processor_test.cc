// Tests for model/image_processor: bit-exact parity with HF's CLIPImageProcessor (oracle
// fixtures under tests/data/oracle), Pillow-exact bicubic resize, config parsing, and safe
// decoding of hostile image bytes. Single-threaded.
#include "model/image_processor.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "tests/util/npy.h"

namespace vtw {
namespace {

using nlohmann::json;
using vtw::testing::LoadNpy;
using vtw::testing::NpyArray;
using vtw::testing::TestDataPath;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string WriteTemp(const std::string& name, const std::string& content) {
  const std::string path = ::testing::TempDir() + "image_processor_test_" + name;
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

std::string OraclePath(const std::string& rel) { return TestDataPath("oracle/" + rel); }

std::vector<uint8_t> MatBytes(const cv::Mat& m) {
  cv::Mat c = m.isContinuous() ? m : m.clone();
  return std::vector<uint8_t>(c.data, c.data + c.total() * c.elemSize());
}

// Encodes an RGB image (converted to OpenCV's BGR order first).
std::string EncodeRgb(const cv::Mat& rgb, const std::string& ext, std::vector<int> params = {}) {
  cv::Mat bgr;
  if (rgb.channels() == 3) {
    cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
  } else {
    bgr = rgb;
  }
  std::vector<uint8_t> buf;
  EXPECT_TRUE(cv::imencode(ext, bgr, buf, params)) << ext;
  return std::string(buf.begin(), buf.end());
}

cv::Mat RandomImage(int h, int w, int type, uint32_t seed) {
  cv::Mat m(h, w, type);
  cv::RNG rng(seed);
  rng.fill(m, cv::RNG::UNIFORM, 0, 256);
  return m;
}

// A smooth test image (JPEG / lossy WebP friendly).
cv::Mat GradientImage(int h, int w) {
  cv::Mat m(h, w, CV_8UC3);
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      m.at<cv::Vec3b>(y, x) = cv::Vec3b(static_cast<uint8_t>(x * 255 / std::max(1, w - 1)),
                                        static_cast<uint8_t>(y * 255 / std::max(1, h - 1)), 90);
    }
  }
  return m;
}

uint32_t Crc32(const std::string& data) {
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char c : data) {
    crc ^= c;
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

std::string Be32(uint32_t v) {
  return std::string{static_cast<char>(v >> 24), static_cast<char>(v >> 16),
                     static_cast<char>(v >> 8), static_cast<char>(v)};
}

std::string PngChunk(const std::string& type, const std::string& data) {
  return Be32(static_cast<uint32_t>(data.size())) + type + data + Be32(Crc32(type + data));
}

// A syntactically valid PNG whose IHDR claims width x height (8-bit RGB) with a tiny IDAT.
std::string HandBuiltPng(uint32_t width, uint32_t height) {
  std::string ihdr = Be32(width) + Be32(height) + std::string("\x08\x02\x00\x00\x00", 5);
  // zlib stream of a few zero bytes (deflate, stored block is fine for the test).
  std::string idat("\x78\x01\x01\x04\x00\xfb\xff\x00\x00\x00\x00\x00\x04\x00\x01", 15);
  return std::string("\x89PNG\r\n\x1a\n", 8) + PngChunk("IHDR", ihdr) + PngChunk("IDAT", idat) +
         PngChunk("IEND", "");
}

// Offset of the first JPEG SOFn segment's marker byte (after 0xFF), or npos.
size_t FindJpegSof(const std::string& b) {
  size_t i = 2;
  while (i + 4 < b.size()) {
    if (static_cast<uint8_t>(b[i]) != 0xFF) return std::string::npos;
    const uint8_t m = static_cast<uint8_t>(b[i + 1]);
    if (m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC) return i + 1;
    const size_t len = (static_cast<uint8_t>(b[i + 2]) << 8) | static_cast<uint8_t>(b[i + 3]);
    i += 2 + len;
  }
  return std::string::npos;
}

void ExpectInvalid(const StatusOr<cv::Mat>& r, const std::string& substr) {
  ASSERT_FALSE(r.ok()) << "expected an error containing '" << substr << "'";
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status().ToString();
  EXPECT_NE(r.status().message().find(substr), std::string::npos) << r.status().ToString();
}

ImageProcessorConfig TinyConfig() {
  StatusOr<ImageProcessorConfig> c =
      LoadImageProcessorConfig(OraclePath("tiny-llava/preprocessor_config.json"));
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? *c : ImageProcessorConfig{};
}

// ------------------------------------------------------------------------------------------
// Config

TEST(ImageProcessorConfigTest, LoadsTinyLlavaConfig) {
  const ImageProcessorConfig c = TinyConfig();
  EXPECT_TRUE(c.do_resize);
  EXPECT_EQ(c.shortest_edge, 56);
  EXPECT_TRUE(c.do_center_crop);
  EXPECT_EQ(c.crop_height, 56);
  EXPECT_EQ(c.crop_width, 56);
  EXPECT_TRUE(c.do_rescale);
  EXPECT_EQ(c.rescale_factor, 0.00392156862745098);
  EXPECT_TRUE(c.do_normalize);
  EXPECT_TRUE(c.do_convert_rgb);
  EXPECT_EQ(c.resample, 3);
  EXPECT_EQ(c.image_mean[0], 0.48145466);
  EXPECT_EQ(c.image_mean[1], 0.4578275);
  EXPECT_EQ(c.image_mean[2], 0.40821073);
  EXPECT_EQ(c.image_std[0], 0.26862954);
  EXPECT_EQ(c.image_std[1], 0.26130258);
  EXPECT_EQ(c.image_std[2], 0.27577711);
}

TEST(ImageProcessorConfigTest, MissingFieldsTakeHfDefaults) {
  StatusOr<ImageProcessorConfig> c = LoadImageProcessorConfig(WriteTemp("empty.json", "{}"));
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->shortest_edge, 224);
  EXPECT_EQ(c->crop_height, 224);
  EXPECT_EQ(c->crop_width, 224);
  EXPECT_TRUE(c->do_resize && c->do_center_crop && c->do_rescale && c->do_normalize &&
              c->do_convert_rgb);
  EXPECT_EQ(c->rescale_factor, 1.0 / 255.0);
  EXPECT_EQ(c->resample, 3);
  EXPECT_EQ(c->image_mean[0], 0.48145466);
  EXPECT_EQ(c->image_std[2], 0.27577711);
}

TEST(ImageProcessorConfigTest, SizeAndCropVariants) {
  StatusOr<ImageProcessorConfig> c = LoadImageProcessorConfig(
      WriteTemp("variants.json",
                R"({"size": 336, "crop_size": 300, "image_mean": 0.5, "image_std": [0.1, 0.2, 0.3],
          "do_rescale": false, "crop_pct": null, "resample": 3, "rescale_factor": 0.5})"));
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->shortest_edge, 336);
  EXPECT_EQ(c->crop_height, 300);
  EXPECT_EQ(c->crop_width, 300);
  EXPECT_EQ(c->image_mean[2], 0.5);
  EXPECT_EQ(c->image_std[1], 0.2);
  EXPECT_FALSE(c->do_rescale);
  EXPECT_EQ(c->rescale_factor, 0.5);

  c = LoadImageProcessorConfig(
      WriteTemp("fixed.json", R"({"size": {"height": 40, "width": 30}, "crop_size": {"height": 20,
                        "width": 10}, "image_processor_type": "CLIPImageProcessor"})"));
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->shortest_edge, 0);
  EXPECT_EQ(c->resize_height, 40);
  EXPECT_EQ(c->resize_width, 30);
  EXPECT_EQ(c->crop_height, 20);
  EXPECT_EQ(c->crop_width, 10);
}

TEST(ImageProcessorConfigTest, ErrorsNameTheFileAndValue) {
  const std::string missing = ::testing::TempDir() + "no_such_dir/preprocessor_config.json";
  StatusOr<ImageProcessorConfig> c = LoadImageProcessorConfig(missing);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kNotFound);
  EXPECT_NE(c.status().message().find(missing), std::string::npos) << c.status().ToString();

  const std::string dir = ::testing::TempDir();
  c = LoadImageProcessorConfig(dir);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find(dir), std::string::npos) << c.status().ToString();

  struct Bad {
    const char* name;
    const char* json;
    const char* expect;  // substring of the message (besides the path)
  };
  const Bad bad[] = {
      {"badjson.json", R"({"size": )", "invalid JSON"},
      {"array.json", "[1, 2]", "not a JSON object"},
      {"bilinear.json", R"({"resample": 2})", "resample 2 (bilinear)"},
      {"lanczos.json", R"({"resample": 1})", "resample 1"},
      {"resample_str.json", R"({"resample": "bicubic"})", "resample"},
      {"siglip.json", R"({"image_processor_type": "SiglipImageProcessor"})",
       "SiglipImageProcessor"},
      {"longest.json", R"({"size": {"shortest_edge": 10, "longest_edge": 20}})", "longest_edge"},
      {"sizekeys.json", R"({"size": {"h": 10}})", "size"},
      {"crop0.json", R"({"crop_size": 0})", "out of range"},
      {"cropneg.json", R"({"crop_size": {"height": -3, "width": 4}})", "out of range"},
      {"huge.json", R"({"size": {"shortest_edge": 100000}})", "out of range"},
      {"std0.json", R"({"image_std": [0.2, 0, 0.2]})", "std"},
      {"mean2.json", R"({"image_mean": [0.2, 0.1]})", "image_mean"},
      {"boolstr.json", R"({"do_resize": "yes"})", "do_resize"},
      {"factor.json", R"({"rescale_factor": "1/255"})", "rescale_factor"},
  };
  for (const Bad& b : bad) {
    const std::string path = WriteTemp(b.name, b.json);
    c = LoadImageProcessorConfig(path);
    ASSERT_FALSE(c.ok()) << b.name;
    EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument) << c.status().ToString();
    EXPECT_NE(c.status().message().find(path), std::string::npos) << c.status().ToString();
    EXPECT_NE(c.status().message().find(b.expect), std::string::npos) << c.status().ToString();
  }
}

// ------------------------------------------------------------------------------------------
// Sizes

TEST(ImageProcessorSizeTest, ShortestEdgeMatchesHf) {
  EXPECT_EQ(ShortestEdgeResizeSize(60, 80, 56), (ImageSize{56, 74}));   // 80x60 -> 74x56
  EXPECT_EQ(ShortestEdgeResizeSize(91, 37, 56), (ImageSize{137, 56}));  // 37x91 -> 56x137
  EXPECT_EQ(ShortestEdgeResizeSize(56, 56, 56), (ImageSize{56, 56}));
  EXPECT_EQ(ShortestEdgeResizeSize(3, 3, 336), (ImageSize{336, 336}));
  EXPECT_EQ(ShortestEdgeResizeSize(480, 640, 336), (ImageSize{336, 448}));
  EXPECT_EQ(ShortestEdgeResizeSize(1, 40'000'000, 336), (ImageSize{336, 13'440'000'000}));

  ImageProcessorConfig c = TinyConfig();
  StatusOr<ImageSize> s = PreprocessedImageSize(c, 91, 37);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s, (ImageSize{56, 56}));
  c.do_center_crop = false;
  s = PreprocessedImageSize(c, 91, 37);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s, (ImageSize{137, 56}));
  s = PreprocessedImageSize(c, 1, 10'000'000);  // 560'000'000 x 56: over the output cap
  EXPECT_FALSE(s.ok());
  EXPECT_FALSE(PreprocessedImageSize(c, 0, 10).ok());
}

// ------------------------------------------------------------------------------------------
// Oracle parity (HF transformers 4.45.2 + Pillow)

json LoadCases() {
  std::ifstream in(OraclePath("fixtures/cases.json"));
  return json::parse(in);
}

TEST(ImageProcessorOracleTest, PixelValuesBitExactForAllCases) {
  const ImageProcessorConfig config = TinyConfig();
  const json cases = LoadCases();
  ASSERT_EQ(cases["cases"].size(), 8u);
  int checked = 0;
  for (const json& cs : cases["cases"]) {
    const std::string id = cs["id"];
    SCOPED_TRACE(id);
    const std::string bytes = ReadFile(OraclePath(cs["image"].get<std::string>()));
    StatusOr<cv::Mat> rgb = DecodeImage(bytes, ImageLimits{});
    ASSERT_TRUE(rgb.ok()) << rgb.status().ToString();
    EXPECT_EQ(rgb->cols, cs["image_size_wh"][0].get<int>());
    EXPECT_EQ(rgb->rows, cs["image_size_wh"][1].get<int>());

    StatusOr<std::vector<float>> px = ProcessImageBytes(bytes, config, ImageLimits{});
    ASSERT_TRUE(px.ok()) << px.status().ToString();
    const NpyArray want = LoadNpy(OraclePath(cs["pixel_values"]["file"].get<std::string>()));
    ASSERT_EQ(want.shape, (std::vector<int64_t>{1, 3, 56, 56}));
    const std::vector<float> expected = want.AsFloat();
    ASSERT_EQ(px->size(), expected.size());
    int mismatches = 0;
    for (size_t i = 0; i < expected.size(); ++i) mismatches += (*px)[i] != expected[i];
    EXPECT_EQ(mismatches, 0);
    EXPECT_EQ(std::memcmp(px->data(), expected.data(), expected.size() * sizeof(float)), 0);
    ++checked;
  }
  EXPECT_EQ(checked, 8);
}

TEST(ImageProcessorOracleTest, ResizedAndCroppedUint8BitExact) {
  const json cases = LoadCases();
  int checked = 0;
  for (const json& cs : cases["cases"]) {
    const json& pre = cs["preprocess"];
    if (!pre.contains("resized_uint8_hwc_file")) continue;
    const std::string id = cs["id"];
    SCOPED_TRACE(id);
    StatusOr<cv::Mat> rgb =
        DecodeImage(ReadFile(OraclePath(cs["image"].get<std::string>())), ImageLimits{});
    ASSERT_TRUE(rgb.ok()) << rgb.status().ToString();
    const int rh = pre["resized_hw"][0], rw = pre["resized_hw"][1];
    EXPECT_EQ(ShortestEdgeResizeSize(rgb->rows, rgb->cols, 56), (ImageSize{rh, rw}));

    const NpyArray want_resized =
        LoadNpy(OraclePath(pre["resized_uint8_hwc_file"].get<std::string>()));
    ASSERT_EQ(want_resized.shape, (std::vector<int64_t>{rh, rw, 3}));
    const cv::Mat resized = ResizeBicubicPil(*rgb, rw, rh);
    ASSERT_EQ(resized.rows, rh);
    ASSERT_EQ(resized.cols, rw);
    EXPECT_EQ(MatBytes(resized), want_resized.AsUint8());

    const int top = pre["crop_top_left"][0], left = pre["crop_top_left"][1];
    EXPECT_EQ(top, (rh - 56) / 2);
    EXPECT_EQ(left, (rw - 56) / 2);
    const NpyArray want_crop =
        LoadNpy(OraclePath(pre["cropped_uint8_hwc_file"].get<std::string>()));
    EXPECT_EQ(MatBytes(resized(cv::Rect(left, top, 56, 56))), want_crop.AsUint8());

    // Informational: how far OpenCV's own bicubic is from Pillow's on this image.
    cv::Mat cv_cubic;
    cv::resize(*rgb, cv_cubic, cv::Size(rw, rh), 0, 0, cv::INTER_CUBIC);
    cv::Mat diff;
    cv::absdiff(cv_cubic, resized, diff);
    double max_diff = 0;
    cv::minMaxLoc(diff.reshape(1), nullptr, &max_diff);
    std::cout << "[info] " << id << " " << rgb->cols << "x" << rgb->rows << " -> " << rw << "x"
              << rh << ": max |OpenCV INTER_CUBIC - Pillow BICUBIC| = " << max_diff
              << " grey levels, mean " << cv::mean(diff.reshape(1))[0]
              << " (ResizeBicubicPil: 0, bit-exact)\n";
    ++checked;
  }
  EXPECT_EQ(checked, 2);
}

// HF rescales in float64 and then casts: float32(double(u8) * (1/255)). Multiplying in float32
// instead rounds differently for about half of the byte values and breaks bit-exactness.
TEST(ImageProcessorOracleTest, RescaleMustBeDoneInFloat64) {
  const ImageProcessorConfig c = TinyConfig();
  StatusOr<cv::Mat> rgb =
      DecodeImage(ReadFile(OraclePath("images/random_noise.png")), ImageLimits{});
  ASSERT_TRUE(rgb.ok());
  ASSERT_EQ(rgb->rows, 56);
  ASSERT_EQ(rgb->cols, 56);
  const std::vector<float> want = LoadNpy(OraclePath("fixtures/npy/pixel_values/c5.npy")).AsFloat();
  int naive_mismatches = 0;
  for (int y = 0; y < 56; ++y) {
    for (int x = 0; x < 56; ++x) {
      for (int ch = 0; ch < 3; ++ch) {
        const float u = rgb->at<cv::Vec3b>(y, x)[ch];
        const float naive = u * static_cast<float>(c.rescale_factor);
        const float v =
            (naive - static_cast<float>(c.image_mean[ch])) / static_cast<float>(c.image_std[ch]);
        naive_mismatches += v != want[(ch * 56 + y) * 56 + x];
      }
    }
  }
  std::cout << "[info] float32 multiply instead of float64 rescale: " << naive_mismatches << " of "
            << 3 * 56 * 56 << " values of c5 differ from HF\n";
  EXPECT_GT(naive_mismatches, 0);
}

// Pillow 9.4 Image.resize(BICUBIC) of a synthetic 211x157 RGB image, summarised by FNV-1a 64
// of the output bytes and three samples. Covers strong antialiased shrinking (x7), mixed
// up/down, a skipped horizontal pass, 1x1 and extreme widening.
uint8_t SynthR(int x, int y) { return static_cast<uint8_t>(((x * 7 + y * 13) ^ (x * y)) & 255); }

TEST(ImageProcessorResizeTest, MatchesPillowOnSyntheticImage) {
  cv::Mat src(157, 211, CV_8UC3);
  for (int y = 0; y < src.rows; ++y) {
    for (int x = 0; x < src.cols; ++x) {
      src.at<cv::Vec3b>(y, x) = cv::Vec3b(SynthR(x, y), static_cast<uint8_t>((x * x + 3 * y) & 255),
                                          ((x / 9 + y / 5) % 2) ? 255 : 0);
    }
  }
  struct Ref {
    int w, h;
    uint64_t fnv;
    uint8_t first, mid, last;
  };
  const Ref refs[] = {
      {30, 22, 0x46a07331b0cb3737ull, 63, 135, 128},
      {500, 13, 0xffa53cbe8d9beaf9ull, 85, 124, 135},
      {211, 300, 0xfb097736d759bafeull, 0, 194, 0},
      {97, 157, 0xa310de5a64941d34ull, 4, 182, 0},
      {1, 1, 0x2d34371adf582fadull, 128, 127, 127},
      {3000, 5, 0x6e438d6647b85132ull, 116, 126, 129},
  };
  for (const Ref& r : refs) {
    SCOPED_TRACE(std::to_string(r.w) + "x" + std::to_string(r.h));
    const std::vector<uint8_t> b = MatBytes(ResizeBicubicPil(src, r.w, r.h));
    ASSERT_EQ(b.size(), static_cast<size_t>(r.w) * r.h * 3);
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint8_t c : b) h = (h ^ c) * 0x100000001b3ull;
    EXPECT_EQ(b[0], r.first);
    EXPECT_EQ(b[b.size() / 2], r.mid);
    EXPECT_EQ(b.back(), r.last);
    EXPECT_EQ(h, r.fnv);
  }
  // Same size: a copy.
  EXPECT_EQ(MatBytes(ResizeBicubicPil(src, 211, 157)), MatBytes(src));
  // Other channel counts resample each channel alike.
  cv::Mat gray;
  cv::extractChannel(src, gray, 0);
  cv::Mat gray_out = ResizeBicubicPil(gray, 30, 22), rgb_out = ResizeBicubicPil(src, 30, 22);
  cv::Mat r0;
  cv::extractChannel(rgb_out, r0, 0);
  EXPECT_EQ(MatBytes(gray_out), MatBytes(r0));
  // Preconditions.
  EXPECT_TRUE(ResizeBicubicPil(cv::Mat(), 3, 3).empty());
  EXPECT_TRUE(ResizeBicubicPil(src, 0, 3).empty());
  EXPECT_TRUE(ResizeBicubicPil(cv::Mat(4, 4, CV_32FC3), 3, 3).empty());
}

// HF's center_crop (image_transforms.center_crop) written literally, on HWC uint8.
cv::Mat HfCenterCrop(const cv::Mat& img, int crop_h, int crop_w) {
  auto floordiv = [](int a, int b) { return static_cast<int>(std::floor(double(a) / b)); };
  const int h = img.rows, w = img.cols;
  int top = floordiv(h - crop_h, 2), bottom = top + crop_h;
  int left = floordiv(w - crop_w, 2), right = left + crop_w;
  if (top >= 0 && bottom <= h && left >= 0 && right <= w) {
    return img(cv::Rect(left, top, crop_w, crop_h)).clone();
  }
  const int nh = std::max(crop_h, h), nw = std::max(crop_w, w);
  cv::Mat padded = cv::Mat::zeros(nh, nw, img.type());
  const int top_pad = static_cast<int>(std::ceil((nh - h) / 2.0));
  const int left_pad = static_cast<int>(std::ceil((nw - w) / 2.0));
  img.copyTo(padded(cv::Rect(left_pad, top_pad, w, h)));
  top += top_pad;
  bottom += top_pad;
  left += left_pad;
  right += left_pad;
  const int y0 = std::max(0, top), y1 = std::min(nh, bottom);
  const int x0 = std::max(0, left), x1 = std::min(nw, right);
  return padded(cv::Rect(x0, y0, x1 - x0, y1 - y0)).clone();
}

// Straightforward reference: full resize, HF crop, then rescale/normalize per pixel.
std::vector<float> ReferencePreprocess(const cv::Mat& rgb, const ImageProcessorConfig& c) {
  cv::Mat img = rgb;
  if (c.do_resize) {
    const ImageSize s = c.shortest_edge > 0
                            ? ShortestEdgeResizeSize(rgb.rows, rgb.cols, c.shortest_edge)
                            : ImageSize{c.resize_height, c.resize_width};
    img = ResizeBicubicPil(rgb, static_cast<int>(s.width), static_cast<int>(s.height));
  }
  if (c.do_center_crop) img = HfCenterCrop(img, c.crop_height, c.crop_width);
  std::vector<float> out(3 * img.total());
  for (int y = 0; y < img.rows; ++y) {
    for (int x = 0; x < img.cols; ++x) {
      for (int ch = 0; ch < 3; ++ch) {
        const uint8_t u = img.at<cv::Vec3b>(y, x)[ch];
        float v = c.do_rescale ? static_cast<float>(u * c.rescale_factor) : u;
        if (c.do_normalize) {
          v = (v - static_cast<float>(c.image_mean[ch])) / static_cast<float>(c.image_std[ch]);
        }
        out[(static_cast<size_t>(ch) * img.rows + y) * img.cols + x] = v;
      }
    }
  }
  return out;
}

TEST(ImageProcessorPreprocessTest, WindowedResizeAndPaddingMatchReference) {
  struct Case {
    int h, w;
    int shortest_edge, resize_h, resize_w;  // shortest_edge 0: fixed size
    int crop_h, crop_w;
    bool do_resize, do_crop, do_rescale, do_normalize;
  };
  const Case cases[] = {
      {60, 80, 56, 0, 0, 56, 56, true, true, true, true},    // oracle c6 geometry
      {91, 37, 56, 0, 0, 56, 56, true, true, true, true},    // oracle c7 geometry
      {300, 200, 20, 0, 0, 20, 20, true, true, true, true},  // strong shrink
      {5, 3, 56, 0, 0, 56, 56, true, true, true, true},      // strong enlarge
      {7, 500, 16, 0, 0, 16, 16, true, true, true, true},    // wide strip
      {40, 40, 32, 0, 0, 36, 33, true, true, true, true},    // crop larger: zero padding
      {56, 56, 56, 0, 0, 60, 59, false, true, true, true},   // no resize, padded crop
      {56, 56, 56, 0, 0, 21, 57, false, true, true, true},   // crop smaller in one axis only
      {50, 70, 0, 30, 45, 24, 24, true, true, true, true},   // fixed-size resize
      {50, 70, 0, 30, 45, 24, 24, true, false, true, true},  // no crop: resized size
      {33, 44, 28, 0, 0, 28, 28, true, true, false, true},   // no rescale
      {33, 44, 28, 0, 0, 28, 28, true, true, true, false},   // no normalize
  };
  uint32_t seed = 1;
  for (const Case& k : cases) {
    SCOPED_TRACE(std::to_string(k.w) + "x" + std::to_string(k.h) + " seed " + std::to_string(seed));
    ImageProcessorConfig c = TinyConfig();
    c.shortest_edge = k.shortest_edge;
    c.resize_height = k.resize_h;
    c.resize_width = k.resize_w;
    c.crop_height = k.crop_h;
    c.crop_width = k.crop_w;
    c.do_resize = k.do_resize;
    c.do_center_crop = k.do_crop;
    c.do_rescale = k.do_rescale;
    c.do_normalize = k.do_normalize;
    const cv::Mat img = RandomImage(k.h, k.w, CV_8UC3, seed++);
    StatusOr<std::vector<float>> got = PreprocessImage(img, c);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    const std::vector<float> want = ReferencePreprocess(img, c);
    ASSERT_EQ(got->size(), want.size());
    EXPECT_EQ(std::memcmp(got->data(), want.data(), want.size() * sizeof(float)), 0);
    StatusOr<ImageSize> s = PreprocessedImageSize(c, k.h, k.w);
    ASSERT_TRUE(s.ok());
    EXPECT_EQ(static_cast<size_t>(3 * s->height * s->width), got->size());
  }
}

TEST(ImageProcessorPreprocessTest, PaddingIsNormalizedZero) {
  ImageProcessorConfig c = TinyConfig();
  c.do_resize = false;
  c.crop_height = 60;
  c.crop_width = 59;
  cv::Mat img(56, 56, CV_8UC3, cv::Scalar(255, 255, 255));
  StatusOr<std::vector<float>> px = PreprocessImage(img, c);
  ASSERT_TRUE(px.ok());
  auto at = [&](int ch, int y, int x) { return (*px)[(ch * 60 + y) * 59 + x]; };
  const float pad0 =
      (0.0f - static_cast<float>(c.image_mean[0])) / static_cast<float>(c.image_std[0]);
  // Image at rows [2, 58) (ceil(4/2)), cols [2, 58) (ceil(3/2)).
  EXPECT_EQ(at(0, 0, 0), pad0);
  EXPECT_EQ(at(0, 1, 30), pad0);
  EXPECT_NE(at(0, 2, 2), pad0);
  EXPECT_NE(at(0, 57, 57), pad0);
  EXPECT_EQ(at(0, 58, 30), pad0);
  EXPECT_EQ(at(0, 30, 1), pad0);
  EXPECT_EQ(at(0, 30, 58), pad0);
}

TEST(ImageProcessorPreprocessTest, ExtremeAspectRatios) {
  ImageProcessorConfig c = TinyConfig();
  // 1 x 400000: the virtual resize is 56 x 22.4M; only the cropped window is computed.
  const cv::Mat tall = RandomImage(400000, 1, CV_8UC3, 7);
  StatusOr<std::vector<float>> px = PreprocessImage(tall, c);
  ASSERT_TRUE(px.ok()) << px.status().ToString();
  EXPECT_EQ(px->size(), 3u * 56 * 56);
  const cv::Mat wide = RandomImage(1, 400000, CV_8UC3, 8);
  px = PreprocessImage(wide, c);
  ASSERT_TRUE(px.ok()) << px.status().ToString();
  // A fixed-size resize of such a strip would need a huge intermediate: clean error.
  c.shortest_edge = 0;
  c.resize_height = 224;
  c.resize_width = 224;
  c.crop_height = 224;
  c.crop_width = 224;
  px = PreprocessImage(tall, c);
  ASSERT_FALSE(px.ok());
  EXPECT_EQ(px.status().code(), StatusCode::kInvalidArgument);
}

TEST(ImageProcessorPreprocessTest, RejectsBadInput) {
  const ImageProcessorConfig c = TinyConfig();
  EXPECT_FALSE(PreprocessImage(cv::Mat(), c).ok());
  EXPECT_FALSE(PreprocessImage(cv::Mat(10, 10, CV_8UC1, cv::Scalar(0)), c).ok());
  EXPECT_FALSE(PreprocessImage(cv::Mat(10, 10, CV_8UC4, cv::Scalar(0)), c).ok());
  EXPECT_FALSE(PreprocessImage(cv::Mat(10, 10, CV_16UC3, cv::Scalar(0)), c).ok());
  ImageProcessorConfig bilinear = c;
  bilinear.resample = 2;
  StatusOr<std::vector<float>> r =
      PreprocessImage(cv::Mat(10, 10, CV_8UC3, cv::Scalar(0)), bilinear);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("resample 2"), std::string::npos);
}

// ------------------------------------------------------------------------------------------
// Decoding: hostile input

TEST(ImageDecodeTest, RejectsEmptyRandomAndUnsupported) {
  ExpectInvalid(DecodeImage("", ImageLimits{}), "empty");
  std::mt19937 rng(42);
  for (int i = 0; i < 50; ++i) {
    std::string junk(1 + rng() % 2000, '\0');
    for (char& ch : junk) ch = static_cast<char>(rng());
    if (junk[0] == 'B' || static_cast<uint8_t>(junk[0]) == 0x89 ||
        static_cast<uint8_t>(junk[0]) == 0xFF || junk[0] == 'R') {
      junk[0] = 'x';
    }
    ExpectInvalid(DecodeImage(junk, ImageLimits{}), "unsupported image format");
  }
  ExpectInvalid(DecodeImage(std::string("GIF89a\x01\x00\x01\x00\x00\x00", 12), ImageLimits{}),
                "unsupported image format (expected PNG, JPEG, WebP or BMP)");
  ExpectInvalid(DecodeImage(std::string("II*\0\x08\0\0\0", 8), ImageLimits{}),
                "unsupported image format");
  ExpectInvalid(DecodeImage(std::string("RIFF\x10\0\0\0WAVEfmt ", 16), ImageLimits{}),
                "unsupported image format");
}

TEST(ImageDecodeTest, RejectsCorruptAndTruncated) {
  const std::string png = ReadFile(OraclePath("images/random_noise.png"));
  ASSERT_GT(png.size(), 1000u);
  ExpectInvalid(DecodeImage(png.substr(0, png.size() / 2), ImageLimits{}),
                "could not decode image");
  ExpectInvalid(DecodeImage(png.substr(0, 16), ImageLimits{}), "truncated PNG header");
  ExpectInvalid(DecodeImage(png.substr(0, 8), ImageLimits{}), "truncated PNG header");
  // Valid header, garbage body.
  std::string garbage = png.substr(0, 33);
  std::mt19937 rng(7);
  for (int i = 0; i < 3000; ++i) garbage += static_cast<char>(rng());
  ExpectInvalid(DecodeImage(garbage, ImageLimits{}), "could not decode image");
  // IHDR that is not first.
  std::string not_ihdr = png;
  not_ihdr.replace(12, 4, "IDAT");
  ExpectInvalid(DecodeImage(not_ihdr, ImageLimits{}), "first chunk is not IHDR");

  const std::string jpeg = EncodeRgb(GradientImage(32, 48), ".jpg");
  ExpectInvalid(DecodeImage(jpeg.substr(0, 3), ImageLimits{}), "truncated JPEG header");
  const size_t sof = FindJpegSof(jpeg);
  ASSERT_NE(sof, std::string::npos);
  ExpectInvalid(DecodeImage(jpeg.substr(0, sof + 4), ImageLimits{}), "truncated JPEG header");
  ExpectInvalid(DecodeImage(std::string("\xFF\xD8\xFF\xDA\x00\x02", 6), ImageLimits{}),
                "scan data before the frame header");
  ExpectInvalid(DecodeImage(std::string("\xFF\xD8\xFF\xD9", 4), ImageLimits{}),
                "EOI before the frame header");

  const std::string webp = EncodeRgb(GradientImage(32, 48), ".webp");
  ExpectInvalid(DecodeImage(webp.substr(0, 22), ImageLimits{}), "truncated WebP header");
  std::string webp_garbage = webp.substr(0, 30) + std::string(500, '\x5a');
  ExpectInvalid(DecodeImage(webp_garbage, ImageLimits{}), "could not decode image");

  const std::string bmp = EncodeRgb(GradientImage(32, 48), ".bmp");
  ExpectInvalid(DecodeImage(bmp.substr(0, 20), ImageLimits{}), "truncated BMP header");
  ExpectInvalid(DecodeImage(bmp.substr(0, 100), ImageLimits{}), "could not decode image");
}

TEST(ImageDecodeTest, RejectsDecompressionBombBeforeDecoding) {
  const std::string bomb = HandBuiltPng(30000, 30000);
  ASSERT_LT(bomb.size(), 100u);
  const auto start = std::chrono::steady_clock::now();
  StatusOr<cv::Mat> r = DecodeImage(bomb, ImageLimits{});
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  ExpectInvalid(r, "30000x30000 = 900000000 pixels, more than the limit of 40000000 pixels");
  EXPECT_LT(ms, 50.0) << "the bomb must be rejected from its header, not decoded";

  // The same trick in every other container.
  const cv::Mat small = GradientImage(16, 16);
  std::string jpeg = EncodeRgb(small, ".jpg");
  const size_t sof = FindJpegSof(jpeg);
  ASSERT_NE(sof, std::string::npos);
  jpeg[sof + 4] = jpeg[sof + 5] = jpeg[sof + 6] = jpeg[sof + 7] = '\xEA';  // 60138 x 60138
  ExpectInvalid(DecodeImage(jpeg, ImageLimits{}), "JPEG image is 60138x60138");

  std::string webp_lossless = EncodeRgb(small, ".webp", {cv::IMWRITE_WEBP_QUALITY, 101});
  ASSERT_EQ(webp_lossless.substr(12, 4), "VP8L");
  const uint32_t bits = 16383u | (16383u << 14);  // 16384 x 16384
  webp_lossless[21] = static_cast<char>(bits);
  webp_lossless[22] = static_cast<char>(bits >> 8);
  webp_lossless[23] = static_cast<char>(bits >> 16);
  webp_lossless[24] = static_cast<char>((webp_lossless[24] & 0xF0) | ((bits >> 24) & 0x0F));
  ExpectInvalid(DecodeImage(webp_lossless, ImageLimits{}), "WebP image is 16384x16384");

  std::string webp_lossy = EncodeRgb(small, ".webp", {cv::IMWRITE_WEBP_QUALITY, 80});
  ASSERT_EQ(webp_lossy.substr(12, 4), "VP8 ");
  webp_lossy[26] = webp_lossy[28] = '\xFF';
  webp_lossy[27] = webp_lossy[29] = '\x3F';  // 16383 x 16383
  ExpectInvalid(DecodeImage(webp_lossy, ImageLimits{}), "WebP image is 16383x16383");

  std::string bmp = EncodeRgb(small, ".bmp");
  bmp[18] = bmp[22] = '\x00';
  bmp[19] = bmp[23] = '\x00';
  bmp[20] = bmp[24] = '\x01';  // 65536 x 65536
  bmp[21] = bmp[25] = '\x00';
  ExpectInvalid(DecodeImage(bmp, ImageLimits{}), "BMP image is 65536x65536");
  bmp[22] = bmp[23] = bmp[25] = '\xFF';
  bmp[24] = '\xFE';  // height -65537 (top-down): the magnitude counts
  ExpectInvalid(DecodeImage(bmp, ImageLimits{}), "BMP image is 65536x65537");

  // The cap is the caller's: a tighter one rejects ordinary images, exactly at the boundary.
  ImageLimits tight;
  tight.max_pixels = 100;
  EXPECT_TRUE(DecodeImage(EncodeRgb(GradientImage(10, 10), ".png"), tight).ok());
  ExpectInvalid(DecodeImage(EncodeRgb(GradientImage(10, 11), ".png"), tight),
                "11x10 = 110 pixels, more than the limit of 100 pixels");
  ImageLimits few_bytes;
  few_bytes.max_bytes = 64;
  ExpectInvalid(DecodeImage(EncodeRgb(GradientImage(10, 10), ".bmp"), few_bytes),
                "more than the limit of 64 bytes");
}

TEST(ImageDecodeTest, RejectsZeroSizeHeaders) {
  ExpectInvalid(DecodeImage(HandBuiltPng(0, 10), ImageLimits{}), "zero-size image (0x10)");
  ExpectInvalid(DecodeImage(HandBuiltPng(10, 0), ImageLimits{}), "zero-size");
  std::string jpeg = EncodeRgb(GradientImage(16, 16), ".jpg");
  const size_t sof = FindJpegSof(jpeg);
  ASSERT_NE(sof, std::string::npos);
  jpeg[sof + 4] = jpeg[sof + 5] = '\0';  // height 0 (DNL)
  ExpectInvalid(DecodeImage(jpeg, ImageLimits{}), "zero-size image (16x0)");
  std::string bmp = EncodeRgb(GradientImage(16, 16), ".bmp");
  bmp[22] = bmp[23] = bmp[24] = bmp[25] = '\0';
  ExpectInvalid(DecodeImage(bmp, ImageLimits{}), "zero-size");
  // VP8X with the animation flag.
  std::string vp8x = std::string("RIFF") + std::string("\x1e\0\0\0", 4) + "WEBPVP8X" +
                     std::string("\x0a\0\0\0\x02\0\0\0\x0f\0\0\x0f\0\0", 14);
  ExpectInvalid(DecodeImage(vp8x, ImageLimits{}), "animated WebP");
}

// Builds an APP1 Exif segment carrying only an Orientation tag.
std::string ExifOrientationSegment(uint16_t orientation) {
  std::string tiff("II*\0\x08\0\0\0", 8);                        // little-endian TIFF, IFD at 8
  tiff += std::string("\x01\x00", 2);                            // 1 entry
  tiff += std::string("\x12\x01\x03\x00\x01\x00\x00\x00", 8);    // 0x0112 SHORT count 1
  tiff += std::string{static_cast<char>(orientation), 0, 0, 0};  // value
  tiff += std::string(4, '\0');                                  // no next IFD
  const std::string payload = std::string("Exif\0\0", 6) + tiff;
  const size_t len = payload.size() + 2;
  return std::string("\xFF\xE1", 2) + static_cast<char>(len >> 8) + static_cast<char>(len) +
         payload;
}

// Random byte flips of valid files of every format: errors are fine, crashes are not.
TEST(ImageDecodeTest, SurvivesMutatedFiles) {
  const cv::Mat img = GradientImage(24, 40);
  const std::string seeds[] = {
      EncodeRgb(img, ".png"),
      EncodeRgb(img, ".jpg"),
      EncodeRgb(img, ".webp"),
      EncodeRgb(img, ".webp", {cv::IMWRITE_WEBP_QUALITY, 101}),
      EncodeRgb(img, ".bmp"),
      EncodeRgb(img, ".jpg", {cv::IMWRITE_JPEG_PROGRESSIVE, 1}),
      "\xFF\xD8" + ExifOrientationSegment(6) + EncodeRgb(img, ".jpg").substr(2)};
  std::mt19937 rng(1234);
  int decoded = 0, rejected = 0;
  for (const std::string& seed : seeds) {
    for (int iter = 0; iter < 150; ++iter) {
      std::string m = seed;
      const int flips = 1 + static_cast<int>(rng() % 8);
      for (int f = 0; f < flips; ++f) m[rng() % m.size()] = static_cast<char>(rng());
      if (rng() % 4 == 0) m.resize(rng() % m.size() + 1);
      StatusOr<cv::Mat> r = DecodeImage(m, ImageLimits{});
      if (r.ok()) {
        ++decoded;
        EXPECT_EQ(r->type(), CV_8UC3);
        EXPECT_LE(static_cast<int64_t>(r->total()), ImageLimits{}.max_pixels);
      } else {
        ++rejected;
        EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status().ToString();
      }
    }
  }
  std::cout << "[info] mutated files: " << decoded << " decoded, " << rejected << " rejected\n";
}

// ------------------------------------------------------------------------------------------
// Decoding: formats and colour handling

TEST(ImageDecodeTest, RoundTripsAllFormats) {
  const cv::Mat rgb = GradientImage(30, 50);
  struct Fmt {
    const char* ext;
    std::vector<int> params;
    double max_mean_abs;  // 0: lossless
  };
  const Fmt fmts[] = {{".png", {}, 0},
                      {".bmp", {}, 0},
                      {".webp", {cv::IMWRITE_WEBP_QUALITY, 101}, 0},
                      {".webp", {cv::IMWRITE_WEBP_QUALITY, 90}, 4},
                      {".jpg", {cv::IMWRITE_JPEG_QUALITY, 95}, 3},
                      {".jpg", {cv::IMWRITE_JPEG_QUALITY, 90, cv::IMWRITE_JPEG_PROGRESSIVE, 1}, 4}};
  for (const Fmt& f : fmts) {
    SCOPED_TRACE(f.ext);
    StatusOr<cv::Mat> r = DecodeImage(EncodeRgb(rgb, f.ext, f.params), ImageLimits{});
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(r->type(), CV_8UC3);
    ASSERT_EQ(r->rows, 30);
    ASSERT_EQ(r->cols, 50);
    cv::Mat diff;
    cv::absdiff(*r, rgb, diff);
    const cv::Scalar mean = cv::mean(diff);
    for (int c = 0; c < 3; ++c) EXPECT_LE(mean[c], f.max_mean_abs) << "channel " << c;
    // RGB order: channel 0 grows to the right, channel 1 downwards.
    EXPECT_LT((*r).at<cv::Vec3b>(15, 2)[0], 40);
    EXPECT_GT((*r).at<cv::Vec3b>(15, 47)[0], 215);
    EXPECT_GT((*r).at<cv::Vec3b>(28, 25)[1], 215);
  }
}

TEST(ImageDecodeTest, GrayscaleIsReplicatedAndAlphaDropped) {
  const cv::Mat gray = RandomImage(13, 17, CV_8UC1, 3);
  for (const std::string ext : {".png", ".bmp", ".webp", ".jpg"}) {
    SCOPED_TRACE(ext);
    std::vector<int> params;
    if (ext == ".webp") params = {cv::IMWRITE_WEBP_QUALITY, 101};
    StatusOr<cv::Mat> r = DecodeImage(EncodeRgb(gray, ext, params), ImageLimits{});
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(r->type(), CV_8UC3);
    std::vector<cv::Mat> ch;
    cv::split(*r, ch);
    if (ext != ".jpg") {  // lossless formats
      EXPECT_EQ(MatBytes(ch[0]), MatBytes(gray));
    }
    EXPECT_EQ(MatBytes(ch[1]), MatBytes(ch[0]));
    EXPECT_EQ(MatBytes(ch[2]), MatBytes(ch[0]));
  }

  // RGBA PNG with alpha 0..255: colour channels survive untouched (no compositing on white or
  // black), as PIL's convert("RGB") does.
  cv::Mat bgra = RandomImage(9, 11, CV_8UC4, 4);
  bgra.at<cv::Vec4b>(0, 0) = cv::Vec4b(10, 20, 30, 0);  // fully transparent
  std::vector<uint8_t> buf;
  ASSERT_TRUE(cv::imencode(".png", bgra, buf));
  StatusOr<cv::Mat> r = DecodeImage(std::string(buf.begin(), buf.end()), ImageLimits{});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  cv::Mat want;
  cv::cvtColor(bgra, want, cv::COLOR_BGRA2RGB);
  EXPECT_EQ(MatBytes(*r), MatBytes(want));
  EXPECT_EQ(r->at<cv::Vec3b>(0, 0), cv::Vec3b(30, 20, 10));

  // 16-bit RGB PNG: reduced to the high byte (as PIL does for 16-bit RGB PNGs).
  cv::Mat bgr16(5, 6, CV_16UC3);
  cv::RNG rng(5);
  rng.fill(bgr16, cv::RNG::UNIFORM, 0, 65536);
  buf.clear();
  ASSERT_TRUE(cv::imencode(".png", bgr16, buf));
  r = DecodeImage(std::string(buf.begin(), buf.end()), ImageLimits{});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->type(), CV_8UC3);
  for (int y = 0; y < 5; ++y) {
    for (int x = 0; x < 6; ++x) {
      for (int c = 0; c < 3; ++c) {
        EXPECT_EQ(r->at<cv::Vec3b>(y, x)[c], bgr16.at<cv::Vec3w>(y, x)[2 - c] >> 8);
      }
    }
  }
}

TEST(ImageDecodeTest, JpegExifOrientationIsApplied) {
  // 40 wide x 20 tall: left half red, right half blue.
  cv::Mat rgb(20, 40, CV_8UC3, cv::Scalar(255, 0, 0));
  rgb(cv::Rect(20, 0, 20, 20)).setTo(cv::Scalar(0, 0, 255));
  const std::string jpeg = EncodeRgb(rgb, ".jpg", {cv::IMWRITE_JPEG_QUALITY, 95});
  const std::string rotated = jpeg.substr(0, 2) + ExifOrientationSegment(6) + jpeg.substr(2);
  StatusOr<cv::Mat> plain = DecodeImage(jpeg, ImageLimits{});
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->cols, 40);
  StatusOr<cv::Mat> r = DecodeImage(rotated, ImageLimits{});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  // Orientation 6 = rotate 90 degrees clockwise to display: 20 wide x 40 tall, red on top.
  ASSERT_EQ(r->cols, 20);
  ASSERT_EQ(r->rows, 40);
  EXPECT_GT(r->at<cv::Vec3b>(5, 10)[0], 200);
  EXPECT_LT(r->at<cv::Vec3b>(5, 10)[2], 60);
  EXPECT_GT(r->at<cv::Vec3b>(35, 10)[2], 200);
  EXPECT_LT(r->at<cv::Vec3b>(35, 10)[0], 60);
}

}  // namespace
}  // namespace vtw
