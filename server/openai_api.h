// The OpenAI chat-completions wire format, as vtw-serve serves it, without any HTTP: the parsing
// of a request body into the protocol-neutral RequestSpec (server/validation.h), and the JSON of
// responses, stream chunks, errors and the model list; plus the one vtw::Status -> HTTP status
// map. The transport is server/openai_http.h. Pure functions; thread-safe.
//
// Request fields read: "model" (absent or the served name), "messages" (system / user /
// assistant, content as a string or as parts {"type": "text"} and {"type": "image_url",
// "image_url": {"url": "data:image/...;base64,..."}}; at most one image; roles alternate user and
// assistant after leading system messages and end with the user), "max_completion_tokens" or
// "max_tokens", "temperature", "top_p", "seed", "stop" (string or list), "stream",
// "stream_options", "n" (1 only); extensions: "top_k", "ignore_eos", "vtw_layer" (a layer, "off"
// or "auto"), "vtw_profile", "vtw_timeout" (seconds). Fields this server cannot honour
// ("tools", "logprobs", non-zero penalties, n > 1, a non-text "response_format") are rejected
// with a message instead of being silently ignored; other unknown fields are ignored.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "model/status.h"
#include "server/request.h"
#include "server/validation.h"

namespace vtw {

struct ChatCompletionRequest {
  RequestSpec spec;  // the chat template applied (raw prompt with <image>), image bytes decoded
  bool stream = false;
  std::optional<double> timeout_seconds;  // "vtw_timeout"
};

// Parses a /v1/chat/completions body. Errors: InvalidArgument naming the field at fault
// (malformed JSON, wrong types, remote image URLs: the server never fetches URLs, bad base64,
// more than one image, unsupported fields), NotFound for a "model" other than `served_model`.
StatusOr<ChatCompletionRequest> ParseChatCompletionRequest(std::string_view body,
                                                           const std::string& served_model);

// Strict RFC 4648 base64 (padding optional, ASCII whitespace skipped); nullopt when invalid.
std::optional<std::string> DecodeBase64(std::string_view text);
// RFC 4648 base64 with padding (what clients put in data: URLs; DecodeBase64's inverse).
std::string EncodeBase64(std::string_view bytes);

// The HTTP status of a request that ended with `status`: 200 OK, 400 invalid input, 401
// UNAUTHENTICATED, 404 NOT_FOUND, 413 too large, 429 the queue is full, 503 UNAVAILABLE
// (loading, draining, failed engine), 504 DEADLINE_EXCEEDED, 499 CANCELLED, 500 otherwise.
int HttpStatusFor(const Status& status);

// {"error": {"message", "type", "code", "param": null}}; code is the status code name in lower
// case ("invalid_argument", "resource_exhausted", ...).
nlohmann::json ErrorJson(const Status& status);

// "stop" (EOS or a stop string) or "length".
const char* OpenAiFinishReason(FinishReason reason);

// The "usage" and "vtw" objects of a finished request.
nlohmann::json UsageJson(const RequestSummary& s);
nlohmann::json VtwJson(const RequestSummary& s);

// A whole (non-streamed) chat.completion.
nlohmann::json CompletionJson(const std::string& id, int64_t created, const std::string& model,
                              const RequestSummary& s);

// One chat.completion.chunk: `role` adds {"role": "assistant"} to the delta (the first chunk);
// `final` (the last chunk) adds finish_reason, usage and vtw.
nlohmann::json ChunkJson(const std::string& id, int64_t created, const std::string& model,
                         const std::string& content, bool role, const RequestSummary* final);

// GET /v1/models.
nlohmann::json ModelsJson(const std::string& served_model, int64_t created);

}  // namespace vtw
