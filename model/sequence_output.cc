#include "model/sequence_output.h"

#include <algorithm>

namespace vtw {
namespace {

// Largest prefix length <= n of `text` that does not split a UTF-8 character.
size_t Utf8Boundary(const std::string& text, size_t n) {
  while (n > 0 && n < text.size() && (static_cast<unsigned char>(text[n]) & 0xC0) == 0x80) --n;
  return n;
}

}  // namespace

SequenceOutput::SequenceOutput(const Tokenizer* tokenizer, StopParams stop)
    : stop_(std::move(stop)), checker_(stop_) {
  if (tokenizer) detok_ = std::make_unique<IncrementalDetokenizer>(*tokenizer);
  for (const std::string& s : stop_.stop) {
    if (!s.empty()) holdback_ = std::max(holdback_, s.size() - 1);
  }
}

std::string SequenceOutput::Append(int32_t token) {
  token_ids_.push_back(token);
  const bool eos = token == stop_.eos_id && !stop_.ignore_eos;
  if (detok_ && !eos) text_ += detok_->Push(token);
  size_t visible = std::string::npos;
  finish_reason_ = checker_.Check(token, static_cast<int>(token_ids_.size()), text_, &visible);
  size_t end = text_.size();
  if (finish_reason_ == FinishReason::kStop) {
    text_.resize(visible);
    end = visible;
  } else if (finished()) {
    if (detok_) text_ += detok_->Flush();
    end = text_.size();
  } else {
    end = Utf8Boundary(text_, end > holdback_ ? end - holdback_ : 0);
  }
  if (end <= released_) return {};
  std::string delta = text_.substr(released_, end - released_);
  released_ = end;
  return delta;
}

}  // namespace vtw
