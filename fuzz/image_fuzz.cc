// libFuzzer entry points of the "image" target. The body, vtw::fuzz::ImageTarget, lives in
// fuzz_targets.cc so that tests/fuzz_regression_test.cc runs the same code.
#include "fuzz/fuzz_targets.h"

VTW_DEFINE_FUZZER(image)
