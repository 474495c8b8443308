#include "server/image_cache.h"

namespace vtw {

ImageKey HashImageBytes(std::string_view bytes) {
  uint64_t fnv = 1469598103934665603ULL;
  uint64_t mix = 0x9e3779b97f4a7c15ULL ^ bytes.size();
  for (unsigned char c : bytes) {
    fnv = (fnv ^ c) * 1099511628211ULL;
    mix = (mix + c) * 0xff51afd7ed558ccdULL;
    mix ^= mix >> 29;
  }
  return {fnv, mix ^ bytes.size()};
}

at::Tensor ImageCache::Find(const ImageKey& key) {
  auto it = map_.find(key);
  if (it == map_.end()) return at::Tensor();
  lru_.splice(lru_.begin(), lru_, it->second);
  return it->second->second;
}

void ImageCache::Insert(const ImageKey& key, const at::Tensor& features) {
  if (max_entries_ == 0) return;
  auto it = map_.find(key);
  if (it != map_.end()) {
    it->second->second = features;
    lru_.splice(lru_.begin(), lru_, it->second);
    return;
  }
  lru_.emplace_front(key, features);
  map_[key] = lru_.begin();
  while (map_.size() > max_entries_) {
    map_.erase(lru_.back().first);
    lru_.pop_back();
  }
}

}  // namespace vtw
