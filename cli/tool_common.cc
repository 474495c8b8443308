#include "cli/tool_common.h"

#include <cstdio>
#include <cstdlib>
#include <thread>

#include <ATen/Parallel.h>

namespace vtw::tools {

int ConfigureThreads(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(threads);
  return threads;
}

void ExitWithError(const Status& status) {
  std::fprintf(stderr, "error: %s\n", status.message().c_str());
  std::exit(1);
}

}  // namespace vtw::tools
