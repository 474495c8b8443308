// KvCache: the key/value cache of one sequence, one growable buffer per decoder layer.
// Layers may hold different numbers of entries (with Visual Tokens Withdrawal, layers >= K hold
// no image entries). Not thread-safe: owned by whoever runs the model (the engine thread).
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace vtw {

class KvCache {
 public:
  // `capacity_hint[l]` pre-sizes layer l (entries); the cache grows past it when needed.
  KvCache(int num_layers, int num_kv_heads, int head_dim, at::ScalarType dtype,
          const std::vector<int64_t>& capacity_hint = {});
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;
  KvCache(KvCache&&) = default;
  KvCache& operator=(KvCache&&) = default;

  int num_layers() const { return static_cast<int>(length_.size()); }
  at::ScalarType dtype() const { return dtype_; }
  // Entries held by `layer`.
  int64_t length(int layer) const { return length_[layer]; }

  // Appends `k`, `v` ([kv_heads, n, head_dim]) to `layer`.
  void Append(int layer, const at::Tensor& k, const at::Tensor& v);
  // Appends one entry from host memory: `k`, `v` point at [kv_heads, head_dim] contiguous values
  // of the cache's dtype. For CPU caches only; the decode path of LlavaModel::Forward, where
  // Append's tensor views and copies cost more than the 2 x kv_heads x head_dim values moved.
  void AppendOne(int layer, const void* k, const void* v);

  // Views of the held entries of `layer`: [kv_heads, length, head_dim]. Not contiguous unless
  // length == capacity (the heads are capacity entries apart).
  at::Tensor keys(int layer) const;
  at::Tensor values(int layer) const;

  // Entries `layer` can hold before it grows (0 before the first Append or hint).
  int64_t capacity(int layer) const { return k_[layer].defined() ? k_[layer].size(1) : 0; }
  // The whole buffers of `layer`, [kv_heads, capacity, head_dim], contiguous: the held entries
  // then zeros (entries at and past length() are always zero, never uninitialised memory, so a
  // product with a zero weight there is exactly zero). LlavaModel's decode attention reads these
  // instead of keys()/values(): LibTorch's bf16 batched matmul copies a non-contiguous operand
  // first, which made q.K^T of a 7B decode row 2.6x slower (docs/PERFORMANCE.md).
  const at::Tensor& key_buffer(int layer) const { return k_[layer]; }
  const at::Tensor& value_buffer(int layer) const { return v_[layer]; }

  // Bytes of the entries held (2 * kv_heads * head_dim * element size per entry and layer).
  int64_t bytes_used() const;
  // Bytes per entry and layer (keys and values).
  int64_t bytes_per_entry() const { return entry_bytes_; }

 private:
  void Reserve(int layer, int64_t entries);

  int num_kv_heads_;
  int head_dim_;
  at::ScalarType dtype_;
  int64_t entry_bytes_;
  std::vector<at::Tensor> k_;  // [kv_heads, capacity, head_dim] per layer; zero past length
  std::vector<at::Tensor> v_;
  std::vector<int64_t> length_;
};

}  // namespace vtw
