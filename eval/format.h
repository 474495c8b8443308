// Small text helpers shared by the eval/ reports and progress lines: printf-style numbers,
// durations ("1 min 05 s"), percentages and means that are 0 for an empty set, elapsed seconds.
// Header-only; thread-safe.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

namespace vtw::tools {

inline double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

inline std::string Format(const char* fmt, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

// "12.3 s", "4 min 05 s", "1 h 02 min"; "?" for a negative or non-finite value.
inline std::string FormatDuration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  if (s < 60) return Format("%.1f s", s);
  if (s < 3600) return Format("%.0f min ", std::floor(s / 60)) + Format("%02.0f s", std::fmod(s, 60));
  return Format("%.0f h ", std::floor(s / 3600)) + Format("%02.0f min", std::fmod(s, 3600) / 60);
}

inline double Pct(int64_t part, int64_t whole) {
  return whole ? 100.0 * static_cast<double>(part) / static_cast<double>(whole) : 0.0;
}

inline double Mean(int64_t sum, int64_t n) { return n ? static_cast<double>(sum) / n : 0.0; }

// "off" for K >= num_layers, "by-type" for the per-type run (k < 0), else the layer number.
inline std::string LayerName(int k, int num_layers) {
  if (k < 0) return "by-type";
  if (k >= num_layers) return "off";
  return std::to_string(k);
}

}  // namespace vtw::tools
