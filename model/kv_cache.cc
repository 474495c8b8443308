#include "model/kv_cache.h"

#include <algorithm>
#include <cstring>

#include <ATen/ATen.h>

namespace vtw {

KvCache::KvCache(int num_layers, int num_kv_heads, int head_dim, at::ScalarType dtype,
                 const std::vector<int64_t>& capacity_hint)
    : num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      dtype_(dtype),
      entry_bytes_(2LL * num_kv_heads * head_dim * c10::elementSize(dtype)),
      k_(num_layers),
      v_(num_layers),
      length_(num_layers, 0) {
  for (int l = 0; l < num_layers; ++l) {
    int64_t hint = l < static_cast<int>(capacity_hint.size()) ? capacity_hint[l] : 0;
    if (hint > 0) Reserve(l, hint);
  }
}

void KvCache::Reserve(int layer, int64_t entries) {
  int64_t capacity = k_[layer].defined() ? k_[layer].size(1) : 0;
  if (entries <= capacity) return;
  int64_t new_capacity = std::max<int64_t>(entries, capacity * 2);
  auto opts = at::TensorOptions().dtype(dtype_);
  // Zeros, not empty: entries past length() must be finite (see key_buffer()).
  at::Tensor k = at::zeros({num_kv_heads_, new_capacity, head_dim_}, opts);
  at::Tensor v = at::zeros({num_kv_heads_, new_capacity, head_dim_}, opts);
  if (length_[layer] > 0) {
    k.narrow(1, 0, length_[layer]).copy_(keys(layer));
    v.narrow(1, 0, length_[layer]).copy_(values(layer));
  }
  k_[layer] = std::move(k);
  v_[layer] = std::move(v);
}

void KvCache::Append(int layer, const at::Tensor& k, const at::Tensor& v) {
  const int64_t n = k.size(1);
  if (n == 0) return;
  Reserve(layer, length_[layer] + n);
  k_[layer].narrow(1, length_[layer], n).copy_(k);
  v_[layer].narrow(1, length_[layer], n).copy_(v);
  length_[layer] += n;
}

void KvCache::AppendOne(int layer, const void* k, const void* v) {
  Reserve(layer, length_[layer] + 1);
  TORCH_CHECK(k_[layer].device().is_cpu(), "KvCache::AppendOne: the cache is not on the CPU");
  const int64_t cap = k_[layer].size(1);
  const size_t row = static_cast<size_t>(head_dim_) * c10::elementSize(dtype_);
  char* kd = static_cast<char*>(k_[layer].data_ptr());
  char* vd = static_cast<char*>(v_[layer].data_ptr());
  for (int64_t h = 0; h < num_kv_heads_; ++h) {
    const size_t dst = (h * cap + length_[layer]) * row;
    std::memcpy(kd + dst, static_cast<const char*>(k) + h * row, row);
    std::memcpy(vd + dst, static_cast<const char*>(v) + h * row, row);
  }
  ++length_[layer];
}

at::Tensor KvCache::keys(int layer) const {
  if (!k_[layer].defined()) {
    return at::empty({num_kv_heads_, 0, head_dim_}, at::TensorOptions().dtype(dtype_));
  }
  return k_[layer].narrow(1, 0, length_[layer]);
}

at::Tensor KvCache::values(int layer) const {
  if (!v_[layer].defined()) {
    return at::empty({num_kv_heads_, 0, head_dim_}, at::TensorOptions().dtype(dtype_));
  }
  return v_[layer].narrow(1, 0, length_[layer]);
}

int64_t KvCache::bytes_used() const {
  int64_t entries = 0;
  for (int64_t n : length_) entries += n;
  return entries * entry_bytes_;
}

}  // namespace vtw
