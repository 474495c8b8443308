// Helpers shared by the `vtw` subcommands: thread setup, error exit.
#pragma once

#include <string>

#include "model/status.h"

namespace vtw::tools {

// Sets LibTorch's intra-op threads (0 = all cores) and returns the number used.
int ConfigureThreads(int threads);

// Prints "error: <message>" to stderr and exits with status 1 (2 for invalid arguments).
[[noreturn]] void ExitWithError(const Status& status);

}  // namespace vtw::tools
