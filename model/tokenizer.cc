// Tokenizer implementation: HF slow LlamaTokenizer semantics over our own SentencePiece BPE
// implementation (see tokenizer.h for why libsentencepiece is not used). SentencePiece parts
// follow google/sentencepiece (normalizer.cc, bpe_model.cc, sentencepiece_processor.cc); HF parts
// follow transformers 4.45 (tokenization_utils.py, models/llama/tokenization_llama.py).
// Thread-safety: Tokenizer is immutable after Load(); IncrementalDetokenizer is thread-compatible.
#include "model/tokenizer.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <queue>
#include <sstream>
#include <stdexcept>
#include <utility>

#include <nlohmann/json.hpp>

namespace vtw {
namespace {

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";         // U+2581 "▁"
constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";     // U+FFFD
constexpr std::string_view kDefaultUnkSurface = " \xE2\x81\x87 ";  // SentencePiece's " ⁇ "

bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string ReplaceAll(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  while (true) {
    const size_t hit = s.find(from, pos);
    if (hit == std::string_view::npos) break;
    out.append(s.substr(pos, hit - pos));
    out.append(to);
    pos = hit + from.size();
  }
  out.append(s.substr(pos));
  return out;
}

bool IsAsciiSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}
std::string StripLeft(const std::string& s) {
  size_t i = 0;
  while (i < s.size() && IsAsciiSpace(s[i])) ++i;
  return s.substr(i);
}
std::string StripRight(const std::string& s) {
  size_t n = s.size();
  while (n > 0 && IsAsciiSpace(s[n - 1])) --n;
  return s.substr(0, n);
}

// Classifies the UTF-8 sequence at the start of non-empty `s` the way SentencePiece's
// DecodeUTF8 does (no overlongs, no surrogates, <= U+10FFFF): returns its length when it is a
// complete valid character, 0 when `s` is a proper prefix of some valid character, -1 when the
// first byte can only be decoded as U+FFFD.
int Utf8CharStatus(std::string_view s) {
  const auto b0 = static_cast<uint8_t>(s[0]);
  if (b0 < 0x80) return 1;
  int need = 0;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return -1;
  }
  for (int i = 1; i < need; ++i) {
    if (static_cast<size_t>(i) >= s.size()) return 0;
    const auto b = static_cast<uint8_t>(s[i]);
    const uint8_t min = i == 1 ? lo : 0x80;
    const uint8_t max = i == 1 ? hi : 0xBF;
    if (b < min || b > max) return -1;
  }
  return need;
}

// Moves the decodable prefix of `*pending` to `*out`. Complete characters are copied, bytes that
// cannot start a valid character become U+FFFD each; an unfinished character at the end stays
// pending unless `final`, in which case its bytes become U+FFFD each too. Returns true if
// anything was appended.
bool DrainBytes(std::string* pending, bool final, std::string* out) {
  size_t pos = 0;
  while (pos < pending->size()) {
    const int n = Utf8CharStatus(std::string_view(*pending).substr(pos));
    if (n > 0) {
      out->append(*pending, pos, n);
      pos += n;
    } else if (n < 0 || final) {
      out->append(kReplacementChar);
      pos += 1;
    } else {
      break;
    }
  }
  pending->erase(0, pos);
  return pos > 0;
}

// --- Protobuf wire-format reading of the SentencePiece ModelProto
// (sentencepiece_model.proto); only the fields that change encoding or decoding are read.

bool ReadVarint(std::string_view* s, uint64_t* v) {
  *v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (s->empty()) return false;
    const auto b = static_cast<uint8_t>(s->front());
    s->remove_prefix(1);
    *v |= static_cast<uint64_t>(b & 0x7F) << shift;
    if ((b & 0x80) == 0) return true;
  }
  return false;
}

struct WireField {
  uint32_t number = 0;
  int wire_type = 0;
  uint64_t varint = 0;     // wire type 0
  uint32_t fixed32 = 0;    // wire type 5
  std::string_view bytes;  // wire type 2
};

// Calls `fn` (returning false to abort) for every field of the serialized message `s`; false on
// malformed input or when `fn` aborts.
template <typename Fn>
bool ForEachField(std::string_view s, Fn fn) {
  while (!s.empty()) {
    uint64_t key = 0;
    if (!ReadVarint(&s, &key)) return false;
    WireField f;
    f.number = static_cast<uint32_t>(key >> 3);
    f.wire_type = static_cast<int>(key & 7);
    if (f.number == 0) return false;
    switch (f.wire_type) {
      case 0:
        if (!ReadVarint(&s, &f.varint)) return false;
        break;
      case 1:
        if (s.size() < 8) return false;
        s.remove_prefix(8);
        break;
      case 2: {
        uint64_t len = 0;
        if (!ReadVarint(&s, &len) || len > s.size()) return false;
        f.bytes = s.substr(0, len);
        s.remove_prefix(len);
        break;
      }
      case 5:
        if (s.size() < 4) return false;
        for (int i = 3; i >= 0; --i) f.fixed32 = (f.fixed32 << 8) | static_cast<uint8_t>(s[i]);
        s.remove_prefix(4);
        break;
      default:
        return false;  // groups are not used by sentencepiece_model.proto
    }
    if (!fn(f)) return false;
  }
  return true;
}

// Number of bytes of the UTF-8 character starting with `c`, from its lead byte only
// (SentencePiece's OneCharLen).
size_t OneCharLen(char c) {
  static constexpr uint8_t kLen[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLen[static_cast<uint8_t>(c) >> 4];
}

std::string ByteToPiece(uint8_t b) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  return std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">";
}

// "<0xAB>" -> 0xAB; -1 if `piece` is not a byte piece name.
int PieceToByte(std::string_view piece) {
  if (piece.size() != 6 || !StartsWith(piece, "<0x") || piece[5] != '>') return -1;
  int v = 0;
  for (int i = 3; i < 5; ++i) {
    const char c = piece[i];
    v <<= 4;
    if (c >= '0' && c <= '9') {
      v |= c - '0';
    } else if (c >= 'A' && c <= 'F') {
      v |= c - 'A' + 10;
    } else {
      return -1;
    }
  }
  return v;
}

