// The bodies of the libFuzzer targets (fuzz/*_fuzz.cc) as plain functions, so that the fuzzers
// and the regression test (tests/fuzz_regression_test.cc, built with the normal compiler) run
// exactly the same code on an input. Each body feeds untrusted bytes to one parser or validator
// of the project, then checks invariants of what it accepted; a violated invariant aborts with a
// message on stderr ("FUZZ CHECK FAILED"), which libFuzzer reports as a crash. Bodies never catch
// exceptions: one that escapes is a finding too.
//
// Thread-compatible: bodies share lazily loaded, immutable fixtures (the oracle tokenizer and
// model bundle from tests/data/oracle/tiny-llava). The data directory is VTW_TEST_DATA_DIR from
// the environment when set, else the source tree's tests/data.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace vtw::fuzz {

// safetensors file image -> SafetensorsFile::FromBytes (the parser Open uses); accepted files:
// every view lies inside the image, sizes match, Find works, float views convert.
void SafetensorsTarget(const uint8_t* data, size_t size);

// model.safetensors.index.json text -> ParseShardIndex; accepted: plain shard names only.
void ShardIndexTarget(const uint8_t* data, size_t size);

// config.json text -> ParseLlavaConfigText; accepted: derived sizes are positive and consistent,
// LlavaConfigToJson parses back to the same geometry.
void LlavaConfigTarget(const uint8_t* data, size_t size);

// First byte: which ImageProcessorConfig (the oracle's, no crop, fixed size, no resize); the
// rest: encoded image -> DecodeImage (4 MP cap) -> PreprocessImage; accepted: RGB u8 within the
// cap, output of PreprocessedImageSize's shape with finite values.
void ImageTarget(const uint8_t* data, size_t size);

// First byte: flags (add_bos, skip_special_tokens, in-vocab ids); the rest: text for the oracle
// tokenizer's Encode (ids in range), and, read as int16 ids (in- and out-of-range), Decode and
// IncrementalDetokenizer (chunks valid UTF-8, their concatenation equal to Decode(ids, true)).
void TokenizerTarget(const uint8_t* data, size_t size);

// tokenizer.model bytes (with the oracle's tokenizer_config.json and added_tokens.json) ->
// Tokenizer::LoadFromMemory; an accepted tokenizer must encode and decode a fixed text.
void TokenizerModelTarget(const uint8_t* data, size_t size);

// Serialized vtw.v1.GenerateRequest -> ParseFromArray -> BuildRequest (the server's validation)
// with default ServiceLimits (image pixels capped at 4 MP) against the oracle model bundle;
// accepted requests: prompt + max_new_tokens fit the context, K in [0, layers], the sampler built
// from the validated parameters returns in-vocab ids; rejected ones map to a non-OK gRPC status.
void RequestTarget(const uint8_t* data, size_t size);

// A /v1/chat/completions body -> ParseChatCompletionRequest -> BuildRequest against the oracle
// bundle: errors map to HTTP 400/404 with a message and serialize as JSON; accepted bodies have
// the chat template applied with one <image> per image.
void ChatRequestTarget(const uint8_t* data, size_t size);

struct Target {
  const char* name;  // fuzz/<name>_fuzz.cc, fuzz/corpus/<name>/
  void (*body)(const uint8_t*, size_t);
  void (*init)();  // loads the fixtures the body needs (idempotent)
  size_t max_len;  // -max_len for libFuzzer
};

// All targets, in a fixed order.
const std::vector<Target>& Targets();

// The target called `name`; aborts if there is none.
const Target& FindTarget(const std::string& name);

// tests/data (VTW_TEST_DATA_DIR from the environment, else the source tree's).
std::string TestDataDir();

}  // namespace vtw::fuzz

// Defines the libFuzzer entry points of one target (used once per fuzz/<name>_fuzz.cc).
#define VTW_DEFINE_FUZZER(NAME)                                                \
  extern "C" int LLVMFuzzerInitialize(int*, char***) {                         \
    ::vtw::fuzz::FindTarget(#NAME).init();                                     \
    return 0;                                                                  \
  }                                                                            \
  extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {    \
    static const ::vtw::fuzz::Target& target = ::vtw::fuzz::FindTarget(#NAME); \
    target.body(data, size);                                                   \
    return 0;                                                                  \
  }
