#include "vtw/generator.h"

#include <algorithm>
#include <chrono>

#include <ATen/ATen.h>

namespace vtw {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

Status CheckWithdrawable(const PromptLayout& layout, int withdraw_layer, int num_layers) {
  if (withdraw_layer < 0) {
    return InvalidArgument("VTW layer must be >= 0, got " + std::to_string(withdraw_layer));
  }
  if (withdraw_layer >= num_layers || layout.num_image_tokens == 0) return Status::Ok();
  if (!layout.kinds.empty() && layout.kinds.back() == TokenKind::kImage) {
    return InvalidArgument("the prompt ends with <image>: with VTW the image tokens are withdrawn "
                           "and no text token is left to predict from; add text after <image> or "
                           "turn VTW off");
  }
  return Status::Ok();
}

StatusOr<GenerateResult> GenerateOne(const LlavaModel& model, const Tokenizer* tokenizer,
                                     const PromptLayout& layout, const at::Tensor& image_features,
                                     const GenerateOptions& options) {
  const int num_layers = model.num_layers();
  VTW_RETURN_IF_ERROR(CheckWithdrawable(layout, options.withdraw_layer, num_layers));
  VTW_RETURN_IF_ERROR(ValidateSamplingParams(options.sampling));
  if (layout.size() == 0) return InvalidArgument("empty prompt");
  const int64_t max_len = model.config().text.max_position_embeddings;
  if (layout.size() + options.stop.max_new_tokens > max_len) {
    return InvalidArgument("prompt (" + std::to_string(layout.size()) + " tokens) + max_new_tokens (" +
                           std::to_string(options.stop.max_new_tokens) +
                           ") exceeds the context length " + std::to_string(max_len));
  }
  const int k = std::min(options.withdraw_layer, num_layers);
  const ComputeModel compute(model.config(), c10::elementSize(model.dtype()));
  GenerateResult result;
  if (layout.num_image_tokens > 0) result.vision_flops = compute.VisionFlops();

  // Cache sized the VTW way: layers >= K never hold image entries.
  std::vector<int64_t> capacity(num_layers);
  for (int l = 0; l < num_layers; ++l) {
    capacity[l] = (l < k ? layout.size() : layout.num_text_tokens()) + options.stop.max_new_tokens;
  }
  KvCache cache = model.NewKvCache(capacity);
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

  Sampler sampler(options.sampling);
  StopChecker stop(options.stop);
  std::unique_ptr<IncrementalDetokenizer> detok;
  if (tokenizer) detok = std::make_unique<IncrementalDetokenizer>(*tokenizer);
  const int64_t vocab = model.config().text.vocab_size;
  start = std::chrono::steady_clock::now();
  for (int step = 0;; ++step) {
    at::Tensor row = logits.contiguous();
    if (step == 0) result.first_logits = row;
    if (options.record_step_logits) result.step_logits.push_back(row);
    const int32_t token = sampler.Sample(row.data_ptr<float>(), vocab);
    result.token_ids.push_back(token);
    size_t visible = std::string::npos;
    if (detok && !(token == options.stop.eos_id && !options.stop.ignore_eos)) {
      result.text += detok->Push(token);
    }
    FinishReason reason = stop.Check(token, step + 1, result.text, &visible);
    if (reason != FinishReason::kNone) {
      if (detok && reason != FinishReason::kStop) result.text += detok->Flush();
      if (reason == FinishReason::kStop) result.text.resize(visible);
      result.finish_reason = reason;
      break;
    }
    // Decode step: the new token goes in at its index in the full sequence.
    const int64_t position = static_cast<int64_t>(kinds.size());
    const int64_t cached_text = position - layout.num_image_tokens;
    result.decode_flops += compute.DecodeStepFlops(cached_text, layout.num_image_tokens, k);
    kinds.push_back(TokenKind::kText);
    ForwardBatch batch;
    batch.token_ids = {token};
    batch.positions = {position};
    batch.kinds = {TokenKind::kText};
    batch.seqs.push_back({&cache, 1, k, true});
    logits = model.Forward(batch).logits[0];
  }
  result.decode_seconds = SecondsSince(start);
  result.kv_cache_bytes = cache.bytes_used();
  const int64_t text = static_cast<int64_t>(kinds.size()) - layout.num_image_tokens;
  result.kv_cache_bytes_without_vtw = compute.KvCacheBytes(text, layout.num_image_tokens, num_layers);
  return result;
}

}  // namespace vtw