StatusOr<std::string> ReadFile(const std::filesystem::path& path, std::string_view what_to_do) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return NotFound("tokenizer: missing file " + path.string() + "; " + std::string(what_to_do));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound("tokenizer: cannot open " + path.string() + "; check its permissions");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return DataLoss("tokenizer: error reading " + path.string());
  return ss.str();
}

// `text` (the content of the JSON file `file`) parsed.
StatusOr<nlohmann::json> ParseJsonText(std::string_view text, const std::string& file) {
  try {
    return nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    return InvalidArgument("tokenizer: " + file + " is not valid JSON (" + e.what() +
                           "); restore it from the original checkpoint");
  }
}

// A token spec in tokenizer_config.json: "<s>", {"content": "<s>", ...} or null.
StatusOr<std::optional<std::string>> TokenContent(const nlohmann::json& config,
                                                  const std::string& key,
                                                  const std::string& file) {
  if (!config.contains(key) || config[key].is_null()) return std::optional<std::string>();
  const auto& v = config[key];
  if (v.is_string()) return std::optional<std::string>(v.get<std::string>());
  if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    return std::optional<std::string>(v["content"].get<std::string>());
  }
  return InvalidArgument("tokenizer: " + file + ": \"" + key +
                         "\" must be a string or an object with a string \"content\"");
}

StatusOr<bool> BoolField(const nlohmann::json& config, const std::string& key, bool def,
                         const std::string& file) {
  if (!config.contains(key) || config[key].is_null()) return def;
  if (!config[key].is_boolean()) {
    return InvalidArgument("tokenizer: " + file + ": \"" + key + "\" must be true or false");
  }
  return config[key].get<bool>();
}

}  // namespace

// --- SentencePiece model: a BPE model with the identity normalizer, equivalent to
// sentencepiece::SentencePieceProcessor for such models.
struct Tokenizer::SpModel {
  enum Type { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };
  struct Piece {
    std::string text;
    float score = 0.0f;
    int type = kNormal;
  };

  std::vector<Piece> pieces;
  // Views into `pieces` (never resized after Parse). NORMAL, USER_DEFINED and UNUSED pieces
  // take part in BPE; CONTROL, UNKNOWN and BYTE pieces are only found by PieceToId.
  std::unordered_map<std::string_view, int> normal;
  std::unordered_map<std::string_view, int> reserved;
  std::vector<std::string_view> user_defined;  // longest first
  int unk_id = -1;
  int model_type = 1;  // TrainerSpec.model_type, proto default UNIGRAM
  bool byte_fallback = false;
  bool treat_whitespace_as_suffix = false;
  bool add_dummy_prefix = true;  // NormalizerSpec, proto defaults
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
  std::string precompiled_charsmap;
  bool has_denormalizer_rules = false;
  std::string unk_surface = std::string(kDefaultUnkSurface);
  std::vector<std::pair<std::string, std::string>> self_test;  // input, expected pieces

  // Parses and validates a serialized ModelProto; `file` names it in error messages.
  static StatusOr<std::unique_ptr<SpModel>> Parse(std::string_view bytes, const std::string& file);
  // Parse's steps: the protobuf fields; the pieces as sentencepiece's InitializePieces checks
  // them; what this implementation supports; the model's stored self-test samples.
  bool ReadFields(std::string_view bytes);
  Status IndexPieces(const std::string& file, const std::string& corrupt);
  Status CheckSupported(const std::string& file) const;
  Status RunSelfTest(const std::string& file) const;

  int size() const { return static_cast<int>(pieces.size()); }
  bool IsType(int id, int type) const { return id >= 0 && id < size() && pieces[id].type == type; }
  bool IsByte(int id) const { return IsType(id, kByte); }
  bool IsControl(int id) const { return IsType(id, kControl); }
  bool IsUnknown(int id) const { return IsType(id, kUnknown); }
  bool IsUnused(int id) const { return IsType(id, kUnused); }

  int PieceToId(std::string_view piece) const {
    if (auto it = reserved.find(piece); it != reserved.end()) return it->second;
    if (auto it = normal.find(piece); it != normal.end()) return it->second;
    return unk_id;
  }

  // Length of the longest user-defined symbol at the start of `s` (found = true), else of the
  // first character.
  size_t PrefixMatch(std::string_view s, bool* found) const {
    for (const std::string_view u : user_defined) {
      if (StartsWith(s, u)) {
        *found = true;
        return u.size();
      }
    }
    *found = false;
    return std::min(s.size(), OneCharLen(s[0]));
  }

  // Normalizer::NormalizePrefix without a charsmap: (normalized text, bytes consumed).
  std::pair<std::string_view, size_t> NormalizePrefix(std::string_view s) const {
    bool found = false;
    const size_t n = PrefixMatch(s, &found);
    if (found) return {s.substr(0, n), n};
    const int len = Utf8CharStatus(s);
    if (len <= 0) return {kReplacementChar, 1};  // malformed UTF-8: one byte becomes U+FFFD
    return {s.substr(0, len), static_cast<size_t>(len)};
  }

  // Normalizer::Normalize with the identity rule (whitespace handling only).
  std::string Normalize(std::string_view input) const {
    std::string out;
    if (remove_extra_whitespaces) {
      while (!input.empty()) {
        const auto p = NormalizePrefix(input);
        if (p.first != " ") break;
        input.remove_prefix(p.second);
      }
    }
    if (input.empty()) return out;
    const std::string_view space = escape_whitespaces ? kSpaceSymbol : " ";
    if (add_dummy_prefix) out.append(space);
    bool is_prev_space = remove_extra_whitespaces;
    while (!input.empty()) {
      const auto p = NormalizePrefix(input);
      std::string_view sp = p.first;
      while (is_prev_space && StartsWith(sp, " ")) sp.remove_prefix(1);
      if (!sp.empty()) {
        for (const char c : sp) {
          if (escape_whitespaces && c == ' ') {
            out.append(kSpaceSymbol);
          } else {
            out += c;
          }
        }
        is_prev_space = EndsWith(sp, " ");
      }
      input.remove_prefix(p.second);
      if (!remove_extra_whitespaces) is_prev_space = false;
    }
    if (remove_extra_whitespaces) {
      while (EndsWith(out, space)) out.resize(out.size() - space.size());
    }
    return out;
  }

