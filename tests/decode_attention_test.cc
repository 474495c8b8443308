// The fused decode-attention kernel against softmax(q.K^T / sqrt(D)).V computed in fp64 from the
// same (rounded) inputs: head sizes with and without a vector tail, grouped-query attention,
// lengths that are not a multiple of the kernel's 4-key step, caches with spare capacity, fp32
// and bf16, several rows at once (different lengths), and the recorded probabilities.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "model/decode_attention.h"

namespace vtw {
namespace {

struct Case {
  int64_t heads, kv_heads, d;
  std::vector<int64_t> lengths;  // one decode row per entry
  int64_t spare;                 // cache capacity beyond the length
};

// Runs the kernel on random inputs and checks it against fp64 arithmetic.
void Check(const Case& c, at::ScalarType dtype) {
  SCOPED_TRACE(std::string(dtype == at::kFloat ? "fp32" : "bf16") + " heads " +
               std::to_string(c.heads) + "/" + std::to_string(c.kv_heads) + " d " +
               std::to_string(c.d));
  const int64_t n = static_cast<int64_t>(c.lengths.size()), group = c.heads / c.kv_heads;
  std::vector<at::Tensor> qs, ks, vs;
  at::Tensor out = at::full({n, c.heads * c.d}, 7.0, dtype);  // every element must be written
  std::vector<DecodeAttentionRow> rows;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t cap = c.lengths[i] + c.spare;
    qs.push_back((at::randn({c.heads, c.d}) * 2).to(dtype));
    // Spare entries hold garbage (NaN): the kernel must read only `length` entries.
    ks.push_back(at::full({c.kv_heads, cap, c.d}, NAN, dtype));
    vs.push_back(at::full({c.kv_heads, cap, c.d}, NAN, dtype));
    ks.back().narrow(1, 0, c.lengths[i]).copy_(at::randn({c.kv_heads, c.lengths[i], c.d}));
    vs.back().narrow(1, 0, c.lengths[i]).copy_(at::randn({c.kv_heads, c.lengths[i], c.d}));
    rows.push_back({qs.back().data_ptr(), ks.back().data_ptr(), vs.back().data_ptr(), cap * c.d,
                    c.lengths[i], static_cast<char*>(out.data_ptr()) +
                                      i * c.heads * c.d * out.element_size()});
  }
  at::Tensor probs;
  DecodeAttention(rows, c.heads, c.kv_heads, c.d, dtype, &probs);
  int64_t max_len = 0;
  for (int64_t l : c.lengths) max_len = std::max(max_len, l);
  ASSERT_EQ(probs.sizes(), (at::IntArrayRef{n, c.heads, max_len}));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = c.lengths[i];
    at::Tensor q = qs[i].to(at::kDouble).view({c.kv_heads, group, c.d});
    at::Tensor k = ks[i].narrow(1, 0, len).to(at::kDouble);  // [KV, len, D]
    at::Tensor v = vs[i].narrow(1, 0, len).to(at::kDouble);
    at::Tensor p = at::softmax(at::bmm(q, k.transpose(1, 2)) / std::sqrt(double(c.d)), -1);
    at::Tensor expect = at::bmm(p, v).reshape({c.heads * c.d});
    at::Tensor got = out[i].to(at::kDouble);
    // fp32: summation order only. bf16: the output is rounded once (relative 2^-9), inputs exact.
    const double tol = dtype == at::kFloat ? 1e-5 : 8e-3;
    EXPECT_LT((got - expect).abs().max().item<double>(), tol) << "row " << i;
    EXPECT_LT((probs[i].narrow(-1, 0, len).to(at::kDouble) - p.reshape({c.heads, len}))
                  .abs().max().item<double>(), 1e-5) << "row " << i;
    if (len < max_len) {  // past the row's length: probability exactly 0
      EXPECT_EQ(probs[i].narrow(-1, len, max_len - len).abs().max().item<float>(), 0.0f);
    }
    EXPECT_FALSE(at::isnan(out[i]).any().item<bool>()) << "row " << i;
  }
}

