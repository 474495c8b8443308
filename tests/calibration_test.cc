// KL calibration against the oracle's kl_calibration.json: per case and K within 1e-5, the mean,
// and the K picked for each eta.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "tests/util/oracle.h"
#include "vtw/calibration.h"

namespace vtw {
namespace {

using testing::OracleCases;
using testing::OracleKl;
using testing::OracleModel;

std::vector<CalibrationSample> OracleSamples() {
  std::vector<CalibrationSample> samples;
  for (const auto& c : OracleCases()) {
    at::Tensor pixels = testing::OracleTensor(c["pixel_values"]["file"]);
    samples.push_back({testing::OracleLayout(c), OracleModel().EncodeImages(pixels)[0], ""});
  }
  return samples;
}

TEST(Calibration, KlMatchesOraclePerCaseAndMean) {
  auto samples = OracleSamples();
  size_t calls = 0;
  auto table = ComputeKlTable(OracleModel(), samples, [&](size_t done, size_t total) {
    ++calls;
    EXPECT_EQ(total, samples.size());
    EXPECT_EQ(done, calls);
  });
  EXPECT_EQ(calls, samples.size());
  const auto& want = OracleKl()["per_case_kl"];
  ASSERT_EQ(table.size(), 8u);
  for (size_t i = 0; i < table.size(); ++i) {
    const auto& row = want[OracleCases()[i]["id"].get<std::string>()];
    ASSERT_EQ(table[i].size(), 5u);
    for (int k = 0; k <= 4; ++k) {
      EXPECT_NEAR(table[i][k], row[k].get<double>(), 1e-5) << "case " << i << " K=" << k;
    }
  }
  std::vector<double> mean = MeanKl(table);
  for (int k = 0; k <= 4; ++k) {
    EXPECT_NEAR(mean[k], OracleKl()["mean_kl"][k].get<double>(), 1e-5) << "K=" << k;
  }
  for (const auto& [eta, k] : OracleKl()["picked_K"].items()) {
    EXPECT_EQ(PickWithdrawLayer(mean, std::stod(eta)), k.get<int>()) << "eta " << eta;
  }
}

TEST(Calibration, KlDivergenceBasics) {
  at::Tensor a = at::tensor({1.0f, 2.0f, 3.0f});
  EXPECT_NEAR(KlDivergence(a, a), 0.0, 1e-12);
  EXPECT_NEAR(KlDivergence(a, a + 5.0f), 0.0, 1e-12);  // shift invariant
  at::Tensor b = at::tensor({3.0f, 2.0f, 1.0f});
  EXPECT_GT(KlDivergence(a, b), 0.1);
}

TEST(Calibration, PickRule) {
  EXPECT_EQ(PickWithdrawLayer({0.5, 0.1, 0.01, 0.0}, 0.05), 2);
  EXPECT_EQ(PickWithdrawLayer({0.5, 0.1, 0.01, 0.0}, 0.1), 1);
  EXPECT_EQ(PickWithdrawLayer({0.5, 0.1, 0.01, 0.0}, 1.0), 0);
  EXPECT_EQ(PickWithdrawLayer({0.5, 0.1, 0.01, 0.0}, 0.0), 3);
}

}  // namespace
}  // namespace vtw
