// VtwSettings: the withdrawal layer(s) a model directory was calibrated for (DIR/vtw.json,
// written by `vtw calibrate --write`), and the resolution of a request's VTW choice
// (default / off / explicit layer / task profile) into a withdrawal layer K.
// Plain values; thread-compatible.
#pragma once

#include <map>
#include <optional>
#include <string>

#include "model/status.h"

namespace vtw {

struct VtwSettings {
  std::optional<int> default_layer;   // calibrated K; nullopt: VTW off by default
  std::map<std::string, int> profiles;  // task profile name -> K
  double eta = 0;                      // KL threshold the default was picked with
  int num_samples = 0;                 // calibration samples used
};

inline constexpr const char* kVtwSettingsFile = "vtw.json";

// Reads DIR/vtw.json. A missing file gives default settings (VTW off); a malformed one or a
// layer outside [0, num_layers] is InvalidArgument naming the file.
StatusOr<VtwSettings> LoadVtwSettings(const std::string& model_dir, int num_layers);

// Writes DIR/vtw.json atomically.
Status SaveVtwSettings(const std::string& model_dir, const VtwSettings& settings);

enum class VtwMode { kDefault, kOff, kLayer, kProfile };

// The withdrawal layer K for a request; num_layers means no withdrawal. InvalidArgument for a
// layer past the layer count or an unknown profile (the message lists the known ones).
StatusOr<int> ResolveWithdrawLayer(const VtwSettings& settings, int num_layers, VtwMode mode,
                                   int layer, const std::string& profile);

// Parses a command-line value: "off", "default", "auto" (= default) or a layer number.
StatusOr<int> ParseVtwLayerFlag(const std::string& value, const VtwSettings& settings,
                                int num_layers);

}  // namespace vtw