  // bpe::Model::SampleEncode(normalized, alpha = 0): (piece, id) pairs viewing `normalized`.
  std::vector<std::pair<std::string_view, int>> EncodeNormalized(
      std::string_view normalized) const {
    struct Symbol {
      int prev;
      int next;
      bool freeze;
      std::string_view piece;
    };
    struct SymbolPair {
      int left;
      int right;
      float score;
      size_t size;
    };
    struct Lower {  // priority: higher score first, then leftmost
      bool operator()(const SymbolPair& a, const SymbolPair& b) const {
        return a.score < b.score || (a.score == b.score && a.left > b.left);
      }
    };
    std::vector<std::pair<std::string_view, int>> output;
    if (normalized.empty()) return output;

    std::vector<Symbol> symbols;
    symbols.reserve(normalized.size());
    for (int index = 0; !normalized.empty(); ++index) {
      Symbol s;
      const size_t len = PrefixMatch(normalized, &s.freeze);
      s.piece = normalized.substr(0, len);
      s.prev = index - 1;
      normalized.remove_prefix(len);
      s.next = normalized.empty() ? -1 : index + 1;
      symbols.push_back(s);
    }

    std::priority_queue<SymbolPair, std::vector<SymbolPair>, Lower> agenda;
    std::unordered_map<std::string_view, std::pair<std::string_view, std::string_view>> rev_merge;
    auto maybe_add_pair = [&](int left, int right) {
      if (left == -1 || right == -1 || symbols[left].freeze || symbols[right].freeze) return;
      const std::string_view piece(symbols[left].piece.data(),
                                   symbols[left].piece.size() + symbols[right].piece.size());
      const auto it = normal.find(piece);
      if (it == normal.end()) return;
      agenda.push({left, right, pieces[it->second].score, piece.size()});
      if (IsUnused(it->second)) rev_merge[piece] = {symbols[left].piece, symbols[right].piece};
    };
    for (size_t i = 1; i < symbols.size(); ++i) maybe_add_pair(static_cast<int>(i) - 1, i);

    while (!agenda.empty()) {
      const SymbolPair top = agenda.top();
      agenda.pop();
      Symbol& left = symbols[top.left];
      Symbol& right = symbols[top.right];
      if (left.piece.empty() || right.piece.empty() ||
          left.piece.size() + right.piece.size() != top.size) {
        continue;  // stale
      }
      left.piece = std::string_view(left.piece.data(), left.piece.size() + right.piece.size());
      left.next = right.next;
      if (right.next >= 0) symbols[right.next].prev = top.left;
      right.piece = std::string_view();
      maybe_add_pair(left.prev, top.left);
      maybe_add_pair(top.left, left.next);
    }

    // Unused pieces are split back into what they were merged from.
    std::function<void(std::string_view)> resegment = [&](std::string_view w) {
      const int id = PieceToId(w);
      const auto p = IsUnused(id) ? rev_merge.find(w) : rev_merge.end();
      if (p == rev_merge.end()) {
        output.emplace_back(w, id);
        return;
      }
      resegment(p->second.first);
      resegment(p->second.second);
    };
    for (int index = 0; index != -1; index = symbols[index].next) resegment(symbols[index].piece);
    return output;
  }

  // SentencePieceProcessor::Encode(text, &pieces): unknown pieces become byte pieces with
  // byte_fallback, otherwise runs of unknown pieces merge into one.
  std::vector<std::string> Encode(std::string_view text) const {
    const std::string normalized = Normalize(text);
    std::vector<std::string> out;
    bool is_prev_unk = false;
    for (const auto& [w, id] : EncodeNormalized(normalized)) {
      const bool is_unk = IsUnknown(id);
      if (is_unk && byte_fallback) {
        for (const char b : w) out.push_back(ByteToPiece(static_cast<uint8_t>(b)));
      } else if (is_unk && is_prev_unk) {
        out.back().append(w);
      } else {
        out.emplace_back(w);
      }
      is_prev_unk = is_unk;
    }
    return out;
  }
};

StatusOr<std::unique_ptr<Tokenizer::SpModel>> Tokenizer::SpModel::Parse(std::string_view bytes,
                                                                         const std::string& file) {
  auto m = std::make_unique<SpModel>();
  const std::string corrupt =
      "; the file is corrupt or not a SentencePiece model: re-download tokenizer.model from the "
      "checkpoint";
  if (!m->ReadFields(bytes) || m->pieces.empty()) {
    return DataLoss("tokenizer: cannot parse " + file + corrupt);
  }
  VTW_RETURN_IF_ERROR(m->IndexPieces(file, corrupt));
  VTW_RETURN_IF_ERROR(m->CheckSupported(file));
  VTW_RETURN_IF_ERROR(m->RunSelfTest(file));
  return m;
}

