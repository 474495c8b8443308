// ImageCache: a bounded LRU map from image content (a 128-bit hash of the encoded bytes) to the
// projected image features, so an image seen again is not re-encoded. Not thread-safe: the
// engine thread owns it.
#pragma once

#include <cstdint>
#include <list>
#include <string_view>
#include <unordered_map>

#include <ATen/core/Tensor.h>

namespace vtw {

struct ImageKey {
  uint64_t hi = 0, lo = 0;
  bool operator==(const ImageKey& o) const { return hi == o.hi && lo == o.lo; }
};

// Two independent 64-bit hashes of `bytes` (FNV-1a and a multiplicative mix), with the length.
ImageKey HashImageBytes(std::string_view bytes);

class ImageCache {
 public:
  explicit ImageCache(size_t max_entries) : max_entries_(max_entries) {}

  // The features for `key`, or an undefined tensor; a hit refreshes the entry.
  at::Tensor Find(const ImageKey& key);
  // Inserts (or replaces) and evicts the least recently used entries beyond the bound.
  void Insert(const ImageKey& key, const at::Tensor& features);
  size_t size() const { return map_.size(); }

 private:
  struct KeyHash {
    size_t operator()(const ImageKey& k) const { return k.hi ^ (k.lo * 0x9e3779b97f4a7c15ULL); }
  };
  size_t max_entries_;
  std::list<std::pair<ImageKey, at::Tensor>> lru_;  // front = most recent
  std::unordered_map<ImageKey, decltype(lru_)::iterator, KeyHash> map_;
};

}  // namespace vtw
