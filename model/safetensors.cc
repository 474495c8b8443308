// Safetensors reader (mmap + validation), sharded-directory loader, atomic writer and float
// conversions. See safetensors.h for contracts and thread-safety.
#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

namespace vtw {
namespace {

using Json = nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;  // 100 MiB, as in the reference impl.
constexpr uint64_t kMaxIndexBytes = uint64_t{100} << 20;
constexpr int kMaxJsonDepth = 16;  // a valid header nests 3 deep (object, entry, shape)
constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleName = "model.safetensors";

struct DTypeInfo {
  SafetensorsDType dtype;
  const char* name;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {SafetensorsDType::kF32, "F32", 4},   {SafetensorsDType::kF16, "F16", 2},
    {SafetensorsDType::kBF16, "BF16", 2}, {SafetensorsDType::kF64, "F64", 8},
    {SafetensorsDType::kI64, "I64", 8},   {SafetensorsDType::kI32, "I32", 4},
    {SafetensorsDType::kI16, "I16", 2},   {SafetensorsDType::kI8, "I8", 1},
    {SafetensorsDType::kU8, "U8", 1},     {SafetensorsDType::kBool, "BOOL", 1},
};

const DTypeInfo& Info(SafetensorsDType dtype) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.dtype == dtype) return info;
  }
  return kDTypes[0];  // unreachable for valid enum values
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// Product of dims with overflow checks. Returns false on a negative dim or overflow of
// numel or numel * elem_size.
bool CheckedByteSize(const std::vector<int64_t>& shape, size_t elem_size, int64_t* numel,
                     uint64_t* nbytes) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return false;
  }
  uint64_t b = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(n), static_cast<uint64_t>(elem_size), &b)) {
    return false;
  }
  *numel = n;
  *nbytes = b;
  return true;
}

// Thrown from the parse callback to abort parsing with a message.
struct JsonReject {
  std::string message;
};

// Parses [begin, end) as JSON, rejecting duplicate keys in any object and nesting deeper than
// kMaxJsonDepth. On failure returns false and sets *error.
bool ParseJsonStrict(const char* begin, const char* end, Json* out, std::string* error) {
  std::vector<std::set<std::string>> keys_stack;
  auto callback = [&keys_stack](int depth, Json::parse_event_t event, Json& parsed) -> bool {
    switch (event) {
      case Json::parse_event_t::object_start:
      case Json::parse_event_t::array_start:
        if (depth >= kMaxJsonDepth) {
          throw JsonReject{"JSON nesting deeper than " + std::to_string(kMaxJsonDepth)};
        }
        if (event == Json::parse_event_t::object_start) keys_stack.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        if (!keys_stack.empty()) keys_stack.pop_back();
        break;
      case Json::parse_event_t::key:
        if (!keys_stack.empty() && parsed.is_string()) {
          const std::string& key = parsed.get_ref<const std::string&>();
          if (!keys_stack.back().insert(key).second) {
            throw JsonReject{"duplicate key '" + key + "'"};
          }
        }
        break;
      default:
        break;
    }
    return true;
  };
  try {
    *out = Json::parse(begin, end, callback, /*allow_exceptions=*/true);
    return true;
  } catch (const JsonReject& e) {
    *error = e.message;
  } catch (const std::exception& e) {
    *error = e.what();
  }
  return false;
}

std::string Errno(int err) { return std::strerror(err); }

// Closes a file descriptor on scope exit unless released.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;
  int Release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

}  // namespace

size_t SafetensorsDTypeSize(SafetensorsDType dtype) { return Info(dtype).size; }

const char* SafetensorsDTypeName(SafetensorsDType dtype) { return Info(dtype).name; }

std::optional<SafetensorsDType> ParseSafetensorsDType(std::string_view name) {
  for (const DTypeInfo& info : kDTypes) {
    if (name == info.name) return info.dtype;
  }
  return std::nullopt;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// ----------------------------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

const TensorView* SafetensorsFile::Find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const std::string where = "safetensors file " + path + ": ";
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;

  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) return NotFound(where + "does not exist");
    return InvalidArgument(where + "cannot open: " + Errno(err));
  }
  FdCloser closer(fd);
  struct stat st;
  if (::fstat(fd, &st) != 0) return InvalidArgument(where + "cannot stat: " + Errno(errno));
  if (!S_ISREG(st.st_mode)) return InvalidArgument(where + "not a regular file");
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  const uint8_t* base = nullptr;
  if (file_size >= 8) {  // shorter files are rejected by Parse (and mmap of 0 bytes fails)
    void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) return Internal(where + "mmap failed: " + Errno(errno));
    file->map_ = map;
    base = static_cast<const uint8_t*>(map);
  }
  file->map_size_ = file_size;
  ::close(closer.Release());  // the mapping keeps the file alive
  VTW_RETURN_IF_ERROR(file->Parse(base, file_size));
  return file;
}

StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBytes(std::string bytes,
                                                                      const std::string& name) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = name;
  file->owned_ = std::move(bytes);
  file->map_size_ = file->owned_.size();
  VTW_RETURN_IF_ERROR(
      file->Parse(reinterpret_cast<const uint8_t*>(file->owned_.data()), file->owned_.size()));
  return file;
}

namespace {

// One tensor of the header, before its bytes are located in the file.
struct HeaderEntry {
  uint64_t begin;
  uint64_t end;
  TensorView view;
};

// The header entry `name` -> `value` (dtype, shape, data_offsets), checked on its own.
StatusOr<HeaderEntry> ParseHeaderEntry(const std::string& name, const Json& value,
                                       const std::string& where) {
  const std::string at = where + "tensor '" + name + "': ";
  if (!value.is_object()) return DataLoss(at + "entry is not a JSON object");
  auto dtype_it = value.find("dtype");
  auto shape_it = value.find("shape");
  auto offsets_it = value.find("data_offsets");
  if (dtype_it == value.end()) return DataLoss(at + "missing 'dtype'");
  if (shape_it == value.end()) return DataLoss(at + "missing 'shape'");
  if (offsets_it == value.end()) return DataLoss(at + "missing 'data_offsets'");
  if (!dtype_it->is_string()) return DataLoss(at + "'dtype' is not a string");
  const std::string& dtype_name = dtype_it->get_ref<const std::string&>();
  std::optional<SafetensorsDType> dtype = ParseSafetensorsDType(dtype_name);
  if (!dtype) return DataLoss(at + "unknown dtype '" + dtype_name + "'");

  if (!shape_it->is_array()) return DataLoss(at + "'shape' is not an array");
  std::vector<int64_t> shape;
  shape.reserve(shape_it->size());
  for (const Json& dim : *shape_it) {
    if (dim.is_number_unsigned()) {
      uint64_t d = dim.get<uint64_t>();
      if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return DataLoss(at + "shape dimension " + std::to_string(d) + " overflows int64");
      }
      shape.push_back(static_cast<int64_t>(d));
    } else if (dim.is_number_integer()) {
      return DataLoss(at + "negative shape dimension " + std::to_string(dim.get<int64_t>()));
    } else {
      return DataLoss(at + "shape entry " + dim.dump() + " is not an integer");
    }
  }
  int64_t numel = 0;
  uint64_t expected_bytes = 0;
  if (!CheckedByteSize(shape, SafetensorsDTypeSize(*dtype), &numel, &expected_bytes)) {
    return DataLoss(at + "byte size of shape " + ShapeString(shape) + " overflows");
  }

  const Json& offsets = *offsets_it;
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned()) {
    return DataLoss(at + "'data_offsets' " + offsets.dump() +
                    " is not two non-negative integers");
  }
  const uint64_t begin = offsets[0].get<uint64_t>();
  const uint64_t end = offsets[1].get<uint64_t>();
  if (begin > end) {
    return DataLoss(at + "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                    "] are decreasing");
  }
  if (end - begin != expected_bytes) {
    return DataLoss(at + "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                    "] span " + std::to_string(end - begin) + " bytes but shape " +
                    ShapeString(shape) + " of " + dtype_name + " needs " +
                    std::to_string(expected_bytes));
  }
  HeaderEntry entry{begin, end, TensorView{}};
  entry.view.name = name;
  entry.view.dtype = *dtype;
  entry.view.shape = std::move(shape);
  entry.view.nbytes = static_cast<size_t>(expected_bytes);
  return entry;
}

