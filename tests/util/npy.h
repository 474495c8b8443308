// Minimal reader for NumPy .npy v1.0 files (little-endian float32 / int64 / uint8, C order),
// used by the parity tests to load the Hugging Face oracle arrays.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vtw::testing {

struct NpyArray {
  std::string dtype;              // "<f4", "<i8", "|u1", ...
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;     // raw little-endian data

  int64_t numel() const;
  std::vector<float> AsFloat() const;     // requires dtype <f4
  std::vector<uint8_t> AsUint8() const;   // requires dtype |u1
};

// Loads `path`; aborts the test (via gtest FAIL semantics in the caller) by throwing
// std::runtime_error with the path when the file is missing or malformed.
NpyArray LoadNpy(const std::string& path);

// Absolute path of a file under tests/data.
std::string TestDataPath(const std::string& relative);

}  // namespace vtw::testing
