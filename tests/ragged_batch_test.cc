// The flat ragged batch: all 8 oracle cases together, prefill chunks and decode tokens mixed,
// a different withdrawal layer per sequence (one with VTW off), give each case the same ids and
// logits as running it alone. And KV-cached decoding equals full recomputation.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "server/generator.h"
#include "tests/util/oracle.h"

namespace vtw {
namespace {

using testing::MaxAbsDiff;
using testing::OracleCases;
using testing::OracleLayout;
using testing::OracleModel;

constexpr int kSteps = 12;

at::Tensor Features(const nlohmann::json& c) {
  return OracleModel().EncodeImages(testing::OracleTensor(c["pixel_values"]["file"]))[0];
}

GenerateResult Alone(const nlohmann::json& c, int k) {
  GenerateOptions options;
  options.withdraw_layer = k;
  options.stop.max_new_tokens = kSteps;
  options.stop.ignore_eos = true;
  options.record_step_logits = true;
  auto r = GenerateOne(OracleModel(), nullptr, OracleLayout(c), Features(c), options);
  EXPECT_TRUE(r.ok());
  return std::move(r).value();
}

// One sequence's progress in the hand-driven batch.
struct Seq {
  PromptLayout layout;
  at::Tensor features;
  int k;
  int chunk;                // prefill chunk size
  int start_step;           // engine step at which it joins
  int64_t done = 0;         // prompt rows processed
  int64_t image_done = 0;
  std::vector<int32_t> ids;
  std::vector<at::Tensor> logits;
  std::unique_ptr<KvCache> cache;
};

TEST(RaggedBatch, AllCasesTogetherMatchAlone) {
  const int ks[8] = {0, 1, 2, 3, 4, 2, 1, 3};  // K = 4 is VTW off for this 4-layer model
  const int chunks[8] = {100, 7, 100, 13, 5, 100, 9, 30};
  const int starts[8] = {0, 0, 1, 1, 2, 3, 3, 5};
  std::vector<Seq> seqs(8);
  for (int i = 0; i < 8; ++i) {
    const auto& c = OracleCases()[i];
    seqs[i].layout = OracleLayout(c);
    seqs[i].features = Features(c);
    seqs[i].k = ks[i];
    seqs[i].chunk = chunks[i];
    seqs[i].start_step = starts[i];
    seqs[i].cache = std::make_unique<KvCache>(OracleModel().NewKvCache());
  }
  int mixed_steps = 0;
  for (int step = 0; step < 200; ++step) {
    ForwardBatch batch;
    std::vector<at::Tensor> images;
    std::vector<int> members;
    bool has_prefill = false, has_decode = false;
    for (int i = 0; i < 8; ++i) {
      Seq& s = seqs[i];
      if (step < s.start_step || static_cast<int>(s.ids.size()) >= kSteps) continue;
      if (s.done < s.layout.size()) {  // prefill chunk
        const int64_t end = std::min(s.layout.size(), s.done + s.chunk);
        const int64_t image_rows =
            batch.AppendRows(s.layout.token_ids, s.layout.kinds, s.done, end);
        if (image_rows) images.push_back(s.features.narrow(0, s.image_done, image_rows));
        s.image_done += image_rows;
        batch.seqs.push_back({s.cache.get(), static_cast<int>(end - s.done), s.k,
                              end == s.layout.size()});
        s.done = end;
        has_prefill = true;
      } else {  // decode the last sampled token
        batch.token_ids.push_back(s.ids.back());
        batch.positions.push_back(s.layout.size() + static_cast<int64_t>(s.ids.size()) - 1);
        batch.kinds.push_back(TokenKind::kText);
        batch.seqs.push_back({s.cache.get(), 1, s.k, true});
        has_decode = true;
      }
      members.push_back(i);
    }
    if (members.empty()) break;
    mixed_steps += has_prefill && has_decode;
    if (!images.empty()) batch.image_embeds = at::cat(images, 0);
    ForwardOutput out = OracleModel().Forward(batch);
    for (size_t row = 0; row < out.logits_seq.size(); ++row) {
      Seq& s = seqs[members[out.logits_seq[row]]];
      at::Tensor l = out.logits[row].contiguous();
      s.logits.push_back(l);
      s.ids.push_back(static_cast<int32_t>(l.argmax().item<int64_t>()));
    }
  }
  EXPECT_GT(mixed_steps, 2) << "the schedule must mix prefill and decode in one step";
  for (int i = 0; i < 8; ++i) {
    SCOPED_TRACE("case " + std::to_string(i) + " K=" + std::to_string(ks[i]));
    GenerateResult alone = Alone(OracleCases()[i], ks[i]);
    ASSERT_EQ(seqs[i].ids.size(), static_cast<size_t>(kSteps));
    EXPECT_EQ(seqs[i].ids, alone.token_ids);
    for (int t = 0; t < kSteps; ++t) {
      EXPECT_LT(MaxAbsDiff(seqs[i].logits[t], alone.step_logits[t]), 1e-4) << "step " << t;
    }
    // The cache of layers >= K holds text only.
    for (int l = 0; l < 4; ++l) {
      const int64_t text = seqs[i].layout.num_text_tokens() + kSteps - 1;
      EXPECT_EQ(seqs[i].cache->length(l), l < ks[i] ? text + 16 : text) << "layer " << l;
    }
  }
}

TEST(RaggedBatch, CachedDecodingEqualsFullRecomputation) {
  for (int k : {0, 2, 4}) {
    const auto& c = OracleCases()[5];
    GenerateResult r = Alone(c, k);
    // Recompute without a cache over prompt + generated tokens (all but the last).
    PromptLayout layout = OracleLayout(c);
    ForwardBatch batch;
    batch.token_ids = layout.token_ids;
    batch.kinds = layout.kinds;
    for (int t = 0; t < kSteps - 1; ++t) {
      batch.token_ids.push_back(r.token_ids[t]);
      batch.kinds.push_back(TokenKind::kText);
    }
    for (int64_t p = 0; p < static_cast<int64_t>(batch.token_ids.size()); ++p) {
      batch.positions.push_back(p);
    }
    batch.image_embeds = Features(c);
    batch.seqs.push_back({nullptr, static_cast<int>(batch.token_ids.size()), k, true});
    ForwardTrace trace;
    trace.all_logits = true;
    OracleModel().Forward(batch, &trace);
    const int64_t rows = trace.logits_all.size(0);
    for (int t = 0; t < kSteps; ++t) {
      at::Tensor full = trace.logits_all[rows - kSteps + t];
      EXPECT_LT(MaxAbsDiff(full, r.step_logits[t]), 1e-4) << "K=" << k << " step " << t;
    }
  }
}

// Decode rows read the cache's buffers (LlavaModel::Forward): the fused kernel reads the held
// entries of each head; the bmm path multiplies the whole zero-padded buffer when it is at most 2x
// the held entries and a view otherwise. The logits and the recorded attention must not depend on
// the spare capacity nor on the implementation, in fp32 and in bf16.
TEST(RaggedBatch, DecodeLogitsDoNotDependOnCacheCapacity) {
  const auto& c = OracleCases()[2];
  const PromptLayout layout = OracleLayout(c);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    auto model = LlavaModel::Load(testing::OracleModelDir(), dtype);
    ASSERT_TRUE(model.ok()) << model.status().ToString();
    const at::Tensor features =
        (*model)->EncodeImages(testing::OracleTensor(c["pixel_values"]["file"]))[0];
    for (int k : {2, 4}) {
      std::vector<at::Tensor> per_spare, per_spare_attention;
      constexpr auto kFused = DecodeAttentionImpl::kFused, kBmm = DecodeAttentionImpl::kBmm;
      const std::pair<int64_t, DecodeAttentionImpl> variants[] = {
          {0, kFused}, {1, kFused}, {20, kFused}, {4000, kFused}, {0, kBmm}, {1, kBmm},
          {20, kBmm},  {4000, kBmm}};
      for (const auto& [spare, impl] : variants) {
        (*model)->set_decode_attention(impl);
        const int layers = (*model)->config().text.num_hidden_layers;
        std::vector<int64_t> cap(layers);
        for (int l = 0; l < layers; ++l) {
          cap[l] = (l < k ? layout.size() : layout.num_text_tokens()) + 3 + spare;
        }
        KvCache cache = (*model)->NewKvCache(cap);
        ForwardBatch prefill;
        prefill.AppendRows(layout.token_ids, layout.kinds, 0, layout.size());
        prefill.image_embeds = features;
        prefill.seqs.push_back({&cache, static_cast<int>(layout.size()), k, true});
        (*model)->Forward(prefill);
        std::vector<at::Tensor> steps;
        for (int t = 0; t < 3; ++t) {
          ForwardBatch step;
          step.token_ids = {300 + 17 * t};
          step.positions = {layout.size() + t};
          step.kinds = {TokenKind::kText};
          step.seqs.push_back({&cache, 1, k, true});
          ForwardTrace trace;
          trace.last_row_attention = true;
          steps.push_back((*model)->Forward(step, &trace).logits[0]);
          // The recorded attention covers exactly the held entries (not the spare zeros).
          const int64_t keys = cache.length(0);
          const at::Tensor a = trace.attention[0][0];
          ASSERT_EQ(a.size(1), keys);
          EXPECT_LT(MaxAbsDiff(a.sum(-1), at::ones({a.size(0)})),
                    dtype == at::kFloat ? 1e-5 : 0.02);
          if (t == 2) per_spare_attention.push_back(a);
        }
        EXPECT_EQ(cache.capacity(0), cap[0]);
        per_spare.push_back(at::stack(steps));
      }
      for (size_t i = 1; i < per_spare_attention.size(); ++i) {
        EXPECT_LT(MaxAbsDiff(per_spare_attention[i], per_spare_attention[0]),
                  dtype == at::kFloat ? 1e-5 : 0.01);
      }
      for (size_t i = 1; i < per_spare.size(); ++i) {
        // The same products over the held entries, plus exact zeros: equal up to summation order.
        EXPECT_LT(MaxAbsDiff(per_spare[i], per_spare[0]), dtype == at::kFloat ? 1e-4 : 0.05)
            << DTypeName(dtype) << " K=" << k << " spare/implementation case " << i;
      }
    }
  }
}

TEST(RaggedBatch, GeneratedImageTokenIdIsOrdinaryText) {
  // Decode the image token id as a text token: it embeds as a normal id and is never withdrawn.
  const auto& c = OracleCases()[0];
  PromptLayout layout = OracleLayout(c);
  KvCache cache = OracleModel().NewKvCache();
  ForwardBatch prefill;
  prefill.AppendRows(layout.token_ids, layout.kinds, 0, layout.size());
  prefill.image_embeds = Features(c);
  prefill.seqs.push_back({&cache, static_cast<int>(layout.size()), 1, true});
  OracleModel().Forward(prefill);
  ForwardBatch step;
  step.token_ids = {400};
  step.positions = {layout.size()};
  step.kinds = {TokenKind::kText};
  step.seqs.push_back({&cache, 1, 1, true});
  ForwardOutput out = OracleModel().Forward(step);
  EXPECT_EQ(out.logits.size(0), 1);
  EXPECT_EQ(cache.length(3), layout.num_text_tokens() + 1);
  EXPECT_EQ(cache.length(0), layout.size() + 1);
}

}  // namespace
}  // namespace vtw
