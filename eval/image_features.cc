#include "eval/image_features.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include <ATen/ATen.h>
#include <opencv2/core.hpp>

#include "eval/format.h"
#include "model/image_processor.h"

namespace vtw::tools {
namespace {

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

}  // namespace vtw::tools
