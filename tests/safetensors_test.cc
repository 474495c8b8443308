// Tests for model/safetensors.{h,cc}: the oracle checkpoint, writer round trips, sharded
// directories, float conversions, and rejection of every kind of malformed file.
#include "model/safetensors.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "tests/util/npy.h"

namespace vtw {
namespace {

namespace fs = std::filesystem;

std::string OraclePath() { return testing::TestDataPath("oracle/tiny-llava/model.safetensors"); }

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void WriteFile(const std::string& path, const std::string& bytes) {
  // Unlink instead of truncating: ext4 flushes truncated-and-rewritten files to disk on close,
  // which makes the corruption loop below take seconds.
  std::error_code ec;
  fs::remove(path, ec);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string LengthPrefix(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A raw safetensors file: length prefix + header text + data.
std::string RawFile(const std::string& header, const std::string& data) {
  return LengthPrefix(header.size()) + header + data;
}

std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> shape;
  std::string digits;
  for (char c : text) {
    if (c >= '0' && c <= '9') {
      digits.push_back(c);
    } else if (!digits.empty()) {
      shape.push_back(std::stoll(digits));
      digits.clear();
    }
  }
  return shape;
}

::testing::AssertionResult ErrorMentions(const Status& status, StatusCode code,
                                         const std::vector<std::string>& needles) {
  if (status.ok()) return ::testing::AssertionFailure() << "expected an error, got OK";
  if (status.code() != code) {
    return ::testing::AssertionFailure()
           << "code " << StatusCodeName(status.code()) << ", expected " << StatusCodeName(code)
           << ": " << status.message();
  }
  for (const std::string& needle : needles) {
    if (status.message().find(needle) == std::string::npos) {
      return ::testing::AssertionFailure()
             << "message does not mention '" << needle << "': " << status.message();
    }
  }
  return ::testing::AssertionSuccess();
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::path(::testing::TempDir()) / "safetensors_test_XXXXXX").string();
    ASSERT_NE(mkdtemp(pattern.data()), nullptr) << pattern;
    dir_ = pattern;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::string Path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  // Writes `bytes` to a fresh file and opens it; returns the status.
  Status OpenBytes(const std::string& name, const std::string& bytes) {
    WriteFile(Path(name), bytes);
    return SafetensorsFile::Open(Path(name)).status();
  }

  std::string dir_;
};

// ---------------------------------------------------------------------------------------------
// Oracle checkpoint

TEST_F(SafetensorsTest, OracleMatchesTensorList) {
  auto file = SafetensorsFile::Open(OraclePath());
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  const SafetensorsFile& f = **file;
  EXPECT_EQ(f.metadata().at("format"), "pt");

  std::ifstream list(testing::TestDataPath("oracle/tiny-llava/tensor_list.txt"));
  ASSERT_TRUE(list.good());
  std::string line;
  int rows = 0;
  while (std::getline(list, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    std::string name, shape_text, std_text;
    ASSERT_TRUE(std::getline(fields, name, '\t'));
    ASSERT_TRUE(std::getline(fields, shape_text, '\t'));
    ASSERT_TRUE(std::getline(fields, std_text, '\t'));
    ++rows;
    const TensorView* view = f.Find(name);
    ASSERT_NE(view, nullptr) << name;
    EXPECT_EQ(view->name, name);
    EXPECT_EQ(view->file, &f.path());
    EXPECT_EQ(view->dtype, SafetensorsDType::kF32) << name;
    EXPECT_EQ(view->shape, ParseShape(shape_text)) << name << " " << shape_text;
    EXPECT_EQ(view->nbytes, static_cast<size_t>(view->numel()) * 4) << name;

    auto values = ToFloatVector(*view);
    ASSERT_TRUE(values.ok()) << values.status().ToString();
    ASSERT_EQ(values->size(), static_cast<size_t>(view->numel()));
    double sum = 0;
    for (float v : *values) {
      ASSERT_TRUE(std::isfinite(v)) << name;
      sum += v;
    }
    const double mean = sum / values->size();
    double sq = 0;
    for (float v : *values) sq += (v - mean) * (v - mean);
    // The list uses the sample standard deviation (torch.std), printed with 5 decimals.
    const double std_dev = values->size() > 1 ? std::sqrt(sq / (values->size() - 1)) : 0.0;
    EXPECT_NEAR(std_dev, std::stod(std_text), 1e-4) << name;
  }
  EXPECT_GT(rows, 90);  // 98 in the shipped checkpoint
  EXPECT_EQ(f.tensors().size(), static_cast<size_t>(rows));

  // tensors() is in data order, contiguous, and starts at the data section.
  for (size_t i = 1; i < f.tensors().size(); ++i) {
    EXPECT_EQ(f.tensors()[i - 1].data + f.tensors()[i - 1].nbytes, f.tensors()[i].data);
  }
  EXPECT_EQ(f.Find("no.such.tensor"), nullptr);
}

TEST_F(SafetensorsTest, OracleDirectoryAsWeightStore) {
  auto store = WeightStore::OpenDirectory(testing::TestDataPath("oracle/tiny-llava"));
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  auto file = SafetensorsFile::Open(OraclePath());
  ASSERT_TRUE(file.ok());
  size_t total = 0;
  for (const TensorView& v : (*file)->tensors()) total += v.nbytes;
  EXPECT_EQ((*store)->total_bytes(), total);
  const std::vector<std::string> names = (*store)->Names();
  EXPECT_EQ(names.size(), (*file)->tensors().size());
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
  const TensorView* lm_head = (*store)->Find("language_model.lm_head.weight");
  ASSERT_NE(lm_head, nullptr);
  EXPECT_EQ(lm_head->shape, (std::vector<int64_t>{402, 64}));
}

TEST_F(SafetensorsTest, TruncatedOracleNamesTheCutTensor) {
  const std::string bytes = ReadFile(OraclePath());
  ASSERT_GT(bytes.size(), 1000u);
  auto intact = SafetensorsFile::Open(OraclePath());
  ASSERT_TRUE(intact.ok());
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  const size_t data_start = 8 + header_len;
  // The oracle's first tensor (in data order) starts at data offset 0.
  const uint8_t* base = (*intact)->tensors().front().data;
  ASSERT_EQ(std::memcmp(base, bytes.data() + data_start, 64), 0);
  const size_t cut = data_start + (bytes.size() - data_start) / 2 + 3;
  // The tensor the cut runs through: the first (in data order) whose end is past the cut.
  std::string victim;
  for (const TensorView& v : (*intact)->tensors()) {
    const size_t end = data_start + static_cast<size_t>(v.data - base) + v.nbytes;
    if (end > cut) {
      victim = v.name;
      break;
    }
  }
  ASSERT_FALSE(victim.empty());
  const std::string path = Path("truncated.safetensors");
  WriteFile(path, bytes.substr(0, cut));
  auto file = SafetensorsFile::Open(path);
  EXPECT_TRUE(ErrorMentions(file.status(), StatusCode::kDataLoss,
                            {path, "tensor '" + victim + "'", "beyond the data section"}));
}

// ---------------------------------------------------------------------------------------------
// Writer round trip

TEST_F(SafetensorsTest, WriterRoundTripF32F16Bf16) {
  const std::vector<float> f32 = {1.0f, -2.5f, 3.25f, 0.0f, 1e-8f, -65504.0f};
  const std::vector<uint16_t> f16 = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x7c00, 0x8000};
  std::vector<uint16_t> bf16;
  for (float v : f32) bf16.push_back(FloatToBf16RoundNearestEven(v));
  const std::vector<int64_t> i64 = {-1, 2, std::numeric_limits<int64_t>::max()};
  const uint8_t flag = 1;

  const std::vector<TensorToWrite> tensors = {
      {"z.f32", SafetensorsDType::kF32, {2, 3}, f32.data(), f32.size() * 4},
      {"a.f16", SafetensorsDType::kF16, {6}, f16.data(), f16.size() * 2},
      {"m.bf16", SafetensorsDType::kBF16, {3, 2}, bf16.data(), bf16.size() * 2},
      {"ids", SafetensorsDType::kI64, {3}, i64.data(), i64.size() * 8},
      {"scalar", SafetensorsDType::kBool, {}, &flag, 1},
      {"empty", SafetensorsDType::kF32, {0, 4}, nullptr, 0},
  };
  const std::string path = Path("round.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}, {"note", "héllo"}}).ok());
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  const std::string bytes = ReadFile(path);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ(header_len % 8, 0u);
  EXPECT_EQ(bytes[8], '{');

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  const SafetensorsFile& f = **file;
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.metadata().at("note"), "héllo");
  ASSERT_EQ(f.tensors().size(), tensors.size());
  // Data order is the given order ("empty" has no bytes and sorts by offset, then name).
  EXPECT_EQ(f.tensors()[0].name, "z.f32");
  EXPECT_EQ(f.tensors()[1].name, "a.f16");
  EXPECT_EQ(f.tensors()[2].name, "m.bf16");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(f.tensors()[0].data) % 8, 0u);  // data 8-aligned

