// Access to the Hugging Face oracle copied into tests/data/oracle: the tiny-llava checkpoint,
// the per-case fixtures (cases.json, vtw.json, kl_calibration.json) and their .npy arrays.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include "model/llava_model.h"
#include "model/prompt_layout.h"

namespace vtw::testing {

std::string OracleDir();                       // tests/data/oracle
std::string OracleModelDir();                  // tests/data/oracle/tiny-llava
const nlohmann::json& OracleCases();           // cases.json "cases" array
const nlohmann::json& OracleVtw();             // vtw.json models.tiny-llava.cases
const nlohmann::json& OracleKl();              // kl_calibration.json models.tiny-llava

// A .npy file under the oracle dir as an fp32 tensor (shape kept).
at::Tensor OracleTensor(const std::string& relative_path);

// The shared fp32 oracle model (loaded once).
const LlavaModel& OracleModel();

// The encoded bytes of case `case_index`'s image file.
std::string OracleImageBytes(int case_index);

// Layout of case `c` built from its expanded input_ids.
PromptLayout OracleLayout(const nlohmann::json& c);

// Greedy ids compare: the number of leading steps that must match exactly (up to and including
// the first step whose recorded top1-top2 margin is below `threshold`).
size_t StepsToCompare(const nlohmann::json& margins, double threshold);

// A fresh, empty directory for the running test: TempDir()/PREFIX_PID_TESTNAME.
std::filesystem::path FreshTestDir(const std::string& prefix);

// Copies the oracle model directory to `dest`, writable (tests never write into tests/data).
std::string CopyOracleModel(const std::filesystem::path& dest);

// Max |a - b|.
double MaxAbsDiff(const at::Tensor& a, const at::Tensor& b);

}  // namespace vtw::testing
