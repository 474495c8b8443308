// Safetensors I/O, torch-free: a memory-mapped, fully validated reader (SafetensorsFile), a
// directory loader for single-file and sharded Hugging Face checkpoints (WeightStore), an atomic
// writer (WriteSafetensors) and bf16/f16 <-> f32 conversion helpers. Converting TensorViews to
// torch tensors happens elsewhere; nothing here depends on LibTorch.
//
// File format (https://github.com/huggingface/safetensors): u64 little-endian header length N,
// N bytes of UTF-8 JSON (an object; may be padded with trailing spaces), then the data section.
// Each JSON entry is "name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]} with
// offsets relative to the data section; "__metadata__" is an optional string -> string map.
//
// Thread-safety: SafetensorsFile and WeightStore are immutable after Open*/OpenDirectory, so
// concurrent const calls are safe. TensorView::data points into a read-only mapping that lives as
// long as its owning SafetensorsFile / WeightStore; the file must not be modified or truncated
// on disk while it is mapped (that would raise SIGBUS on access, which no check can prevent).
// The free functions are thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "model/status.h"

namespace vtw {

// Element types this project reads and writes (a subset of the safetensors dtypes).
enum class SafetensorsDType { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool };

// Bytes per element: 4, 2, 2, 8, 8, 4, 2, 1, 1, 1 respectively.
size_t SafetensorsDTypeSize(SafetensorsDType dtype);

// The on-disk name: "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL".
const char* SafetensorsDTypeName(SafetensorsDType dtype);

// Inverse of SafetensorsDTypeName (exact, case-sensitive match); nullopt for any other name.
std::optional<SafetensorsDType> ParseSafetensorsDType(std::string_view name);

// A validated, non-owning view of one tensor inside a mapped file. `data` may be unaligned
// (read it with memcpy) and is little-endian, C-contiguous. `file` points to the owner's path.
// Valid as long as the owning SafetensorsFile / WeightStore.
struct TensorView {
  std::string name;
  SafetensorsDType dtype = SafetensorsDType::kF32;
  std::vector<int64_t> shape;  // empty for a scalar
  const uint8_t* data = nullptr;
  size_t nbytes = 0;  // == numel() * SafetensorsDTypeSize(dtype), checked at open
  const std::string* file = nullptr;

  // Product of `shape` (1 for a scalar). Cannot overflow for views produced by this module.
  int64_t numel() const;
};

// One memory-mapped .safetensors file. Non-copyable and non-movable (views point into it); hold
// it by unique_ptr.
class SafetensorsFile {
 public:
  // Maps and validates `path`. Errors (every message names the file, and the tensor where one
  // is involved): NotFound if the file does not exist; InvalidArgument if it cannot be opened
  // or is not a regular file; DataLoss for any malformed content: shorter than 8 bytes, header
  // length > file size - 8 or > 100 MiB, header not a JSON object (duplicate keys included),
  // entries without a valid dtype/shape/data_offsets, negative or overflowing shapes, offsets
  // out of order or beyond the data section, byte size != numel * element size, overlapping
  // tensors, a non string->string __metadata__. Never allocates more than the file's size
  // (plus bounded per-entry overhead) based on its contents.
  static StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  // The same parser and checks as Open, over a complete file image held in memory (the object
  // keeps `bytes`; views point into that copy). `name` stands for the path in messages and in
  // path(). Open maps the file and runs exactly this code; the fuzz tests call it directly.
  static StatusOr<std::unique_ptr<SafetensorsFile>> FromBytes(std::string bytes,
                                                              const std::string& name);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // The tensor called `name`, or nullptr. Returned pointer lives as long as this object.
  const TensorView* Find(std::string_view name) const;

  // All tensors, ordered by their position in the data section (ties broken by name).
  const std::vector<TensorView>& tensors() const { return tensors_; }

  // The "__metadata__" map (empty when absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The path given to Open.
  const std::string& path() const { return path_; }

  // Total size of the file in bytes.
  size_t file_size() const { return map_size_; }

 private:
  SafetensorsFile() = default;

  // Validates the file image [base, base + size) (already mapped or owned by this object) and
  // fills tensors_, by_name_ and metadata_.
  Status Parse(const uint8_t* base, uint64_t size);