  const TensorView* v32 = f.Find("z.f32");
  ASSERT_NE(v32, nullptr);
  EXPECT_EQ(v32->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(*ToFloatVector(*v32), f32);

  const TensorView* v16 = f.Find("a.f16");
  ASSERT_NE(v16, nullptr);
  EXPECT_EQ(std::memcmp(v16->data, f16.data(), 12), 0);
  auto h = ToFloatVector(*v16);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ((*h)[0], 1.0f);
  EXPECT_EQ((*h)[1], -2.0f);
  EXPECT_EQ((*h)[2], 65504.0f);
  EXPECT_EQ((*h)[3], std::ldexp(1.0f, -24));
  EXPECT_TRUE(std::isinf((*h)[4]));
  EXPECT_TRUE(std::signbit((*h)[5]));

  const TensorView* vb = f.Find("m.bf16");
  ASSERT_NE(vb, nullptr);
  auto b = ToFloatVector(*vb);
  ASSERT_TRUE(b.ok());
  for (size_t i = 0; i < f32.size(); ++i) {
    EXPECT_EQ((*b)[i], Bf16ToFloat(bf16[i]));
    EXPECT_NEAR((*b)[i], f32[i], std::fabs(f32[i]) / 128) << i;
  }

  const TensorView* vi = f.Find("ids");
  ASSERT_NE(vi, nullptr);
  EXPECT_EQ(std::memcmp(vi->data, i64.data(), 24), 0);
  auto not_float = ToFloatVector(*vi);
  EXPECT_TRUE(
      ErrorMentions(not_float.status(), StatusCode::kInvalidArgument, {"ids", "I64", path}));

  const TensorView* vs = f.Find("scalar");
  ASSERT_NE(vs, nullptr);
  EXPECT_TRUE(vs->shape.empty());
  EXPECT_EQ(vs->numel(), 1);
  EXPECT_EQ(vs->data[0], 1);

  const TensorView* ve = f.Find("empty");
  ASSERT_NE(ve, nullptr);
  EXPECT_EQ(ve->numel(), 0);
  EXPECT_EQ(ve->nbytes, 0u);
  EXPECT_TRUE(ToFloatVector(*ve)->empty());

  // Overwriting an existing file replaces it.
  ASSERT_TRUE(WriteSafetensors(path, {tensors[0]}, {}).ok());
  auto again = SafetensorsFile::Open(path);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)->tensors().size(), 1u);
  EXPECT_TRUE((*again)->metadata().empty());
}

