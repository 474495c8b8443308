// libFuzzer entry points of the "request" target. The body, vtw::fuzz::RequestTarget, lives in
// fuzz_targets.cc so that tests/fuzz_regression_test.cc runs the same code.
#include "fuzz/fuzz_targets.h"

VTW_DEFINE_FUZZER(request)