// Bounds and overlaps of the entries against a data section of `data_size` bytes. Sorts them.
Status CheckDataLayout(std::vector<HeaderEntry>& entries, uint64_t data_size,
                       const std::string& where) {
  // In data order: the first tensor reported is the first one affected
  // (for a truncated file, the one the cut runs through).
  std::sort(entries.begin(), entries.end(), [](const HeaderEntry& a, const HeaderEntry& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.view.name < b.view.name;
  });
  uint64_t covered_end = 0;
  const std::string* covered_by = nullptr;
  for (HeaderEntry& entry : entries) {
    const std::string at = where + "tensor '" + entry.view.name + "': ";
    if (entry.end > data_size) {
      return DataLoss(at + "data_offsets [" + std::to_string(entry.begin) + ", " +
                      std::to_string(entry.end) + "] extend beyond the data section of " +
                      std::to_string(data_size) + " bytes (file truncated?)");
    }
    if (entry.end == entry.begin) continue;  // empty tensors overlap nothing
    if (covered_by != nullptr && entry.begin < covered_end) {
      return DataLoss(at + "data_offsets [" + std::to_string(entry.begin) + ", " +
                      std::to_string(entry.end) + "] overlap tensor '" + *covered_by + "'");
    }
    covered_end = entry.end;
    covered_by = &entry.view.name;
  }

  return Status::Ok();
}

}  // namespace

Status SafetensorsFile::Parse(const uint8_t* base, uint64_t file_size) {
  const std::string where = "safetensors file " + path_ + ": ";
  SafetensorsFile* file = this;
  if (file_size < 8) {
    return DataLoss(where + "file is " + std::to_string(file_size) +
                    " bytes, shorter than the 8-byte header length prefix");
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];
  if (header_len > kMaxHeaderBytes) {
    return DataLoss(where + "header length " + std::to_string(header_len) +
                    " exceeds the limit of " + std::to_string(kMaxHeaderBytes) + " bytes");
  }
  if (header_len > file_size - 8) {
    return DataLoss(where + "header length " + std::to_string(header_len) + " exceeds the " +
                    std::to_string(file_size - 8) +
                    " bytes that follow the length prefix (file truncated?)");
  }
  const uint64_t data_size = file_size - 8 - header_len;
  const uint8_t* data = base + 8 + header_len;

  Json header;
  std::string json_error;
  const char* hbegin = reinterpret_cast<const char*>(base + 8);
  if (!ParseJsonStrict(hbegin, hbegin + header_len, &header, &json_error)) {
    return DataLoss(where + "header is not valid JSON: " + json_error);
  }
  if (!header.is_object()) {
    return DataLoss(where + "header is a JSON " + std::string(header.type_name()) +
                    ", expected an object");
  }

  std::vector<HeaderEntry> entries;
  entries.reserve(header.size());
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const Json& value = it.value();
    if (name == "__metadata__") {
      if (!value.is_object()) return DataLoss(where + "__metadata__ is not a JSON object");
      for (auto m = value.begin(); m != value.end(); ++m) {
        if (!m.value().is_string()) {
          return DataLoss(where + "__metadata__ value for key '" + m.key() + "' is not a string");
        }
        file->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    VTW_ASSIGN_OR_RETURN(HeaderEntry entry, ParseHeaderEntry(name, value, where));
    entries.push_back(std::move(entry));
  }
  // The first tensor reported is the first one affected (for a truncated file, the one the cut
  // runs through).
  VTW_RETURN_IF_ERROR(CheckDataLayout(entries, data_size, where));
  file->tensors_.reserve(entries.size());
  for (HeaderEntry& entry : entries) {
    entry.view.data = data + entry.begin;
    entry.view.file = &file->path_;
    file->by_name_.emplace(entry.view.name, file->tensors_.size());
    file->tensors_.push_back(std::move(entry.view));
  }
  return Status::Ok();
}

// ----------------------------------------------------------------------------------------------
// WeightStore

const TensorView* WeightStore::Find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

std::vector<std::string> WeightStore::Names() const {
  std::vector<std::string> names;
  names.reserve(by_name_.size());
  for (const auto& [name, view] : by_name_) names.push_back(name);
  return names;
}

StatusOr<std::map<std::string, std::vector<std::string>>> ParseShardIndex(
    std::string_view json_text, const std::string& where) {
  Json index;
  std::string json_error;
  if (!ParseJsonStrict(json_text.data(), json_text.data() + json_text.size(), &index,
                       &json_error)) {
    return DataLoss(where + "not valid JSON: " + json_error);
  }
  if (!index.is_object()) return DataLoss(where + "not a JSON object");
  auto map_it = index.find("weight_map");
  if (map_it == index.end() || !map_it->is_object()) {
    return DataLoss(where + "missing 'weight_map' object");
  }
  if (map_it->empty()) return DataLoss(where + "'weight_map' is empty");

  std::map<std::string, std::vector<std::string>> tensors_by_shard;
  for (auto it = map_it->begin(); it != map_it->end(); ++it) {
    if (!it.value().is_string()) {
      return DataLoss(where + "weight_map entry for tensor '" + it.key() + "' is not a string");
    }
    const std::string& shard = it.value().get_ref<const std::string&>();
    if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos ||
        shard.find('\0') != std::string::npos) {
      return DataLoss(where + "tensor '" + it.key() + "' maps to shard '" + shard +
                      "', which is not a plain file name");
    }
    tensors_by_shard[shard].push_back(it.key());
  }
  return tensors_by_shard;
}

