// Runs a program and captures its exit status, stdout and stderr (tests of the `vtw` binary).
#pragma once

#include <string>
#include <vector>

namespace vtw::testing {

struct ProcessResult {
  int exit_code = -1;  // exit status, or -1 when killed by a signal
  int signal = 0;      // the signal that ended it, 0 if it exited
  std::string out, err;
};

// Runs argv[0] with arguments (no shell). Blocks until it ends.
ProcessResult RunProcess(const std::vector<std::string>& argv);

// Path of the built `vtw` binary.
std::string VtwBinary();

}  // namespace vtw::testing
