// Teacher forcing over an EncodedSplit: batches of sequences (one image each, its questions as
// the first turn and later conversation turns) run through the runtime's own forward with
// per-sequence withdrawal; the logits at the answer positions; and the validation that scores
// greedy answers without generating (exact = every answer token and the EOS are the argmax).
// Used by the trainer's loss and its validation. Reads the model only (autograd aside).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "model/forward_batch.h"
#include "model/llava_model.h"
#include "train/train_data.h"

namespace vtw::tools {

// One assembled batch: the forward batch and where its targets are.
struct Batch {
  ForwardBatch fb;
  std::vector<int64_t> target_rows;  // original batch row whose logits predict each target
  std::vector<int64_t> targets;
  std::vector<int> target_seq;       // sequence of each target
  std::vector<int64_t> first_target; // index into targets of each sequence's first target
  int64_t tokens = 0;
  at::Tensor features;               // [n_img, P, Ht] projected image tokens
  std::vector<int64_t> images;       // split image index of each features row
};

// A batch of sequences; groups[s] lists the examples of sequence s (one image): the first in its
// single-question form, the others as later conversation turns. withdraw[s] is its K.
Batch AssembleBatch(const LlavaModel& model, const EncodedSplit& data,
                    const std::vector<std::vector<int64_t>>& groups,
                    const std::vector<int>& withdraw);

// Logits [targets, V] of the batch's target rows.
at::Tensor TargetLogits(const LlavaModel& model, const Batch& b);

// One validation result.
struct EvalResult {
  int64_t count = 0;
  double first_token_accuracy = 0;  // greedy first answer token correct
  double exact_accuracy = 0;        // every answer token and the EOS after it greedy-correct
  double loss = 0;                  // mean cross-entropy over answer tokens + EOS
  std::map<std::string, double> exact_by_type;
  std::map<std::string, int64_t> count_by_type;
};

// Accuracy of `model` on `data` with withdrawal at `withdraw_layer` (>= layers: off), teacher
// forced: exact = greedy decoding would emit exactly the answer tokens then EOS.
EvalResult Evaluate(const LlavaModel& model, const EncodedSplit& data, int withdraw_layer,
                    int batch_size = 64);

}  // namespace vtw::tools
