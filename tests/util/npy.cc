#include "tests/util/npy.h"

#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>
#include <stdexcept>

namespace vtw::testing {

int64_t NpyArray::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<float> NpyArray::AsFloat() const {
  if (dtype != "<f4") throw std::runtime_error("npy dtype is " + dtype + ", want <f4");
  std::vector<float> out(numel());
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

std::vector<uint8_t> NpyArray::AsUint8() const {
  if (dtype != "|u1") throw std::runtime_error("npy dtype is " + dtype + ", want |u1");
  return bytes;
}

NpyArray LoadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error("not npy: " + path);
  uint16_t header_len = 0;
  in.read(reinterpret_cast<char*>(&header_len), 2);
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  std::smatch m;
  NpyArray arr;
  if (!std::regex_search(header, m, std::regex("'descr': '([^']+)'")))
    throw std::runtime_error("npy header without descr: " + path);
  arr.dtype = m[1];
  if (header.find("'fortran_order': False") == std::string::npos)
    throw std::runtime_error("npy not C order: " + path);
  if (!std::regex_search(header, m, std::regex("'shape': \\(([^)]*)\\)")))
    throw std::runtime_error("npy header without shape: " + path);
  std::stringstream ss(m[1].str());
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.find_first_not_of(' ') == std::string::npos) continue;
    arr.shape.push_back(std::stoll(item));
  }
  size_t elem = arr.dtype == "|u1" ? 1 : (arr.dtype == "<f4" ? 4 : 8);
  arr.bytes.resize(static_cast<size_t>(arr.numel()) * elem);
  in.read(reinterpret_cast<char*>(arr.bytes.data()), arr.bytes.size());
  if (!in) throw std::runtime_error("npy truncated: " + path);
  return arr;
}

std::string TestDataPath(const std::string& relative) {
  return std::string(VTW_TEST_DATA_DIR) + "/" + relative;
}

}  // namespace vtw::testing
