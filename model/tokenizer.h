// Tokenizer: Hugging Face's slow LlamaTokenizer (transformers 4.45) as used by llava-hf
// checkpoints: added-token splitting, the `legacy` prefix-space rules, byte fallback, HF's decode
// quirks, a streaming (incremental) detokenizer and the LLaVA-1.5 chat template. Owns everything
// that turns prompt text into ids and generated ids into text.
//
// tokenizer.model is read by our own SentencePiece implementation (BPE model, identity
// normalizer: what LLaMA-family checkpoints use), not by libsentencepiece: Debian's
// libsentencepiece bundles and exports protobuf 3.14 symbols and crashes at load time in any
// process that also loads libtorch's libprotobuf 3.21. Other model types fail to load with
// UNIMPLEMENTED.
//
// Thread-safety: a loaded Tokenizer is immutable; all its const methods may be called from any
// number of threads at once. IncrementalDetokenizer is thread-compatible (one per sequence, used
// by one thread at a time) and must not outlive the Tokenizer it was built with.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "model/status.h"

namespace vtw {

class IncrementalDetokenizer;

class Tokenizer {
 public:
  // Loads `model_dir`/tokenizer.model (SentencePiece BPE), `model_dir`/tokenizer_config.json
  // (required; read: added_tokens_decoder, bos/eos/unk/pad tokens, additional_special_tokens,
  // add_bos_token, add_eos_token, legacy (default true, as HF), add_prefix_space (default true))
  // and, when present, `model_dir`/added_tokens.json. Errors: NOT_FOUND for a missing directory
  // or file, DATA_LOSS for an unreadable tokenizer.model, UNIMPLEMENTED for a SentencePiece model
  // that is not BPE with the identity normalizer, INTERNAL when the model's own self-test samples
  // do not encode as recorded, INVALID_ARGUMENT for malformed JSON; messages name the file and
  // say what to do.
  static StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& model_dir);

  // Load's parsing over file contents already in memory: `model_bytes` is tokenizer.model,
  // `config_json` tokenizer_config.json and `added_tokens_json` added_tokens.json (nullopt when
  // the file is absent); `model_dir` only names the files in messages. The same errors as Load
  // apart from the file-system ones. Load reads the files and calls this; the fuzz tests call it
  // with arbitrary bytes.
  static StatusOr<std::unique_ptr<Tokenizer>> LoadFromMemory(
      std::string_view model_bytes, std::string_view config_json,
      std::optional<std::string_view> added_tokens_json, const std::string& model_dir);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Token ids of `text` exactly as HF `tokenizer(text).input_ids` (slow LlamaTokenizer): the text
  // is split on added-token strings (leftmost, longest first; they map to their ids, so "<s>"
  // or "<image>" typed in the text become those tokens), every other chunk is SentencePiece
  // encoded. With legacy=false only the first chunk gets the "▁" prefix (add_prefix_space) and
  // the others none; with legacy=true SentencePiece's own dummy prefix applies to every chunk.
  // `add_bos` prepends bos_id() (when the tokenizer has one); EOS is never appended.
  std::vector<int32_t> Encode(std::string_view text, bool add_bos) const;

  // Text of `ids` exactly as HF `tokenizer.decode(ids, skip_special_tokens=...)` (with its
  // defaults spaces_between_special_tokens=True, clean_up_tokenization_spaces=False): byte
  // pieces are joined into bytes and invalid UTF-8 becomes U+FFFD per offending byte (as
  // SentencePiece does), the first piece loses its leading "▁", special tokens render as their
  // content when not skipped and added tokens beyond the SentencePiece vocab are set off by
  // spaces. Ids outside [0, vocab_size()) or in gaps of the vocab render as nothing.
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const;

  int32_t bos_id() const { return bos_id_; }            // -1 if none
  int32_t eos_id() const { return eos_id_; }            // -1 if none
  int32_t pad_id() const { return pad_id_; }            // -1 if none
  int32_t unk_id() const { return unk_id_; }            // -1 if none
  int32_t image_token_id() const { return image_id_; }  // id of "<image>", -1 if none
  // Max id + 1 over SentencePiece pieces and added tokens (HF len(tokenizer)).
  int32_t vocab_size() const { return static_cast<int32_t>(tokens_.size()); }
  // Number of SentencePiece pieces (HF tokenizer.vocab_size).
  int32_t sp_vocab_size() const { return sp_size_; }
  bool add_bos_token() const { return add_bos_token_; }
  bool add_eos_token() const { return add_eos_token_; }
  bool legacy() const { return legacy_; }

  // The token string of `id` (HF convert_ids_to_tokens): an added token's content or the
  // SentencePiece piece ("▁the", "<0x0A>"); "" for an id that names no token.
  std::string IdToPiece(int32_t id) const;
  // True for ids HF skips with skip_special_tokens (bos, eos, unk, pad, additional special
  // tokens and added tokens marked special).
  bool IsSpecial(int32_t id) const;
  // The id of an added token's content or of a SentencePiece piece; nullopt if unknown.
  std::optional<int32_t> FindToken(std::string_view token) const;

