// Fuzz target bodies; see fuzz_targets.h.
#include "fuzz/fuzz_targets.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string_view>

#include "model/image_processor.h"
#include "model/llava_config.h"
#include "model/safetensors.h"
#include "model/sampler.h"
#include "model/tokenizer.h"
#include "server/model_bundle.h"
#include "server/openai_api.h"
#include "server/service.h"
#include "server/validation.h"

#ifndef VTW_SOURCE_DIR
#error "VTW_SOURCE_DIR must be defined (the build does)"
#endif

namespace vtw::fuzz {
namespace {

[[noreturn]] void CheckFailed(const char* file, int line, const char* cond,
                              const std::string& what) {
  std::fprintf(stderr, "FUZZ CHECK FAILED at %s:%d: %s\n  %s\n", file, line, cond, what.c_str());
  std::fflush(stderr);
  std::abort();
}

#define FUZZ_CHECK(cond, what)                                   \
  do {                                                           \
    if (!(cond)) CheckFailed(__FILE__, __LINE__, #cond, (what)); \
  } while (0)

// VTW_FUZZ_VERBOSE=1 prints why each input was rejected (for triage and corpus checks).
void Rejected(const char* target, const Status& status) {
  static const bool verbose = [] {
    const char* env = std::getenv("VTW_FUZZ_VERBOSE");
    return env != nullptr && *env != '\0' && std::string(env) != "0";
  }();
  if (verbose) std::fprintf(stderr, "[%s] rejected: %s\n", target, status.ToString().c_str());
}

std::string_view AsText(const uint8_t* data, size_t size) {
  return size == 0 ? std::string_view()
                   : std::string_view(reinterpret_cast<const char*>(data), size);
}

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "fuzz: cannot read %s (set VTW_TEST_DATA_DIR to tests/data)\n",
                 path.c_str());
    std::abort();
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string OracleModelDir() { return TestDataDir() + "/oracle/tiny-llava"; }

// True when `s` is well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF).
bool IsValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<uint8_t>(s[i]);
    size_t n = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      n = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    for (size_t k = 1; k <= n; ++k) {
      if (i + k >= s.size()) return false;
      const auto d = static_cast<uint8_t>(s[i + k]);
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

// --- shared fixtures ------------------------------------------------------------------------

const Tokenizer& OracleTokenizer() {
  static const Tokenizer* tok = [] {
    auto loaded = Tokenizer::Load(OracleModelDir());
    if (!loaded.ok()) {
      std::fprintf(stderr, "fuzz: oracle tokenizer: %s\n", loaded.status().ToString().c_str());
      std::abort();
    }
    return std::move(loaded).value().release();
  }();
  return *tok;
}

struct TokenizerFiles {
  std::string config;
  std::string added;
};

const TokenizerFiles& OracleTokenizerFiles() {
  static const TokenizerFiles files{ReadFileOrDie(OracleModelDir() + "/tokenizer_config.json"),
                                    ReadFileOrDie(OracleModelDir() + "/added_tokens.json")};
  return files;
}

const ModelBundle& OracleBundle() {
  static const ModelBundle* bundle = [] {
    at::set_num_threads(1);
    auto loaded = ModelBundle::Load(OracleModelDir(), at::kFloat);
    if (!loaded.ok()) {
      std::fprintf(stderr, "fuzz: oracle model bundle: %s\n", loaded.status().ToString().c_str());
      std::abort();
    }
    return std::move(loaded).value().release();
  }();
  return *bundle;
}

// The image configurations ImageTarget picks from with its first byte.
const std::vector<ImageProcessorConfig>& ImageConfigs() {
  static const std::vector<ImageProcessorConfig> configs = [] {
    auto oracle = LoadImageProcessorConfig(OracleModelDir() + "/preprocessor_config.json");
    if (!oracle.ok()) {
      std::fprintf(stderr, "fuzz: oracle preprocessor config: %s\n",
                   oracle.status().ToString().c_str());
      std::abort();
    }
    std::vector<ImageProcessorConfig> c(4, *oracle);
    c[1].do_center_crop = false;  // output = the shortest-edge resize (any aspect ratio)
    c[1].shortest_edge = 32;
    c[2].shortest_edge = 0;  // fixed-size resize, then a larger crop (zero padding)
    c[2].resize_height = 20;
    c[2].resize_width = 48;
    c[2].crop_height = 40;
    c[2].crop_width = 40;
    c[3].do_resize = false;  // crop (and pad) the decoded image as it is
    c[3].do_rescale = false;
    c[3].crop_height = 64;
    c[3].crop_width = 24;
    return c;
  }();
  return configs;
}

constexpr int64_t kFuzzMaxPixels = int64_t{4} << 20;  // 4 MP: 12 MB decoded, fast under ASan

void InitNothing() {}
void InitImage() { ImageConfigs(); }
void InitTokenizer() { OracleTokenizer(); }
void InitTokenizerModel() { OracleTokenizerFiles(); }
void InitRequest() { OracleBundle(); }

}  // namespace

std::string TestDataDir() {
  if (const char* env = std::getenv("VTW_TEST_DATA_DIR"); env != nullptr && *env != '\0') {
    return env;
  }
  return std::string(VTW_SOURCE_DIR) + "/tests/data";
}

// --- safetensors ----------------------------------------------------------------------------

void SafetensorsTarget(const uint8_t* data, size_t size) {
  auto file = SafetensorsFile::FromBytes(std::string(AsText(data, size)), "fuzz.safetensors");
  if (!file.ok()) {
    Rejected("safetensors", file.status());
    FUZZ_CHECK(!file.status().message().empty(), "an error without a message");
    return;
  }
  const SafetensorsFile& f = **file;
  FUZZ_CHECK(f.file_size() == size, "file_size() differs from the input size");
  uint64_t total = 0;
  const uint8_t* prev_end = nullptr;
  for (const TensorView& view : f.tensors()) {
    FUZZ_CHECK(view.name != "__metadata__", "__metadata__ became a tensor");
    FUZZ_CHECK(f.Find(view.name) == &view, "Find does not return the view of '" + view.name + "'");
    FUZZ_CHECK(view.file != nullptr && *view.file == "fuzz.safetensors", "view.file is wrong");
    int64_t numel = 1;
    for (int64_t d : view.shape) {
      FUZZ_CHECK(d >= 0, "negative dimension accepted");
      FUZZ_CHECK(!__builtin_mul_overflow(numel, d, &numel), "numel overflows");
    }
    FUZZ_CHECK(view.numel() == numel, "numel() is wrong");
    FUZZ_CHECK(static_cast<uint64_t>(numel) * SafetensorsDTypeSize(view.dtype) == view.nbytes,
               "nbytes != numel * element size for '" + view.name + "'");
    FUZZ_CHECK(view.nbytes <= size, "a tensor larger than the file");
    total += view.nbytes;
    FUZZ_CHECK(total <= size, "tensors add up to more than the file");
    if (view.nbytes > 0) {
      FUZZ_CHECK(prev_end == nullptr || view.data >= prev_end, "tensors overlap or are unordered");
      prev_end = view.data + view.nbytes;
      // Touch the first and last byte: out of the input's buffer, ASan reports it.
      volatile uint8_t first = view.data[0];
      volatile uint8_t last = view.data[view.nbytes - 1];
      (void)first;
      (void)last;
    }
    if (view.dtype == SafetensorsDType::kF32 || view.dtype == SafetensorsDType::kF16 ||
        view.dtype == SafetensorsDType::kBF16) {
      auto floats = ToFloatVector(view);
      FUZZ_CHECK(floats.ok(), "ToFloatVector failed on a float tensor");
      FUZZ_CHECK(static_cast<int64_t>(floats->size()) == numel, "ToFloatVector size is wrong");
    } else {
      FUZZ_CHECK(!ToFloatVector(view).ok(), "ToFloatVector accepted a non-float tensor");
    }
  }
}

void ShardIndexTarget(const uint8_t* data, size_t size) {
  auto index = ParseShardIndex(AsText(data, size), "shard index fuzz: ");
  if (!index.ok()) {
    Rejected("shard_index", index.status());
    FUZZ_CHECK(index.status().code() == StatusCode::kDataLoss, index.status().ToString());
    return;
  }
  FUZZ_CHECK(!index->empty(), "an empty weight_map was accepted");
  for (const auto& [shard, tensors] : *index) {
    FUZZ_CHECK(!shard.empty() && shard != "." && shard != ".." &&
                   shard.find('/') == std::string::npos && shard.find('\0') == std::string::npos,
               "shard '" + shard + "' is not a plain file name");
    FUZZ_CHECK(!tensors.empty(), "a shard without tensors");
  }
}

// --- config.json ----------------------------------------------------------------------------

void LlavaConfigTarget(const uint8_t* data, size_t size) {
  auto config = ParseLlavaConfigText(AsText(data, size), "config.json");
  if (!config.ok()) {
    Rejected("llava_config", config.status());
    FUZZ_CHECK(config.status().code() == StatusCode::kInvalidArgument, config.status().ToString());
    return;
  }
  const LlavaConfig& c = *config;
  FUZZ_CHECK(c.vision.head_dim() > 0, "vision head_dim <= 0");
  FUZZ_CHECK(c.vision.num_patches() > 0, "num_patches <= 0");
  FUZZ_CHECK(c.num_image_tokens() > 0, "num_image_tokens <= 0");
  FUZZ_CHECK(c.vision_layers_used() >= 0 && c.vision_layers_used() <= c.vision.num_hidden_layers,
             "vision_layers_used out of range");
  FUZZ_CHECK(c.text.q_size() > 0 && c.text.kv_size() > 0, "q/kv size <= 0");
  FUZZ_CHECK(c.text.num_attention_heads % c.text.num_key_value_heads == 0, "GQA ratio");
  FUZZ_CHECK(c.image_token_index >= 0, "negative image_token_index");
  // What `vtw train` writes must load back as the same geometry.
  const std::string written = LlavaConfigToJson(c).dump();
  auto again = ParseLlavaConfigText(written, "config.json (written)");
  FUZZ_CHECK(again.ok(), "LlavaConfigToJson output does not parse: " + again.status().ToString() +
                             "\n  " + written);
  const LlavaConfig& a = *again;
  FUZZ_CHECK(LlavaConfigToJson(a) == LlavaConfigToJson(c),
             "round trip changed the config:\n  " + written + "\n  " + LlavaConfigToJson(a).dump());
}

// --- images ---------------------------------------------------------------------------------

void ImageTarget(const uint8_t* data, size_t size) {
  if (size == 0) return;
  const auto& configs = ImageConfigs();
  const ImageProcessorConfig& config = configs[data[0] % configs.size()];
  const std::string_view bytes = AsText(data + 1, size - 1);
  ImageLimits limits;
  limits.max_pixels = kFuzzMaxPixels;
  auto rgb = DecodeImage(bytes, limits);
  if (!rgb.ok()) {
    Rejected("image", rgb.status());
    const StatusCode code = rgb.status().code();
    FUZZ_CHECK(code == StatusCode::kInvalidArgument || code == StatusCode::kResourceExhausted,
               rgb.status().ToString());
    return;
  }
  FUZZ_CHECK(rgb->type() == CV_8UC3 && rgb->dims == 2, "DecodeImage did not return RGB u8");
  FUZZ_CHECK(rgb->rows > 0 && rgb->cols > 0, "empty image accepted");
  FUZZ_CHECK(int64_t{rgb->rows} * rgb->cols <= kFuzzMaxPixels, "pixel limit not enforced");
  auto out_size = PreprocessedImageSize(config, rgb->rows, rgb->cols);
  auto chw = PreprocessImage(*rgb, config);
  FUZZ_CHECK(chw.ok() == out_size.ok(), "PreprocessImage and PreprocessedImageSize disagree");
  if (!chw.ok()) return;
  FUZZ_CHECK(static_cast<int64_t>(chw->size()) == 3 * out_size->height * out_size->width,
             "PreprocessImage output size differs from PreprocessedImageSize");
  if (config.do_center_crop) {
    FUZZ_CHECK(out_size->height == config.crop_height && out_size->width == config.crop_width,
               "center crop size not honoured");
  }
  for (float v : *chw) FUZZ_CHECK(std::isfinite(v), "non-finite pixel value");
}

// --- tokenizer ------------------------------------------------------------------------------

void TokenizerTarget(const uint8_t* data, size_t size) {
  if (size == 0) return;
  const Tokenizer& tok = OracleTokenizer();
  const uint8_t flags = data[0];
  const bool add_bos = flags & 1;
  const bool skip_special = flags & 2;
  const bool in_vocab = flags & 4;
  const std::string_view text = AsText(data + 1, size - 1);

  const std::vector<int32_t> ids = tok.Encode(text, add_bos);
  for (int32_t id : ids) {
    FUZZ_CHECK(id >= 0 && id < tok.vocab_size(), "Encode returned id " + std::to_string(id));
  }
  if (add_bos && tok.bos_id() >= 0) {
    FUZZ_CHECK(!ids.empty() && ids[0] == tok.bos_id(), "add_bos did not prepend BOS");
  }
  (void)tok.Decode(ids, skip_special);

  // The bytes again as int16 ids: out-of-range and negative ids included (or folded into
  // [-8, vocab + 8) with the in_vocab flag).
  std::vector<int32_t> raw;
  raw.reserve(text.size() / 2);
  for (size_t i = 0; i + 1 < text.size(); i += 2) {
    int16_t v;
    std::memcpy(&v, text.data() + i, 2);
    int32_t id = v;
    if (in_vocab) id = static_cast<int32_t>(static_cast<uint16_t>(v) % (tok.vocab_size() + 16)) - 8;
    raw.push_back(id);
  }
  for (const std::vector<int32_t>* list : {&ids, static_cast<const std::vector<int32_t>*>(&raw)}) {
    const std::string full = tok.Decode(*list, /*skip_special_tokens=*/true);
    FUZZ_CHECK(IsValidUtf8(full), "Decode returned invalid UTF-8");
    (void)tok.Decode(*list, /*skip_special_tokens=*/false);
    IncrementalDetokenizer detok(tok);
    std::string streamed;
    for (int32_t id : *list) {
      const std::string chunk = detok.Push(id);
      FUZZ_CHECK(IsValidUtf8(chunk), "IncrementalDetokenizer chunk is not valid UTF-8");
      streamed += chunk;
    }
    const std::string tail = detok.Flush();
    FUZZ_CHECK(IsValidUtf8(tail), "IncrementalDetokenizer tail is not valid UTF-8");
    streamed += tail;
    FUZZ_CHECK(streamed == full, "streamed text '" + streamed + "' != Decode '" + full + "'");
    for (int32_t id : *list) {
      (void)tok.IdToPiece(id);
      (void)tok.IsSpecial(id);
    }
  }
}

void TokenizerModelTarget(const uint8_t* data, size_t size) {
  const TokenizerFiles& files = OracleTokenizerFiles();
  auto tok = Tokenizer::LoadFromMemory(AsText(data, size), files.config, files.added, "fuzz");
  if (!tok.ok()) {
    Rejected("tokenizer_model", tok.status());
    FUZZ_CHECK(!tok.status().message().empty(), "an error without a message");
    return;
  }
  const Tokenizer& t = **tok;
  const std::vector<int32_t> ids = t.Encode("USER: <image>\nWhat is \xC3\xA9 ASSISTANT: 42!", true);
  for (int32_t id : ids) {
    FUZZ_CHECK(id >= 0 && id < t.vocab_size(), "Encode returned id " + std::to_string(id));
  }
  (void)t.Decode(ids, false);
  (void)t.Decode(ids, true);
}

// --- request validation ---------------------------------------------------------------------

void RequestTarget(const uint8_t* data, size_t size) {
  v1::GenerateRequest wire;
  if (!wire.ParseFromArray(data, static_cast<int>(size))) return;
  const ModelBundle& bundle = OracleBundle();
  ServiceLimits limits;  // the server's defaults
  limits.image.max_pixels = kFuzzMaxPixels;
  StatusOr<RequestSpec> spec = SpecFromWire(wire);
  auto request = spec.ok() ? BuildRequest(bundle, *spec, limits)
                           : StatusOr<std::unique_ptr<Request>>(spec.status());
  if (!request.ok()) {
    Rejected("request", request.status());
    const grpc::Status status = ToGrpcStatus(request.status());
    FUZZ_CHECK(!status.ok(), "a rejected request maps to gRPC OK");
    FUZZ_CHECK(!request.status().message().empty(), "an error without a message");
    return;
  }
  const Request& r = **request;
  const LlavaConfig& config = bundle.model->config();
  const int layers = bundle.model->num_layers();
  FUZZ_CHECK(!r.id.empty() && r.id.size() <= 128, "request id '" + r.id + "'");
  FUZZ_CHECK(r.withdraw_layer >= 0 && r.withdraw_layer <= layers,
             "withdraw layer " + std::to_string(r.withdraw_layer));
  FUZZ_CHECK(r.stop.max_new_tokens >= 1 && r.stop.max_new_tokens <= limits.max_new_tokens_limit,
             "max_new_tokens " + std::to_string(r.stop.max_new_tokens));
  const PromptLayout& layout = r.prompt.layout;
  FUZZ_CHECK(layout.size() > 0, "empty prompt accepted");
  FUZZ_CHECK(layout.size() + r.stop.max_new_tokens <= config.text.max_position_embeddings,
             "prompt + max_new_tokens over the context length");
  FUZZ_CHECK(layout.kinds.size() == layout.token_ids.size(), "layout kinds/ids sizes differ");
  for (int64_t id : layout.token_ids) {
    FUZZ_CHECK(id >= 0 && id < config.text.vocab_size, "prompt id " + std::to_string(id));
  }
  const bool has_image = !wire.image().empty();
  FUZZ_CHECK(layout.num_image_tokens == (has_image ? config.num_image_tokens() : 0),
             "image tokens in the layout");
  if (has_image) {
    const at::Tensor& px = r.prompt.pixel_values;
    FUZZ_CHECK(px.defined() && px.dim() == 4 && px.size(1) == 3 &&
                   px.size(2) == config.vision.image_size && px.size(3) == config.vision.image_size,
               "pixel_values shape");
    FUZZ_CHECK(at::isfinite(px).all().item<bool>(), "non-finite pixel values");
  }
  // The engine builds a sampler from the validated parameters; it must pick an in-vocab id.
  Sampler sampler(r.sampling);
  std::vector<float> logits(static_cast<size_t>(config.text.vocab_size));
  for (size_t i = 0; i < logits.size(); ++i)
    logits[i] = static_cast<float>((i * 7919) % 101) / 7.0f;
  const int32_t next = sampler.Sample(logits.data(), static_cast<int64_t>(logits.size()));
  FUZZ_CHECK(next >= 0 && next < config.text.vocab_size, "sampled id " + std::to_string(next));
}

// --- registry -------------------------------------------------------------------------------

// --- OpenAI chat request parser -------------------------------------------------------------

void ChatRequestTarget(const uint8_t* data, size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  StatusOr<ChatCompletionRequest> parsed = ParseChatCompletionRequest(body, "tiny-llava");
  if (!parsed.ok()) {
    Rejected("chat_request", parsed.status());
    const int http = HttpStatusFor(parsed.status());
    FUZZ_CHECK(http == 400 || http == 404, "a parse error answers HTTP " + std::to_string(http));
    FUZZ_CHECK(!parsed.status().message().empty(), "an error without a message");
    // The error body is JSON whatever the message holds (invalid UTF-8 is replaced).
    (void)ErrorJson(parsed.status()).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    return;
  }
  const RequestSpec& spec = parsed->spec;
  FUZZ_CHECK(spec.raw_prompt, "the chat template was not applied");
  FUZZ_CHECK(spec.prompt.size() >= std::strlen("USER:  ASSISTANT:"), "prompt '" + spec.prompt + "'");
  FUZZ_CHECK(CountOccurrences(spec.prompt, kImageToken) == (spec.image.empty() ? 0 : 1),
             "the prompt's <image> count does not match the image");
  ServiceLimits limits;
  limits.image.max_pixels = kFuzzMaxPixels;
  auto request = BuildRequest(OracleBundle(), spec, limits);
  if (!request.ok()) {
    Rejected("chat_request", request.status());
    FUZZ_CHECK(HttpStatusFor(request.status()) >= 400, "a rejected request answers 2xx");
  }
}

const std::vector<Target>& Targets() {
  static const std::vector<Target> targets = {
      {"safetensors", &SafetensorsTarget, &InitNothing, 65536},
      {"shard_index", &ShardIndexTarget, &InitNothing, 16384},
      {"llava_config", &LlavaConfigTarget, &InitNothing, 16384},
      {"image", &ImageTarget, &InitImage, 65536},
      {"tokenizer", &TokenizerTarget, &InitTokenizer, 4096},
      {"tokenizer_model", &TokenizerModelTarget, &InitTokenizerModel, 16384},
      {"request", &RequestTarget, &InitRequest, 65536},
      {"chat_request", &ChatRequestTarget, &InitRequest, 65536},
  };
  return targets;
}

const Target& FindTarget(const std::string& name) {
  for (const Target& t : Targets()) {
    if (name == t.name) return t;
  }
  std::fprintf(stderr, "fuzz: no target called '%s'\n", name.c_str());
  std::abort();
}

}  // namespace vtw::fuzz