StatusOr<std::unique_ptr<WeightStore>> WeightStore::OpenDirectory(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path root(dir);
  const std::string index_path = (root / kIndexName).string();
  const std::string single_path = (root / kSingleName).string();
  std::unique_ptr<WeightStore> store(new WeightStore());
  std::error_code ec;

  if (fs::exists(index_path, ec)) {
    const std::string where = "shard index " + index_path + ": ";
    std::error_code size_ec;
    const uintmax_t size = fs::file_size(index_path, size_ec);
    if (size_ec) return InvalidArgument(where + "cannot read: " + size_ec.message());
    if (size > kMaxIndexBytes) {
      return DataLoss(where + "file is " + std::to_string(size) + " bytes, over the limit of " +
                      std::to_string(kMaxIndexBytes));
    }
    std::ifstream in(index_path, std::ios::binary);
    if (!in) return InvalidArgument(where + "cannot open");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad()) return InvalidArgument(where + "read error");

    VTW_ASSIGN_OR_RETURN(auto tensors_by_shard, ParseShardIndex(text, where));
    for (const auto& [shard, names] : tensors_by_shard) {
      const std::string shard_path = (root / shard).string();
      auto opened = SafetensorsFile::Open(shard_path);
      if (!opened.ok()) {
        return Status(opened.status().code(),
                      where + "shard '" + shard + "': " + opened.status().message());
      }
      std::unique_ptr<SafetensorsFile> file = std::move(opened).value();
      for (const std::string& name : names) {
        if (file->Find(name) == nullptr) {
          return DataLoss(where + "tensor '" + name + "' is mapped to shard '" + shard + "' but " +
                          shard_path + " does not contain it");
        }
      }
      store->files_.push_back(std::move(file));
    }
  } else if (fs::exists(single_path, ec)) {
    VTW_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(single_path));
    store->files_.push_back(std::move(file));
  } else {
    std::string message = "no " + std::string(kSingleName) + " or " + kIndexName + " in " + dir;
    if (!fs::is_directory(root, ec)) message += " (not a directory)";
    return NotFound(message);
  }

  for (const auto& file : store->files_) {
    for (const TensorView& view : file->tensors()) {
      auto [it, inserted] = store->by_name_.emplace(view.name, &view);
      if (!inserted) {
        return DataLoss("tensor '" + view.name + "' appears in two shards: " + *it->second->file +
                        " and " + file->path());
      }
      store->total_bytes_ += view.nbytes;
    }
  }
  return store;
}

// ----------------------------------------------------------------------------------------------
// Float conversions

float Bf16ToFloat(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

uint16_t FloatToBf16RoundNearestEven(float value) {
  uint32_t u;
  std::memcpy(&u, &value, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep sign, force quiet
    return static_cast<uint16_t>((u >> 16) | 0x0040u);
  }
  const uint32_t lsb = (u >> 16) & 1u;
  u += 0x7fffu + lsb;  // may carry into the exponent: correct rounding up to the next binade/inf
  return static_cast<uint16_t>(u >> 16);
}

float F16ToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  uint32_t u;
  if (exponent == 0x1f) {  // inf / NaN
    u = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    u = sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // signed zero
    u = sign;
  } else {  // subnormal: mantissa * 2^-24, exact in float
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    std::memcpy(&u, &magnitude, sizeof(u));
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

uint16_t FloatToF16RoundNearestEven(float value) {
  uint32_t u;
  std::memcpy(&u, &value, sizeof(u));
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) {  // NaN: keep top mantissa bits, force quiet
    return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
  }
  if (abs >= 0x477ff000u) {  // >= 65520 rounds to infinity (also inf itself)
    return static_cast<uint16_t>(sign | 0x7c00u);
  }
  if (abs < 0x38800000u) {  // below 2^-14: subnormal half (or zero)
    // value = m * 2^-24 with m = |x| * 2^24 rounded to nearest even; exact in float arithmetic
    // since |x| < 2^-14 and the scaling is a power of two.
    float magnitude;
    std::memcpy(&magnitude, &abs, sizeof(magnitude));
    const float scaled = std::nearbyint(magnitude * 16777216.0f);  // default mode: ties-to-even
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(scaled));
  }
  // Normal half: rebias exponent, round the 13 dropped mantissa bits to nearest even.
  uint32_t rebased = abs - ((127u - 15u) << 23);
  const uint32_t lsb = (rebased >> 13) & 1u;
  rebased += 0x0fffu + lsb;
  return static_cast<uint16_t>(sign | (rebased >> 13));
}