  std::string path_;
  void* map_ = nullptr;  // the mapping made by Open (nullptr for FromBytes)
  size_t map_size_ = 0;  // the file's size (also for FromBytes)
  std::string owned_;    // the file image given to FromBytes
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t, std::less<>> by_name_;  // name -> index in tensors_
  std::map<std::string, std::string> metadata_;
};

// The "weight_map" of a model.safetensors.index.json (its text in `json_text`): shard file name
// -> the tensors mapped to it, shards sorted by name. DataLoss, each message prefixed with
// `where`: not valid JSON (duplicate keys and nesting deeper than 16 included), not an object, a
// missing, non-object or empty weight_map, a non-string entry, or a shard that is not a plain
// file name (empty, ".", "..", containing '/' or NUL). WeightStore::OpenDirectory uses it.
StatusOr<std::map<std::string, std::vector<std::string>>> ParseShardIndex(
    std::string_view json_text, const std::string& where);

// All weights of a Hugging Face model directory, single-file or sharded. Non-copyable.
class WeightStore {
 public:
  // If DIR/model.safetensors.index.json exists, reads its "weight_map" (tensor -> shard file
  // name, a plain file name inside DIR), opens each shard once, and checks that every mapped
  // tensor is present in its shard (DataLoss naming tensor and shard) and that no tensor occurs
  // in two shards (DataLoss naming the tensor and both shards). A missing shard is NotFound
  // naming the shard's path. Tensors present in a shard but not listed in the map are kept.
  // Otherwise opens DIR/model.safetensors. With neither: NotFound
  // "no model.safetensors or model.safetensors.index.json in DIR". Errors from
  // SafetensorsFile::Open are passed through.
  static StatusOr<std::unique_ptr<WeightStore>> OpenDirectory(const std::string& dir);

  WeightStore(const WeightStore&) = delete;
  WeightStore& operator=(const WeightStore&) = delete;

  // The tensor called `name` in any file, or nullptr. Lives as long as this object.
  const TensorView* Find(std::string_view name) const;

  // Names of all tensors, sorted.
  std::vector<std::string> Names() const;

  // Sum of nbytes over all tensors (not counting headers).
  size_t total_bytes() const { return total_bytes_; }

  // The opened files, in shard-name order (one entry for a single-file checkpoint).
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  WeightStore() = default;

  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*, std::less<>> by_name_;
  size_t total_bytes_ = 0;
};

// bfloat16 bits -> float (exact).
float Bf16ToFloat(uint16_t bits);

// float -> bfloat16 bits, rounding to nearest, ties to even. NaN stays a (quiet) NaN with its
// sign; values that round past the largest finite bf16 become infinity.
uint16_t FloatToBf16RoundNearestEven(float value);

// IEEE binary16 bits -> float (exact), including subnormals, signed zeros, infinities and NaN.
float F16ToFloat(uint16_t bits);

// float -> IEEE binary16 bits, rounding to nearest, ties to even (subnormals, overflow to
// infinity, NaN kept quiet with its sign).
uint16_t FloatToF16RoundNearestEven(float value);

// The tensor's elements as floats. F32, F16 and BF16 only; other dtypes are InvalidArgument
// naming the tensor and its dtype.
StatusOr<std::vector<float>> ToFloatVector(const TensorView& view);

// One tensor for WriteSafetensors: `data` holds `nbytes` little-endian, C-contiguous bytes.
struct TensorToWrite {
  std::string name;
  SafetensorsDType dtype = SafetensorsDType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t nbytes = 0;
};

// Writes a safetensors file: header JSON ("__metadata__" first when non-empty, then the tensors
// in the given order) padded with spaces so the data section starts at a multiple of 8 bytes,
// then the tensor bytes in the given order. Written to `path` + ".tmp", fsync'ed, then renamed
// over `path`, so readers never see a partial file. InvalidArgument (naming the tensor) for an
// empty, duplicate or "__metadata__" name, a negative or overflowing shape, nbytes !=
// numel * element size, or null data with nbytes > 0; Internal for I/O failures (the temporary
// file is removed).
Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata);

}  // namespace vtw
