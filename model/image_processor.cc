// Image preprocessing bit-exact with HF's CLIPImageProcessor; see image_processor.h.
// Thread-safety: all functions are reentrant (no shared mutable state).
//
// Floating-point note: the resize weights and the normalisation must be computed with plain
// IEEE double/float operations, one rounding per operation, as Pillow and NumPy do on x86-64.
// Do not build this file with FP contraction into FMA (e.g. -march=native with
// -ffp-contract=fast): the bit-exact tests would catch the drift.
#include "model/image_processor.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <new>
#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <sstream>
#include <utility>

namespace vtw {
namespace {

using nlohmann::json;

// ---------------------------------------------------------------------------------------------
// preprocessor_config.json

constexpr int kMaxConfigSize = 16384;

const char* ResampleName(int r) {
  static constexpr const char* kNames[] = {"nearest", "lanczos", "bilinear",
                                           "bicubic", "box",     "hamming"};
  return r >= 0 && r < 6 ? kNames[r] : "unknown";
}

// Checks the fields that PreprocessImage relies on. `where` prefixes the messages.
Status ValidateConfig(const ImageProcessorConfig& c, const std::string& where) {
  auto in_range = [](int v) { return v >= 1 && v <= kMaxConfigSize; };
  if (c.resample != 3) {
    return InvalidArgument(where + ": resample " + std::to_string(c.resample) + " (" +
                           ResampleName(c.resample) +
                           ") is not supported; only 3 (bicubic) is implemented");
  }
  if (c.shortest_edge < 0 || c.shortest_edge > kMaxConfigSize) {
    return InvalidArgument(where + ": size.shortest_edge " + std::to_string(c.shortest_edge) +
                           " is out of range [1, " + std::to_string(kMaxConfigSize) + "]");
  }
  if (c.shortest_edge == 0 && (!in_range(c.resize_height) || !in_range(c.resize_width))) {
    return InvalidArgument(where + ": size " + std::to_string(c.resize_height) + "x" +
                           std::to_string(c.resize_width) + " is out of range [1, " +
                           std::to_string(kMaxConfigSize) + "]");
  }
  if (!in_range(c.crop_height) || !in_range(c.crop_width)) {
    return InvalidArgument(where + ": crop_size " + std::to_string(c.crop_height) + "x" +
                           std::to_string(c.crop_width) + " is out of range [1, " +
                           std::to_string(kMaxConfigSize) + "]");
  }
  if (!std::isfinite(c.rescale_factor)) {
    return InvalidArgument(where + ": rescale_factor is not finite");
  }
  for (int i = 0; i < 3; ++i) {
    if (!std::isfinite(c.image_mean[i]) || !std::isfinite(c.image_std[i]) ||
        static_cast<float>(c.image_std[i]) == 0.0f) {
      return InvalidArgument(where + ": image_mean/image_std must be finite and std non-zero");
    }
  }
  return Status::Ok();
}

// Field readers: a missing or null field keeps the default (HF treats None as "use default").
const json* Field(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return nullptr;
  return &*it;
}

Status ReadBool(const json& j, const char* key, const std::string& path, bool* out) {
  const json* f = Field(j, key);
  if (f == nullptr) return Status::Ok();
  if (!f->is_boolean()) return InvalidArgument(path + ": \"" + key + "\" must be a boolean");
  *out = f->get<bool>();
  return Status::Ok();
}

Status ReadDouble(const json& j, const char* key, const std::string& path, double* out) {
  const json* f = Field(j, key);
  if (f == nullptr) return Status::Ok();
  if (!f->is_number()) return InvalidArgument(path + ": \"" + key + "\" must be a number");
  *out = f->get<double>();
  return Status::Ok();
}

Status ToInt(const json& v, const std::string& what, const std::string& path, int* out) {
  if (!v.is_number_integer()) return InvalidArgument(path + ": " + what + " must be an integer");
  const int64_t x = v.get<int64_t>();
  if (x < 1 || x > kMaxConfigSize) {
    return InvalidArgument(path + ": " + what + " " + std::to_string(x) + " is out of range [1, " +
                           std::to_string(kMaxConfigSize) + "]");
  }
  *out = static_cast<int>(x);
  return Status::Ok();
}

// "image_mean" / "image_std": three numbers, or one number for every channel.
Status ReadTriple(const json& j, const char* key, const std::string& path, double out[3]) {
  const json* f = Field(j, key);
  if (f == nullptr) return Status::Ok();
  if (f->is_number()) {
    out[0] = out[1] = out[2] = f->get<double>();
    return Status::Ok();
  }
  if (!f->is_array() || f->size() != 3) {
    return InvalidArgument(path + ": \"" + key + "\" must be a list of 3 numbers");
  }
  for (int i = 0; i < 3; ++i) {
    if (!(*f)[i].is_number()) {
      return InvalidArgument(path + ": \"" + key + "\" must be a list of 3 numbers");
    }
    out[i] = (*f)[i].get<double>();
  }
  return Status::Ok();
}

// "size": {"shortest_edge": N} | {"height": H, "width": W} | N (HF get_size_dict with
// default_to_square=False turns an int into a shortest edge).
Status ReadSize(const json& j, const std::string& path, ImageProcessorConfig* c) {
  const json* f = Field(j, "size");
  if (f == nullptr) return Status::Ok();
  if (f->is_number()) return ToInt(*f, "\"size\"", path, &c->shortest_edge);
  if (!f->is_object()) return InvalidArgument(path + ": \"size\" must be an int or an object");
  if (f->contains("shortest_edge")) {
    if (f->contains("longest_edge")) {
      return InvalidArgument(path + ": \"size\".longest_edge is not supported");
    }
    return ToInt((*f)["shortest_edge"], "size.shortest_edge", path, &c->shortest_edge);
  }
  if (f->contains("height") && f->contains("width")) {
    VTW_RETURN_IF_ERROR(ToInt((*f)["height"], "size.height", path, &c->resize_height));
    VTW_RETURN_IF_ERROR(ToInt((*f)["width"], "size.width", path, &c->resize_width));
    c->shortest_edge = 0;
    return Status::Ok();
  }
  return InvalidArgument(path + ": \"size\" must have \"shortest_edge\" or \"height\" and " +
                         "\"width\", got " + f->dump());
}

// "crop_size": N (square) | {"height": H, "width": W}.
Status ReadCropSize(const json& j, const std::string& path, ImageProcessorConfig* c) {
  const json* f = Field(j, "crop_size");
  if (f == nullptr) return Status::Ok();
  if (f->is_number()) {
    VTW_RETURN_IF_ERROR(ToInt(*f, "\"crop_size\"", path, &c->crop_height));
    c->crop_width = c->crop_height;
    return Status::Ok();
  }
  if (!f->is_object() || !f->contains("height") || !f->contains("width")) {
    return InvalidArgument(path + ": \"crop_size\" must be an int or {\"height\", \"width\"}");
  }
  VTW_RETURN_IF_ERROR(ToInt((*f)["height"], "crop_size.height", path, &c->crop_height));
  return ToInt((*f)["width"], "crop_size.width", path, &c->crop_width);
}

// ---------------------------------------------------------------------------------------------
// Container headers

enum class Format { kPng, kJpeg, kWebp, kBmp };

const char* FormatName(Format f) {
  switch (f) {
    case Format::kPng:
      return "PNG";
    case Format::kJpeg:
      return "JPEG";
    case Format::kWebp:
      return "WebP";
    case Format::kBmp:
      return "BMP";
  }
  return "?";
}

const unsigned char* U(std::string_view b) {
  return reinterpret_cast<const unsigned char*>(b.data());
}
uint32_t Be16(const unsigned char* p) { return (uint32_t{p[0]} << 8) | p[1]; }
uint32_t Be32(const unsigned char* p) { return (Be16(p) << 16) | Be16(p + 2); }
uint32_t Le16(const unsigned char* p) { return uint32_t{p[0]} | (uint32_t{p[1]} << 8); }
uint32_t Le24(const unsigned char* p) { return Le16(p) | (uint32_t{p[2]} << 16); }
uint32_t Le32(const unsigned char* p) { return Le16(p) | (Le16(p + 2) << 16); }

bool StartsWith(std::string_view b, std::string_view prefix) {
  return b.size() >= prefix.size() && b.substr(0, prefix.size()) == prefix;
}

StatusOr<Format> SniffFormat(std::string_view b) {
  if (StartsWith(b, std::string_view("\x89PNG\r\n\x1a\n", 8))) return Format::kPng;
  if (StartsWith(b, "\xFF\xD8\xFF")) return Format::kJpeg;
  if (StartsWith(b, "RIFF") && b.size() >= 12 && b.substr(8, 4) == "WEBP") return Format::kWebp;
  if (StartsWith(b, "BM")) return Format::kBmp;
  return InvalidArgument("unsupported image format (expected PNG, JPEG, WebP or BMP)");
}

Status Truncated(Format f, size_t n) {
  return InvalidArgument(std::string("truncated ") + FormatName(f) + " header (" +
                         std::to_string(n) + " bytes)");
}

Status Malformed(Format f, const std::string& why) {
  return InvalidArgument(std::string("malformed ") + FormatName(f) + " header: " + why);
}

// PNG: 8-byte signature, then the IHDR chunk (length 13), width and height big-endian.
StatusOr<ImageSize> PngSize(std::string_view b) {
  if (b.size() < 24) return Truncated(Format::kPng, b.size());
  const unsigned char* p = U(b);
  if (Be32(p + 8) != 13 || std::memcmp(p + 12, "IHDR", 4) != 0) {
    return Malformed(Format::kPng, "first chunk is not IHDR");
  }
  const uint32_t w = Be32(p + 16), h = Be32(p + 20);
  if (w > 0x7FFFFFFFu || h > 0x7FFFFFFFu) {
    return Malformed(Format::kPng, "width or height exceeds 2^31-1");
  }
  return ImageSize{h, w};
}

bool IsJpegSof(unsigned m) { return m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC; }

// JPEG: walks the marker segments after SOI to the first SOFn frame header, skipping bytes
// between segments exactly as libjpeg's next_marker() does, so the size found is the one the
// decoder will use (libjpeg rejects a second SOF).
StatusOr<ImageSize> JpegSize(std::string_view b) {
  const unsigned char* p = U(b);
  const size_t n = b.size();
  size_t i = 2;  // after FF D8
  for (;;) {
    // Skip to an 0xFF, swallow fill bytes; FF 00 is stuffed entropy data, not a marker.
    unsigned marker = 0;
    for (;;) {
      while (i < n && p[i] != 0xFF) ++i;
      while (i < n && p[i] == 0xFF) ++i;
      if (i >= n) return Truncated(Format::kJpeg, n);
      marker = p[i++];
      if (marker != 0x00) break;
    }
    if (marker == 0xD8) return Malformed(Format::kJpeg, "duplicate SOI marker");
    if (marker == 0xD9) return Malformed(Format::kJpeg, "EOI before the frame header");
    if (marker == 0xDA) return Malformed(Format::kJpeg, "scan data before the frame header");
    if ((marker >= 0xD0 && marker <= 0xD7) || marker == 0x01) continue;  // no length field
    if (i + 2 > n) return Truncated(Format::kJpeg, n);
    const size_t len = Be16(p + i);
    if (len < 2) return Malformed(Format::kJpeg, "segment length below 2");
    if (IsJpegSof(marker)) {
      // precision (1), height (2), width (2), components (1)
      if (len < 8) return Malformed(Format::kJpeg, "SOF segment too short");
      if (i + 7 > n) return Truncated(Format::kJpeg, n);
      return ImageSize{Be16(p + i + 3), Be16(p + i + 5)};
    }
    i += len;
  }
}

// WebP: RIFF container; the first chunk is VP8 (lossy), VP8L (lossless) or VP8X (extended,
// canvas size; libwebp rejects a still image whose frame differs from the canvas).
StatusOr<ImageSize> WebpSize(std::string_view b) {
  if (b.size() < 20) return Truncated(Format::kWebp, b.size());
  const unsigned char* p = U(b);
  const std::string_view fourcc = b.substr(12, 4);
  if (fourcc == "VP8 ") {
    if (b.size() < 30) return Truncated(Format::kWebp, b.size());
    if (p[23] != 0x9D || p[24] != 0x01 || p[25] != 0x2A) {
      return Malformed(Format::kWebp, "bad VP8 start code");
    }
    return ImageSize{Le16(p + 28) & 0x3FFF, Le16(p + 26) & 0x3FFF};
  }
  if (fourcc == "VP8L") {
    if (b.size() < 25) return Truncated(Format::kWebp, b.size());
    if (p[20] != 0x2F) return Malformed(Format::kWebp, "bad VP8L signature");
    const uint32_t bits = Le32(p + 21);
    return ImageSize{((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1};
  }
  if (fourcc == "VP8X") {
    if (b.size() < 30) return Truncated(Format::kWebp, b.size());
    if (p[20] & 0x02) return InvalidArgument("animated WebP is not supported");
    return ImageSize{int64_t{Le24(p + 27)} + 1, int64_t{Le24(p + 24)} + 1};
  }
  std::string printable;
  for (char c : fourcc) printable += (c >= 0x20 && c < 0x7F) ? c : '?';
  return Malformed(Format::kWebp, "unknown first chunk '" + printable + "'");
}

// BMP: 14-byte file header, then the DIB header whose size selects the layout: 12 (OS/2
// BITMAPCOREHEADER, 16-bit unsigned sizes) or >= 16 (BITMAPINFOHEADER and later, 32-bit signed
// sizes; a negative height means top-down rows).
StatusOr<ImageSize> BmpSize(std::string_view b) {
  if (b.size() < 26) return Truncated(Format::kBmp, b.size());
  const unsigned char* p = U(b);
  const uint32_t header_size = Le32(p + 14);
  if (header_size == 12) return ImageSize{Le16(p + 20), Le16(p + 18)};
  if (header_size < 16 || header_size > 4096) {
    return Malformed(Format::kBmp, "unsupported DIB header size " + std::to_string(header_size));
  }
  const int64_t w = static_cast<int32_t>(Le32(p + 18));
  const int64_t h = static_cast<int32_t>(Le32(p + 22));
  if (w < 0) return Malformed(Format::kBmp, "negative width " + std::to_string(w));
  return ImageSize{h < 0 ? -h : h, w};
}

// ---------------------------------------------------------------------------------------------
// Pillow's bicubic resample (libImaging/Resample.c), 8-bit path.

constexpr int kPrecisionBits = 32 - 8 - 2;

// Caps the work of one internal resize (taps stored, intermediate pixels) so that a fixed-size
// resize of an absurdly elongated image fails cleanly instead of allocating gigabytes.
constexpr int64_t kMaxResizeWork = int64_t{64} << 20;
constexpr int64_t kUnlimited = std::numeric_limits<int64_t>::max();

double BicubicFilter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Fixed-point taps of the outputs [begin, begin + n) of a 1-D resample in_size -> out_size.
struct Taps {
  std::vector<int> first;      // first input index of each output
  std::vector<int> count;      // number of inputs of each output
  std::vector<size_t> offset;  // start of each output's weights in `weights`
  std::vector<int32_t> weights;
  // True when 255 * sum(|weights|) + 2^21 fits in int32 for every output (always, in practice:
  // the normalised bicubic weights sum to 1 with small negative lobes), so the passes may
  // accumulate in int32 like Pillow; otherwise they use int64.
  bool fits_int32 = true;
};

StatusOr<Taps> ComputeTaps(int in_size, int64_t out_size, int64_t begin, int n, int64_t max_work) {
  // Pillow passes the box (0, 0, w, h) as floats: scale = (double)(float(in) - 0.f) / out.
  const double scale =
      static_cast<double>(static_cast<float>(in_size)) / static_cast<double>(out_size);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;  // bicubic support 2, widened when shrinking
  const double ss = 1.0 / filterscale;
  const int64_t ksize = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  if (ksize > max_work / std::max(n, 1)) {
    return InvalidArgument("resize " + std::to_string(in_size) + " -> " + std::to_string(out_size) +
                           " needs too many filter taps");
  }
  Taps t;
  t.first.resize(n);
  t.count.resize(n);
  t.offset.resize(n);
  t.weights.reserve(static_cast<size_t>(n) * static_cast<size_t>(ksize));
  std::vector<double> k(static_cast<size_t>(ksize) + 1);
  for (int i = 0; i < n; ++i) {
    const int64_t xx = begin + i;
    const double center = (static_cast<double>(xx) + 0.5) * scale;
    double ww = 0.0;
    // (int) casts truncate toward zero, as in C.
    int64_t xmin = static_cast<int64_t>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int64_t xmax = static_cast<int64_t>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    if (xmax < 0) xmax = 0;
    if (xmax > ksize) xmax = ksize;  // cannot happen; keeps k in bounds regardless
    for (int64_t x = 0; x < xmax; ++x) {
      // Same operation order as Pillow: ((x + xmin) - center + 0.5) * ss.
      const double w = BicubicFilter((static_cast<double>(x + xmin) - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    t.first[i] = static_cast<int>(xmin);
    t.count[i] = static_cast<int>(xmax);
    t.offset[i] = t.weights.size();
    int64_t abs_sum = 0;
    for (int64_t x = 0; x < xmax; ++x) {
      const double kx = ww != 0.0 ? k[x] / ww : k[x];
      // normalize_coeffs_8bpc: round half away from zero, then truncate to int.
      const double scaled = kx * (1 << kPrecisionBits);
      const int32_t fixed = static_cast<int32_t>(kx < 0 ? -0.5 + scaled : 0.5 + scaled);
      t.weights.push_back(fixed);
      abs_sum += fixed < 0 ? -int64_t{fixed} : fixed;
    }
    if (255 * abs_sum + (int64_t{1} << (kPrecisionBits - 1)) >
        std::numeric_limits<int32_t>::max()) {
      t.fits_int32 = false;
    }
  }
  return t;
}

template <typename Acc>
inline uint8_t Clip8(Acc acc) {
  const Acc v = acc >> kPrecisionBits;  // arithmetic shift (floor), as Pillow's lookup table
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// dst row r = horizontal resample of src row (r0 + r) at the outputs described by `t`.
template <typename Acc, int CH>
void HorizontalPass(const cv::Mat& src, int r0, const Taps& t, cv::Mat* dst) {
  const int n = static_cast<int>(t.first.size());
  for (int r = 0; r < dst->rows; ++r) {
    const uint8_t* in = src.ptr<uint8_t>(r0 + r);
    uint8_t* out = dst->ptr<uint8_t>(r);
    for (int i = 0; i < n; ++i) {
      const int32_t* k = t.weights.data() + t.offset[i];
      const uint8_t* px = in + static_cast<size_t>(t.first[i]) * CH;
      Acc acc[CH];
      for (int c = 0; c < CH; ++c) acc[c] = Acc{1} << (kPrecisionBits - 1);
      for (int x = 0; x < t.count[i]; ++x, px += CH) {
        for (int c = 0; c < CH; ++c) acc[c] += Acc{px[c]} * Acc{k[x]};
      }
      for (int c = 0; c < CH; ++c) out[i * CH + c] = Clip8(acc[c]);
    }
  }
}

template <typename Acc>
void HorizontalPassAnyChannels(const cv::Mat& src, int r0, const Taps& t, cv::Mat* dst) {
  switch (src.channels()) {
    case 1:
      HorizontalPass<Acc, 1>(src, r0, t, dst);
      break;
    case 2:
      HorizontalPass<Acc, 2>(src, r0, t, dst);
      break;
    case 3:
      HorizontalPass<Acc, 3>(src, r0, t, dst);
      break;
    default:
      HorizontalPass<Acc, 4>(src, r0, t, dst);
      break;
  }
}

// dst row i = vertical resample of src rows (t.first[i] - r0 ...) for every column.
template <typename Acc>
void VerticalPass(const cv::Mat& src, int r0, const Taps& t, cv::Mat* dst) {
  const int row_len = dst->cols * dst->channels();
  std::vector<Acc> acc(static_cast<size_t>(row_len));
  for (int i = 0; i < dst->rows; ++i) {
    std::fill(acc.begin(), acc.end(), Acc{1} << (kPrecisionBits - 1));
    const int32_t* k = t.weights.data() + t.offset[i];
    for (int y = 0; y < t.count[i]; ++y) {
      const uint8_t* in = src.ptr<uint8_t>(t.first[i] - r0 + y);
      const Acc ky = k[y];
      for (int j = 0; j < row_len; ++j) acc[j] += Acc{in[j]} * ky;
    }
    uint8_t* out = dst->ptr<uint8_t>(i);
    for (int j = 0; j < row_len; ++j) out[j] = Clip8(acc[j]);
  }
}

// Rows [y0, y0 + h) and columns [x0, x0 + w) of Pillow's bicubic resize of `src` to
// out_w x out_h (which may exceed int: only the window is computed). Each output pixel of a
// pass depends only on its own taps, so the window is bit-identical to the full resize.
StatusOr<cv::Mat> ResizeWindow(const cv::Mat& src, int64_t out_w, int64_t out_h, int64_t x0,
                               int64_t y0, int w, int h, int64_t max_work) {
  const bool need_horizontal = out_w != src.cols;
  const bool need_vertical = out_h != src.rows;
  // Source rows the vertical pass reads (or the window rows themselves when it is skipped).
  Taps vt;
  int64_t r0 = y0, r1 = y0 + h;
  if (need_vertical) {
    VTW_ASSIGN_OR_RETURN(vt, ComputeTaps(src.rows, out_h, y0, h, max_work));
    r0 = std::numeric_limits<int64_t>::max();
    r1 = 0;
    for (int i = 0; i < h; ++i) {
      r0 = std::min<int64_t>(r0, vt.first[i]);
      r1 = std::max<int64_t>(r1, int64_t{vt.first[i]} + vt.count[i]);
    }
    if (r1 <= r0) r0 = r1 = 0;
  }
  cv::Mat tmp;
  if (need_horizontal) {
    if (r1 - r0 > max_work / std::max(w, 1)) {
      return InvalidArgument("image " + std::to_string(src.cols) + "x" + std::to_string(src.rows) +
                             " is too elongated to resize to " + std::to_string(out_w) + "x" +
                             std::to_string(out_h));
    }
    VTW_ASSIGN_OR_RETURN(Taps ht, ComputeTaps(src.cols, out_w, x0, w, max_work));
    tmp.create(static_cast<int>(r1 - r0), w, src.type());
    if (ht.fits_int32) {
      HorizontalPassAnyChannels<int32_t>(src, static_cast<int>(r0), ht, &tmp);
    } else {
      HorizontalPassAnyChannels<int64_t>(src, static_cast<int>(r0), ht, &tmp);
    }
  } else {
    tmp = src(cv::Rect(static_cast<int>(x0), static_cast<int>(r0), w, static_cast<int>(r1 - r0)));
  }
  if (!need_vertical) return tmp.clone();
  cv::Mat out(h, w, src.type());
  if (vt.fits_int32) {
    VerticalPass<int32_t>(tmp, static_cast<int>(r0), vt, &out);
  } else {
    VerticalPass<int64_t>(tmp, static_cast<int>(r0), vt, &out);
  }
  return out;
}

// One axis of HF's center_crop: which part of the resized image is kept (src_begin, len) and
// where it lands in the crop (dst_begin); the rest of the crop is zero padding.
struct CropAxis {
  int64_t src_begin = 0;
  int64_t dst_begin = 0;
  int len = 0;
};

CropAxis CenterCropAxis(int64_t size, int64_t crop) {
  CropAxis a;
  if (size >= crop) {
    a.src_begin = (size - crop) / 2;  // (H - crop_h) // 2, non-negative here
    a.len = static_cast<int>(crop);
  } else {
    // HF pads to the crop size placing the image at ceil((crop - size) / 2), then crops at 0.
    a.dst_begin = (crop - size + 1) / 2;
    a.len = static_cast<int>(size);
  }
  return a;
}

ImageSize ResizedSize(const ImageProcessorConfig& c, int64_t height, int64_t width) {
  if (!c.do_resize) return {height, width};
  if (c.shortest_edge > 0) return ShortestEdgeResizeSize(height, width, c.shortest_edge);
  return {c.resize_height, c.resize_width};
}

}  // namespace

StatusOr<ImageProcessorConfig> LoadImageProcessorConfig(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    return NotFound("image processor config " + path + " does not exist");
  }
  if (!std::filesystem::is_regular_file(path, ec)) {
    return InvalidArgument("image processor config " + path + " is not a regular file");
  }
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in || in.bad()) return InvalidArgument("cannot read image processor config " + path);
  json j;
  try {
    j = json::parse(text.str());
  } catch (const json::exception& e) {
    return InvalidArgument(path + ": invalid JSON: " + e.what());
  }
  if (!j.is_object()) return InvalidArgument(path + ": top level is not a JSON object");

  for (const char* key : {"image_processor_type", "feature_extractor_type"}) {
    const json* f = Field(j, key);
    if (f == nullptr) continue;
    const std::string type = f->is_string() ? f->get<std::string>() : f->dump();
    if (type != "CLIPImageProcessor" && type != "CLIPFeatureExtractor") {
      return InvalidArgument(path + ": " + key + " \"" + type +
                             "\" is not supported (only CLIPImageProcessor)");
    }
  }

  ImageProcessorConfig c;
  VTW_RETURN_IF_ERROR(ReadBool(j, "do_resize", path, &c.do_resize));
  VTW_RETURN_IF_ERROR(ReadBool(j, "do_center_crop", path, &c.do_center_crop));
  VTW_RETURN_IF_ERROR(ReadBool(j, "do_rescale", path, &c.do_rescale));
  VTW_RETURN_IF_ERROR(ReadBool(j, "do_normalize", path, &c.do_normalize));
  VTW_RETURN_IF_ERROR(ReadBool(j, "do_convert_rgb", path, &c.do_convert_rgb));
  VTW_RETURN_IF_ERROR(ReadSize(j, path, &c));
  VTW_RETURN_IF_ERROR(ReadCropSize(j, path, &c));
  VTW_RETURN_IF_ERROR(ReadDouble(j, "rescale_factor", path, &c.rescale_factor));
  VTW_RETURN_IF_ERROR(ReadTriple(j, "image_mean", path, c.image_mean));
  VTW_RETURN_IF_ERROR(ReadTriple(j, "image_std", path, c.image_std));
  if (const json* f = Field(j, "resample")) {
    if (!f->is_number_integer()) return InvalidArgument(path + ": \"resample\" must be an int");
    const int64_t r = f->get<int64_t>();
    c.resample = (r >= -1000 && r <= 1000) ? static_cast<int>(r) : -1;
  }
  VTW_RETURN_IF_ERROR(ValidateConfig(c, path));
  return c;
}

StatusOr<cv::Mat> DecodeImage(std::string_view bytes, const ImageLimits& limits) {
  if (bytes.empty()) return InvalidArgument("empty image");
  if (bytes.size() > limits.max_bytes ||
      bytes.size() > static_cast<size_t>(std::numeric_limits<int>::max())) {
    return InvalidArgument("image is " + std::to_string(bytes.size()) +
                           " bytes, more than the limit of " + std::to_string(limits.max_bytes) +
                           " bytes");
  }
  VTW_ASSIGN_OR_RETURN(const Format format, SniffFormat(bytes));
  StatusOr<ImageSize> size_or = InvalidArgument("");
  switch (format) {
    case Format::kPng:
      size_or = PngSize(bytes);
      break;
    case Format::kJpeg:
      size_or = JpegSize(bytes);
      break;
    case Format::kWebp:
      size_or = WebpSize(bytes);
      break;
    case Format::kBmp:
      size_or = BmpSize(bytes);
      break;
  }
  if (!size_or.ok()) return size_or.status();
  const ImageSize size = *size_or;
  const std::string dims = std::to_string(size.width) + "x" + std::to_string(size.height);
  if (size.width <= 0 || size.height <= 0) {
    return InvalidArgument(std::string(FormatName(format)) +
                           " header declares a zero-size image (" + dims + ")");
  }
  // Both are at most 2^31, so the product fits in int64.
  if (size.width * size.height > limits.max_pixels) {
    return InvalidArgument(std::string(FormatName(format)) + " image is " + dims + " = " +
                           std::to_string(size.width * size.height) +
                           " pixels, more than the limit of " + std::to_string(limits.max_pixels) +
                           " pixels");
  }

  cv::Mat decoded;
  try {
    // IMREAD_COLOR: 8-bit BGR; gray replicated, alpha stripped (no compositing), palettes
    // expanded, 16-bit reduced to the high byte; JPEG EXIF orientation applied. HF/PIL does not
    // exif-transpose, so rotated JPEGs differ from HF on purpose (phone photos come out upright).
    decoded =
        cv::imdecode(cv::_InputArray(U(bytes), static_cast<int>(bytes.size())), cv::IMREAD_COLOR);
  } catch (const cv::Exception& e) {
    return InvalidArgument(std::string("could not decode image: ") + FormatName(format) +
                           " data is corrupt (" + e.what() + ")");
  } catch (const std::bad_alloc&) {
    return ResourceExhausted("out of memory decoding a " + dims + " image");
  }
  if (decoded.empty()) {
    return InvalidArgument(std::string("could not decode image: corrupt or truncated ") +
                           FormatName(format) + " data");
  }
  if (static_cast<int64_t>(decoded.total()) > limits.max_pixels) {  // defence in depth
    return InvalidArgument("decoded image exceeds the pixel limit");
  }
  cv::Mat rgb;
  switch (decoded.channels()) {
    case 1:
      cv::cvtColor(decoded, rgb, cv::COLOR_GRAY2RGB);
      break;
    case 3:
      cv::cvtColor(decoded, rgb, cv::COLOR_BGR2RGB);
      break;
    case 4:
      cv::cvtColor(decoded, rgb, cv::COLOR_BGRA2RGB);
      break;
    default:
      return Internal("decoder returned " + std::to_string(decoded.channels()) + " channels");
  }
  if (rgb.depth() != CV_8U) {
    cv::Mat u8;
    rgb.convertTo(u8, CV_8U, rgb.depth() == CV_16U ? 1.0 / 256.0 : 1.0);
    rgb = u8;
  }
  return rgb;
}

cv::Mat ResizeBicubicPil(const cv::Mat& image, int out_width, int out_height) {
  if (image.empty() || image.depth() != CV_8U || image.channels() > 4 || image.dims != 2 ||
      out_width <= 0 || out_height <= 0) {
    return cv::Mat();
  }
  StatusOr<cv::Mat> out =
      ResizeWindow(image, out_width, out_height, 0, 0, out_width, out_height, kUnlimited);
  return out.ok() ? std::move(out).value() : cv::Mat();
}

ImageSize ShortestEdgeResizeSize(int64_t height, int64_t width, int64_t shortest_edge) {
  const bool width_is_short = width <= height;
  const int64_t short_side = width_is_short ? width : height;
  const int64_t long_side = width_is_short ? height : width;
  // Python: int(size * long / short); the int product is exact, `/` is a correctly rounded
  // double division, int() truncates.
  const int64_t new_long = static_cast<int64_t>(static_cast<double>(shortest_edge * long_side) /
                                                static_cast<double>(short_side));
  return width_is_short ? ImageSize{new_long, shortest_edge} : ImageSize{shortest_edge, new_long};
}

StatusOr<ImageSize> PreprocessedImageSize(const ImageProcessorConfig& config, int64_t height,
                                          int64_t width) {
  if (height <= 0 || width <= 0 || height > std::numeric_limits<int>::max() ||
      width > std::numeric_limits<int>::max()) {
    return InvalidArgument("invalid image size " + std::to_string(width) + "x" +
                           std::to_string(height));
  }
  VTW_RETURN_IF_ERROR(ValidateConfig(config, "image processor config"));
  const ImageSize out = config.do_center_crop ? ImageSize{config.crop_height, config.crop_width}
                                              : ResizedSize(config, height, width);
  if (out.height > kMaxPreprocessedPixels / out.width) {
    return InvalidArgument("preprocessed image would be " + std::to_string(out.width) + "x" +
                           std::to_string(out.height) + ", more than " +
                           std::to_string(kMaxPreprocessedPixels) + " pixels");
  }
  return out;
}

StatusOr<std::vector<float>> PreprocessImage(const cv::Mat& rgb_u8,
                                             const ImageProcessorConfig& config) {
  if (rgb_u8.empty() || rgb_u8.type() != CV_8UC3 || rgb_u8.dims != 2) {
    return InvalidArgument("PreprocessImage needs a non-empty 8-bit 3-channel RGB image");
  }
  VTW_ASSIGN_OR_RETURN(const ImageSize out,
                       PreprocessedImageSize(config, rgb_u8.rows, rgb_u8.cols));
  const ImageSize resized = ResizedSize(config, rgb_u8.rows, rgb_u8.cols);
  const CropAxis ax = CenterCropAxis(resized.width, out.width);
  const CropAxis ay = CenterCropAxis(resized.height, out.height);

  // The part of the resized image that survives the crop.
  cv::Mat window;
  if (config.do_resize) {
    VTW_ASSIGN_OR_RETURN(window, ResizeWindow(rgb_u8, resized.width, resized.height, ax.src_begin,
                                              ay.src_begin, ax.len, ay.len, kMaxResizeWork));
  } else {
    window = rgb_u8(
        cv::Rect(static_cast<int>(ax.src_begin), static_cast<int>(ay.src_begin), ax.len, ay.len));
  }

  // HF: rescale = float32(float64(u8) * rescale_factor); normalize = (x - float32(mean)) /
  // float32(std) in float32. Tabulated per channel and byte value (identical arithmetic).
  float lut[3][256];
  for (int c = 0; c < 3; ++c) {
    const float mean = static_cast<float>(config.image_mean[c]);
    const float stdev = static_cast<float>(config.image_std[c]);
    for (int v = 0; v < 256; ++v) {
      float x = config.do_rescale
                    ? static_cast<float>(static_cast<double>(v) * config.rescale_factor)
                    : static_cast<float>(v);
      if (config.do_normalize) x = (x - mean) / stdev;
      lut[c][v] = x;
    }
  }
  const size_t plane = static_cast<size_t>(out.height) * static_cast<size_t>(out.width);
  std::vector<float> chw(3 * plane);
  for (int c = 0; c < 3; ++c) {
    std::fill(chw.begin() + c * plane, chw.begin() + (c + 1) * plane, lut[c][0]);  // padding
  }
  for (int y = 0; y < window.rows; ++y) {
    const uint8_t* row = window.ptr<uint8_t>(y);
    const size_t base = static_cast<size_t>(ay.dst_begin + y) * static_cast<size_t>(out.width) +
                        static_cast<size_t>(ax.dst_begin);
    for (int x = 0; x < window.cols; ++x) {
      for (int c = 0; c < 3; ++c) chw[c * plane + base + x] = lut[c][row[x * 3 + c]];
    }
  }
  return chw;
}

StatusOr<std::vector<float>> ProcessImageBytes(std::string_view bytes,
                                               const ImageProcessorConfig& config,
                                               const ImageLimits& limits) {
  VTW_ASSIGN_OR_RETURN(const cv::Mat rgb, DecodeImage(bytes, limits));
  return PreprocessImage(rgb, config);
}

StatusOr<std::string> ReadImageFile(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return NotFound("file '" + path + "' does not exist");
  if (std::filesystem::is_directory(path, ec)) {
    return InvalidArgument("'" + path + "' is a directory, not a file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return InvalidArgument("cannot read '" + path + "'");
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

}  // namespace vtw
