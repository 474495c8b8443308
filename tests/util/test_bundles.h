// Model bundles for tests: the oracle model directory, or random weights in the oracle's
// geometry with its tokenizer and preprocessing. Each call loads a fresh bundle.
#pragma once

#include <memory>

#include "server/model_bundle.h"

namespace vtw::testing {

// The oracle model directory as a bundle (fp32).
std::unique_ptr<ModelBundle> OracleBundle();
// Random weights in the oracle's geometry but `layers` decoder layers and a long context, with
// the oracle's tokenizer and preprocessing: slow enough per request for cancel/deadline tests.
std::unique_ptr<ModelBundle> LongContextBundle(int layers, int hidden, int context);

}  // namespace vtw::testing
