// ImageFeatureCache: the projected image features of image files, computed once per file and
// reused for every question and every K of an evaluation. Not thread-safe (one evaluation).
#pragma once

#include <cstddef>
#include <string>
#include <unordered_map>

#include <ATen/core/Tensor.h>

#include "model/status.h"
#include "server/model_bundle.h"

namespace vtw::tools {

// Projected image features ([num_image_tokens, Ht], model dtype) per image file, computed once.
// With `blank`, the features of a "blanked" copy of the image: same size, every pixel set to the
// per-channel median of the image's border pixels (the background in the shapes dataset, where
// shapes never touch the border). Holds at most `capacity` images (then starts over).
class ImageFeatureCache {
 public:
  explicit ImageFeatureCache(const ModelBundle& bundle, size_t capacity = 4096)
      : bundle_(bundle), capacity_(capacity) {}
  StatusOr<at::Tensor> Get(const std::string& path, bool blank = false);
  size_t misses() const { return misses_; }
  double seconds() const { return seconds_; }  // time spent decoding and encoding images

 private:
  const ModelBundle& bundle_;
  size_t capacity_;
  std::unordered_map<std::string, at::Tensor> cache_;
  size_t misses_ = 0;
  double seconds_ = 0;
};

}  // namespace vtw::tools
