// SequenceOutput: what one sequence's generated tokens become: the text (streaming
// detokenization), when the sequence ends (EOS, a stop string, max_new_tokens) and how much of
// the text is safe to stream so far (a possible stop-string prefix is held back, and never a
// split UTF-8 character is released). The one output path of the system: the engine, the
// single-request generator and the evaluator all feed sampled tokens through it.
// One instance per sequence; not thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/sampler.h"
#include "model/tokenizer.h"

namespace vtw {

class SequenceOutput {
 public:
  // `tokenizer` may be null: no text then (and stop strings never match). It must outlive this.
  SequenceOutput(const Tokenizer* tokenizer, StopParams stop);
  SequenceOutput(const SequenceOutput&) = delete;
  SequenceOutput& operator=(const SequenceOutput&) = delete;

  // Feeds the next generated token (not after finished()). Returns the text newly safe to show:
  // with stop strings, the last (longest stop string - 1) bytes wait until they cannot start a
  // stop string; once the sequence finishes, everything left of the final text.
  std::string Append(int32_t token);

  bool finished() const { return finish_reason_ != FinishReason::kNone; }
  FinishReason finish_reason() const { return finish_reason_; }
  // All text so far; once finished, the final text (cut before a stop string; EOS adds none).
  const std::string& text() const { return text_; }
  // Generated ids, the EOS included when it ended the sequence.
  const std::vector<int32_t>& token_ids() const { return token_ids_; }

 private:
  StopParams stop_;
  StopChecker checker_;
  std::unique_ptr<IncrementalDetokenizer> detok_;  // null without a tokenizer
  size_t holdback_ = 0;  // bytes that could still be the start of a stop string
  std::string text_;
  size_t released_ = 0;  // bytes of text_ already returned by Append
  std::vector<int32_t> token_ids_;
  FinishReason finish_reason_ = FinishReason::kNone;
};

}  // namespace vtw
