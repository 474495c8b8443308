// Request validation, the same for every protocol: a RequestSpec (what a client asked for,
// already decoded from its wire format: gRPC message or OpenAI-style JSON) becomes an engine
// Request, or a Status a person can act on (INVALID_ARGUMENT for bad input). Runs on the
// network threads; pure apart from image decoding and tokenization. Thread-safe.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "model/image_processor.h"
#include "server/model_bundle.h"
#include "server/request.h"
#include "vtw/vtw_settings.h"

namespace vtw {

struct ServiceLimits {
  int default_max_new_tokens = 64;   // when the request leaves max_new_tokens unset
  int max_new_tokens_limit = 512;    // larger requests are INVALID_ARGUMENT
  size_t max_prompt_bytes = 16384;   // prompt text, before tokenization
  ImageLimits image;                 // encoded bytes and decoded pixels
};

// A generation request in protocol-neutral form.
struct RequestSpec {
  std::string request_id;           // empty: the server makes one up
  std::string image;                // encoded image bytes; empty = text only
  std::string prompt;               // the question (chat template applied here), or with
  bool raw_prompt = false;          //   raw_prompt the whole templated text with <image>
  std::optional<int64_t> max_new_tokens;  // unset: limits.default_max_new_tokens
  float temperature = 0.0f;
  int64_t top_k = 0;
  std::optional<float> top_p;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  bool ignore_eos = false;
  VtwMode vtw_mode = VtwMode::kDefault;
  int64_t vtw_layer = 0;            // with kLayer
  std::string vtw_profile;          // with kProfile
  // How the client's protocol names two fields, for error messages.
  const char* max_new_tokens_field = "max_new_tokens";
  const char* stop_field = "stop";
};

// Validates `spec` against the model and the limits and prepares its prompt (decodes the image,
// applies the chat template, tokenizes). The returned Request has no sink, deadline or protocol
// set.
StatusOr<std::unique_ptr<Request>> BuildRequest(const ModelBundle& bundle, const RequestSpec& spec,
                                                const ServiceLimits& limits);

}  // namespace vtw