bool Tokenizer::SpModel::ReadFields(std::string_view bytes) {
  return ForEachField(bytes, [&](const WireField& f) {
    if (f.wire_type != 2) return f.number > 5;  // known top-level fields are all messages
    switch (f.number) {
      case 1: {  // pieces
        Piece p;
        if (!ForEachField(f.bytes, [&](const WireField& g) {
              if (g.number == 1 && g.wire_type == 2) p.text = std::string(g.bytes);
              if (g.number == 2 && g.wire_type == 5) std::memcpy(&p.score, &g.fixed32, 4);
              if (g.number == 3 && g.wire_type == 0) p.type = static_cast<int>(g.varint);
              return true;
            })) {
          return false;
        }
        pieces.push_back(std::move(p));
        return true;
      }
      case 2:  // trainer_spec
        return ForEachField(f.bytes, [&](const WireField& g) {
          if (g.wire_type == 0 && g.number == 3) model_type = static_cast<int>(g.varint);
          if (g.wire_type == 0 && g.number == 24) treat_whitespace_as_suffix = g.varint != 0;
          if (g.wire_type == 0 && g.number == 35) byte_fallback = g.varint != 0;
          if (g.wire_type == 2 && g.number == 44) unk_surface = std::string(g.bytes);
          return true;
        });
      case 3:  // normalizer_spec
        return ForEachField(f.bytes, [&](const WireField& g) {
          if (g.wire_type == 2 && g.number == 2) precompiled_charsmap = std::string(g.bytes);
          if (g.wire_type == 0 && g.number == 3) add_dummy_prefix = g.varint != 0;
          if (g.wire_type == 0 && g.number == 4) remove_extra_whitespaces = g.varint != 0;
          if (g.wire_type == 0 && g.number == 5) escape_whitespaces = g.varint != 0;
          return true;
        });
      case 4:  // self_test_data
        return ForEachField(f.bytes, [&](const WireField& g) {
          if (g.wire_type != 2 || g.number != 1) return true;
          std::pair<std::string, std::string> sample;
          const bool sample_ok = ForEachField(g.bytes, [&](const WireField& h) {
            if (h.wire_type == 2 && h.number == 1) sample.first = std::string(h.bytes);
            if (h.wire_type == 2 && h.number == 2) sample.second = std::string(h.bytes);
            return true;
          });
          self_test.push_back(std::move(sample));
          return sample_ok;
        });
      case 5:  // denormalizer_spec
        return ForEachField(f.bytes, [&](const WireField& g) {
          if (g.wire_type == 2 && g.number == 2 && !g.bytes.empty()) {
            has_denormalizer_rules = true;
          }
          return true;
        });
      default:
        return true;
    }
  });
}

Status Tokenizer::SpModel::IndexPieces(const std::string& file, const std::string& corrupt) {
  // Validation as in sentencepiece::ModelInterface::InitializePieces.
  std::vector<bool> byte_found(256, false);
  for (int i = 0; i < size(); ++i) {
    const Piece& p = pieces[i];
    if (p.text.empty() || p.text.find('\0') != std::string::npos || p.text.size() >= 8000 ||
        p.type < kNormal || p.type > kByte) {
      return DataLoss("tokenizer: " + file + " has an invalid piece #" + std::to_string(i) +
                      corrupt);
    }
    const bool is_normal = p.type == kNormal || p.type == kUserDefined || p.type == kUnused;
    auto& map = is_normal ? normal : reserved;
    if (!map.emplace(p.text, i).second) {
      return DataLoss("tokenizer: " + file + " defines piece '" + p.text + "' twice" + corrupt);
    }
    if (p.type == kUserDefined) user_defined.push_back(p.text);
    if (p.type == kUnknown) {
      if (unk_id >= 0) return DataLoss("tokenizer: " + file + " defines <unk> twice" + corrupt);
      unk_id = i;
    }
    if (p.type == kByte) {
      const int b = PieceToByte(p.text);
      if (!byte_fallback || b < 0) {
        return DataLoss("tokenizer: " + file + " has an invalid byte piece '" + p.text + "'" +
                        corrupt);
      }
      byte_found[b] = true;
    }
  }
  if (unk_id < 0) return DataLoss("tokenizer: " + file + " defines no <unk> piece" + corrupt);
  if (byte_fallback && std::find(byte_found.begin(), byte_found.end(), false) !=
                              byte_found.end()) {
    return DataLoss("tokenizer: " + file + " uses byte fallback without all 256 byte pieces" +
                    corrupt);
  }
  std::stable_sort(user_defined.begin(), user_defined.end(),
                   [](std::string_view a, std::string_view b) { return a.size() > b.size(); });

  return Status::Ok();
}

Status Tokenizer::SpModel::CheckSupported(const std::string& file) const {
  const std::string unsupported =
      "; only BPE SentencePiece models with the identity normalizer (LLaMA-family checkpoints) "
      "are supported";
  if (model_type != 2) {
    return Unimplemented("tokenizer: " + file + " is a SentencePiece model of type " +
                         std::to_string(model_type) + ", not BPE" + unsupported);
  }
  if (!precompiled_charsmap.empty() || has_denormalizer_rules) {
    return Unimplemented("tokenizer: " + file + " uses a non-identity (de)normalization rule" +
                         unsupported);
  }
  if (treat_whitespace_as_suffix) {
    return Unimplemented("tokenizer: " + file + " uses treat_whitespace_as_suffix" + unsupported);
  }
  return Status::Ok();
}

Status Tokenizer::SpModel::RunSelfTest(const std::string& file) const {
  // Self-test samples stored in the model, as SentencePieceProcessor::Load checks them.
  for (size_t i = 0; i < self_test.size(); ++i) {
    std::string joined;
    for (const auto& p : Encode(self_test[i].first)) {
      if (!joined.empty()) joined += ' ';
      joined += p;
    }
    if (joined != self_test[i].second) {
      return Internal("tokenizer: " + file + " self-test sample " + std::to_string(i) +
                      " encodes as '" + joined + "', expected '" + self_test[i].second + "'");
    }
  }
  return Status::Ok();
}

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& model_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path dir(model_dir);
  if (!fs::is_directory(dir, ec)) {
    return NotFound("tokenizer: model directory '" + model_dir +
                    "' does not exist or is not a directory; pass the directory of a llava-hf "
                    "checkpoint (with tokenizer.model and tokenizer_config.json)");
  }
  VTW_ASSIGN_OR_RETURN(std::string model_bytes,
                       ReadFile(dir / "tokenizer.model",
                                "copy tokenizer.model (the SentencePiece model) from "
                                "the Hugging Face checkpoint into this directory"));
  VTW_ASSIGN_OR_RETURN(std::string config_text,
                       ReadFile(dir / "tokenizer_config.json",
                                "copy tokenizer_config.json from the Hugging Face "
                                "checkpoint into this directory"));
  std::optional<std::string> added_text;
  const fs::path added_path = dir / "added_tokens.json";
  if (fs::exists(added_path, ec)) {
    VTW_ASSIGN_OR_RETURN(added_text, ReadFile(added_path, ""));
  }
  return LoadFromMemory(model_bytes, config_text,
                        added_text ? std::optional<std::string_view>(*added_text) : std::nullopt,
                        model_dir);
}

