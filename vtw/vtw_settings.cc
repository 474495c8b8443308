#include "vtw/vtw_settings.h"

#include <cstdio>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "vtw/withdrawal.h"

namespace vtw {

StatusOr<VtwSettings> LoadVtwSettings(const std::string& model_dir, int num_layers) {
  const std::string path = model_dir + "/" + kVtwSettingsFile;
  VtwSettings settings;
  std::ifstream in(path);
  if (!in) return settings;
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return InvalidArgument(path + ": not a JSON object");
  auto check = [&](const nlohmann::json& v, const std::string& what) -> StatusOr<int> {
    if (!v.is_number_integer() || v.get<int>() < 0 || v.get<int>() > num_layers) {
      return InvalidArgument(path + ": " + what + " must be a layer in [0, " +
                             std::to_string(num_layers) + "], got " + v.dump());
    }
    return v.get<int>();
  };
  if (j.contains("default_layer") && !j["default_layer"].is_null()) {
    VTW_ASSIGN_OR_RETURN(int k, check(j["default_layer"], "default_layer"));
    settings.default_layer = k;
  }
  if (j.contains("profiles")) {
    if (!j["profiles"].is_object()) return InvalidArgument(path + ": profiles must be an object");
    for (const auto& [name, value] : j["profiles"].items()) {
      VTW_ASSIGN_OR_RETURN(int k, check(value, "profile '" + name + "'"));
      settings.profiles[name] = k;
    }
  }
  if (j.contains("eta") && j["eta"].is_number()) settings.eta = j["eta"].get<double>();
  if (j.contains("num_samples") && j["num_samples"].is_number_integer()) {
    settings.num_samples = j["num_samples"].get<int>();
  }
  return settings;
}

Status SaveVtwSettings(const std::string& model_dir, const VtwSettings& s) {
  nlohmann::json j;
  j["default_layer"] = s.default_layer ? nlohmann::json(*s.default_layer) : nlohmann::json();
  j["profiles"] = s.profiles;
  j["eta"] = s.eta;
  j["num_samples"] = s.num_samples;
  const std::string path = model_dir + "/" + kVtwSettingsFile;
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    if (!out) return Internal("cannot write " + tmp);
    out << j.dump(2) << "\n";
    if (!out) return Internal("cannot write " + tmp);
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return Internal("cannot rename " + tmp + ": " + ec.message());
  return Status::Ok();
}

StatusOr<int> ResolveWithdrawLayer(const VtwSettings& settings, int num_layers, VtwMode mode,
                                   int layer, const std::string& profile) {
  switch (mode) {
    case VtwMode::kDefault: return settings.default_layer.value_or(WithdrawalOff(num_layers));
    case VtwMode::kOff: return WithdrawalOff(num_layers);
    case VtwMode::kLayer:
      VTW_RETURN_IF_ERROR(CheckWithdrawLayerRange(layer, num_layers));
      return layer;
    case VtwMode::kProfile: {
      auto it = settings.profiles.find(profile);
      if (it == settings.profiles.end()) {
        std::string known;
        for (const auto& [name, k] : settings.profiles) known += (known.empty() ? "" : ", ") + name;
        return InvalidArgument("unknown VTW profile '" + profile + "' (known: " +
                               (known.empty() ? "none; calibrate with --by-type --write" : known) +
                               ")");
      }
      return it->second;
    }
  }
  return Internal("bad VTW mode");
}

StatusOr<int> ParseVtwLayerFlag(const std::string& value, const VtwSettings& settings,
                                int num_layers) {
  if (value == "off") return WithdrawalOff(num_layers);
  if (value == "default" || value == "auto") {
    return ResolveWithdrawLayer(settings, num_layers, VtwMode::kDefault, 0, "");
  }
  int layer = 0;
  try {
    size_t used = 0;
    layer = std::stoi(value, &used);
    if (used != value.size()) throw std::invalid_argument(value);
  } catch (const std::exception&) {
    return InvalidArgument("--vtw-layer must be a layer number, 'off' or 'auto', got '" + value +
                           "'");
  }
  return ResolveWithdrawLayer(settings, num_layers, VtwMode::kLayer, layer, "");
}

}  // namespace vtw
