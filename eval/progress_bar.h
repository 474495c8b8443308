// ProgressBar: progress of a long evaluation on stderr. Not thread-safe.
#pragma once

#include <chrono>
#include <cstddef>
#include <string>

namespace vtw::tools {

// Progress on stderr: "label [#####.....] 120/600 acc 93.3% 12.1 s, ETA 48 s". Redrawn in place
// (at most 10 times a second) when stderr is a terminal, else one line per 10% and at the end.

class ProgressBar {
 public:
  ProgressBar(std::string label, size_t total, bool enabled = true);
  // `extra` is appended (e.g. "acc 93.3%").
  void Update(size_t done, const std::string& extra = "");
  void Finish(const std::string& extra = "");

 private:
  void Draw(size_t done, const std::string& extra, bool final_line);
  std::string label_;
  size_t total_;
  bool enabled_, tty_;
  std::chrono::steady_clock::time_point start_, last_draw_;
  int last_decile_ = -1;
  bool finished_ = false;
};

}  // namespace vtw::tools