// LoadFromMemory in steps, each reading one part of the configuration into the tokenizer.
struct Tokenizer::Loader {
  using AddedMap = std::map<int32_t, AddedToken>;
  // bos/eos/unk/pad contents; LlamaTokenizer's defaults when the config does not name them.
  struct NamedTokens {
    std::optional<std::string> bos, eos, unk, pad;
  };

  // tokenizer_config.json "added_tokens_decoder": id -> token.
  static StatusOr<AddedMap> AddedTokensDecoder(const nlohmann::json& config,
                                               const std::string& file) {
    AddedMap added;
    if (!config.contains("added_tokens_decoder") || config["added_tokens_decoder"].is_null()) {
      return added;
    }
    const auto& dec = config["added_tokens_decoder"];
    if (!dec.is_object()) {
      return InvalidArgument("tokenizer: " + file +
                             ": \"added_tokens_decoder\" must be an object of id -> token");
    }
    for (const auto& [key, value] : dec.items()) {
      AddedToken t;
      try {
        size_t used = 0;
        const long id = std::stol(key, &used);
        if (used != key.size() || id < 0 || id > INT32_MAX - 1) throw std::out_of_range(key);
        t.id = static_cast<int32_t>(id);
      } catch (const std::exception&) {
        return InvalidArgument("tokenizer: " + file + ": added_tokens_decoder key '" + key +
                               "' is not a token id");
      }
      if (!value.is_object() || !value.contains("content") || !value["content"].is_string() ||
          value["content"].get<std::string>().empty()) {
        return InvalidArgument("tokenizer: " + file + ": added_tokens_decoder[" + key +
                               "] needs a non-empty string \"content\"");
      }
      t.content = value["content"].get<std::string>();
      VTW_ASSIGN_OR_RETURN(t.special, BoolField(value, "special", false, file));
      VTW_ASSIGN_OR_RETURN(t.lstrip, BoolField(value, "lstrip", false, file));
      VTW_ASSIGN_OR_RETURN(t.rstrip, BoolField(value, "rstrip", false, file));
      added[t.id] = std::move(t);
    }
    return added;
  }

  // "additional_special_tokens": strings or {"content": ...} objects.
  static StatusOr<std::vector<std::string>> AdditionalSpecialTokens(const nlohmann::json& config,
                                                                    const std::string& file) {
    std::vector<std::string> additional;
    if (!config.contains("additional_special_tokens") ||
        config["additional_special_tokens"].is_null()) {
      return additional;
    }
    const auto& list = config["additional_special_tokens"];
    if (!list.is_array()) {
      return InvalidArgument("tokenizer: " + file + ": \"additional_special_tokens\" must be a list");
    }
    for (const auto& v : list) {
      if (v.is_string()) {
        additional.push_back(v.get<std::string>());
      } else if (v.is_object() && v.contains("content") && v["content"].is_string()) {
        additional.push_back(v["content"].get<std::string>());
      } else {
        return InvalidArgument("tokenizer: " + file +
                               ": additional_special_tokens entries must be strings");
      }
    }
    return additional;
  }

  static StatusOr<NamedTokens> Named(const nlohmann::json& config, const std::string& file) {
    NamedTokens n;
    VTW_ASSIGN_OR_RETURN(n.bos, TokenContent(config, "bos_token", file));
    VTW_ASSIGN_OR_RETURN(n.eos, TokenContent(config, "eos_token", file));
    VTW_ASSIGN_OR_RETURN(n.unk, TokenContent(config, "unk_token", file));
    VTW_ASSIGN_OR_RETURN(n.pad, TokenContent(config, "pad_token", file));
    if (!config.contains("bos_token")) n.bos = "<s>";
    if (!config.contains("eos_token")) n.eos = "</s>";
    if (!config.contains("unk_token")) n.unk = "<unk>";
    return n;
  }

  // HF all_special_tokens: the named ones, the additional ones, and added tokens marked special
  // (which join `additional`, as in HF _add_tokens).
  static void CollectSpecialContents(Tokenizer* tok, const NamedTokens& n, const AddedMap& added,
                                     std::vector<std::string>* additional) {
    if (n.unk) tok->unk_token_ = *n.unk;
    for (const auto* named : {&n.bos, &n.eos, &n.unk, &n.pad}) {
      if (*named) tok->special_contents_.insert(**named);
    }
    for (const auto& a : *additional) tok->special_contents_.insert(a);
    for (const auto& [id, t] : added) {
      if (t.special && !tok->special_contents_.count(t.content)) {
        tok->special_contents_.insert(t.content);
        additional->push_back(t.content);
      }
    }
  }

  // added_tokens.json (content -> id) for ids that added_tokens_decoder lacks.
  static Status MergeAddedTokensJson(const Tokenizer& tok, std::string_view text,
                                     const std::string& file, AddedMap* added) {
    VTW_ASSIGN_OR_RETURN(nlohmann::json extra, ParseJsonText(text, file));
    if (!extra.is_object()) {
      return InvalidArgument("tokenizer: " + file +
                             " must map token strings to ids; fix or delete it");
    }
    for (const auto& [content, value] : extra.items()) {
      if (!value.is_number_integer() || value.get<int64_t>() < 0 ||
          value.get<int64_t>() > INT32_MAX - 1 || content.empty()) {
        return InvalidArgument("tokenizer: " + file + ": id of '" + content +
                               "' must be a non-negative integer; fix or delete the file");
      }
      const auto id = static_cast<int32_t>(value.get<int64_t>());
      if (added->count(id)) continue;  // added_tokens_decoder wins
      AddedToken t;
      t.id = id;
      t.content = content;
      t.special = tok.special_contents_.count(content) > 0;
      (*added)[id] = std::move(t);
    }
    return Status::Ok();
  }