TEST_F(SafetensorsTest, WriterRejectsBadInput) {
  const float data[4] = {1, 2, 3, 4};
  const std::string path = Path("bad.safetensors");
  EXPECT_TRUE(
      ErrorMentions(WriteSafetensors(path, {{"w", SafetensorsDType::kF32, {2, 3}, data, 16}}, {}),
                    StatusCode::kInvalidArgument, {"'w'", "nbytes 16", "24"}));
  EXPECT_TRUE(
      ErrorMentions(WriteSafetensors(path, {{"w", SafetensorsDType::kF32, {-4}, data, 16}}, {}),
                    StatusCode::kInvalidArgument, {"'w'", "negative"}));
  EXPECT_TRUE(ErrorMentions(WriteSafetensors(path,
                                             {{"w", SafetensorsDType::kF32, {4}, data, 16},
                                              {"w", SafetensorsDType::kF32, {4}, data, 16}},
                                             {}),
                            StatusCode::kInvalidArgument, {"'w'", "duplicate"}));
  EXPECT_TRUE(ErrorMentions(
      WriteSafetensors(path, {{"__metadata__", SafetensorsDType::kF32, {4}, data, 16}}, {}),
      StatusCode::kInvalidArgument, {"__metadata__"}));
  EXPECT_TRUE(
      ErrorMentions(WriteSafetensors(path, {{"w", SafetensorsDType::kF32, {4}, nullptr, 16}}, {}),
                    StatusCode::kInvalidArgument, {"'w'", "null"}));
  EXPECT_TRUE(ErrorMentions(
      WriteSafetensors(path, {{"bad\xff", SafetensorsDType::kF32, {4}, data, 16}}, {}),
      StatusCode::kInvalidArgument, {"UTF-8"}));
  EXPECT_TRUE(ErrorMentions(WriteSafetensors(Path("no/such/dir/x.safetensors"),
                                             {{"w", SafetensorsDType::kF32, {4}, data, 16}}, {}),
                            StatusCode::kInternal, {"no/such/dir/x.safetensors"}));
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

// ---------------------------------------------------------------------------------------------
// Reader: accepted variants

TEST_F(SafetensorsTest, PaddedHeaderAndOutOfOrderOffsets) {
  // "b" comes first in the data although it sorts second in JSON; header padded with spaces.
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},)"
                             R"("b":{"dtype":"U8","shape":[2,4],"data_offsets":[0,8]},)"
                             R"("e":{"dtype":"F32","shape":[0],"data_offsets":[16,16]},)"
                             R"("__metadata__":{"k":"v"}}            )";
  std::string data = "ABCDEFGH";
  const float a[2] = {0.5f, -1.0f};
  data.append(reinterpret_cast<const char*>(a), sizeof(a));
  const std::string path = Path("padded.safetensors");
  WriteFile(path, RawFile(header, data));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  const SafetensorsFile& f = **file;
  ASSERT_EQ(f.tensors().size(), 3u);
  EXPECT_EQ(f.tensors()[0].name, "b");
  EXPECT_EQ(f.tensors()[1].name, "a");
  EXPECT_EQ(f.tensors()[2].name, "e");
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(f.Find("b")->data), 8), "ABCDEFGH");
  EXPECT_EQ(*ToFloatVector(*f.Find("a")), (std::vector<float>{0.5f, -1.0f}));
  EXPECT_EQ(f.metadata().at("k"), "v");
  EXPECT_EQ(f.file_size(), 8 + header.size() + data.size());
}

