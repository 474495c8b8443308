#include "model/batch_rows.h"

#include <ATen/ATen.h>

namespace vtw {

BatchRows::BatchRows(const ForwardBatch& batch, int num_layers)
    : batch_(batch), seq_end_(batch.seqs.size()) {
  const int64_t total = batch.num_tokens();
  TORCH_CHECK(static_cast<int64_t>(batch.positions.size()) == total &&
                  static_cast<int64_t>(batch.kinds.size()) == total,
              "ForwardBatch: token_ids, positions and kinds differ in length");
  row_seq_.reserve(total);
  for (size_t s = 0; s < batch.seqs.size(); ++s) {
    const SequenceChunk& seq = batch.seqs[s];
    TORCH_CHECK(seq.num_tokens >= 0, "ForwardBatch: a sequence has a negative row count");
    TORCH_CHECK(seq.withdraw_layer >= 0 && seq.withdraw_layer <= num_layers,
                "ForwardBatch: withdraw_layer ", seq.withdraw_layer, " is outside [0, ", num_layers,
                "] (", num_layers, " = no withdrawal)");
    row_seq_.insert(row_seq_.end(), seq.num_tokens, static_cast<int>(s));
    TORCH_CHECK(static_cast<int64_t>(row_seq_.size()) <= total,
                "ForwardBatch: sequence rows exceed the token count");
    seq_end_[s] = static_cast<int64_t>(row_seq_.size());
  }
  TORCH_CHECK(static_cast<int64_t>(row_seq_.size()) == total,
              "ForwardBatch: sequence rows do not add up to the token count");
  original_.resize(total);
  for (int64_t r = 0; r < total; ++r) original_[r] = r;
  IndexSequences();
}

void BatchRows::WithdrawImageRows(int layer, std::initializer_list<at::Tensor*> rows_first) {
  std::vector<int64_t> keep;  // current rows that stay
  keep.reserve(original_.size());
  for (size_t i = 0; i < original_.size(); ++i) {
    const int64_t r = original_[i];
    const bool withdraw =
        batch_.kinds[r] == TokenKind::kImage && batch_.seqs[row_seq_[r]].withdraw_layer <= layer;
    if (!withdraw) keep.push_back(static_cast<int64_t>(i));
  }
  if (keep.size() == original_.size()) return;
  const at::Tensor index = at::tensor(keep, at::TensorOptions().dtype(at::kLong));
  for (at::Tensor* t : rows_first) *t = t->index_select(0, index);
  std::vector<int64_t> next(keep.size());
  for (size_t i = 0; i < keep.size(); ++i) next[i] = original_[keep[i]];
  original_ = std::move(next);
  IndexSequences();
}

void BatchRows::IndexSequences() {
  seqs_.assign(batch_.seqs.size(), AttentionSequence{});
  for (size_t s = 0; s < seqs_.size(); ++s) seqs_[s].cache = batch_.seqs[s].cache;
  for (size_t i = original_.size(); i-- > 0;) seqs_[row_seq_[original_[i]]].first_row = i;
  for (int64_t r : original_) ++seqs_[row_seq_[r]].num_rows;
}

int64_t BatchRows::LastRowForLogits(int s) const {
  const AttentionSequence& seq = seqs_[s];
  TORCH_CHECK(seq.num_rows > 0, "Forward: every row of a sequence needing logits was withdrawn");
  const int64_t last = seq.first_row + seq.num_rows - 1;
  TORCH_CHECK(original_[last] == seq_end_[s] - 1,
              "Forward: the last row of a sequence needing logits was withdrawn");
  return last;
}

}  // namespace vtw
