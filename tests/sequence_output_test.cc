// SequenceOutput, the one per-sequence output path (engine, generator, evaluator): the streamed
// pieces add up to the final text, which equals the tokenizer's Decode; EOS, stop strings and
// max_new_tokens end the sequence with the right reason; a possible stop-string prefix is never
// streamed early and a UTF-8 character is never split; no tokenizer means no text.
#include <gtest/gtest.h>

#include "model/sequence_output.h"
#include "tests/util/oracle.h"

namespace vtw {
namespace {

const Tokenizer& Tok() {
  static const Tokenizer* tok = [] {
    auto t = Tokenizer::Load(testing::OracleModelDir());
    EXPECT_TRUE(t.ok()) << t.status().ToString();
    return t.value().release();
  }();
  return *tok;
}

bool IsValidUtf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t j = 1; j < n; ++j) {
      if ((static_cast<unsigned char>(s[i + j]) & 0xC0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

StopParams Stop(int max_new_tokens, std::vector<std::string> stop = {}, bool ignore_eos = false) {
  StopParams p;
  p.max_new_tokens = max_new_tokens;
  p.ignore_eos = ignore_eos;
  p.eos_id = Tok().eos_id();
  p.stop = std::move(stop);
  return p;
}

// Feeds `ids` until the output finishes; returns the streamed pieces.
std::vector<std::string> Feed(SequenceOutput& out, const std::vector<int32_t>& ids) {
  std::vector<std::string> pieces;
  for (int32_t id : ids) {
    if (out.finished()) break;
    pieces.push_back(out.Append(id));
    EXPECT_TRUE(IsValidUtf8(pieces.back())) << "piece " << pieces.size() - 1;
  }
  return pieces;
}

std::string Join(const std::vector<std::string>& pieces) {
  std::string s;
  for (const auto& p : pieces) s += p;
  return s;
}

const char kText[] = "the red circle, héllo wörld: 日本 END of it";

TEST(SequenceOutput, LengthLimitStreamsExactlyTheDecodedText) {
  const std::vector<int32_t> ids = Tok().Encode(kText, /*add_bos=*/false);
  SequenceOutput out(&Tok(), Stop(static_cast<int>(ids.size())));
  const std::vector<std::string> pieces = Feed(out, ids);
  ASSERT_TRUE(out.finished());
  EXPECT_EQ(out.finish_reason(), FinishReason::kLength);
  EXPECT_EQ(out.token_ids(), ids);
  EXPECT_EQ(out.text(), Tok().Decode(ids, /*skip_special_tokens=*/true));
  EXPECT_EQ(Join(pieces), out.text());
}

TEST(SequenceOutput, EosEndsWithoutAddingText) {
  std::vector<int32_t> ids = Tok().Encode("red", false);
  ids.push_back(Tok().eos_id());
  ids.push_back(ids.front());  // never fed: the sequence ended
  SequenceOutput out(&Tok(), Stop(50));
  const std::string streamed = Join(Feed(out, ids));
  EXPECT_EQ(out.finish_reason(), FinishReason::kEos);
  EXPECT_EQ(out.text(), "red");
  EXPECT_EQ(streamed, "red");
  EXPECT_EQ(out.token_ids().size(), ids.size() - 1);  // the EOS is kept, the token after is not
  EXPECT_EQ(out.token_ids().back(), Tok().eos_id());

  SequenceOutput ignoring(&Tok(), Stop(static_cast<int>(ids.size()), {}, /*ignore_eos=*/true));
  Feed(ignoring, ids);
  EXPECT_EQ(ignoring.finish_reason(), FinishReason::kLength);
  EXPECT_EQ(ignoring.token_ids().size(), ids.size());
}

TEST(SequenceOutput, StopStringCutsTheTextAndIsNeverStreamed) {
  const std::vector<int32_t> ids = Tok().Encode(kText, false);
  SequenceOutput out(&Tok(), Stop(500, {"END", "zzz-never"}));
  const std::vector<std::string> pieces = Feed(out, ids);
  ASSERT_EQ(out.finish_reason(), FinishReason::kStop);
  EXPECT_EQ(out.text(), "the red circle, héllo wörld: 日本 ");
  EXPECT_EQ(Join(pieces), out.text());
  // Until the end, what was released is always a prefix that cannot hide the start of a stop
  // string: the last (longest stop - 1) bytes were held back.
  std::string released;
  const std::string full = Tok().Decode(ids, true);
  for (size_t i = 0; i + 1 < pieces.size(); ++i) {
    released += pieces[i];
    EXPECT_EQ(released.find('E'), std::string::npos) << "streamed part of END early at " << i;
  }
  EXPECT_LT(out.token_ids().size(), ids.size()) << "stopped as soon as END appeared";
}

TEST(SequenceOutput, HeldBackBytesAreReleasedWhenTheyCannotStartAStopString) {
  const std::vector<int32_t> ids = Tok().Encode("abc def ghi jkl", false);
  ASSERT_GE(ids.size(), 3u);
  SequenceOutput out(&Tok(), Stop(static_cast<int>(ids.size()), {"#####"}));  // holds back 4
  std::string released;
  for (size_t i = 0; i + 1 < ids.size(); ++i) {
    released += out.Append(ids[i]);
    const std::string so_far = Tok().Decode({ids.begin(), ids.begin() + i + 1}, true);
    EXPECT_EQ(released, so_far.substr(0, so_far.size() > 4 ? so_far.size() - 4 : 0)) << i;
  }
  released += out.Append(ids.back());
  EXPECT_EQ(out.finish_reason(), FinishReason::kLength);
  EXPECT_EQ(released, "abc def ghi jkl");  // the held-back tail arrives when the sequence ends
}

TEST(SequenceOutput, WithoutATokenizerThereIsNoText) {
  SequenceOutput out(nullptr, Stop(3, {"x"}));
  EXPECT_EQ(out.Append(7), "");
  EXPECT_EQ(out.Append(Tok().eos_id()), "");
  EXPECT_EQ(out.finish_reason(), FinishReason::kEos);
  EXPECT_TRUE(out.text().empty());
  SequenceOutput len(nullptr, Stop(2));
  len.Append(7);
  EXPECT_FALSE(len.finished());
  len.Append(8);
  EXPECT_EQ(len.finish_reason(), FinishReason::kLength);
  EXPECT_EQ(len.token_ids(), (std::vector<int32_t>{7, 8}));
}

}  // namespace
}  // namespace vtw
