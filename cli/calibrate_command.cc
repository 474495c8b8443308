// `vtw calibrate`: the VTW paper's "find K" on a JSON-lines dataset: mean KL(p_vtw || p_full) at
// the last prompt position for every K, K = the first layer with mean KL <= eta; optionally one
// K per question type (task profiles), and --write to store the result in DIR/vtw.json, where
// `vtw generate`, `vtw eval` and the server read their default K. Logic in eval/vqa_eval.h.
#include <iostream>
#include <memory>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/tool_common.h"
#include "eval/calibrate.h"
#include "server/model_bundle.h"
#include "vtw/vtw_settings.h"

namespace vtw::tools {
namespace {

struct CalibrateFlags {
  std::string model_dir;
  std::string data;
  int samples = 20;
  std::vector<double> etas;
  bool by_type = false;
  bool write = false;
  bool json = false;
  bool no_progress = false;
  std::string dtype = "fp32";
  int threads = 0;
};

Status RunCalibrate(const CalibrateFlags& f) {
  ConfigureThreads(f.threads);
  CalibrateOptions options;
  options.samples = f.samples;
  if (!f.etas.empty()) options.etas = f.etas;
  options.by_type = f.by_type;
  options.progress = !f.no_progress;
  if (options.samples < 1) {
    return InvalidArgument("--samples must be >= 1, got " + std::to_string(options.samples));
  }
  VTW_ASSIGN_OR_RETURN(at::ScalarType dtype, ParseDType(f.dtype));
  VTW_ASSIGN_OR_RETURN(std::vector<VqaExample> examples, LoadVqaJsonl(f.data));
  const std::string model_dir = f.model_dir.empty() ? DefaultModelDir() : f.model_dir;
  VTW_ASSIGN_OR_RETURN(std::unique_ptr<ModelBundle> bundle, ModelBundle::Load(model_dir, dtype));
  VTW_ASSIGN_OR_RETURN(CalibrationResult result, CalibrateVqa(*bundle, examples, options));
  std::string written;
  if (f.write) {
    VTW_RETURN_IF_ERROR(SaveVtwSettings(bundle->dir, CalibrationSettings(result)));
    written = bundle->dir + "/" + kVtwSettingsFile;
    std::cerr << "[vtw] wrote " << written << "\n";
  }
  if (!f.json) {
    std::cout << CalibrationResultTable(result);
    if (!written.empty()) std::cout << "wrote " << written << "\n";
    return Status::Ok();
  }
  nlohmann::json out = CalibrationResultJson(result);
  out["model"] = bundle->dir;
  out["data"] = f.data;
  out["dtype"] = DTypeName(dtype);
  out["picked_layer"] = result.overall.picked.at(0);
  out["written"] = written.empty() ? nlohmann::json() : nlohmann::json(written);
  std::cout << out.dump() << std::endl;
  return Status::Ok();
}

}  // namespace

void RegisterCalibrateCommand(CLI::App& app) {
  auto flags = std::make_shared<CalibrateFlags>();
  CLI::App* cmd = app.add_subcommand(
      "calibrate", "Find the withdrawal layer K: mean KL(p_vtw || p_full) per K over a few "
                   "samples, K = the first layer with mean KL <= eta");
  cmd->add_option("--model", flags->model_dir, "Model directory (default: the shipped model)");
  cmd->add_option("--data", flags->data,
                  "JSON-lines dataset: {\"image\", \"question\", \"type\"} per line")
      ->required();
  cmd->add_option("--samples", flags->samples,
                  "Calibration samples: the first N lines (with --by-type: the first N per type)")
      ->capture_default_str();
  cmd->add_option("--eta", flags->etas,
                  "KL threshold (repeatable; the first is the one written; default 0.003, the "
                  "paper's value for LLaVA-1.5-7B)");
  cmd->add_flag("--by-type", flags->by_type,
                "Also pick one K per question type (task profiles named by the type)");
  cmd->add_flag("--write", flags->write,
                "Store the result (default K, profiles, eta, samples) in MODEL/vtw.json");
  cmd->add_option("--dtype", flags->dtype, "fp32 or bf16")->capture_default_str();
  cmd->add_option("--threads", flags->threads, "CPU threads (0 = all cores)")
      ->capture_default_str();
  cmd->add_flag("--json", flags->json, "Print one JSON object on stdout");
  cmd->add_flag("--no-progress", flags->no_progress, "No progress bar on stderr");
  cmd->callback([flags] {
    Status st = RunCalibrate(*flags);
    if (!st.ok()) ExitWithError(st);
  });
}

}  // namespace vtw::tools
