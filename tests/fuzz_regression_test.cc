// Runs every fuzz target body (fuzz/fuzz_targets.h, the code the libFuzzer executables run) over
// its seed corpus (fuzz/corpus/<target>/) and over the inputs that once made it fail
// (tests/data/fuzz_regressions/<target>/, one file per fixed finding). A body aborts on a
// violated invariant, and ASan/UBSan builds (VTW_SANITIZE) also catch memory errors here; a
// plain build asserts that nothing crashes and no exception escapes. Built with the normal
// compiler: clang is needed only for fuzzing itself (scripts/fuzz.sh).
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "fuzz/fuzz_targets.h"
#include "model/llava_config.h"

namespace vtw::fuzz {
namespace {

namespace fs = std::filesystem;

std::vector<fs::path> FilesIn(const fs::path& dir) {
  std::vector<fs::path> files;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return files;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.is_regular_file()) files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  return files;
}

std::string ReadAll(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

fs::path CorpusDir(const std::string& target) {
  return fs::path(VTW_SOURCE_DIR) / "fuzz" / "corpus" / target;
}

fs::path RegressionDir(const std::string& target) {
  return fs::path(VTW_SOURCE_DIR) / "tests" / "data" / "fuzz_regressions" / target;
}

void RunFiles(const Target& target, const std::vector<fs::path>& files) {
  target.init();
  for (const fs::path& file : files) {
    SCOPED_TRACE(file.string());
    const std::string bytes = ReadAll(file);
    ASSERT_LE(bytes.size(), target.max_len) << "longer than the fuzzer's -max_len";
    EXPECT_NO_THROW(target.body(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  }
}

class FuzzTargetTest : public ::testing::TestWithParam<std::string> {
 protected:
  const Target& target() const { return FindTarget(GetParam()); }
};

TEST_P(FuzzTargetTest, SeedCorpus) {
  const std::vector<fs::path> files = FilesIn(CorpusDir(GetParam()));
  ASSERT_FALSE(files.empty()) << "no seed corpus in " << CorpusDir(GetParam());
  RunFiles(target(), files);
}

TEST_P(FuzzTargetTest, Regressions) { RunFiles(target(), FilesIn(RegressionDir(GetParam()))); }

TEST_P(FuzzTargetTest, EmptyAndTinyInputs) {
  const Target& t = target();
  t.init();
  EXPECT_NO_THROW(t.body(nullptr, 0));
  for (int b = 0; b < 256; ++b) {
    const uint8_t one = static_cast<uint8_t>(b);
    EXPECT_NO_THROW(t.body(&one, 1));
  }
}

std::vector<std::string> TargetNames() {
  std::vector<std::string> names;
  for (const Target& t : Targets()) names.push_back(t.name);
  return names;
}

INSTANTIATE_TEST_SUITE_P(AllTargets, FuzzTargetTest, ::testing::ValuesIn(TargetNames()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// Every fuzz/<name>_fuzz.cc is registered (the fuzzer would abort at start otherwise) and every
// registered target has its fuzzer source.
TEST(FuzzTargets, EveryFuzzerSourceIsRegistered) {
  std::vector<std::string> sources;
  for (const fs::path& f : FilesIn(fs::path(VTW_SOURCE_DIR) / "fuzz")) {
    const std::string name = f.filename().string();
    const std::string suffix = "_fuzz.cc";
    if (name.size() > suffix.size() &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      sources.push_back(name.substr(0, name.size() - suffix.size()));
    }
  }
  std::vector<std::string> names = TargetNames();
  std::sort(names.begin(), names.end());
  std::sort(sources.begin(), sources.end());
  EXPECT_EQ(sources, names);
}

// Findings of the llava_config target: out-of-range numbers and sizes whose products overflow
// int are rejected with a message, not cast (undefined behaviour) or multiplied out.
TEST(FuzzFindings, LlavaConfigRejectsOutOfRangeNumbers) {
  for (const fs::path& file : FilesIn(RegressionDir("llava_config"))) {
    SCOPED_TRACE(file.string());
    auto config = ParseLlavaConfigText(ReadAll(file), "config.json");
    ASSERT_FALSE(config.ok());
    EXPECT_EQ(config.status().code(), StatusCode::kInvalidArgument);
  }
  auto ok = ParseLlavaConfigText(R"({"model_type": "llava", "text_config": {"hidden_size": 64.0,
      "num_attention_heads": 4, "vocab_size": 100}})", "config.json");
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->text.hidden_size, 64);
  EXPECT_EQ(ok->text.head_dim, 16);
}

// scripts/fuzz.sh passes each target's -max_len from its own table; it must match the registry.
TEST(FuzzTargets, ScriptMaxLenMatchesRegistry) {
  const std::string script = ReadAll(fs::path(VTW_SOURCE_DIR) / "scripts" / "fuzz.sh");
  for (const Target& t : Targets()) {
    const std::string entry = "[" + std::string(t.name) + "]=" + std::to_string(t.max_len) + "\n";
    EXPECT_NE(script.find(entry), std::string::npos) << "scripts/fuzz.sh lacks " << entry;
  }
}

}  // namespace
}  // namespace vtw::fuzz
