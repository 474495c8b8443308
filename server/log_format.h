// Logging setup for the server: spdlog to stderr, as human-readable text or one JSON object per
// line (for log collectors). Call once at start-up, before other threads log.
#pragma once

#include <string>

namespace vtw {

// `format`: "text" or "json"; `level`: spdlog level name. Unknown values fall back to text/info.
void ConfigureLogging(const std::string& format, const std::string& level);

}  // namespace vtw