// ---------------------------------------------------------------------------------------------
// Reader: rejected files. Every message names the file and, where one is involved, the tensor.

TEST_F(SafetensorsTest, MissingFile) {
  const std::string path = Path("absent.safetensors");
  EXPECT_TRUE(ErrorMentions(SafetensorsFile::Open(path).status(), StatusCode::kNotFound,
                            {path, "does not exist"}));
  EXPECT_TRUE(ErrorMentions(SafetensorsFile::Open(dir_).status(), StatusCode::kInvalidArgument,
                            {dir_, "not a regular file"}));
}

TEST_F(SafetensorsTest, EmptyFile) {
  EXPECT_TRUE(ErrorMentions(OpenBytes("empty.safetensors", ""), StatusCode::kDataLoss,
                            {Path("empty.safetensors"), "0 bytes"}));
}

TEST_F(SafetensorsTest, FiveByteFile) {
  EXPECT_TRUE(ErrorMentions(OpenBytes("five.safetensors", "12345"), StatusCode::kDataLoss,
                            {Path("five.safetensors"), "5 bytes"}));
}

TEST_F(SafetensorsTest, HeaderLengthLargerThanFile) {
  EXPECT_TRUE(ErrorMentions(OpenBytes("long.safetensors", LengthPrefix(1000) + "{}"),
                            StatusCode::kDataLoss,
                            {Path("long.safetensors"), "header length 1000 exceeds"}));
}

TEST_F(SafetensorsTest, HeaderLengthTwoToThe40) {
  EXPECT_TRUE(ErrorMentions(OpenBytes("huge.safetensors", LengthPrefix(uint64_t{1} << 40) + "{}"),
                            StatusCode::kDataLoss,
                            {Path("huge.safetensors"), "header length 1099511627776 exceeds"}));
  EXPECT_TRUE(ErrorMentions(OpenBytes("max.safetensors", LengthPrefix(~uint64_t{0}) + "{}"),
                            StatusCode::kDataLoss,
                            {Path("max.safetensors"), "header length 18446744073709551615"}));
}

TEST_F(SafetensorsTest, NonJsonHeader) {
  EXPECT_TRUE(ErrorMentions(OpenBytes("nonjson.safetensors", RawFile("{not json", "")),
                            StatusCode::kDataLoss,
                            {Path("nonjson.safetensors"), "not valid JSON"}));
  EXPECT_TRUE(ErrorMentions(OpenBytes("zero.safetensors", RawFile("", "")), StatusCode::kDataLoss,
                            {Path("zero.safetensors"), "not valid JSON"}));
  EXPECT_TRUE(ErrorMentions(
      OpenBytes("deep.safetensors", RawFile(std::string(5000, '[') + std::string(5000, ']'), "")),
      StatusCode::kDataLoss, {Path("deep.safetensors"), "nesting"}));
}

TEST_F(SafetensorsTest, JsonArrayHeader) {
  EXPECT_TRUE(ErrorMentions(OpenBytes("array.safetensors", RawFile("[1, 2]", "")),
                            StatusCode::kDataLoss,
                            {Path("array.safetensors"), "array", "expected an object"}));
}

TEST_F(SafetensorsTest, EntryNotAnObject) {
  EXPECT_TRUE(ErrorMentions(OpenBytes("entry.safetensors", RawFile(R"({"w": 3})", "")),
                            StatusCode::kDataLoss,
                            {Path("entry.safetensors"), "tensor 'w'", "not a JSON object"}));
}

