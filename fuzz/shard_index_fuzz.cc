// libFuzzer entry points of the "shard_index" target. The body, vtw::fuzz::ShardIndexTarget, lives
// in fuzz_targets.cc so that tests/fuzz_regression_test.cc runs the same code.
#include "fuzz/fuzz_targets.h"

VTW_DEFINE_FUZZER(shard_index)