  // Special tokens that are SentencePiece pieces are added tokens too (HF adds
  // all_special_tokens at init), so "<s>" typed in a prompt is one token even when the config
  // does not list it.
  static void AddSpecialPieces(const Tokenizer& tok, AddedMap* added) {
    std::unordered_set<std::string> have;
    for (const auto& [id, t] : *added) have.insert(t.content);
    std::vector<std::string> named(tok.special_contents_.begin(), tok.special_contents_.end());
    std::sort(named.begin(), named.end());
    for (const auto& content : named) {
      if (have.count(content)) continue;
      const int id = tok.sp_->PieceToId(content);
      if (id < 0 || (tok.sp_->IsUnknown(id) && tok.sp_->pieces[id].text != content)) continue;
      if (added->count(id)) continue;
      AddedToken t;
      t.id = id;
      t.content = content;
      t.special = true;
      (*added)[id] = std::move(t);
    }
  }

  // The id table: SentencePiece pieces, then added tokens (longest content first for matching).
  static Status BuildIdTable(Tokenizer* tok, const AddedMap& added, const std::string& file) {
    int32_t size = tok->sp_size_;
    for (const auto& [id, t] : added) size = std::max(size, id + 1);
    if (size > (1 << 24)) {
      return InvalidArgument("tokenizer: added token ids in " + file +
                             " are implausibly large (vocab would have " + std::to_string(size) +
                             " entries)");
    }
    tok->tokens_.resize(size);
    for (int32_t id = 0; id < tok->sp_size_; ++id) {
      tok->tokens_[id].text = tok->sp_->pieces[id].text;
      tok->tokens_[id].valid = true;
    }
    for (auto& [id, t] : added) {
      tok->tokens_[id].text = t.content;
      tok->tokens_[id].valid = true;
      tok->added_by_content_[t.content] = id;
      tok->added_.push_back(t);
    }
    std::stable_sort(tok->added_.begin(), tok->added_.end(),
                     [](const AddedToken& a, const AddedToken& b) {
                       return a.content.size() > b.content.size();
                     });
    for (size_t i = 0; i < tok->added_.size(); ++i) {
      tok->added_by_first_byte_[static_cast<uint8_t>(tok->added_[i].content[0])].push_back(i);
    }
    return Status::Ok();
  }

  // Named ids, special ids (HF all_special_ids) and legacy added tokens (decoded as their own
  // group: added tokens that are not special, and additional special tokens beyond the
  // SentencePiece vocab, as in PreTrainedTokenizer._decode).
  static void MarkIds(Tokenizer* tok, const NamedTokens& n,
                      const std::vector<std::string>& additional) {
    auto id_of = [&](const std::optional<std::string>& content) -> int32_t {
      if (!content) return -1;
      const auto id = tok->FindToken(*content);
      return id ? *id : -1;
    };
    tok->bos_id_ = id_of(n.bos);
    tok->eos_id_ = id_of(n.eos);
    tok->unk_id_ = id_of(n.unk);
    tok->pad_id_ = id_of(n.pad);
    tok->image_id_ = id_of(std::string(kImageToken));
    std::unordered_set<std::string> legacy_added;
    for (const auto& [content, id] : tok->added_by_content_) {
      if (!tok->special_contents_.count(content)) legacy_added.insert(content);
    }
    for (const auto& a : additional) {
      if (id_of(a) >= tok->sp_size_) legacy_added.insert(a);
    }
    for (const auto& content : tok->special_contents_) {
      const int32_t id = id_of(content);
      if (id >= 0) tok->tokens_[id].special = true;
    }
    for (auto& info : tok->tokens_) {
      if (!info.valid) continue;
      if (tok->special_contents_.count(info.text)) info.special = true;
      if (legacy_added.count(info.text)) info.legacy_added = true;
    }
  }
};

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::LoadFromMemory(
    std::string_view model_bytes, std::string_view config_json,
    std::optional<std::string_view> added_tokens_json, const std::string& model_dir) {
  namespace fs = std::filesystem;
  const fs::path dir(model_dir);
  std::unique_ptr<Tokenizer> tok(new Tokenizer());
  VTW_ASSIGN_OR_RETURN(tok->sp_, SpModel::Parse(model_bytes, (dir / "tokenizer.model").string()));
  tok->sp_size_ = tok->sp_->size();

  const std::string config_file = (dir / "tokenizer_config.json").string();
  VTW_ASSIGN_OR_RETURN(nlohmann::json config, ParseJsonText(config_json, config_file));
  if (!config.is_object()) {
    return InvalidArgument("tokenizer: " + config_file + " must hold a JSON object");
  }
  VTW_ASSIGN_OR_RETURN(tok->legacy_, BoolField(config, "legacy", true, config_file));
  VTW_ASSIGN_OR_RETURN(tok->add_prefix_space_,
                       BoolField(config, "add_prefix_space", true, config_file));
  VTW_ASSIGN_OR_RETURN(tok->add_bos_token_, BoolField(config, "add_bos_token", true, config_file));
  VTW_ASSIGN_OR_RETURN(tok->add_eos_token_,
                       BoolField(config, "add_eos_token", false, config_file));
  // legacy=false: HF reloads the model with the dummy prefix turned off and adds "▁" itself.
  if (!tok->legacy_) tok->sp_->add_dummy_prefix = false;

  // Added tokens: added_tokens_decoder first, then added_tokens.json for ids it lacks.
  VTW_ASSIGN_OR_RETURN(Loader::AddedMap added, Loader::AddedTokensDecoder(config, config_file));
  VTW_ASSIGN_OR_RETURN(std::vector<std::string> additional,
                       Loader::AdditionalSpecialTokens(config, config_file));
  VTW_ASSIGN_OR_RETURN(Loader::NamedTokens named, Loader::Named(config, config_file));
  Loader::CollectSpecialContents(tok.get(), named, added, &additional);
  if (added_tokens_json) {
    VTW_RETURN_IF_ERROR(Loader::MergeAddedTokensJson(
        *tok, *added_tokens_json, (dir / "added_tokens.json").string(), &added));
  }
  Loader::AddSpecialPieces(*tok, &added);
  VTW_RETURN_IF_ERROR(Loader::BuildIdTable(tok.get(), added, config_file));
  Loader::MarkIds(tok.get(), named, additional);
  tok->unk_token_length_ = static_cast<int>(tok->sp_->Encode(tok->unk_token_).size());
  return tok;
}