TEST_F(SafetensorsTest, MissingDataOffsets) {
  EXPECT_TRUE(ErrorMentions(
      OpenBytes("nooff.safetensors", RawFile(R"({"w":{"dtype":"F32","shape":[1]}})", "abcd")),
      StatusCode::kDataLoss, {Path("nooff.safetensors"), "tensor 'w'", "data_offsets"}));
  EXPECT_TRUE(
      ErrorMentions(OpenBytes("nodtype.safetensors",
                              RawFile(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", "abcd")),
                    StatusCode::kDataLoss, {Path("nodtype.safetensors"), "tensor 'w'", "dtype"}));
  EXPECT_TRUE(
      ErrorMentions(OpenBytes("noshape.safetensors",
                              RawFile(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", "abcd")),
                    StatusCode::kDataLoss, {Path("noshape.safetensors"), "tensor 'w'", "shape"}));
}

TEST_F(SafetensorsTest, UnknownDtype) {
  EXPECT_TRUE(ErrorMentions(
      OpenBytes("f8.safetensors",
                RawFile(R"({"w":{"dtype":"F8","shape":[4],"data_offsets":[0,4]}})", "abcd")),
      StatusCode::kDataLoss, {Path("f8.safetensors"), "tensor 'w'", "unknown dtype 'F8'"}));
}

TEST_F(SafetensorsTest, OffsetsBeyondFile) {
  EXPECT_TRUE(ErrorMentions(
      OpenBytes("beyond.safetensors",
                RawFile(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", "abcd")),
      StatusCode::kDataLoss, {Path("beyond.safetensors"), "tensor 'w'", "beyond"}));
  EXPECT_TRUE(ErrorMentions(
      OpenBytes("bigoff.safetensors",
                RawFile(R"({"w":{"dtype":"U8","shape":[0],)"
                        R"("data_offsets":[18446744073709551615,18446744073709551615]}})",
                        "abcd")),
      StatusCode::kDataLoss, {Path("bigoff.safetensors"), "tensor 'w'", "beyond"}));
}

TEST_F(SafetensorsTest, MalformedOffsets) {
  for (const char* offsets : {"[0]", "[0,4,8]", "[4,0]", "[-1,3]", "[0,4.0]", "\"0,4\""}) {
    SCOPED_TRACE(offsets);
    const std::string header =
        std::string(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":)") + offsets + "}}";
    EXPECT_TRUE(ErrorMentions(OpenBytes("off.safetensors", RawFile(header, "abcd")),
                              StatusCode::kDataLoss,
                              {Path("off.safetensors"), "tensor 'w'", "data_offsets"}));
  }
}

TEST_F(SafetensorsTest, NbytesInconsistentWithShape) {
  EXPECT_TRUE(ErrorMentions(
      OpenBytes(
          "size.safetensors",
          RawFile(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "abcdefghijkl")),
      StatusCode::kDataLoss, {Path("size.safetensors"), "tensor 'w'", "span 8 bytes", "12"}));
}

TEST_F(SafetensorsTest, OverlappingTensors) {
  EXPECT_TRUE(ErrorMentions(
      OpenBytes("overlap.safetensors",
                RawFile(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                        R"("b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
                        "abcdef")),
      StatusCode::kDataLoss, {Path("overlap.safetensors"), "tensor 'b'", "overlap", "'a'"}));
  // Identical ranges overlap too.
  EXPECT_TRUE(
      ErrorMentions(OpenBytes("same.safetensors",
                              RawFile(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                                      R"("b":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})",
                                      "abcd")),
                    StatusCode::kDataLoss, {Path("same.safetensors"), "overlap"}));
}

TEST_F(SafetensorsTest, NegativeAndOverflowingShape) {
  EXPECT_TRUE(ErrorMentions(
      OpenBytes("neg.safetensors",
                RawFile(R"({"w":{"dtype":"U8","shape":[-1,4],"data_offsets":[0,4]}})", "abcd")),
      StatusCode::kDataLoss, {Path("neg.safetensors"), "tensor 'w'", "negative"}));
  EXPECT_TRUE(ErrorMentions(
      OpenBytes("ovf.safetensors", RawFile(R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],)"
                                           R"("data_offsets":[0,0]}})",
                                           "")),
      StatusCode::kDataLoss, {Path("ovf.safetensors"), "tensor 'w'", "overflow"}));
  EXPECT_TRUE(ErrorMentions(
      OpenBytes("ovf2.safetensors", RawFile(R"({"w":{"dtype":"F64","shape":[2305843009213693952],)"
                                            R"("data_offsets":[0,0]}})",
                                            "")),
      StatusCode::kDataLoss, {Path("ovf2.safetensors"), "tensor 'w'", "overflow"}));
  EXPECT_TRUE(ErrorMentions(
      OpenBytes("big.safetensors", RawFile(R"({"w":{"dtype":"U8","shape":[18446744073709551615],)"
                                           R"("data_offsets":[0,0]}})",
                                           "")),
      StatusCode::kDataLoss, {Path("big.safetensors"), "tensor 'w'", "overflow"}));
  EXPECT_TRUE(ErrorMentions(
      OpenBytes("frac.safetensors",
                RawFile(R"({"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,0]}})", "")),
      StatusCode::kDataLoss, {Path("frac.safetensors"), "tensor 'w'", "not an integer"}));
}

TEST_F(SafetensorsTest, DuplicateNames) {
  EXPECT_TRUE(
      ErrorMentions(OpenBytes("dup.safetensors",
                              RawFile(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                                      R"("w":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                                      "abcdefgh")),
                    StatusCode::kDataLoss, {Path("dup.safetensors"), "duplicate key 'w'"}));
  // Duplicate keys inside an entry are just as ambiguous.
  EXPECT_TRUE(ErrorMentions(
      OpenBytes("dup2.safetensors",
                RawFile(R"({"w":{"dtype":"U8","dtype":"F32","shape":[4],"data_offsets":[0,4]}})",
                        "abcd")),
      StatusCode::kDataLoss, {Path("dup2.safetensors"), "duplicate key 'dtype'"}));
}

TEST_F(SafetensorsTest, BadMetadata) {
  EXPECT_TRUE(
      ErrorMentions(OpenBytes("meta.safetensors", RawFile(R"({"__metadata__":{"k":1}})", "")),
                    StatusCode::kDataLoss, {Path("meta.safetensors"), "__metadata__", "'k'"}));
  EXPECT_TRUE(ErrorMentions(OpenBytes("meta2.safetensors", RawFile(R"({"__metadata__":[]})", "")),
                            StatusCode::kDataLoss, {Path("meta2.safetensors"), "__metadata__"}));
}

// Random corruption of a valid file must produce a Status, never a crash (run under ASan/UBSan
// with -DVTW_SANITIZE=ON to make this meaningful).
TEST_F(SafetensorsTest, CorruptionNeverCrashes) {
  const float data[6] = {1, 2, 3, 4, 5, 6};
  const std::string path = Path("valid.safetensors");
  ASSERT_TRUE(WriteSafetensors(path,
                               {{"a", SafetensorsDType::kF32, {2, 2}, data, 16},
                                {"b", SafetensorsDType::kBF16, {4}, data + 4, 8}},
                               {{"format", "pt"}})
                  .ok());
  const std::string valid = ReadFile(path);
  // Every truncation.
  for (size_t n = 0; n < valid.size(); ++n) {
    auto st = OpenBytes("cut.safetensors", valid.substr(0, n));
    EXPECT_FALSE(st.ok()) << n;
  }
  // Random byte flips.
  std::mt19937 rng(1234);
  int accepted = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    std::string bytes = valid;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int i = 0; i < flips; ++i) {
      bytes[rng() % bytes.size()] = static_cast<char>(rng() & 0xff);
    }
    WriteFile(Path("flip.safetensors"), bytes);
    auto file = SafetensorsFile::Open(Path("flip.safetensors"));
    if (file.ok()) {
      ++accepted;
      for (const TensorView& v : (*file)->tensors()) {
        ASSERT_LE(v.nbytes, bytes.size());
        if (auto floats = ToFloatVector(v); floats.ok()) {
          EXPECT_EQ(floats->size(), static_cast<size_t>(v.numel()));
        }
      }
    }
  }
  EXPECT_GT(accepted, 0);  // flips in the data section are legitimately accepted
}

// ---------------------------------------------------------------------------------------------
// WeightStore

class WeightStoreTest : public SafetensorsTest {
 protected:
  void WriteShards() {
    ASSERT_TRUE(WriteSafetensors(Path("model-00001-of-00002.safetensors"),
                                 {{"layer.0.w", SafetensorsDType::kF32, {2}, a_, 8},
                                  {"layer.0.b", SafetensorsDType::kF32, {1}, a_ + 2, 4}},
                                 {{"format", "pt"}})
                    .ok());
    ASSERT_TRUE(WriteSafetensors(Path("model-00002-of-00002.safetensors"),
                                 {{"layer.1.w", SafetensorsDType::kF32, {3}, b_, 12}},
                                 {{"format", "pt"}})
                    .ok());
  }
  void WriteIndex(const std::string& weight_map) {
    WriteFile(Path("model.safetensors.index.json"),
              R"({"metadata":{"total_size":24},"weight_map":)" + weight_map + "}");
  }
  const float a_[3] = {1, 2, 3};
  const float b_[3] = {4, 5, 6};
};

TEST_F(WeightStoreTest, ShardedDirectory) {
  WriteShards();
  WriteIndex(R"({"layer.0.w":"model-00001-of-00002.safetensors",)"
             R"("layer.0.b":"model-00001-of-00002.safetensors",)"
             R"("layer.1.w":"model-00002-of-00002.safetensors"})");
  auto store = WeightStore::OpenDirectory(dir_);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  const WeightStore& s = **store;
  EXPECT_EQ(s.Names(), (std::vector<std::string>{"layer.0.b", "layer.0.w", "layer.1.w"}));
  EXPECT_EQ(s.total_bytes(), 24u);
  EXPECT_EQ(s.files().size(), 2u);
  const TensorView* w0 = s.Find("layer.0.w");
  const TensorView* w1 = s.Find("layer.1.w");
  ASSERT_NE(w0, nullptr);
  ASSERT_NE(w1, nullptr);
  EXPECT_EQ(*w0->file, Path("model-00001-of-00002.safetensors"));
  EXPECT_EQ(*w1->file, Path("model-00002-of-00002.safetensors"));
  EXPECT_EQ(*ToFloatVector(*w0), (std::vector<float>{1, 2}));
  EXPECT_EQ(*ToFloatVector(*w1), (std::vector<float>{4, 5, 6}));
  EXPECT_EQ(s.Find("layer.2.w"), nullptr);
}

TEST_F(WeightStoreTest, IndexTakesPrecedenceOverSingleFile) {
  WriteShards();
  WriteIndex(R"({"layer.1.w":"model-00002-of-00002.safetensors"})");
  WriteFile(Path("model.safetensors"), "garbage");
  auto store = WeightStore::OpenDirectory(dir_);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  EXPECT_NE((*store)->Find("layer.1.w"), nullptr);
}

TEST_F(WeightStoreTest, SingleFileDirectory) {
  ASSERT_TRUE(
      WriteSafetensors(Path("model.safetensors"), {{"w", SafetensorsDType::kF32, {3}, a_, 12}}, {})
          .ok());
  auto store = WeightStore::OpenDirectory(dir_);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  EXPECT_EQ((*store)->Names(), std::vector<std::string>{"w"});
  EXPECT_EQ((*store)->total_bytes(), 12u);
}

TEST_F(WeightStoreTest, IndexNamesMissingShard) {
  WriteShards();
  WriteIndex(R"({"layer.0.w":"model-00001-of-00002.safetensors",)"
             R"("layer.9.w":"model-00003-of-00003.safetensors"})");
  EXPECT_TRUE(ErrorMentions(WeightStore::OpenDirectory(dir_).status(), StatusCode::kNotFound,
                            {Path("model-00003-of-00003.safetensors"), "does not exist"}));
}

TEST_F(WeightStoreTest, IndexNamesTensorNotInShard) {
  WriteShards();
  WriteIndex(R"({"layer.0.w":"model-00001-of-00002.safetensors",)"
             R"("layer.1.w":"model-00001-of-00002.safetensors"})");
  EXPECT_TRUE(ErrorMentions(WeightStore::OpenDirectory(dir_).status(), StatusCode::kDataLoss,
                            {"tensor 'layer.1.w'", "model-00001-of-00002.safetensors"}));
}

TEST_F(WeightStoreTest, TensorInTwoShards) {
  ASSERT_TRUE(
      WriteSafetensors(Path("s1.safetensors"), {{"w", SafetensorsDType::kF32, {1}, a_, 4}}, {})
          .ok());
  ASSERT_TRUE(WriteSafetensors(Path("s2.safetensors"),
                               {{"w", SafetensorsDType::kF32, {1}, b_, 4},
                                {"v", SafetensorsDType::kF32, {1}, b_, 4}},
                               {})
                  .ok());
  WriteIndex(R"({"w":"s1.safetensors","v":"s2.safetensors"})");
  EXPECT_TRUE(ErrorMentions(WeightStore::OpenDirectory(dir_).status(), StatusCode::kDataLoss,
                            {"tensor 'w'", Path("s1.safetensors"), Path("s2.safetensors")}));
}

TEST_F(WeightStoreTest, BadIndex) {
  WriteShards();
  WriteFile(Path("model.safetensors.index.json"), "{oops");
  EXPECT_TRUE(ErrorMentions(WeightStore::OpenDirectory(dir_).status(), StatusCode::kDataLoss,
                            {Path("model.safetensors.index.json"), "not valid JSON"}));
  WriteFile(Path("model.safetensors.index.json"), R"({"metadata":{}})");
  EXPECT_TRUE(ErrorMentions(WeightStore::OpenDirectory(dir_).status(), StatusCode::kDataLoss,
                            {"weight_map"}));
  WriteIndex(R"({"w":"../model-00001-of-00002.safetensors"})");
  EXPECT_TRUE(ErrorMentions(WeightStore::OpenDirectory(dir_).status(), StatusCode::kDataLoss,
                            {"tensor 'w'", "plain file name"}));
  WriteIndex(R"({"w":7})");
  EXPECT_TRUE(ErrorMentions(WeightStore::OpenDirectory(dir_).status(), StatusCode::kDataLoss,
                            {"tensor 'w'"}));
}

TEST_F(WeightStoreTest, CorruptShardNamesFile) {
  WriteShards();
  WriteFile(Path("model-00002-of-00002.safetensors"), "12345");
  WriteIndex(R"({"layer.0.w":"model-00001-of-00002.safetensors",)"
             R"("layer.1.w":"model-00002-of-00002.safetensors"})");
  EXPECT_TRUE(ErrorMentions(WeightStore::OpenDirectory(dir_).status(), StatusCode::kDataLoss,
                            {Path("model-00002-of-00002.safetensors")}));
}

TEST_F(WeightStoreTest, DirectoryWithoutWeights) {
  EXPECT_TRUE(ErrorMentions(WeightStore::OpenDirectory(dir_).status(), StatusCode::kNotFound,
                            {"no model.safetensors or model.safetensors.index.json in " + dir_}));
  EXPECT_TRUE(
      ErrorMentions(WeightStore::OpenDirectory(Path("nope")).status(), StatusCode::kNotFound,
                    {"no model.safetensors or model.safetensors.index.json in " + Path("nope")}));
}

// ---------------------------------------------------------------------------------------------
// Float conversions

TEST(FloatConversionTest, Bf16) {
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(Bf16ToFloat(0xc000), -2.0f);
  EXPECT_TRUE(std::isinf(Bf16ToFloat(0x7f80)));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(0x7fc0)));
  EXPECT_EQ(FloatToBf16RoundNearestEven(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16RoundNearestEven(-2.0f), 0xc000);
  // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties to even (down).
  EXPECT_EQ(FloatToBf16RoundNearestEven(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: ties to even (up).
  EXPECT_EQ(FloatToBf16RoundNearestEven(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  // Just above halfway rounds up.
  EXPECT_EQ(FloatToBf16RoundNearestEven(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)),
            0x3f81);
  EXPECT_EQ(FloatToBf16RoundNearestEven(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(FloatToBf16RoundNearestEven(-std::numeric_limits<float>::infinity()), 0xff80);
  const uint16_t nan = FloatToBf16RoundNearestEven(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(std::isnan(Bf16ToFloat(nan)));
  // A signalling NaN whose payload lives only in the low bits must not become infinity.
  uint32_t snan_bits = 0x7f800001u;
  float snan;
  std::memcpy(&snan, &snan_bits, 4);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16RoundNearestEven(snan))));
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float f = Bf16ToFloat(static_cast<uint16_t>(bits));
    if (!std::isnan(f)) {
      EXPECT_EQ(FloatToBf16RoundNearestEven(f), bits);
    }
  }
}

TEST(FloatConversionTest, F16) {
  EXPECT_EQ(F16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(F16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(F16ToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(F16ToFloat(0x0400), std::ldexp(1.0f, -14));     // smallest normal
  EXPECT_EQ(F16ToFloat(0x0001), std::ldexp(1.0f, -24));     // smallest subnormal
  EXPECT_EQ(F16ToFloat(0x03ff), std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_EQ(F16ToFloat(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToFloat(0x0000), 0.0f);
  EXPECT_TRUE(std::signbit(F16ToFloat(0x8000)));
  EXPECT_EQ(F16ToFloat(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(F16ToFloat(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(F16ToFloat(0x7e00)));
  EXPECT_TRUE(std::isnan(F16ToFloat(0x7c01)));
  EXPECT_EQ(F16ToFloat(0x3555), 0.333251953125f);

  EXPECT_EQ(FloatToF16RoundNearestEven(65519.0f), 0x7bff);
  EXPECT_EQ(FloatToF16RoundNearestEven(65520.0f), 0x7c00);
  EXPECT_EQ(FloatToF16RoundNearestEven(1e10f), 0x7c00);
  EXPECT_EQ(FloatToF16RoundNearestEven(-1e10f), 0xfc00);
  EXPECT_EQ(FloatToF16RoundNearestEven(std::ldexp(1.0f, -25)), 0x0000);  // tie -> even (0)
  EXPECT_EQ(FloatToF16RoundNearestEven(std::ldexp(3.0f, -25)), 0x0002);  // tie -> even (2)
  EXPECT_EQ(FloatToF16RoundNearestEven(std::ldexp(1.0f, -30)), 0x0000);
  EXPECT_EQ(FloatToF16RoundNearestEven(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie -> even
  EXPECT_EQ(FloatToF16RoundNearestEven(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_TRUE(std::isnan(F16ToFloat(FloatToF16RoundNearestEven(std::nanf("")))));
  // Every half value round-trips exactly through float.
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float f = F16ToFloat(static_cast<uint16_t>(bits));
    if (!std::isnan(f)) {
      EXPECT_EQ(FloatToF16RoundNearestEven(f), bits) << std::hex << bits;
    }
  }
}

TEST(SafetensorsDTypeTest, NamesAndSizes) {
  const SafetensorsDType all[] = {SafetensorsDType::kF32,  SafetensorsDType::kF16,
                                  SafetensorsDType::kBF16, SafetensorsDType::kF64,
                                  SafetensorsDType::kI64,  SafetensorsDType::kI32,
                                  SafetensorsDType::kI16,  SafetensorsDType::kI8,
                                  SafetensorsDType::kU8,   SafetensorsDType::kBool};
  const size_t sizes[] = {4, 2, 2, 8, 8, 4, 2, 1, 1, 1};
  for (size_t i = 0; i < std::size(all); ++i) {
    EXPECT_EQ(SafetensorsDTypeSize(all[i]), sizes[i]);
    EXPECT_EQ(ParseSafetensorsDType(SafetensorsDTypeName(all[i])), all[i]);
  }
  EXPECT_EQ(std::string(SafetensorsDTypeName(SafetensorsDType::kBool)), "BOOL");
  EXPECT_FALSE(ParseSafetensorsDType("f32").has_value());
  EXPECT_FALSE(ParseSafetensorsDType("F8_E4M3").has_value());
}

}  // namespace
}  // namespace vtw