// Every instruction set this CPU can run (the kernel is compiled once per set; a machine with
// AVX-512 runs all three), restoring the default afterwards.
class DecodeAttentionPerIsa : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    default_isa_ = DecodeAttentionIsa();
    if (!SetDecodeAttentionIsaForTesting(GetParam())) {
      GTEST_SKIP() << "this CPU cannot run " << GetParam();
    }
    ASSERT_EQ(std::string(DecodeAttentionIsa()), GetParam());
  }
  void TearDown() override { ASSERT_TRUE(SetDecodeAttentionIsaForTesting(default_isa_)); }
  std::string default_isa_;
};

TEST_P(DecodeAttentionPerIsa, MatchesFp64ReferenceFp32) {
  at::manual_seed(1);
  Check({32, 32, 128, {628}, 0}, at::kFloat);                // 7B shape, full buffer
  Check({4, 4, 16, {1, 2, 3, 4, 5, 9}, 3}, at::kFloat);       // tiny lengths, 4-key step tails
  Check({8, 2, 24, {37, 64}, 11}, at::kFloat);                // GQA (group 4), D with a tail
  Check({2, 1, 7, {13}, 0}, at::kFloat);                      // D below one vector
}

TEST_P(DecodeAttentionPerIsa, MatchesFp64ReferenceBf16) {
  at::manual_seed(2);
  Check({32, 32, 128, {628, 45, 300}, 5}, at::kBFloat16);  // 7B shape, a withdrawn-layer length
  Check({4, 4, 16, {1, 2, 3, 4, 5, 9}, 3}, at::kBFloat16);
  Check({8, 2, 24, {37, 64}, 11}, at::kBFloat16);
  Check({16, 4, 64, {130}, 0}, at::kBFloat16);            // the medium geometry's heads
}

INSTANTIATE_TEST_SUITE_P(AllIsas, DecodeAttentionPerIsa,
                         ::testing::Values("x86-64-v4", "x86-64-v3", "default"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

TEST(DecodeAttention, UnknownIsaIsRefused) {
  const std::string before = DecodeAttentionIsa();
  EXPECT_FALSE(SetDecodeAttentionIsaForTesting("x86-64-v9"));
  EXPECT_EQ(std::string(DecodeAttentionIsa()), before);
}

TEST(DecodeAttention, LargeScoresDoNotOverflow) {
  // Scores in the hundreds: the softmax must subtract the maximum (no inf/inf = NaN).
  at::manual_seed(3);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    at::Tensor q = (at::ones({1, 64}) * 30).to(dtype);
    at::Tensor k = (at::ones({1, 10, 64}) * 30).to(dtype);
    k[0][3].fill_(31);  // the largest score wins almost all the mass
    at::Tensor v = at::arange(10, at::kFloat).view({1, 10, 1}).expand({1, 10, 64}).contiguous()
                       .to(dtype);
    at::Tensor out = at::empty({64}, dtype);
    DecodeAttention({{q.data_ptr(), k.data_ptr(), v.data_ptr(), 10 * 64, 10, out.data_ptr()}}, 1,
                    1, 64, dtype);
    EXPECT_FALSE(at::isnan(out).any().item<bool>());
    EXPECT_NEAR(out[0].item<float>(), 3.0f, 1e-3);
  }
}

TEST(DecodeAttention, RejectsBadArguments) {
  at::Tensor q = at::zeros({2, 8}), k = at::zeros({1, 4, 8}), out = at::zeros({16});
  DecodeAttentionRow empty{q.data_ptr(), k.data_ptr(), k.data_ptr(), 32, 0, out.data_ptr()};
  EXPECT_THROW(DecodeAttention({empty}, 2, 1, 8, at::kFloat), c10::Error);  // attends to nothing
  DecodeAttentionRow row = empty;
  row.length = 4;
  EXPECT_THROW(DecodeAttention({row}, 3, 2, 8, at::kFloat), c10::Error);    // 3 heads on 2 KV
  EXPECT_THROW(DecodeAttention({row}, 2, 1, 8, at::kHalf), c10::Error);     // no fp16 kernel
  DecodeAttention({row}, 2, 1, 8, at::kFloat);  // zeros: uniform weights over zero values
  EXPECT_EQ(out.abs().max().item<float>(), 0.0f);
}

}  // namespace
}  // namespace vtw