const Tokenizer::TokenInfo* Tokenizer::Info(int32_t id) const {
  if (id < 0 || id >= static_cast<int32_t>(tokens_.size()) || !tokens_[id].valid) return nullptr;
  return &tokens_[id];
}

std::string Tokenizer::IdToPiece(int32_t id) const {
  const TokenInfo* info = Info(id);
  return info ? info->text : std::string();
}

bool Tokenizer::IsSpecial(int32_t id) const {
  const TokenInfo* info = Info(id);
  return info && info->special;
}

std::optional<int32_t> Tokenizer::FindToken(std::string_view token) const {
  const auto it = added_by_content_.find(std::string(token));
  if (it != added_by_content_.end()) return it->second;
  const int id = sp_->PieceToId(token);
  if (id < 0 || (sp_->IsUnknown(id) && sp_->pieces[id].text != token)) return std::nullopt;
  return id;
}

int32_t Tokenizer::PieceOrAddedToId(const std::string& piece) const {
  const auto it = added_by_content_.find(piece);
  if (it != added_by_content_.end()) return it->second;
  return sp_->PieceToId(piece);
}

std::vector<std::string> Tokenizer::TokenizeChunk(const std::string& chunk) const {
  if (legacy_ || !(StartsWith(chunk, kSpaceSymbol) || StartsWith(chunk, " "))) {
    return sp_->Encode(chunk);
  }
  // HF encodes unk_token + text and drops the unk pieces so that SentencePiece keeps the
  // leading "▁" of the chunk.
  std::vector<std::string> pieces = sp_->Encode(unk_token_ + chunk);
  if (static_cast<int>(pieces.size()) >= unk_token_length_) {
    pieces.erase(pieces.begin(), pieces.begin() + unk_token_length_);
  }
  return pieces;
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_bos) const {
  std::string s(text);
  if (!legacy_ && !s.empty()) {
    s = ReplaceAll(s, kSpaceSymbol, " ");
    if (add_prefix_space_) s.insert(0, kSpaceSymbol);
  }

  // Split on added tokens, leftmost then longest match (HF Trie.split).
  struct Chunk {
    std::string text;
    int added = -1;  // index into added_, or -1 for plain text
  };
  std::vector<Chunk> chunks;
  size_t start = 0;
  for (size_t pos = 0; pos < s.size();) {
    int match = -1;
    for (const size_t i : added_by_first_byte_[static_cast<uint8_t>(s[pos])]) {
      const std::string& c = added_[i].content;
      if (s.compare(pos, c.size(), c) == 0) {
        match = static_cast<int>(i);
        break;  // longest first
      }
    }
    if (match < 0) {
      ++pos;
      continue;
    }
    if (pos > start) chunks.push_back({s.substr(start, pos - start), -1});
    chunks.push_back({added_[match].content, match});
    pos += added_[match].content.size();
    start = pos;
  }
  if (start < s.size()) chunks.push_back({s.substr(start), -1});

  // lstrip / rstrip: an added token eats the whitespace next to it.
  for (size_t i = 0; i < chunks.size(); ++i) {
    if (chunks[i].added < 0) continue;
    const AddedToken& t = added_[chunks[i].added];
    if (t.rstrip && i + 1 < chunks.size() && !chunks[i + 1].text.empty()) {
      chunks[i + 1].text = StripLeft(chunks[i + 1].text);
    }
    if (t.lstrip && i > 0 && !chunks[i - 1].text.empty()) {
      chunks[i - 1].text = StripRight(chunks[i - 1].text);
    }
  }

  std::vector<std::string> pieces;
  std::vector<int32_t> ids;
  for (const Chunk& c : chunks) {
    if (c.text.empty()) continue;
    if (c.added >= 0) {
      pieces.push_back(c.text);
      ids.push_back(added_[c.added].id);
      continue;
    }
    for (std::string& p : TokenizeChunk(c.text)) {
      ids.push_back(PieceOrAddedToId(p));
      pieces.push_back(std::move(p));
    }
  }
  // legacy=false: a lone "▁" before a special token is dropped.
  if (!legacy_ && pieces.size() > 1 && pieces[0] == kSpaceSymbol &&
      special_contents_.count(pieces[1])) {
    ids.erase(ids.begin());
  }
  if (add_bos && bos_id_ >= 0) ids.insert(ids.begin(), bos_id_);
  return ids;
}

void Tokenizer::FinishPieces(PieceDecodeState* state, std::string* out) const {
  if (DrainBytes(&state->pending_bytes, /*final=*/true, out)) state->text_nonempty = true;
}

void Tokenizer::AppendPiece(std::string_view piece, PieceDecodeState* state,
                            std::string* out) const {
  const int id = sp_->PieceToId(piece);
  if (sp_->IsByte(id)) {
    state->pending_bytes.push_back(static_cast<char>(PieceToByte(piece)));
    if (DrainBytes(&state->pending_bytes, /*final=*/false, out)) state->text_nonempty = true;
    return;
  }
  FinishPieces(state, out);
  // As SentencePieceProcessor::Decode: a leading "▁" may go only at the start of the text, and
  // only when the normalizer adds a dummy prefix or removes extra whitespace.
  if (state->bos_ws_seen || state->text_nonempty) state->is_bos_ws = false;
  std::string decoded;
  bool has_bos_ws = false;
  if (sp_->IsControl(id)) {
    // invisible
  } else if (sp_->IsUnknown(id)) {
    decoded = sp_->pieces[id].text == piece ? sp_->unk_surface : std::string(piece);
  } else {
    if (state->is_bos_ws && (sp_->add_dummy_prefix || sp_->remove_extra_whitespaces) &&
        StartsWith(piece, kSpaceSymbol)) {
      piece.remove_prefix(kSpaceSymbol.size());
      has_bos_ws = !sp_->remove_extra_whitespaces;
    }
    decoded = ReplaceAll(piece, kSpaceSymbol, " ");
  }
  state->bos_ws_seen = has_bos_ws;
  if (!decoded.empty()) state->text_nonempty = true;
  out->append(decoded);
}

