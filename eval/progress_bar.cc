#include "eval/progress_bar.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "eval/format.h"

namespace vtw::tools {

ProgressBar::ProgressBar(std::string label, size_t total, bool enabled)
    : label_(std::move(label)),
      total_(total),
      enabled_(enabled),
      tty_(isatty(fileno(stderr)) != 0),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_ - std::chrono::seconds(1)) {}

void ProgressBar::Update(size_t done, const std::string& extra) {
  if (!enabled_ || finished_) return;
  const auto now = std::chrono::steady_clock::now();
  if (tty_) {
    if (done < total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
    Draw(done, extra, false);
    return;
  }
  const int decile = total_ ? static_cast<int>(10 * done / total_) : 10;
  if (decile == last_decile_ || done >= total_) return;  // the final line comes from Finish
  last_decile_ = decile;
  Draw(done, extra, true);
}

void ProgressBar::Finish(const std::string& extra) {
  if (!enabled_ || finished_) return;
  finished_ = true;
  Draw(total_, extra, true);
}

void ProgressBar::Draw(size_t done, const std::string& extra, bool final_line) {
  const int width = 24;
  const double frac = total_ ? std::min(1.0, static_cast<double>(done) / total_) : 1.0;
  const int filled = static_cast<int>(frac * width + 1e-9);
  const double elapsed = SecondsSince(start_);
  std::string bar(filled, '#');
  bar += std::string(width - filled, '.');
  std::string line = label_ + " [" + bar + "] " + std::to_string(done) + "/" +
                     std::to_string(total_);
  if (!extra.empty()) line += "  " + extra;
  line += "  " + FormatDuration(elapsed);
  if (done < total_) {
    line += ", ETA " + (done ? FormatDuration(elapsed / done * (total_ - done)) : std::string("?"));
  }
  if (tty_) {
    std::fprintf(stderr, "\r\033[K%s%s", line.c_str(), final_line && done >= total_ ? "\n" : "");
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  std::fflush(stderr);
}

}  // namespace vtw::tools
