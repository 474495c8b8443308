// The FLOPs model against an independent, brute-force count on the oracle config, and the
// withdrawn work; KV bytes against what the model's cache actually holds.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "server/generator.h"
#include "tests/util/oracle.h"
#include "vtw/compute_model.h"

namespace vtw {
namespace {

using testing::OracleModel;

struct Count {
  int64_t dense = 0, attention = 0, withdrawn = 0;
};

// Brute force: walk every layer, row and key, counting 2 FLOPs per multiply-add of each matmul.
Count BruteForce(const LlavaConfig& c, const std::vector<TokenKind>& kinds, int64_t begin,
                 int64_t end, int k) {
  const auto& t = c.text;
  const int64_t h = t.hidden_size, q = t.num_attention_heads * t.head_dim;
  const int64_t kv = t.num_key_value_heads * t.head_dim;
  Count n;
  for (int layer = 0; layer < t.num_hidden_layers; ++layer) {
    auto active = [&](int64_t i) { return kinds[i] == TokenKind::kText || layer < k; };
    for (int64_t i = begin; i < end; ++i) {
      // Per-row matmul work: q, k, v, o projections and the three MLP matrices.
      int64_t row = 0;
      for (int64_t out : {q, kv, kv}) row += 2 * h * out;
      row += 2 * q * h;
      for (int m = 0; m < 3; ++m) row += 2 * h * t.intermediate_size;
      int64_t att = 0, att_all = 0, att_image_keys = 0;
      for (int64_t j = 0; j <= i; ++j) {
        int64_t per_key = 0;
        for (int head = 0; head < t.num_attention_heads; ++head) {
          per_key += 2 * t.head_dim /* q.k */ + 2 * t.head_dim /* p*v */;
        }
        att_all += per_key;
        if (active(j)) att += per_key;
        if (kinds[j] == TokenKind::kImage) att_image_keys += per_key;
      }
      if (active(i)) {
        n.dense += row;
        n.attention += att;
        // A text row at a withdrawn layer no longer attends to the image keys.
        if (layer >= k) n.withdrawn += att_image_keys;
      } else {
        n.withdrawn += row + att_all;  // the withdrawn row's whole work
      }
    }
  }
  return n;
}

TEST(ComputeModel, MatchesBruteForceCountAndWithdrawnWork) {
  const LlavaConfig& c = OracleModel().config();
  ComputeModel cm(c, 4);
  PromptLayout layout = testing::OracleLayout(testing::OracleCases()[0]);
  std::vector<TokenKind> kinds = layout.kinds;
  for (int g = 0; g < 5; ++g) kinds.push_back(TokenKind::kText);  // generated tokens
  const int64_t total = static_cast<int64_t>(kinds.size());
  const int64_t vocab_row = 2LL * c.text.hidden_size * c.text.vocab_size;
  for (int k = 0; k <= 4; ++k) {
    for (auto [begin, end] : {std::pair<int64_t, int64_t>{0, layout.size()},
                              {0, 10}, {10, 25}, {layout.size(), layout.size() + 1},
                              {total - 1, total}}) {
      SCOPED_TRACE("K=" + std::to_string(k) + " [" + std::to_string(begin) + "," +
                   std::to_string(end) + ")");
      Count brute = BruteForce(c, kinds, begin, end, k);
      Flops f = cm.ChunkFlops(kinds, begin, end, k, /*logits=*/true);
      EXPECT_EQ(f.flops, brute.dense + brute.attention + vocab_row);
      EXPECT_EQ(f.saved(), brute.withdrawn);
      if (k == 4) {
        EXPECT_EQ(f.saved(), 0);
      }
    }
    // A decode step equals a one-token chunk.
    Flops step = cm.DecodeStepFlops(total - 1 - 16, 16, k);
    Flops chunk = cm.ChunkFlops(kinds, total - 1, total, k, true);
    EXPECT_EQ(step.flops, chunk.flops);
    EXPECT_EQ(step.flops_without_vtw, chunk.flops_without_vtw);
  }
}

TEST(ComputeModel, VisionFlopsByHand) {
  const LlavaConfig& c = OracleModel().config();
  ComputeModel cm(c, 4);
  // 16 patches + CLS, Hv 64, Iv 128, 2 layers used, patch 14, projector 64 -> 64 -> 64.
  const int64_t conv = 2LL * 16 * 64 * 3 * 14 * 14;
  const int64_t layer = 4 * 2LL * 17 * 64 * 64 + 2 * 2LL * 17 * 17 * 64 + 2 * 2LL * 17 * 64 * 128;
  const int64_t proj = 2LL * 16 * (64 * 64 + 64 * 64);
  EXPECT_EQ(cm.VisionFlops(), conv + 2 * layer + proj);
}

TEST(ComputeModel, KvBytesMatchTheCache) {
  const auto& c = testing::OracleCases()[3];
  at::Tensor features =
      OracleModel().EncodeImages(testing::OracleTensor(c["pixel_values"]["file"]))[0];
  ComputeModel cm(OracleModel().config(), 4);
  for (int k = 0; k <= 4; ++k) {
    GenerateOptions options;
    options.withdraw_layer = k;
    options.stop.max_new_tokens = 6;
    options.stop.ignore_eos = true;
    auto r = GenerateOne(OracleModel(), nullptr, testing::OracleLayout(c), features, options);
    ASSERT_TRUE(r.ok());
    PromptLayout layout = testing::OracleLayout(c);
    const int64_t text = layout.num_text_tokens() + 5;  // the last sampled token is not cached
    EXPECT_EQ(r->kv_cache_bytes, cm.KvCacheBytes(text, 16, k)) << "K=" << k;
    EXPECT_EQ(r->kv_cache_bytes_without_vtw, cm.KvCacheBytes(text, 16, 4));
    // Without withdrawal, bytes = layers * tokens * 2 * kv * D * 4.
    EXPECT_EQ(cm.KvCacheBytes(text, 16, 4), 4 * (text + 16) * 2 * 64 * 4);
  }
}

}  // namespace
}  // namespace vtw
