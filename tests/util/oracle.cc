#include "tests/util/oracle.h"

#include <fstream>
#include <sstream>
#include <stdexcept>

#include <unistd.h>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "tests/util/npy.h"

namespace vtw::testing {
namespace {

nlohmann::json LoadJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  return nlohmann::json::parse(in);
}

}  // namespace

std::string OracleDir() { return TestDataPath("oracle"); }
std::string OracleModelDir() { return TestDataPath("oracle/tiny-llava"); }

const nlohmann::json& OracleCases() {
  static const nlohmann::json j = LoadJson(OracleDir() + "/fixtures/cases.json")["cases"];
  return j;
}

const nlohmann::json& OracleVtw() {
  static const nlohmann::json j =
      LoadJson(OracleDir() + "/fixtures/vtw.json")["models"]["tiny-llava"]["cases"];
  return j;
}

const nlohmann::json& OracleKl() {
  static const nlohmann::json j =
      LoadJson(OracleDir() + "/fixtures/kl_calibration.json")["models"]["tiny-llava"];
  return j;
}

at::Tensor OracleTensor(const std::string& relative_path) {
  NpyArray a = LoadNpy(OracleDir() + "/" + relative_path);
  std::vector<float> v = a.AsFloat();
  return at::tensor(v, at::kFloat).view(a.shape).clone();
}

const LlavaModel& OracleModel() {
  static const std::unique_ptr<LlavaModel> model = [] {
    auto m = LlavaModel::Load(OracleModelDir(), at::kFloat);
    if (!m.ok()) throw std::runtime_error(m.status().ToString());
    return std::move(m).value();
  }();
  return *model;
}

PromptLayout OracleLayout(const nlohmann::json& c) {
  std::vector<int32_t> ids = c["input_ids_unexpanded"].get<std::vector<int32_t>>();
  auto layout = ExpandPrompt(ids, 400, 1, 16, 256);
  if (!layout.ok()) throw std::runtime_error(layout.status().ToString());
  return std::move(layout).value();
}

size_t StepsToCompare(const nlohmann::json& margins, double threshold) {
  for (size_t i = 0; i < margins.size(); ++i) {
    if (margins[i].get<double>() < threshold) return i + 1;
  }
  return margins.size();
}

std::filesystem::path FreshTestDir(const std::string& prefix) {
  namespace fs = std::filesystem;
  fs::path dir = fs::path(::testing::TempDir()) /
                 (prefix + "_" + std::to_string(::getpid()) + "_" +
                  ::testing::UnitTest::GetInstance()->current_test_info()->name());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string CopyOracleModel(const std::filesystem::path& dest) {
  namespace fs = std::filesystem;
  fs::copy(OracleModelDir(), dest, fs::copy_options::recursive);
  for (auto& e : fs::directory_iterator(dest)) {
    fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
  }
  return dest.string();
}

double MaxAbsDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kFloat) - b.to(at::kFloat)).abs().max().item<double>();
}

std::string OracleImageBytes(int case_index) {
  const std::string path = OracleDir() + "/" + OracleCases()[case_index]["image"].get<std::string>();
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

}  // namespace vtw::testing
