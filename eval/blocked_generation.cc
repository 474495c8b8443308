#include "eval/blocked_generation.h"

#include <ATen/ATen.h>

#include "model/sequence_output.h"
#include "vtw/withdrawal.h"

namespace vtw::tools {
namespace {

// One sequence of `layout` rows [begin, end), no withdrawal, on `cache`.
ForwardBatch Rows(const PromptLayout& layout, int64_t begin, int64_t end, KvCache* cache,
                  int num_layers, bool logits) {
  ForwardBatch b;
  b.AppendRows(layout.token_ids, layout.kinds, begin, end);
  b.seqs.push_back({cache, static_cast<int>(end - begin), WithdrawalOff(num_layers), logits});
  return b;
}

}  // namespace

StatusOr<BlockedGeneration> GenerateBlocked(const ModelBundle& bundle, const PromptLayout& layout,
                                            const at::Tensor& image_features, int block_layers,
                                            int max_new_tokens) {
  const LlavaModel& model = *bundle.model;
  const int num_layers = model.num_layers();
  if (block_layers < 0 || block_layers > num_layers) {
    return InvalidArgument("block layer " + std::to_string(block_layers) + " is outside [0, " +
                           std::to_string(num_layers) + "]");
  }
  if (max_new_tokens < 1) return InvalidArgument("max_new_tokens must be >= 1");
  if (layout.size() + max_new_tokens > model.config().text.max_position_embeddings) {
    return InvalidArgument("prompt + max_new_tokens exceed the context length");
  }
  // Cache `c` is what the text rows and generated tokens attend to.
  KvCache c = model.NewKvCache();
  int64_t text_begin = 0;
  if (layout.num_image_tokens > 0) {
    const int64_t prefix = layout.image_start;
    const int64_t image_end = layout.image_start + layout.num_image_tokens;
    if (image_end >= layout.size()) {
      return InvalidArgument("the prompt ends with the image: no text row to block");
    }
    // 1. Rows up to the end of the image, full model (they never see later text anyway).
    KvCache a = model.NewKvCache();
    ForwardBatch b = Rows(layout, 0, image_end, &a, num_layers, /*logits=*/false);
    b.image_embeds = image_features;
    model.Forward(b);
    // 2. Layers < block_layers keep only the rows before the image.
    for (int l = 0; l < num_layers; ++l) {
      const int64_t n = l < block_layers ? prefix : image_end;
      c.Append(l, a.keys(l).narrow(1, 0, n), a.values(l).narrow(1, 0, n));
    }
    text_begin = image_end;
  }
  // 3. The text rows after the image.
  ForwardBatch b = Rows(layout, text_begin, layout.size(), &c, num_layers, /*logits=*/true);
  if (layout.num_image_tokens > 0 && text_begin == 0) b.image_embeds = image_features;
  at::Tensor logits = model.Forward(b).logits[0];
  // 4. Greedy decoding on the same cache, through the same output path as serving.
  StopParams stop;
  stop.max_new_tokens = max_new_tokens;
  stop.eos_id = bundle.tokenizer->eos_id();
  Sampler sampler(SamplingParams{});
  SequenceOutput output(bundle.tokenizer.get(), stop);
  BlockedGeneration out;
  const int64_t vocab = model.config().text.vocab_size;
  while (true) {
    at::Tensor row = logits.contiguous();
    if (!out.first_logits.defined()) out.first_logits = row;
    const int32_t token = sampler.Sample(row.data_ptr<float>(), vocab);
    output.Append(token);
    if (output.finished()) break;
    ForwardBatch d;
    d.token_ids = {token};
    d.positions = {layout.size() + static_cast<int64_t>(output.token_ids().size()) - 1};
    d.kinds = {TokenKind::kText};
    d.seqs.push_back({&c, 1, WithdrawalOff(num_layers), true});
    logits = model.Forward(d).logits[0];
  }
  out.token_ids = output.token_ids();
  out.text = output.text();
  return out;
}

}  // namespace vtw::tools
