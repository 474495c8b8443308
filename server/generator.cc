#include "server/generator.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>

#include "model/sequence_output.h"
#include "vtw/withdrawal.h"

namespace vtw {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

Status CheckRequest(const LlavaModel& model, const PromptLayout& layout,
                    const GenerateOptions& options) {
  VTW_RETURN_IF_ERROR(CheckWithdrawLayer(layout, options.withdraw_layer, model.num_layers()));
  VTW_RETURN_IF_ERROR(ValidateSamplingParams(options.sampling));
  if (layout.size() == 0) return InvalidArgument("empty prompt");
  const int64_t max_len = model.config().text.max_position_embeddings;
  if (layout.size() + options.stop.max_new_tokens > max_len) {
    return InvalidArgument("prompt (" + std::to_string(layout.size()) +
                           " tokens) + max_new_tokens (" +
                           std::to_string(options.stop.max_new_tokens) +
                           ") exceeds the context length " + std::to_string(max_len));
  }
  return Status::Ok();
}

}  // namespace

Flops GenerateResult::total_flops() const {
  Flops total = prefill_flops;
  total += decode_flops;
  total += Flops{vision_flops, vision_flops};
  return total;
}

StatusOr<GenerateResult> GenerateOne(const LlavaModel& model, const Tokenizer* tokenizer,
                                     const PromptLayout& layout, const at::Tensor& image_features,
                                     const GenerateOptions& options) {
  VTW_RETURN_IF_ERROR(CheckRequest(model, layout, options));
  const int num_layers = model.num_layers();
  const int k = options.withdraw_layer;
  const ComputeModel compute(model.config(), c10::elementSize(model.dtype()));
  GenerateResult result;
  if (layout.num_image_tokens > 0) result.vision_flops = compute.VisionFlops();
  KvCache cache =
      model.NewKvCache(KvCapacityPerLayer(layout, k, num_layers, options.stop.max_new_tokens));
  std::vector<TokenKind> kinds = layout.kinds;  // grows with generated tokens

  // Prefill (optionally chunked).
  auto start = std::chrono::steady_clock::now();
  const int64_t chunk = options.prefill_chunk > 0 ? options.prefill_chunk : layout.size();
  at::Tensor logits;
  int64_t image_rows_done = 0;
  for (int64_t begin = 0; begin < layout.size(); begin += chunk) {
    const int64_t end = std::min(layout.size(), begin + chunk);
    ForwardBatch batch;
    const int64_t image_rows = batch.AppendRows(layout.token_ids, layout.kinds, begin, end);
    if (image_rows > 0) {
      batch.image_embeds = image_features.narrow(0, image_rows_done, image_rows);
      image_rows_done += image_rows;
    }
    const bool last_chunk = end == layout.size();
    batch.seqs.push_back({&cache, static_cast<int>(end - begin), k, last_chunk});
    ForwardOutput out = model.Forward(batch);
    result.prefill_flops += compute.ChunkFlops(kinds, begin, end, k, last_chunk);
    if (last_chunk) logits = out.logits[0];
  }
  result.prefill_seconds = SecondsSince(start);

  // Decode: sample, feed the output, then run the new token at its index in the full sequence.
  Sampler sampler(options.sampling);
  SequenceOutput output(tokenizer, options.stop);
  const int64_t vocab = model.config().text.vocab_size;
  start = std::chrono::steady_clock::now();
  while (true) {
    at::Tensor row = logits.contiguous();
    if (!result.first_logits.defined()) result.first_logits = row;
    if (options.record_step_logits) result.step_logits.push_back(row);
    const int32_t token = sampler.Sample(row.data_ptr<float>(), vocab);
    output.Append(token);
    if (output.finished()) break;
    const int64_t position = static_cast<int64_t>(kinds.size());
    result.decode_flops +=
        compute.DecodeStepFlops(position - layout.num_image_tokens, layout.num_image_tokens, k);
    kinds.push_back(TokenKind::kText);
    ForwardBatch batch;
    batch.token_ids = {token};
    batch.positions = {position};
    batch.kinds = {TokenKind::kText};
    batch.seqs.push_back({&cache, 1, k, true});
    logits = model.Forward(batch).logits[0];
  }
  result.decode_seconds = SecondsSince(start);
  result.token_ids = output.token_ids();
  result.text = output.text();
  result.finish_reason = output.finish_reason();
  result.kv_cache_bytes = cache.bytes_used();
  const int64_t text = static_cast<int64_t>(kinds.size()) - layout.num_image_tokens;
  result.kv_cache_bytes_without_vtw =
      compute.KvCacheBytes(text, layout.num_image_tokens, WithdrawalOff(num_layers));
  return result;
}

}  // namespace vtw
