// libFuzzer entry points of the "chat_request" target (the OpenAI-compatible JSON request
// parser). The body, vtw::fuzz::ChatRequestTarget, lives in fuzz_targets.cc so that
// tests/fuzz_regression_test.cc runs the same code.
#include "fuzz/fuzz_targets.h"

VTW_DEFINE_FUZZER(chat_request)
