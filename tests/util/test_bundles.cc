#include "tests/util/test_bundles.h"

#include <stdexcept>

#include <ATen/ATen.h>

#include "tests/util/oracle.h"

namespace vtw::testing {

std::unique_ptr<ModelBundle> OracleBundle() {
  auto b = ModelBundle::Load(OracleModelDir(), at::kFloat);
  if (!b.ok()) throw std::runtime_error(b.status().ToString());
  return std::move(b).value();
}

std::unique_ptr<ModelBundle> LongContextBundle(int layers, int hidden, int context) {
  std::unique_ptr<ModelBundle> bundle = OracleBundle();
  LlavaConfig c = bundle->model->config();
  c.text.num_hidden_layers = layers;
  c.text.hidden_size = hidden;
  c.text.head_dim = hidden / c.text.num_attention_heads;
  c.text.intermediate_size = hidden * 3;
  c.text.max_position_embeddings = context;
  bundle->model = std::make_unique<LlavaModel>(c, RandomLlavaWeights(c, at::kFloat, 7, 0.05),
                                               at::kFloat);
  return bundle;
}

}  // namespace vtw::testing