StatusOr<std::vector<float>> ToFloatVector(const TensorView& view) {
  const size_t elem = SafetensorsDTypeSize(view.dtype);
  const size_t n = view.nbytes / elem;
  std::vector<float> out;
  switch (view.dtype) {
    case SafetensorsDType::kF32:
      out.resize(n);
      if (n > 0) std::memcpy(out.data(), view.data, n * sizeof(float));
      return out;
    case SafetensorsDType::kF16:
    case SafetensorsDType::kBF16: {
      out.resize(n);
      const bool is_bf16 = view.dtype == SafetensorsDType::kBF16;
      for (size_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, view.data + 2 * i, sizeof(bits));
        out[i] = is_bf16 ? Bf16ToFloat(bits) : F16ToFloat(bits);
      }
      return out;
    }
    default:
      return InvalidArgument("tensor '" + view.name + "'" +
                             (view.file != nullptr ? " in " + *view.file : std::string()) +
                             ": cannot convert dtype " + SafetensorsDTypeName(view.dtype) +
                             " to float (F32, F16 and BF16 only)");
  }
}

// ----------------------------------------------------------------------------------------------
// Writer

namespace {

Status WriteAll(int fd, const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status(StatusCode::kInternal, Errno(errno));
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return Status::Ok();
}

}  // namespace

Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  const std::string where = "writing safetensors file " + path + ": ";
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header["__metadata__"] = std::move(meta);
  }
  std::set<std::string_view> seen;
  uint64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    const std::string at = where + "tensor '" + t.name + "': ";
    if (t.name.empty()) return InvalidArgument(where + "empty tensor name");
    if (t.name == "__metadata__") return InvalidArgument(at + "reserved name");
    if (!seen.insert(t.name).second) return InvalidArgument(at + "duplicate name");
    int64_t numel = 0;
    uint64_t nbytes = 0;
    if (!CheckedByteSize(t.shape, SafetensorsDTypeSize(t.dtype), &numel, &nbytes)) {
      return InvalidArgument(at + "shape " + ShapeString(t.shape) +
                             " has a negative dimension or overflows");
    }
    if (nbytes != t.nbytes) {
      return InvalidArgument(at + "nbytes " + std::to_string(t.nbytes) +
                             " != " + std::to_string(nbytes) + " needed by shape " +
                             ShapeString(t.shape) + " of " + SafetensorsDTypeName(t.dtype));
    }
    if (t.data == nullptr && t.nbytes > 0) return InvalidArgument(at + "null data");
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = SafetensorsDTypeName(t.dtype);
    entry["shape"] = t.shape;
    entry["data_offsets"] = {offset, offset + nbytes};
    header[t.name] = std::move(entry);
    offset += nbytes;
  }
  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const std::exception& e) {
    return InvalidArgument(where +
                           "cannot encode header (names and metadata must be UTF-8): " + e.what());
  }
  while (header_text.size() % 8 != 0) header_text.push_back(' ');
  uint8_t prefix[8];
  uint64_t len = header_text.size();
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<uint8_t>(len >> (8 * i));

  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Internal(where + "cannot create " + tmp + ": " + Errno(errno));
  Status st = WriteAll(fd, prefix, sizeof(prefix));
  if (st.ok()) st = WriteAll(fd, header_text.data(), header_text.size());
  for (size_t i = 0; st.ok() && i < tensors.size(); ++i) {
    if (tensors[i].nbytes > 0) st = WriteAll(fd, tensors[i].data, tensors[i].nbytes);
  }
  if (st.ok() && ::fsync(fd) != 0) st = Status(StatusCode::kInternal, Errno(errno));
  if (::close(fd) != 0 && st.ok()) st = Status(StatusCode::kInternal, Errno(errno));
  if (st.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    st = Status(StatusCode::kInternal, "rename to " + path + " failed: " + Errno(errno));
  }
  if (!st.ok()) {
    ::unlink(tmp.c_str());
    return Internal(where + st.message());
  }
  return Status::Ok();
}

}  // namespace vtw
