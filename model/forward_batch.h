// ForwardBatch: the flat, ragged batch that LlavaModel::Forward runs. Tokens from many
// sequences at once (prefill chunks and single decode tokens mixed); each token carries its
// sequence, position id and kind (text or image). Plain data; thread-compatible.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace vtw {

class KvCache;

enum class TokenKind : uint8_t { kText = 0, kImage = 1 };

// The rows of one sequence in a batch. Rows of a sequence are contiguous and in order.
struct SequenceChunk {
  // Every field is explicit: in particular there is no default withdrawal layer, so a caller
  // that means "no withdrawal" says so (vtw::kVtwOff semantics: K = the model's layer count).
  SequenceChunk(KvCache* cache, int num_tokens, int withdraw_layer, bool compute_logits)
      : cache(cache),
        num_tokens(num_tokens),
        withdraw_layer(withdraw_layer),
        compute_logits(compute_logits) {}

  KvCache* cache;       // new keys/values are appended; nullptr: no cache (attend within the
                        // chunk only, as in training)
  int num_tokens;       // rows of this sequence in the batch
  // Withdrawal layer K in [0, num_layers]: before decoder layer K runs, this sequence's image
  // rows leave the batch (model/batch_rows.h). K = num_layers: no withdrawal.
  int withdraw_layer;
  bool compute_logits;  // logits of the sequence's last row
};

struct ForwardBatch {
  std::vector<int64_t> token_ids;  // [T]; ignored for image rows
  std::vector<int64_t> positions;  // [T] original position ids (not renumbered by withdrawal)
  std::vector<TokenKind> kinds;    // [T]
  std::vector<SequenceChunk> seqs;
  at::Tensor image_embeds;         // [num image rows, Ht], in the order of the image rows

  int64_t num_tokens() const { return static_cast<int64_t>(token_ids.size()); }

  // Appends positions [begin, end) of a sequence whose tokens and kinds are `ids` and `row_kinds`
  // (position id = index in the full sequence). Returns how many of the rows are image rows.
  // The caller adds the SequenceChunk and the image rows' embeddings.
  int64_t AppendRows(const std::vector<int64_t>& ids, const std::vector<TokenKind>& row_kinds,
                     int64_t begin, int64_t end) {
    int64_t image_rows = 0;
    for (int64_t p = begin; p < end; ++p) {
      token_ids.push_back(ids[p]);
      positions.push_back(p);
      kinds.push_back(row_kinds[p]);
      image_rows += row_kinds[p] == TokenKind::kImage;
    }
    return image_rows;
  }
};

// What Forward can record besides logits (tests, calibration, the attention-sink study).
struct ForwardTrace {
  bool all_logits = false;         // logits for every row present after the last layer
  bool hidden_states = false;      // [layers + 1] hidden states of the rows present at each
  bool last_row_attention = false; // per layer, attention probs of each sequence's last row

  std::vector<at::Tensor> hidden;         // [0] = input embeddings, [i] = after layer i - 1,
                                          // back = final norm output; each [rows_i, Ht]
  at::Tensor logits_all;                  // [rows at the end, V] fp32
  std::vector<int64_t> final_rows;        // [rows at the end] original batch row of each row
  // attention[layer][seq]: [heads, keys] probabilities of the sequence's last row over the keys
  // of that layer (cache entries then chunk rows).
  std::vector<std::vector<at::Tensor>> attention;
};

struct ForwardOutput {
  at::Tensor logits;                 // [num seqs with compute_logits, V] fp32
  std::vector<int> logits_seq;       // sequence index of each logits row
};

}  // namespace vtw