std::string Tokenizer::DecodePieces(const std::vector<std::string>& pieces) const {
  PieceDecodeState state;
  std::string out;
  for (const auto& p : pieces) AppendPiece(p, &state, &out);
  FinishPieces(&state, &out);
  return out;
}

std::string Tokenizer::ConvertTokensToString(std::vector<std::string> tokens) const {
  if (tokens.empty()) return "";
  if (add_prefix_space_ && StartsWith(tokens[0], kSpaceSymbol)) {
    tokens[0].erase(0, kSpaceSymbol.size());
  }
  std::string out;
  std::vector<std::string> segment;
  bool prev_is_special = false;
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string& t = tokens[i];
    if (special_contents_.count(t)) {
      if (!prev_is_special && i != 0 && legacy_) out += ' ';
      out += DecodePieces(segment);
      out += t;
      prev_is_special = true;
      segment.clear();
    } else {
      if (prev_is_special && i == 1 && add_prefix_space_ && !StartsWith(t, kSpaceSymbol)) {
        out += ' ';
      }
      segment.push_back(t);
      prev_is_special = false;
    }
  }
  out += DecodePieces(segment);
  return out;
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  std::vector<std::string> sub_texts;
  std::vector<std::string> current;
  for (const int32_t id : ids) {
    const TokenInfo* info = Info(id);
    if (info == nullptr || (skip_special_tokens && info->special)) continue;
    if (info->legacy_added) {
      if (!current.empty()) {
        std::string s = ConvertTokensToString(std::move(current));
        current.clear();
        if (!s.empty()) sub_texts.push_back(std::move(s));
      }
      sub_texts.push_back(info->text);
    } else {
      current.push_back(info->text);
    }
  }
  if (!current.empty()) sub_texts.push_back(ConvertTokensToString(std::move(current)));
  std::string out;
  for (size_t i = 0; i < sub_texts.size(); ++i) {
    if (i > 0) out += ' ';  // spaces_between_special_tokens=True
    out += sub_texts[i];
  }
  return out;
}

// --- IncrementalDetokenizer. Follows Tokenizer::Decode(ids, skip_special_tokens=true) one id at
// a time: ordinary pieces form a run (one convert_tokens_to_string call), a legacy added token
// closes the run and forms its own group, and groups are joined by " ".

void IncrementalDetokenizer::ResetRun() {
  state_ = Tokenizer::PieceDecodeState();
  run_tokens_ = 0;
  run_has_text_ = false;
}

std::string IncrementalDetokenizer::EmitRunText(std::string chunk) {
  if (chunk.empty()) return chunk;
  if (!run_has_text_) {
    run_has_text_ = true;
    if (groups_emitted_) chunk.insert(0, " ");
    groups_emitted_ = true;
  }
  return chunk;
}

std::string IncrementalDetokenizer::Push(int32_t id) {
  const Tokenizer::TokenInfo* info = tok_.Info(id);
  if (info == nullptr || info->special) return "";
  if (info->legacy_added) {
    std::string tail;
    tok_.FinishPieces(&state_, &tail);
    std::string out = EmitRunText(std::move(tail));
    if (groups_emitted_) out += ' ';
    out += info->text;
    groups_emitted_ = true;
    ResetRun();
    return out;
  }
  std::string_view piece = info->text;
  if (run_tokens_ == 0 && tok_.add_prefix_space_ && StartsWith(piece, kSpaceSymbol)) {
    piece.remove_prefix(kSpaceSymbol.size());
  }
  ++run_tokens_;
  std::string chunk;
  tok_.AppendPiece(piece, &state_, &chunk);
  return EmitRunText(std::move(chunk));
}

std::string IncrementalDetokenizer::Flush() {
  std::string tail;
  tok_.FinishPieces(&state_, &tail);
  std::string out = EmitRunText(std::move(tail));
  // HF appends the last run even when it decodes to "", so the join leaves a trailing " ".
  if (run_tokens_ > 0 && !run_has_text_ && groups_emitted_) out += ' ';
  ResetRun();
  groups_emitted_ = false;
  return out;
}

std::string ApplyLlavaChatTemplate(std::string_view user_prompt, bool has_image) {
  std::string out = "USER: ";
  if (has_image) {
    out += kImageToken;
    out += '\n';
  }
  out += user_prompt;
  out += " ASSISTANT:";
  return out;
}

std::string ApplyLlavaChatTemplate(const std::vector<ChatMessage>& messages) {
  std::string out;
  for (const ChatMessage& m : messages) {
    switch (m.role) {
      case ChatMessage::Role::kSystem:
        out += m.text;
        out += ' ';
        break;
      case ChatMessage::Role::kUser:
        out += "USER: ";
        if (m.image) {
          out += kImageToken;
          out += '\n';
        }
        out += m.text;
        out += " ASSISTANT:";
        break;
      case ChatMessage::Role::kAssistant:
        out += ' ';
        out += m.text;
        out += "</s>";
        break;
    }
  }
  return out;
}

int CountOccurrences(std::string_view text, std::string_view token) {
  if (token.empty()) return 0;
  int count = 0;
  for (size_t pos = text.find(token); pos != std::string_view::npos;
       pos = text.find(token, pos + token.size())) {
    ++count;
  }
  return count;
}

}  // namespace vtw
