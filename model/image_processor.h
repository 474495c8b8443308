// Image preprocessing, bit-exact with Hugging Face's CLIPImageProcessor (transformers 4.45 on
// Pillow): the preprocessor_config.json it reads, safe decoding of untrusted image bytes
// (PNG, JPEG, WebP, BMP) to 8-bit RGB, Pillow's fixed-point bicubic resize, shortest-edge resize,
// center crop (zero padded when the image is smaller), rescale and normalize to CHW float32.
//
// Thread-safety: every function here is reentrant and may be called from many threads at once;
// ImageProcessorConfig and ImageLimits are plain value types (thread-compatible).
#pragma once

#include <cstddef>
#include <cstdint>
#include <opencv2/core/mat.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "model/status.h"

namespace vtw {

// The fields of HF's CLIPImageProcessor that change its output. Defaults are HF's own
// (CLIPImageProcessor.__init__), used for fields that preprocessor_config.json omits.
struct ImageProcessorConfig {
  bool do_resize = true;
  // Resize target. shortest_edge > 0: the short side becomes shortest_edge and the long side
  // int(shortest_edge * long / short) ("size": {"shortest_edge": N} or "size": N).
  // shortest_edge == 0: resize to exactly resize_height x resize_width
  // ("size": {"height": H, "width": W}).
  int shortest_edge = 224;
  int resize_height = 0;
  int resize_width = 0;
  bool do_center_crop = true;
  int crop_height = 224;
  int crop_width = 224;
  bool do_rescale = true;
  double rescale_factor = 1.0 / 255.0;
  bool do_normalize = true;
  double image_mean[3] = {0.48145466, 0.4578275, 0.40821073};  // OPENAI_CLIP_MEAN
  double image_std[3] = {0.26862954, 0.26130258, 0.27577711};  // OPENAI_CLIP_STD
  // Parsed for completeness. DecodeImage always yields RGB, which is what HF does for any
  // non-RGB input when do_convert_rgb is true (the default and every LLaVA checkpoint's value).
  bool do_convert_rgb = true;
  int resample = 3;  // PIL resample filter id; only 3 (BICUBIC) is supported.
};

// Reads a Hugging Face preprocessor_config.json. Missing fields take HF's defaults. Accepts
// "size" as {"shortest_edge": N}, {"height": H, "width": W} or an int (= shortest edge);
// "crop_size" as an int (square) or {"height": H, "width": W}; "image_mean"/"image_std" as a
// list of 3 numbers or one number for all channels. Errors (InvalidArgument, or NotFound for a
// missing file), each naming `path`: unreadable file, invalid JSON, a field of the wrong type or
// out of range (sizes must be in [1, 16384], std non-zero), a resample other than 3 (bicubic),
// or an image_processor_type other than CLIPImageProcessor (other processors differ in ways
// this code does not reproduce).
StatusOr<ImageProcessorConfig> LoadImageProcessorConfig(const std::string& path);

// Caps on untrusted image input, checked before any pixel is decoded.
struct ImageLimits {
  // Largest width * height accepted, read from the container header before decoding. 40 MP
  // covers every ordinary camera and phone photo (a 48 MP phone sensor saves 12 MP by default)
  // while bounding the decoded RGB buffer to ~120 MB, so a small "decompression bomb" file
  // claiming e.g. 30000x30000 cannot make the server allocate gigabytes.
  int64_t max_pixels = 40'000'000;
  // Largest encoded size accepted (32 MiB).
  size_t max_bytes = size_t{32} << 20;
};

// Decodes an encoded image (PNG, JPEG, WebP or BMP, recognised by its magic bytes) into an
// 8-bit, 3-channel RGB cv::Mat (CV_8UC3, rows = height), as PIL's Image.convert("RGB") would:
// grayscale is replicated to three channels, an alpha channel is dropped without compositing,
// palettes are expanded, 16-bit samples are reduced to 8 bits. The width and height are read
// from the container header (PNG IHDR, JPEG SOFn, WebP VP8/VP8L/VP8X, BMP info header) and
// checked against `limits` before any pixel is decoded.
// JPEG EXIF orientation IS applied (the pixels are rotated/flipped upright). HF/PIL does not
// exif-transpose, so such JPEGs differ from HF; this is deliberate: users send phone photos and
// expect the model to see them the right way up.
// Errors, InvalidArgument: empty input, more than limits.max_bytes, unsupported format,
// truncated or malformed header, zero width or height, width * height > limits.max_pixels,
// animated WebP, or pixel data that cannot be decoded ("could not decode image ...");
// ResourceExhausted if memory runs out while decoding. A JPEG whose entropy data is cut short
// still decodes (libjpeg only warns and fills in the missing part), where PIL would raise.
// Hostile bytes yield an error, not a crash (as far as the system libpng/libjpeg/libwebp and
// OpenCV's BMP reader are robust; fuzzed in the tests), and memory stays within a small
// multiple of the header's width * height * 3 bytes.
StatusOr<cv::Mat> DecodeImage(std::string_view bytes, const ImageLimits& limits);

// The bytes of an encoded image file (decode them with DecodeImage). NotFound for a missing
// path, InvalidArgument for a directory or an unreadable file; messages name the path.
StatusOr<std::string> ReadImageFile(const std::string& path);

// Pillow's Image.resize(size, resample=BICUBIC) for 8-bit images, reproduced bit for bit
// (Pillow's libImaging/Resample.c): separable, horizontal pass then vertical pass, a pass is
// skipped when that dimension does not change; cubic kernel with a = -0.5 whose support (2) is
// scaled by in/out when shrinking (antialiasing); per-output weights normalised to sum 1, then
// converted to 22-bit fixed point; the 8-bit result of each pass is rounded and clipped.
// `image` must be non-empty CV_8UC1..CV_8UC4 (channels are resampled independently) and the
// output size positive; otherwise an empty Mat is returned. Returns a new Mat of the same type,
// out_height x out_width; the caller bounds the output size (it is allocated in full).
cv::Mat ResizeBicubicPil(const cv::Mat& image, int out_width, int out_height);

struct ImageSize {
  int64_t height = 0;
  int64_t width = 0;
  bool operator==(const ImageSize& o) const { return height == o.height && width == o.width; }
};

// HF's get_resize_output_image_size(size=shortest_edge, default_to_square=False): the short
// side becomes shortest_edge, the long side int(shortest_edge * long / short) (truncated), e.g.
// 80x60 (WxH) -> 74x56 and 37x91 -> 56x137. A square stays square. Inputs must be positive.
ImageSize ShortestEdgeResizeSize(int64_t height, int64_t width, int64_t shortest_edge);

// Largest output PreprocessImage produces (only reachable with do_center_crop = false).
inline constexpr int64_t kMaxPreprocessedPixels = int64_t{4096} * 4096;

// The [height, width] of PreprocessImage's output for an input of the given size: the crop size
// when do_center_crop, else the resized (or, without do_resize, the input) size. InvalidArgument
// when the input size is not positive or the output exceeds kMaxPreprocessedPixels.
StatusOr<ImageSize> PreprocessedImageSize(const ImageProcessorConfig& config, int64_t height,
                                          int64_t width);

// CLIPImageProcessor's pixel_values for one RGB image, bit-exact with HF: resize (shortest edge
// or fixed size, ResizeBicubicPil), center crop at top = (H - crop_h) // 2, left =
// (W - crop_w) // 2 (zero padding where the image is smaller than the crop, as HF does),
// x = float32(double(u8) * rescale_factor), then (x - float32(mean)) / float32(std) in float32.
// `rgb_u8` must be a non-empty CV_8UC3 RGB image. Returns CHW float32 of shape
// [3, H, W] with [H, W] = PreprocessedImageSize(config, rows, cols), i.e. [3, crop_height,
// crop_width] when do_center_crop. Only the part of the resized image that survives the crop is
// computed (bit-identical to resizing in full), so with shortest-edge resizing even extreme
// aspect ratios (1 x 400000) cost little time and memory.
// Errors: InvalidArgument for a bad input Mat or output size, a config that
// LoadImageProcessorConfig would reject (e.g. resample != 3), or a fixed-size resize ("size":
// {"height", "width"}) of an image so elongated that it would need > 64M intermediate pixels.
StatusOr<std::vector<float>> PreprocessImage(const cv::Mat& rgb_u8,
                                             const ImageProcessorConfig& config);

// DecodeImage followed by PreprocessImage.
StatusOr<std::vector<float>> ProcessImageBytes(std::string_view bytes,
                                               const ImageProcessorConfig& config,
                                               const ImageLimits& limits);

}  // namespace vtw
