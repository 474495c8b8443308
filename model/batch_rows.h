// BatchRows: which rows of a ForwardBatch are still in the batch at the current decoder layer,
// and where each sequence's rows are. WithdrawImageRows is the mechanism of Visual Tokens
// Withdrawal: before layer K of a sequence, its image rows leave the batch with one row gather,
// so every later op (projections, attention, MLP, KV-cache appends) sees fewer rows. Nothing
// else removes rows; the kept rows keep their order and their original position ids.
// Bookkeeping on the CPU plus the gather; not thread-safe (one forward pass owns it).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "model/attention.h"
#include "model/forward_batch.h"

namespace vtw {

class BatchRows {
 public:
  // Every row of `batch` (which must outlive this object). Checks (programmer errors) that the
  // per-row vectors have one entry per row, that the sequences' row counts add up, and that each
  // sequence's withdrawal layer is in [0, num_layers] (num_layers: no withdrawal).
  BatchRows(const ForwardBatch& batch, int num_layers);

  // Removes the image rows of every sequence whose withdrawal layer is <= `layer`: the same row
  // gather on each tensor of `rows_first` (each [rows, ...], rows in batch order). A no-op when
  // no row leaves.
  void WithdrawImageRows(int layer, std::initializer_list<at::Tensor*> rows_first);

  int64_t size() const { return static_cast<int64_t>(original_.size()); }
  // Each sequence's rows in the current batch (its cache, first row, row count).
  const std::vector<AttentionSequence>& sequences() const { return seqs_; }
  // The original batch row of each current row.
  const std::vector<int64_t>& original_rows() const { return original_; }
  // The current row holding sequence `s`'s last original row. Checks (programmer error) that it
  // was not withdrawn: a sequence that needs logits must end with a text row.
  int64_t LastRowForLogits(int s) const;

 private:
  void IndexSequences();

  const ForwardBatch& batch_;
  std::vector<int> row_seq_;             // [T] sequence of each original row
  std::vector<int64_t> seq_end_;         // [S] one past each sequence's last original row
  std::vector<int64_t> original_;        // [rows now] original row of each current row
  std::vector<AttentionSequence> seqs_;  // [S]
};

}  // namespace vtw
