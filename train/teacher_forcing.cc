#include "train/teacher_forcing.h"

#include <algorithm>

#include <ATen/ATen.h>

namespace vtw::tools {

Batch AssembleBatch(const LlavaModel& model, const EncodedSplit& data,
                    const std::vector<std::vector<int64_t>>& groups,
                    const std::vector<int>& withdraw) {
  Batch b;
  // Unique images, in first-use order.
  std::vector<int64_t> images;
  std::vector<int64_t> seq_image(groups.size());
  std::map<int32_t, int64_t> image_slot;
  for (size_t s = 0; s < groups.size(); ++s) {
    const int32_t img = data.examples[groups[s].front()].image;
    auto it = image_slot.find(img);
    if (it == image_slot.end()) {
      it = image_slot.emplace(img, static_cast<int64_t>(images.size())).first;
      images.push_back(img);
    }
    seq_image[s] = it->second;
  }
  at::Tensor features = model.EncodeImages(data.Pixels(images));  // [n_img, P, Ht]
  b.features = features;
  b.images = images;
  const int64_t p = features.size(1), ht = features.size(2);
  at::Tensor idx = at::tensor(seq_image, at::TensorOptions().dtype(at::kLong));
  b.fb.image_embeds = features.index_select(0, idx).reshape({-1, ht});
  int64_t base = 0;
  for (size_t s = 0; s < groups.size(); ++s) {
    // The sequence: turn 0's prompt (with the image rows) and answer + EOS, then each later
    // turn's prompt and answer + EOS; the final EOS is only a target, never an input.
    std::vector<int64_t> ids;
    std::vector<TokenKind> kinds;
    b.first_target.push_back(static_cast<int64_t>(b.targets.size()));
    for (size_t t = 0; t < groups[s].size(); ++t) {
      const TrainExample& ex = data.examples[groups[s][t]];
      if (t == 0) {
        ids.insert(ids.end(), ex.prompt_ids.begin(), ex.prompt_ids.end());
        kinds.insert(kinds.end(), ex.kinds.begin(), ex.kinds.end());
      } else {
        ids.insert(ids.end(), ex.turn_ids.begin(), ex.turn_ids.end());
        kinds.resize(ids.size(), TokenKind::kText);
      }
      for (size_t j = 0; j < ex.target_ids.size(); ++j) {
        b.target_rows.push_back(base + static_cast<int64_t>(ids.size()) - 1);
        b.targets.push_back(ex.target_ids[j]);
        b.target_seq.push_back(static_cast<int>(s));
        ids.push_back(ex.target_ids[j]);
        kinds.push_back(TokenKind::kText);
      }
    }
    const int64_t n = static_cast<int64_t>(ids.size()) - 1;
    int64_t image_rows = 0;
    for (int64_t i = 0; i < n; ++i) {
      b.fb.token_ids.push_back(ids[i]);
      b.fb.kinds.push_back(kinds[i]);
      b.fb.positions.push_back(i);
      image_rows += kinds[i] == TokenKind::kImage;
    }
    TORCH_CHECK(image_rows == p, "example image rows differ from the model's image tokens");
    b.fb.seqs.push_back({/*cache=*/nullptr, static_cast<int>(n), withdraw[s], /*compute_logits=*/false});
    base += n;
  }
  b.tokens = base;
  return b;
}

// Logits [targets, V] of the batch's target rows.
at::Tensor TargetLogits(const LlavaModel& model, const Batch& b) {
  ForwardTrace trace;
  trace.all_logits = true;
  model.Forward(b.fb, &trace);
  std::vector<int64_t> final_index(b.fb.num_tokens(), -1);
  for (size_t i = 0; i < trace.final_rows.size(); ++i) {
    final_index[trace.final_rows[i]] = static_cast<int64_t>(i);
  }
  std::vector<int64_t> gather(b.target_rows.size());
  for (size_t i = 0; i < gather.size(); ++i) {
    gather[i] = final_index[b.target_rows[i]];
    TORCH_CHECK(gather[i] >= 0, "a target row was withdrawn");
  }
  return trace.logits_all.index_select(0, at::tensor(gather, at::TensorOptions().dtype(at::kLong)));
}

EvalResult Evaluate(const LlavaModel& model, const EncodedSplit& data, int withdraw_layer,
                    int batch_size) {
  at::NoGradGuard no_grad;
  EvalResult r;
  const int64_t n = static_cast<int64_t>(data.examples.size());
  std::vector<int64_t> correct_type(kQuestionTypes.size(), 0), count_type(kQuestionTypes.size(), 0);
  int64_t exact = 0, first = 0, targets = 0;
  double loss_sum = 0;
  for (int64_t b0 = 0; b0 < n; b0 += batch_size) {
    std::vector<int64_t> idx;
    for (int64_t i = b0; i < std::min(n, b0 + batch_size); ++i) idx.push_back(i);
    std::vector<std::vector<int64_t>> groups;
    for (int64_t i : idx) groups.push_back({i});
    Batch b = AssembleBatch(model, data, groups, std::vector<int>(idx.size(), withdraw_layer));
    at::Tensor logits = TargetLogits(model, b);
    at::Tensor tgt = at::tensor(b.targets, at::TensorOptions().dtype(at::kLong));
    loss_sum += at::cross_entropy_loss(logits, tgt, {}, at::Reduction::Sum).item<double>();
    targets += static_cast<int64_t>(b.targets.size());
    at::Tensor pred = logits.argmax(-1).contiguous();
    const int64_t* p = pred.data_ptr<int64_t>();
    std::vector<bool> ok(idx.size(), true);
    for (size_t t = 0; t < b.targets.size(); ++t) {
      if (p[t] != b.targets[t]) ok[b.target_seq[t]] = false;
    }
    for (size_t s = 0; s < idx.size(); ++s) {
      const int type = data.examples[idx[s]].type;
      first += p[b.first_target[s]] == b.targets[b.first_target[s]];
      exact += ok[s];
      if (type >= 0) {
        ++count_type[type];
        correct_type[type] += ok[s];
      }
    }
  }
  r.count = n;
  r.exact_accuracy = n ? static_cast<double>(exact) / n : 0;
  r.first_token_accuracy = n ? static_cast<double>(first) / n : 0;
  r.loss = targets ? loss_sum / targets : 0;
  for (size_t t = 0; t < kQuestionTypes.size(); ++t) {
    if (count_type[t] == 0) continue;
    r.exact_by_type[kQuestionTypes[t]] = static_cast<double>(correct_type[t]) / count_type[t];
    r.count_by_type[kQuestionTypes[t]] = count_type[t];
  }
  return r;
}

}  // namespace vtw::tools
