// Tests for model/tokenizer: parity with HF LlamaTokenizer (transformers 4.45.2) on the oracle
// fixtures (ids, pieces, decoded texts), HF decode quirks, the incremental detokenizer invariant,
// load errors and the chat template. Single-threaded.
#include "model/tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/util/npy.h"

namespace vtw {
namespace {

namespace fs = std::filesystem;
using ::vtw::testing::TestDataPath;

std::string ModelDir() { return TestDataPath("oracle/tiny-llava"); }

nlohmann::json LoadJson(const std::string& rel) {
  std::ifstream in(TestDataPath(rel));
  EXPECT_TRUE(in.good()) << rel;
  return nlohmann::json::parse(in);
}

std::string ReadAll(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Strict UTF-8 validity (no overlongs, surrogates or code points above U+10FFFF).
bool IsValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto b0 = static_cast<uint8_t>(s[i]);
    int n = 0;
    uint32_t cp = 0;
    if (b0 < 0x80) {
      n = 1;
      cp = b0;
    } else if ((b0 & 0xE0) == 0xC0) {
      n = 2;
      cp = b0 & 0x1F;
    } else if ((b0 & 0xF0) == 0xE0) {
      n = 3;
      cp = b0 & 0x0F;
    } else if ((b0 & 0xF8) == 0xF0) {
      n = 4;
      cp = b0 & 0x07;
    } else {
      return false;
    }
    if (i + n > s.size()) return false;
    for (int k = 1; k < n; ++k) {
      const auto b = static_cast<uint8_t>(s[i + k]);
      if ((b & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (b & 0x3F);
    }
    static const uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n;
  }
  return true;
}

std::vector<int32_t> ToIds(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

class TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto tok = Tokenizer::Load(ModelDir());
    ASSERT_TRUE(tok.ok()) << tok.status().ToString();
    tok_ = std::move(tok).value().release();
    cases_ = new nlohmann::json(LoadJson("oracle/fixtures/cases.json"));
    vtw_ = new nlohmann::json(LoadJson("oracle/fixtures/vtw.json"));
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete cases_;
    delete vtw_;
  }
  static const Tokenizer& tok() { return *tok_; }

  // Every greedy id sequence in the oracle: (label, ids, text, text_skip_special or null).
  struct Greedy {
    std::string label;
    std::vector<int32_t> ids;
    std::string text;
    std::optional<std::string> text_skip;
  };
  static std::vector<Greedy> AllGreedy() {
    std::vector<Greedy> out;
    for (const auto& c : (*cases_)["cases"]) {
      const auto& g = c["models"]["tiny-llava"]["greedy"];
      out.push_back({c["id"].get<std::string>(), ToIds(g["new_ids"]), g["text"],
                     g["text_skip_special"].get<std::string>()});
    }
    for (const auto& [cid, ks] : (*vtw_)["models"]["tiny-llava"]["cases"].items()) {
      for (const auto& [k, e] : ks.items()) {
        out.push_back({cid + "/" + k, ToIds(e["greedy_new_ids"]), e["greedy_text"], {}});
      }
    }
    return out;
  }

  static Tokenizer* tok_;
  static nlohmann::json* cases_;
  static nlohmann::json* vtw_;
};
Tokenizer* TokenizerTest::tok_ = nullptr;
nlohmann::json* TokenizerTest::cases_ = nullptr;
nlohmann::json* TokenizerTest::vtw_ = nullptr;

// Feeds `ids` through an IncrementalDetokenizer; checks each chunk is valid UTF-8 and that the
// concatenation equals Decode(ids, skip_special_tokens=true).
void ExpectStreamMatchesDecode(const Tokenizer& tok, const std::vector<int32_t>& ids,
                               const std::string& label) {
  IncrementalDetokenizer detok(tok);
  std::string streamed;
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::string chunk = detok.Push(ids[i]);
    ASSERT_TRUE(IsValidUtf8(chunk)) << label << " chunk after id #" << i << " (" << ids[i] << ")";
    streamed += chunk;
  }
  const std::string tail = detok.Flush();
  ASSERT_TRUE(IsValidUtf8(tail)) << label;
  streamed += tail;
  ASSERT_EQ(streamed, tok.Decode(ids, /*skip_special_tokens=*/true)) << label;
  // Flush reset the detokenizer: a second pass gives the same text.
  std::string again;
  for (const int32_t id : ids) again += detok.Push(id);
  again += detok.Flush();
  ASSERT_EQ(again, streamed) << label;
}

// ---------------------------------------------------------------------------------------------
// Oracle parity.

TEST_F(TokenizerTest, AccessorsMatchOracleMeta) {
  const auto& meta = (*cases_)["meta"];
  EXPECT_EQ(tok().bos_id(), meta["bos_id"].get<int>());
  EXPECT_EQ(tok().eos_id(), meta["eos_id"].get<int>());
  EXPECT_EQ(tok().pad_id(), meta["pad_id"].get<int>());
  EXPECT_EQ(tok().image_token_id(), meta["image_token_id"].get<int>());
  EXPECT_EQ(tok().vocab_size(), meta["vocab_size"].get<int>());
  EXPECT_EQ(tok().sp_vocab_size(), 400);
  EXPECT_EQ(tok().unk_id(), 0);
  EXPECT_FALSE(tok().legacy());
  EXPECT_TRUE(tok().add_bos_token());
  EXPECT_FALSE(tok().add_eos_token());

  for (int32_t id : {0, 1, 2, 400, 401}) EXPECT_TRUE(tok().IsSpecial(id)) << id;
  for (int32_t id : {3, 13, 263, 346, 362, 399}) EXPECT_FALSE(tok().IsSpecial(id)) << id;
  EXPECT_FALSE(tok().IsSpecial(-1));
  EXPECT_FALSE(tok().IsSpecial(402));

  EXPECT_EQ(tok().IdToPiece(400), "<image>");
  EXPECT_EQ(tok().IdToPiece(401), "<pad>");
  EXPECT_EQ(tok().IdToPiece(13), "<0x0A>");
  EXPECT_EQ(tok().IdToPiece(263), "\u2581the");
  EXPECT_EQ(tok().IdToPiece(402), "");
  EXPECT_EQ(tok().IdToPiece(-3), "");

  EXPECT_EQ(tok().FindToken("<image>"), std::optional<int32_t>(400));
  EXPECT_EQ(tok().FindToken("<pad>"), std::optional<int32_t>(401));
  EXPECT_EQ(tok().FindToken("<s>"), std::optional<int32_t>(1));
  EXPECT_EQ(tok().FindToken("<unk>"), std::optional<int32_t>(0));
  EXPECT_EQ(tok().FindToken("\u2581the"), std::optional<int32_t>(263));
  EXPECT_EQ(tok().FindToken("no-such-piece"), std::nullopt);
  EXPECT_EQ(tok().FindToken(""), std::nullopt);
}

TEST_F(TokenizerTest, OracleInputIdsAndPieces) {
  int checked = 0;
  for (const auto& c : (*cases_)["cases"]) {
    const std::string prompt = c["prompt"];
    const std::string id = c["id"];
    const std::vector<int32_t> ids = tok().Encode(prompt, /*add_bos=*/true);
    EXPECT_EQ(ids, ToIds(c["input_ids_unexpanded"])) << id << ": " << prompt;
    std::vector<std::string> pieces;
    for (const int32_t t : ids) pieces.push_back(tok().IdToPiece(t));
    EXPECT_EQ(pieces, c["tokens_unexpanded"].get<std::vector<std::string>>()) << id;
    // The prompt is exactly the chat template applied to the question.
    EXPECT_EQ(ApplyLlavaChatTemplate(c["question"].get<std::string>(), true), prompt) << id;
    EXPECT_EQ(CountOccurrences(prompt, kImageToken), 1) << id;
    ++checked;
  }
  EXPECT_EQ(checked, 8);
}

TEST_F(TokenizerTest, OracleRuleForPrompts) {
  // The README's rule: [1] + sp("▁USER: ") + [400] + sp("\n" + question + " ASSISTANT:"), i.e.
  // only the first chunk gets the "▁" prefix.
  const auto with = tok().Encode("USER: <image>\nWhat", true);
  EXPECT_EQ(with, (std::vector<int32_t>{1, 303, 370, 346, 400, 13, 373, 321}));
  EXPECT_EQ(tok().Encode("USER: <image>\nWhat", false),
            (std::vector<int32_t>{303, 370, 346, 400, 13, 373, 321}));
}

TEST_F(TokenizerTest, OracleGreedyTextsDecode) {
  int checked = 0;
  for (const auto& g : AllGreedy()) {
    EXPECT_EQ(tok().Decode(g.ids, /*skip_special_tokens=*/false), g.text) << g.label;
    if (g.text_skip) {
      EXPECT_EQ(tok().Decode(g.ids, /*skip_special_tokens=*/true), *g.text_skip) << g.label;
    }
    ++checked;
  }
  EXPECT_EQ(checked, 8 + 8 * 5);
}

TEST_F(TokenizerTest, OracleGreedyStreamsIncrementally) {
  for (const auto& g : AllGreedy()) {
    ExpectStreamMatchesDecode(tok(), g.ids, g.label);
  }
  // Prompt followed by the generation, as a server would never do but the invariant allows.
  for (const auto& c : (*cases_)["cases"]) {
    std::vector<int32_t> ids = ToIds(c["input_ids"]);
    const auto gen = ToIds(c["models"]["tiny-llava"]["greedy"]["new_ids"]);
    ids.insert(ids.end(), gen.begin(), gen.end());
    ExpectStreamMatchesDecode(tok(), ids, c["id"].get<std::string>() + "+prompt");
  }
}

// ---------------------------------------------------------------------------------------------
// HF decode quirks (expected values follow transformers 4.45.2 PreTrainedTokenizer._decode,
// LlamaTokenizer.convert_tokens_to_string and SentencePiece decoding).

TEST_F(TokenizerTest, DecodePromptIds) {
  const auto ids = tok().Encode("USER: <image>\nWhat color is the circle? ASSISTANT:", true);
  EXPECT_EQ(tok().Decode(ids, true), "USER: \nWhat color is the circle? ASSISTANT:");
  // <image> lies beyond the SentencePiece vocab and is an additional special token, so HF
  // decodes it as its own group joined with spaces; "<s>" then "▁USER" gives "<s> USER".
  EXPECT_EQ(tok().Decode(ids, false),
            "<s> USER:  <image> \nWhat color is the circle? ASSISTANT:");
}

TEST_F(TokenizerTest, DecodeQuirks) {
  const int32_t kO = 313;      // "▁o"
  const int32_t kM = 362;      // "m"
  const int32_t kSpace = 346;  // "▁"
  auto bytes = [](std::initializer_list<int> bs) {
    std::vector<int32_t> ids;
    for (int b : bs) ids.push_back(3 + b);  // <0x00> is id 3
    return ids;
  };
  // Only the very first piece loses its "▁".
  EXPECT_EQ(tok().Decode({kO, kO}, true), "o o");
  EXPECT_EQ(tok().Decode({kSpace, kO}, true), " o");
  EXPECT_EQ(tok().Decode({kM, kO}, true), "m o");
  // Skipped specials do not restart the run: the "▁" of the piece after them stays.
  EXPECT_EQ(tok().Decode({1, kM, 400, kO, 401, 2}, true), "m o");
  // Byte fallback: valid sequences join, invalid bytes become U+FFFD one per byte.
  EXPECT_EQ(tok().Decode(bytes({0xE6, 0x97, 0xA5}), true), "\xE6\x97\xA5");
  EXPECT_EQ(tok().Decode(bytes({0xEA, 0xB4, 0x50}), true), "\uFFFD\uFFFDP");
  EXPECT_EQ(tok().Decode(bytes({0xF0, 0x9F, 0x98, 0x80}), true), "\U0001F600");
  EXPECT_EQ(tok().Decode(bytes({0xC0, 0xAF}), true), "\uFFFD\uFFFD");        // overlong
  EXPECT_EQ(tok().Decode(bytes({0xED, 0xA0, 0x80}), true), "\uFFFD\uFFFD\uFFFD");  // surrogate
  EXPECT_EQ(tok().Decode(bytes({0xE6, 0x97}), true), "\uFFFD\uFFFD");        // truncated
  // A special token between bytes splits them when rendered, not when skipped.
  std::vector<int32_t> split = {3 + 0xE6, 401, 3 + 0x97, 3 + 0xA5};
  EXPECT_EQ(tok().Decode(split, true), "\xE6\x97\xA5");
  EXPECT_EQ(tok().Decode(split, false), "\uFFFD<pad>\uFFFD\uFFFD");
  // Specials other than <image> render inline; a leading special then a piece without "▁"
  // gets a space (LlamaTokenizer's i == 1 rule).
  EXPECT_EQ(tok().Decode({kM, 401, kM}, false), "m<pad>m");
  EXPECT_EQ(tok().Decode({1, kM}, false), "<s> m");
  EXPECT_EQ(tok().Decode({1, kO}, false), "<s> o");
  EXPECT_EQ(tok().Decode({kM, 2}, false), "m</s>");
  // <image> (beyond the SentencePiece vocab) is set off by spaces; an empty trailing run still
  // adds the separator, an empty run before it does not.
  EXPECT_EQ(tok().Decode({kM, 400, kM}, false), "m <image> m");
  EXPECT_EQ(tok().Decode({kM, 400, kO}, false), "m <image> o");
  EXPECT_EQ(tok().Decode({400}, false), "<image>");
  EXPECT_EQ(tok().Decode({400, kSpace}, false), "<image> ");
  EXPECT_EQ(tok().Decode({kSpace, 400}, false), "<image>");
  EXPECT_EQ(tok().Decode({400, 400}, false), "<image> <image>");
  // Ids that name no token render as nothing.
  EXPECT_EQ(tok().Decode({-1, kM, 402, 100000}, false), "m");
  EXPECT_EQ(tok().Decode({}, false), "");
}

TEST_F(TokenizerTest, EncodeEdgeCases) {
  EXPECT_EQ(tok().Encode("", true), (std::vector<int32_t>{1}));
  EXPECT_EQ(tok().Encode("", false), (std::vector<int32_t>{}));
  // A lone "▁" before a leading special token is dropped (legacy=false).
  EXPECT_EQ(tok().Encode("<image>\nWhat", false), (std::vector<int32_t>{400, 13, 373, 321}));
  // Special token strings in the text become those tokens.
  EXPECT_EQ(tok().Encode("m</s>", false), (std::vector<int32_t>{288, 2}));
  // Text after an added token keeps its own leading space as "▁".
  EXPECT_EQ(tok().Encode("<image> the", false), (std::vector<int32_t>{400, 263}));
  // "▁" typed by the user is treated as a space.
  EXPECT_EQ(tok().Encode("\u2581the", false), tok().Encode(" the", false));
  EXPECT_EQ(tok().Encode(" the", false), (std::vector<int32_t>{346, 263}));
}

TEST_F(TokenizerTest, MultiByteRoundTrip) {
  for (const std::string text :
       {"h\u00e9llo \u65e5\u672c", "\U0001F600 smile", "What color is the circle?",
        "na\u00efve caf\u00e9 \u2014 \u00fcber", "tab\tand\nnewline  two spaces", "a\u2581b"}) {
    const auto ids = tok().Encode(text, true);
    std::string expected = text;
    // "▁" in the input is a space for HF (legacy=false), so it decodes as one.
    if (expected == "a\u2581b") expected = "a b";
    EXPECT_EQ(tok().Decode(ids, true), expected) << text;
    ExpectStreamMatchesDecode(tok(), ids, text);
  }
  const auto ids = tok().Encode("h\u00e9llo \u65e5\u672c", false);
  std::vector<std::string> pieces;
  for (const int32_t id : ids) pieces.push_back(tok().IdToPiece(id));
  EXPECT_EQ(pieces, (std::vector<std::string>{"\u2581", "h", "<0xC3>", "<0xA9>", "l", "l", "o",
                                              "\u2581", "<0xE6>", "<0x97>", "<0xA5>", "<0xE6>",
                                              "<0x9C>", "<0xAC>"}));
}

// ---------------------------------------------------------------------------------------------
// Incremental detokenizer.

TEST_F(TokenizerTest, IncrementalHoldsIncompleteCharacters) {
  IncrementalDetokenizer d(tok());
  EXPECT_EQ(d.Push(362), "m");
  EXPECT_EQ(d.Push(3 + 0xE6), "");
  EXPECT_EQ(d.Push(3 + 0x97), "");
  EXPECT_EQ(d.Push(401), "");  // skipped special does not break the character
  EXPECT_EQ(d.Push(3 + 0xA5), "\xE6\x97\xA5");
  EXPECT_EQ(d.Push(3 + 0xEA), "");
  EXPECT_EQ(d.Push(3 + 0xB4), "");
  EXPECT_EQ(d.Push(395), "\uFFFD\uFFFDP");  // "P" ends the bytes: the prefix can never complete
  EXPECT_EQ(d.Push(3 + 0xFF), "\uFFFD");    // never valid: emitted at once
  EXPECT_EQ(d.Push(3 + 0xF0), "");
  EXPECT_EQ(d.Push(3 + 0x41), "\uFFFD" "A");  // 'A' cannot continue F0
  EXPECT_EQ(d.Push(3 + 0xC3), "");
  EXPECT_EQ(d.Flush(), "\uFFFD");
  // After Flush the first piece loses its "▁" again.
  EXPECT_EQ(d.Push(313), "o");
  EXPECT_EQ(d.Push(313), " o");
  EXPECT_EQ(d.Flush(), "");
}

std::vector<int32_t> RandomStream(std::mt19937* rng, int32_t vocab, int len) {
  std::uniform_int_distribution<int> kind(0, 9);
  std::uniform_int_distribution<int32_t> any(0, vocab - 1);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_int_distribution<uint32_t> cp(0x80, 0x10FFFF);
  std::vector<int32_t> ids;
  while (static_cast<int>(ids.size()) < len) {
    const int k = kind(*rng);
    if (k <= 3) {
      ids.push_back(any(*rng));
    } else if (k <= 5) {
      ids.push_back(3 + byte(*rng));  // random byte piece
    } else if (k <= 8) {
      // UTF-8 of a random code point (surrogates give invalid bytes), sometimes truncated.
      const uint32_t c = cp(*rng);
      std::vector<int> b;
      if (c < 0x800) {
        b = {static_cast<int>(0xC0 | (c >> 6)), static_cast<int>(0x80 | (c & 0x3F))};
      } else if (c < 0x10000) {
        b = {static_cast<int>(0xE0 | (c >> 12)), static_cast<int>(0x80 | ((c >> 6) & 0x3F)),
             static_cast<int>(0x80 | (c & 0x3F))};
      } else {
        b = {static_cast<int>(0xF0 | (c >> 18)), static_cast<int>(0x80 | ((c >> 12) & 0x3F)),
             static_cast<int>(0x80 | ((c >> 6) & 0x3F)), static_cast<int>(0x80 | (c & 0x3F))};
      }
      if (k == 8) b.pop_back();
      for (int x : b) ids.push_back(3 + x);
    } else {
      const int32_t special[] = {0, 1, 2, 400, 401, -7, vocab, 346, 313};
      ids.push_back(special[std::uniform_int_distribution<int>(0, 8)(*rng)]);
    }
  }
  return ids;
}

TEST_F(TokenizerTest, IncrementalMatchesDecodeOnRandomStreams) {
  std::mt19937 rng(20240517);
  for (int trial = 0; trial < 2000; ++trial) {
    const auto ids = RandomStream(&rng, tok().vocab_size(), 1 + trial % 40);
    ExpectStreamMatchesDecode(tok(), ids, "trial " + std::to_string(trial));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// ---------------------------------------------------------------------------------------------
// Other tokenizer configurations, built in a temporary directory.

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            ("vtw_tokenizer_test_" + std::to_string(::getpid()) + "_" + std::to_string(next_++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }
  std::string str() const { return path_.string(); }
  void Write(const std::string& name, const std::string& content) const {
    std::ofstream out(path_ / name, std::ios::binary);
    out << content;
  }
  void CopyFrom(const std::string& dir, const std::string& name) const {
    fs::copy_file(fs::path(dir) / name, path_ / name, fs::copy_options::overwrite_existing);
  }

 private:
  static inline int next_ = 0;
  fs::path path_;
};

nlohmann::json OracleConfig() {
  std::ifstream in(fs::path(ModelDir()) / "tokenizer_config.json");
  return nlohmann::json::parse(in);
}

TEST(TokenizerConfigTest, NonSpecialAddedTokenIsOwnGroupAndStreams) {
  TempDir dir;
  dir.CopyFrom(ModelDir(), "tokenizer.model");
  auto config = OracleConfig();
  config["added_tokens_decoder"]["400"]["special"] = false;
  config["additional_special_tokens"] = nlohmann::json::array();
  dir.Write("tokenizer_config.json", config.dump());
  auto tok = Tokenizer::Load(dir.str());
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  EXPECT_FALSE((*tok)->IsSpecial(400));
  EXPECT_EQ((*tok)->image_token_id(), 400);
  // Still split out of text (any added token is).
  EXPECT_EQ((*tok)->Encode("USER: <image>\nWhat", true),
            (std::vector<int32_t>{1, 303, 370, 346, 400, 13, 373, 321}));
  // Not skipped: decoded as its own group, joined with spaces.
  EXPECT_EQ((*tok)->Decode({362, 400, 313, 1}, true), "m <image> o");
  EXPECT_EQ((*tok)->Decode({400, 346}, true), "<image> ");
  std::mt19937 rng(7);
  for (int trial = 0; trial < 1000; ++trial) {
    const auto ids = RandomStream(&rng, (*tok)->vocab_size(), 1 + trial % 30);
    ExpectStreamMatchesDecode(**tok, ids, "trial " + std::to_string(trial));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

TEST(TokenizerConfigTest, LegacyTrueAddsPrefixToEveryChunk) {
  TempDir dir;
  dir.CopyFrom(ModelDir(), "tokenizer.model");
  auto config = OracleConfig();
  config["legacy"] = true;
  dir.Write("tokenizer_config.json", config.dump());
  auto tok = Tokenizer::Load(dir.str());
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  EXPECT_TRUE((*tok)->legacy());
  // The well-known legacy behaviour: a "▁" (LLaMA's 29871) after <image>.
  EXPECT_EQ((*tok)->Encode("USER: <image>\nWhat", true),
            (std::vector<int32_t>{1, 303, 370, 346, 400, 346, 13, 373, 321}));
  EXPECT_EQ((*tok)->Decode((*tok)->Encode("the circle", true), true), "the circle");
  std::mt19937 rng(11);
  for (int trial = 0; trial < 500; ++trial) {
    const auto ids = RandomStream(&rng, (*tok)->vocab_size(), 1 + trial % 30);
    ExpectStreamMatchesDecode(**tok, ids, "trial " + std::to_string(trial));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

TEST(TokenizerConfigTest, AddedTokensJsonWithoutDecoder) {
  TempDir dir;
  dir.CopyFrom(ModelDir(), "tokenizer.model");
  dir.CopyFrom(ModelDir(), "added_tokens.json");
  auto config = OracleConfig();
  config.erase("added_tokens_decoder");
  dir.Write("tokenizer_config.json", config.dump());
  auto tok = Tokenizer::Load(dir.str());
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  EXPECT_EQ((*tok)->vocab_size(), 402);
  EXPECT_EQ((*tok)->image_token_id(), 400);
  EXPECT_EQ((*tok)->pad_id(), 401);
  EXPECT_TRUE((*tok)->IsSpecial(400));
  EXPECT_TRUE((*tok)->IsSpecial(401));
  EXPECT_EQ((*tok)->Encode("USER: <image>\nWhat", true),
            (std::vector<int32_t>{1, 303, 370, 346, 400, 13, 373, 321}));
}

TEST(TokenizerConfigTest, MinimalConfigUsesLlamaDefaults) {
  TempDir dir;
  dir.CopyFrom(ModelDir(), "tokenizer.model");
  dir.Write("tokenizer_config.json", "{\"legacy\": false}");
  auto tok = Tokenizer::Load(dir.str());
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  EXPECT_EQ((*tok)->bos_id(), 1);
  EXPECT_EQ((*tok)->eos_id(), 2);
  EXPECT_EQ((*tok)->unk_id(), 0);
  EXPECT_EQ((*tok)->pad_id(), -1);
  EXPECT_EQ((*tok)->image_token_id(), -1);
  EXPECT_EQ((*tok)->vocab_size(), 400);
  // bos/eos/unk are pieces of the model, hence added tokens: "</s>" in text is EOS.
  EXPECT_EQ((*tok)->Encode("m</s>", true), (std::vector<int32_t>{1, 288, 2}));
  // Without <image> as an added token it is ordinary text.
  EXPECT_GT((*tok)->Encode("<image>", false).size(), 1u);
}

// ---------------------------------------------------------------------------------------------
// Load errors: a status naming the file, never a crash.

void ExpectLoadError(const std::string& dir, StatusCode code, const std::string& must_contain) {
  auto tok = Tokenizer::Load(dir);
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), code) << tok.status().ToString();
  EXPECT_NE(tok.status().message().find(must_contain), std::string::npos)
      << tok.status().ToString();
}

TEST(TokenizerLoadTest, MissingDirectory) {
  ExpectLoadError("/nonexistent/vtw/model", StatusCode::kNotFound, "/nonexistent/vtw/model");
}

TEST(TokenizerLoadTest, MissingTokenizerModel) {
  TempDir dir;
  dir.CopyFrom(ModelDir(), "tokenizer_config.json");
  ExpectLoadError(dir.str(), StatusCode::kNotFound, "tokenizer.model");
}

TEST(TokenizerLoadTest, CorruptTokenizerModel) {
  const std::string good = ReadAll(fs::path(ModelDir()) / "tokenizer.model");
  std::mt19937 rng(3);
  std::string noise(4096, '\0');
  for (char& c : noise) c = static_cast<char>(rng());
  const std::vector<std::pair<std::string, std::string>> variants = {
      {"empty", ""},
      {"text", "this is not a sentencepiece model\n"},
      {"noise", noise},
      {"truncated", good.substr(0, good.size() / 2)},
      {"no pieces", std::string("\x1a\x02\x18\x00", 4)},
  };
  for (const auto& [label, bytes] : variants) {
    SCOPED_TRACE(label);
    TempDir dir;
    dir.CopyFrom(ModelDir(), "tokenizer_config.json");
    dir.Write("tokenizer.model", bytes);
    ExpectLoadError(dir.str(), StatusCode::kDataLoss, "tokenizer.model");
  }
}

// A protobuf length-delimited field (lengths < 128 only).
std::string Field(int number, const std::string& payload) {
  return std::string(1, static_cast<char>(number << 3 | 2)) +
         std::string(1, static_cast<char>(payload.size())) + payload;
}

TEST(TokenizerLoadTest, SentencePieceModelVariants) {
  const std::string good = ReadAll(fs::path(ModelDir()) / "tokenizer.model");
  auto load_with = [&](const std::string& model_bytes) {
    TempDir dir;
    dir.CopyFrom(ModelDir(), "tokenizer_config.json");
    dir.Write("tokenizer.model", model_bytes);
    return Tokenizer::Load(dir.str());
  };
  // Appended fields merge into the model (protobuf semantics).
  {
    SCOPED_TRACE("unigram");
    auto tok = load_with(good + Field(2, std::string("\x18\x01", 2)));  // model_type = UNIGRAM
    ASSERT_FALSE(tok.ok());
    EXPECT_EQ(tok.status().code(), StatusCode::kUnimplemented) << tok.status().ToString();
    EXPECT_NE(tok.status().message().find("not BPE"), std::string::npos);
  }
  {
    SCOPED_TRACE("normalization rule");
    auto tok = load_with(good + Field(3, Field(2, "x")));  // precompiled_charsmap
    ASSERT_FALSE(tok.ok());
    EXPECT_EQ(tok.status().code(), StatusCode::kUnimplemented) << tok.status().ToString();
  }
  // Self-test samples stored in the model are checked at load, as SentencePiece does.
  const std::string sample_ok = Field(1, Field(1, "What") + Field(2, "\u2581What"));
  const std::string sample_bad = Field(1, Field(1, "What") + Field(2, "\u2581W hat"));
  {
    SCOPED_TRACE("self-test ok");
    auto tok = load_with(good + Field(4, sample_ok));
    EXPECT_TRUE(tok.ok()) << tok.status().ToString();
  }
  {
    SCOPED_TRACE("self-test mismatch");
    auto tok = load_with(good + Field(4, sample_bad));
    ASSERT_FALSE(tok.ok());
    EXPECT_EQ(tok.status().code(), StatusCode::kInternal) << tok.status().ToString();
    EXPECT_NE(tok.status().message().find("self-test"), std::string::npos);
  }
}

TEST(TokenizerLoadTest, MissingTokenizerConfig) {
  TempDir dir;
  dir.CopyFrom(ModelDir(), "tokenizer.model");
  ExpectLoadError(dir.str(), StatusCode::kNotFound, "tokenizer_config.json");
}

TEST(TokenizerLoadTest, BadTokenizerConfig) {
  const std::vector<std::pair<std::string, std::string>> variants = {
      {"syntax", "{\"legacy\": false,"},
      {"not an object", "[1, 2, 3]"},
      {"legacy type", "{\"legacy\": \"no\"}"},
      {"decoder key", "{\"added_tokens_decoder\": {\"x\": {\"content\": \"<a>\"}}}"},
      {"decoder content", "{\"added_tokens_decoder\": {\"400\": {\"special\": true}}}"},
      {"bos type", "{\"bos_token\": 5}"},
  };
  for (const auto& [label, text] : variants) {
    SCOPED_TRACE(label);
    TempDir dir;
    dir.CopyFrom(ModelDir(), "tokenizer.model");
    dir.Write("tokenizer_config.json", text);
    ExpectLoadError(dir.str(), StatusCode::kInvalidArgument, "tokenizer_config.json");
  }
}

TEST(TokenizerLoadTest, BadAddedTokensJson) {
  TempDir dir;
  dir.CopyFrom(ModelDir(), "tokenizer.model");
  dir.CopyFrom(ModelDir(), "tokenizer_config.json");
  dir.Write("added_tokens.json", "{\"<image>\": \"four hundred\"}");
  ExpectLoadError(dir.str(), StatusCode::kInvalidArgument, "added_tokens.json");
}

// ---------------------------------------------------------------------------------------------
// Chat template and placeholder counting.

TEST(ChatTemplateTest, Strings) {
  EXPECT_EQ(ApplyLlavaChatTemplate("What color is the circle?", true),
            "USER: <image>\nWhat color is the circle? ASSISTANT:");
  EXPECT_EQ(ApplyLlavaChatTemplate("Hello", false), "USER: Hello ASSISTANT:");
  EXPECT_EQ(ApplyLlavaChatTemplate("", true), "USER: <image>\n ASSISTANT:");
}

TEST(ChatTemplateTest, CountOccurrences) {
  EXPECT_EQ(CountOccurrences("USER: <image>\nhi", "<image>"), 1);
  EXPECT_EQ(CountOccurrences("<image><image> x <image>", "<image>"), 3);
  EXPECT_EQ(CountOccurrences("no images", "<image>"), 0);
  EXPECT_EQ(CountOccurrences("<image", "<image>"), 0);
  EXPECT_EQ(CountOccurrences("aaaa", "aa"), 2);  // non-overlapping
  EXPECT_EQ(CountOccurrences("abc", ""), 0);
}

}  // namespace
}  // namespace vtw