 private:
  friend class IncrementalDetokenizer;
  struct SpModel;  // the parsed tokenizer.model (defined in tokenizer.cc)
  struct Loader;   // the steps of LoadFromMemory (tokenizer.cc)

  struct TokenInfo {
    std::string text;           // added-token content or SentencePiece piece
    bool valid = false;         // names a token
    bool special = false;       // in HF all_special_ids
    bool legacy_added = false;  // decoded as its own space-separated group (HF legacy_added_tokens)
  };
  struct AddedToken {
    int32_t id = -1;
    std::string content;
    bool special = false;
    bool lstrip = false;
    bool rstrip = false;
  };
  // State of SentencePiece decoding over one run of pieces (one sp.decode() call in HF).
  struct PieceDecodeState {
    std::string pending_bytes;  // byte-fallback bytes not yet turned into text
    bool is_bos_ws = true;      // a leading "▁" may still be consumed
    bool bos_ws_seen = false;
    bool text_nonempty = false;
  };

  Tokenizer();

  // Appends the text that `piece` completes to `out`; incomplete UTF-8 stays pending.
  void AppendPiece(std::string_view piece, PieceDecodeState* state, std::string* out) const;
  // Appends what is pending (invalid or incomplete bytes as U+FFFD each) to `out`.
  void FinishPieces(PieceDecodeState* state, std::string* out) const;
  // SentencePieceProcessor::Decode(pieces) with this model's normalizer settings.
  std::string DecodePieces(const std::vector<std::string>& pieces) const;
  // HF LlamaTokenizer.convert_tokens_to_string.
  std::string ConvertTokensToString(std::vector<std::string> tokens) const;
  // HF LlamaTokenizer._tokenize of one chunk without added tokens: SentencePiece pieces.
  std::vector<std::string> TokenizeChunk(const std::string& chunk) const;
  int32_t PieceOrAddedToId(const std::string& piece) const;
  const TokenInfo* Info(int32_t id) const;

  std::unique_ptr<SpModel> sp_;
  int32_t sp_size_ = 0;
  std::vector<TokenInfo> tokens_;                         // by id
  std::vector<AddedToken> added_;                         // sorted by content length, longest first
  std::vector<size_t> added_by_first_byte_[256];          // indices into added_, same order
  std::unordered_map<std::string, int32_t> added_by_content_;
  std::unordered_set<std::string> special_contents_;      // HF all_special_tokens
  std::string unk_token_ = "<unk>";
  int unk_token_length_ = 0;                              // pieces of sp.encode(unk_token)
  int32_t bos_id_ = -1, eos_id_ = -1, pad_id_ = -1, unk_id_ = -1, image_id_ = -1;
  bool add_bos_token_ = true;
  bool add_eos_token_ = false;
  bool legacy_ = true;
  bool add_prefix_space_ = true;
};

// Streams the text of one generated sequence: Push() each new id, Flush() at the end. The
// concatenation of all returned chunks equals tokenizer.Decode(all ids, skip_special_tokens=true)
// and every chunk is valid UTF-8: bytes of an unfinished multi-byte character are held back until
// it completes, or emitted as U+FFFD once it cannot (exactly as the full decode renders them).
class IncrementalDetokenizer {
 public:
  // `tokenizer` must outlive this object.
  explicit IncrementalDetokenizer(const Tokenizer& tokenizer) : tok_(tokenizer) {}

  // Feeds one id; returns the newly completed text (possibly empty). Special ids add nothing.
  std::string Push(int32_t id);
  // Returns all text still held back and resets to the initial state (ready for a new sequence).
  std::string Flush();

 private:
  std::string EmitRunText(std::string chunk);
  void ResetRun();

  const Tokenizer& tok_;
  Tokenizer::PieceDecodeState state_;
  int run_tokens_ = 0;           // tokens in the current run (group of ordinary pieces)
  bool run_has_text_ = false;    // the current run has produced text
  bool groups_emitted_ = false;  // some group was emitted (the next needs a " " separator)
};

// "USER: <image>\n{user_prompt} ASSISTANT:" with an image, "USER: {user_prompt} ASSISTANT:"
// without (the llava-hf 1.5 prompt format, no system prompt).
std::string ApplyLlavaChatTemplate(std::string_view user_prompt, bool has_image);

// One message of a conversation. `image`: the conversation's image goes at the start of this
// message (a user message).
struct ChatMessage {
  enum class Role { kSystem, kUser, kAssistant };
  Role role = Role::kUser;
  std::string text;
  bool image = false;
};

// The LLaVA-1.5 conversation format (vicuna_v1, as the model is trained): system texts, then
// "USER: [<image>\n]{text} ASSISTANT: {answer}</s>USER: {text} ASSISTANT:". One user message
// with an image gives exactly ApplyLlavaChatTemplate(text, true). The caller checks that the
// last message is the user's (the reply comes next).
std::string ApplyLlavaChatTemplate(const std::vector<ChatMessage>& messages);

// Number of non-overlapping occurrences of `token` in `text` (0 for an empty token). Callers
// use it to reject prompts whose count of "<image>" placeholders does not match the images.
int CountOccurrences(std::string_view text, std::string_view token);

// Name of the image placeholder in llava-hf prompts.
inline constexpr std::string_view kImageToken = "<image>";

}  // namespace vtw
