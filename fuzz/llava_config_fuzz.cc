// libFuzzer entry points of the "llava_config" target. The body, vtw::fuzz::LlavaConfigTarget,
// lives in fuzz_targets.cc so that tests/fuzz_regression_test.cc runs the same code.
#include "fuzz/fuzz_targets.h"

VTW_DEFINE_FUZZER(llava_config)
