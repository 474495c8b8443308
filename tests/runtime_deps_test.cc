// The Dockerfile's runtime-packages stage must install every shared library the built binaries load:
// runs scripts/check-runtime-deps.sh on VTW_BINARY_DIR's vtw-server and vtw (ldd + dpkg -S
// against the runtime stage's apt-get list and its dependency closure). A second check proves
// the script fails when a needed package is taken out of the list.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace {

namespace fs = std::filesystem;

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

std::string Quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

RunResult RunCommand(const std::string& command) {
  RunResult result;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 4096> buffer{};
  size_t n = 0;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) result.output.append(buffer.data(), n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class RuntimeDepsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::system("command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1") != 0) {
      GTEST_SKIP() << "not a Debian system (no dpkg-query / apt-get)";
    }
    for (const char* binary : {"vtw-server", "vtw"}) {
      ASSERT_TRUE(fs::exists(fs::path(VTW_BINARY_DIR) / binary))
          << VTW_BINARY_DIR << "/" << binary << " is not built";
    }
  }

  static std::string Script() { return (fs::path(VTW_SOURCE_DIR) / "scripts/check-runtime-deps.sh").string(); }
  static fs::path Dockerfile() { return fs::path(VTW_SOURCE_DIR) / "Dockerfile"; }

  static RunResult Check(const fs::path& dockerfile) {
    return RunCommand("bash " + Quote(Script()) + " --dockerfile " + Quote(dockerfile.string()) + " " +
               Quote(VTW_BINARY_DIR));
  }
};

TEST_F(RuntimeDepsTest, RuntimeStageInstallsEveryLibraryTheBinariesLoad) {
  const RunResult r = Check(Dockerfile());
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("all covered by the runtime stage"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("MISSING"), std::string::npos) << r.output;
  // The report names the libraries the binaries link directly.
  for (const char* lib : {"libtorch_cpu.so", "libgrpc++.so", "libopencv_imgcodecs.so", "libspdlog.so",
                          "libprometheus-cpp-core.so"}) {
    EXPECT_NE(r.output.find(lib), std::string::npos) << lib << "\n" << r.output;
  }
}

TEST_F(RuntimeDepsTest, FailsWhenARuntimePackageIsMissing) {
  // libprometheus-cpp-core1.0 is needed by vtw-server only and is no dependency of any other
  // runtime package: without it in the list, the check must name it and fail.
  const std::string package = "libprometheus-cpp-core1.0";
  std::string text = ReadFile(Dockerfile());
  const std::string runtime_marker = "AS runtime";
  const size_t runtime = text.find(runtime_marker);
  ASSERT_NE(runtime, std::string::npos) << "the Dockerfile has no 'AS runtime' stage";
  const size_t at = text.find(" " + package, runtime);
  ASSERT_NE(at, std::string::npos) << package << " is not in the runtime stage's list";
  text.erase(at, package.size() + 1);

  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("runtime_deps_test." + std::to_string(static_cast<long>(::getpid())));
  fs::create_directories(dir);
  const fs::path broken = dir / "Dockerfile";
  std::ofstream(broken) << text;

  const RunResult r = Check(broken);
  fs::remove_all(dir);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("MISSING"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("Add to the runtime stage's apt-get install: " + package), std::string::npos)
      << r.output;
}

}  // namespace
