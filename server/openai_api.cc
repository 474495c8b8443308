#include "server/openai_api.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "model/tokenizer.h"
#include "server/engine.h"

namespace vtw {
namespace {

using json = nlohmann::json;

Status Bad(const std::string& message) { return InvalidArgument(message); }

std::string TypeName(const json& v) { return v.is_null() ? "null" : v.type_name(); }

// The integer value of `key` if present: a JSON integer (or an integral float such as 8.0).
StatusOr<std::optional<int64_t>> OptionalInt(const json& body, const char* key) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::optional<int64_t>();
  if (it->is_number_integer()) {
    if (it->is_number_unsigned() && it->get<uint64_t>() > uint64_t{INT64_MAX}) {
      return Bad(std::string("\"") + key + "\" is too large");
    }
    return std::optional<int64_t>(it->get<int64_t>());
  }
  if (it->is_number_float()) {
    const double d = it->get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15) {
      return std::optional<int64_t>(static_cast<int64_t>(d));
    }
  }
  return Bad(std::string("\"") + key + "\" must be an integer, got " + TypeName(*it) + " " +
             it->dump());
}

StatusOr<std::optional<double>> OptionalNumber(const json& body, const char* key) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::optional<double>();
  if (!it->is_number()) {
    return Bad(std::string("\"") + key + "\" must be a number, got " + TypeName(*it));
  }
  return std::optional<double>(it->get<double>());
}

StatusOr<bool> OptionalBool(const json& body, const char* key, bool fallback) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) {
    return Bad(std::string("\"") + key + "\" must be true or false, got " + TypeName(*it));
  }
  return it->get<bool>();
}

// An image_url value: only inline data: URLs.
StatusOr<std::string> ImageFromUrl(const json& part, size_t message) {
  const std::string where = "messages[" + std::to_string(message) + "]: image_url";
  const json* url = nullptr;
  auto it = part.find("image_url");
  if (it == part.end()) return Bad(where + " part without an \"image_url\"");
  if (it->is_string()) {
    url = &*it;
  } else if (it->is_object() && it->contains("url") && (*it)["url"].is_string()) {
    url = &(*it)["url"];
  } else {
    return Bad(where + " must be {\"url\": \"data:image/png;base64,...\"}");
  }
  const std::string& u = url->get_ref<const std::string&>();
  auto starts = [&](const char* prefix) {
    return u.size() >= std::strlen(prefix) &&
           std::equal(prefix, prefix + std::strlen(prefix), u.begin(),
                      [](char a, char b) { return a == std::tolower(static_cast<unsigned char>(b)); });
  };
  if (starts("http://") || starts("https://")) {
    return Bad(where + ": the server never fetches URLs; send the image inline as "
               "\"data:image/png;base64,...\" (or image/jpeg, image/webp)");
  }
  if (!starts("data:")) {
    return Bad(where + ": only data: URLs are accepted (\"data:image/png;base64,...\")");
  }
  const size_t comma = u.find(',');
  const std::string header = u.substr(5, comma == std::string::npos ? 0 : comma - 5);
  if (comma == std::string::npos || header.size() < 7 || header.rfind("image/", 0) != 0 ||
      header.compare(header.size() - 7, 7, ";base64") != 0) {
    return Bad(where + ": expected \"data:image/<type>;base64,<data>\"");
  }
  std::optional<std::string> bytes = DecodeBase64(std::string_view(u).substr(comma + 1));
  if (!bytes) return Bad(where + ": the data is not valid base64");
  if (bytes->empty()) return Bad(where + ": the image is empty");
  return std::move(*bytes);
}

// A message's text and, when it has one, its image.
struct ParsedMessage {
  ChatMessage message;
  std::string image;
};

StatusOr<ParsedMessage> ParseMessage(const json& m, size_t index) {
  const std::string where = "messages[" + std::to_string(index) + "]";
  if (!m.is_object()) return Bad(where + " must be an object with \"role\" and \"content\"");
  auto role = m.find("role");
  if (role == m.end() || !role->is_string()) return Bad(where + ": \"role\" must be a string");
  ParsedMessage out;
  const std::string& r = role->get_ref<const std::string&>();
  if (r == "system" || r == "developer") {
    out.message.role = ChatMessage::Role::kSystem;
  } else if (r == "user") {
    out.message.role = ChatMessage::Role::kUser;
  } else if (r == "assistant") {
    out.message.role = ChatMessage::Role::kAssistant;
  } else {
    return Bad(where + ": role '" + r + "' is not supported (system, user or assistant)");
  }
  auto content = m.find("content");
  if (content == m.end() || content->is_null()) {
    return Bad(where + ": \"content\" is required");
  }
  if (content->is_string()) {
    out.message.text = content->get<std::string>();
    return out;
  }
  if (!content->is_array()) {
    return Bad(where + ": \"content\" must be a string or a list of parts");
  }
  std::vector<std::string> texts;
  for (const json& part : *content) {
    if (!part.is_object() || !part.contains("type") || !part["type"].is_string()) {
      return Bad(where + ": every content part needs a string \"type\"");
    }
    const std::string& type = part["type"].get_ref<const std::string&>();
    if (type == "text") {
      if (!part.contains("text") || !part["text"].is_string()) {
        return Bad(where + ": a text part needs a string \"text\"");
      }
      texts.push_back(part["text"].get<std::string>());
    } else if (type == "image_url") {
      if (out.message.role != ChatMessage::Role::kUser) {
        return Bad(where + ": only user messages can carry an image");
      }
      if (out.message.image) {
        return Bad("more than one image in the request: the served model takes one image");
      }
      VTW_ASSIGN_OR_RETURN(out.image, ImageFromUrl(part, index));
      out.message.image = true;
    } else {
      return Bad(where + ": content part type '" + type + "' is not supported (text, image_url)");
    }
  }
  for (size_t i = 0; i < texts.size(); ++i) out.message.text += (i ? " " : "") + texts[i];
  return out;
}

// The conversation as the chat template's messages, and its one image (if any).
Status ParseMessages(const json& body, RequestSpec* spec) {
  auto it = body.find("messages");
  if (it == body.end() || !it->is_array() || it->empty()) {
    return Bad("\"messages\" must be a non-empty list");
  }
  std::vector<ChatMessage> messages;
  bool seen_turn = false;
  ChatMessage::Role expected = ChatMessage::Role::kUser;
  for (size_t i = 0; i < it->size(); ++i) {
    VTW_ASSIGN_OR_RETURN(ParsedMessage m, ParseMessage((*it)[i], i));
    if (m.message.role == ChatMessage::Role::kSystem) {
      if (seen_turn) return Bad("messages: system messages must come first");
    } else {
      if (m.message.role != expected) {
        return Bad("messages: after the system messages, roles must alternate user, assistant, "
                   "user, ... (messages[" + std::to_string(i) + "] breaks it)");
      }
      seen_turn = true;
      expected = expected == ChatMessage::Role::kUser ? ChatMessage::Role::kAssistant
                                                      : ChatMessage::Role::kUser;
    }
    if (m.message.image) {
      if (!spec->image.empty()) {
        return Bad("more than one image in the request: the served model takes one image");
      }
      spec->image = std::move(m.image);
    }
    if (m.message.text.find(std::string(kImageToken)) != std::string::npos) {
      return Bad("messages[" + std::to_string(i) + "]: the text contains <image>; send the image "
                 "as an image_url part and the server places it");
    }
    messages.push_back(std::move(m.message));
  }
  if (expected != ChatMessage::Role::kAssistant) {
    return Bad("messages: the last message must be the user's (the reply comes next)");
  }
  const bool has_text = std::any_of(messages.begin(), messages.end(), [](const ChatMessage& m) {
    return m.role == ChatMessage::Role::kUser && !m.text.empty();
  });
  if (!has_text) return Bad("messages: no user text: send a question");
  spec->prompt = ApplyLlavaChatTemplate(messages);
  spec->raw_prompt = true;
  return Status::Ok();
}

Status RejectUnsupported(const json& body) {
  VTW_ASSIGN_OR_RETURN(std::optional<int64_t> n, OptionalInt(body, "n"));
  if (n && *n != 1) return Bad("\"n\" must be 1: one choice per request");
  for (const char* key : {"tools", "functions", "tool_choice", "function_call"}) {
    if (body.contains(key) && !body[key].is_null()) {
      return Bad(std::string("\"") + key + "\" is not supported: the model does not call tools");
    }
  }
  VTW_ASSIGN_OR_RETURN(bool logprobs, OptionalBool(body, "logprobs", false));
  if (logprobs) return Bad("\"logprobs\" is not supported");
  for (const char* key : {"presence_penalty", "frequency_penalty"}) {
    VTW_ASSIGN_OR_RETURN(std::optional<double> p, OptionalNumber(body, key));
    if (p && *p != 0) return Bad(std::string("\"") + key + "\" is not supported (only 0)");
  }
  if (auto it = body.find("response_format"); it != body.end() && !it->is_null()) {
    if (!it->is_object() || it->value("type", std::string()) != "text") {
      return Bad("\"response_format\" other than {\"type\": \"text\"} is not supported");
    }
  }
  if (auto it = body.find("stream_options"); it != body.end() && !it->is_null() &&
                                             !it->is_object()) {
    return Bad("\"stream_options\" must be an object");
  }
  return Status::Ok();
}

Status ParseSampling(const json& body, RequestSpec* spec) {
  VTW_ASSIGN_OR_RETURN(std::optional<int64_t> max_completion,
                       OptionalInt(body, "max_completion_tokens"));
  VTW_ASSIGN_OR_RETURN(std::optional<int64_t> max_tokens, OptionalInt(body, "max_tokens"));
  spec->max_new_tokens = max_completion ? max_completion : max_tokens;
  spec->max_new_tokens_field = max_completion ? "max_completion_tokens" : "max_tokens";
  VTW_ASSIGN_OR_RETURN(std::optional<double> temperature, OptionalNumber(body, "temperature"));
  // OpenAI's default temperature is 1; an absent one here is greedy (0), as in the gRPC API,
  // so that answers are reproducible unless a client asks for sampling.
  if (temperature) spec->temperature = static_cast<float>(*temperature);
  VTW_ASSIGN_OR_RETURN(std::optional<double> top_p, OptionalNumber(body, "top_p"));
  if (top_p) spec->top_p = static_cast<float>(*top_p);
  VTW_ASSIGN_OR_RETURN(std::optional<int64_t> top_k, OptionalInt(body, "top_k"));
  if (top_k) {
    if (*top_k < -1) return Bad("\"top_k\" must be >= 0 (or -1: off)");
    spec->top_k = *top_k < 0 ? 0 : *top_k;
  }
  VTW_ASSIGN_OR_RETURN(std::optional<int64_t> seed, OptionalInt(body, "seed"));
  if (seed) spec->seed = static_cast<uint64_t>(*seed);
  VTW_ASSIGN_OR_RETURN(spec->ignore_eos, OptionalBool(body, "ignore_eos", false));
  if (auto it = body.find("stop"); it != body.end() && !it->is_null()) {
    if (it->is_string()) {
      spec->stop.push_back(it->get<std::string>());
    } else if (it->is_array()) {
      for (const json& s : *it) {
        if (!s.is_string()) return Bad("\"stop\" must be a string or a list of strings");
        spec->stop.push_back(s.get<std::string>());
      }
    } else {
      return Bad("\"stop\" must be a string or a list of strings");
    }
  }
  return Status::Ok();
}

Status ParseVtw(const json& body, RequestSpec* spec) {
  if (auto it = body.find("vtw_layer"); it != body.end() && !it->is_null()) {
    if (it->is_string()) {
      const std::string& v = it->get_ref<const std::string&>();
      if (v == "off") {
        spec->vtw_mode = VtwMode::kOff;
      } else if (v == "auto" || v == "default") {
        spec->vtw_mode = VtwMode::kDefault;
      } else {
        return Bad("\"vtw_layer\" must be a layer number, \"off\" or \"auto\", got \"" + v + "\"");
      }
    } else {
      VTW_ASSIGN_OR_RETURN(std::optional<int64_t> k, OptionalInt(body, "vtw_layer"));
      spec->vtw_mode = VtwMode::kLayer;
      spec->vtw_layer = *k;
    }
  }
  if (auto it = body.find("vtw_profile"); it != body.end() && !it->is_null()) {
    if (!it->is_string()) return Bad("\"vtw_profile\" must be a string");
    if (body.contains("vtw_layer") && !body["vtw_layer"].is_null()) {
      return Bad("give \"vtw_layer\" or \"vtw_profile\", not both");
    }
    spec->vtw_mode = VtwMode::kProfile;
    spec->vtw_profile = it->get<std::string>();
  }
  return Status::Ok();
}

}  // namespace

constexpr char kBase64Alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

std::string EncodeBase64(std::string_view bytes) {
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  for (size_t i = 0; i < bytes.size(); i += 3) {
    const size_t n = std::min<size_t>(3, bytes.size() - i);
    uint32_t v = static_cast<uint32_t>(static_cast<unsigned char>(bytes[i])) << 16;
    if (n > 1) v |= static_cast<uint32_t>(static_cast<unsigned char>(bytes[i + 1])) << 8;
    if (n > 2) v |= static_cast<uint32_t>(static_cast<unsigned char>(bytes[i + 2]));
    out += kBase64Alphabet[(v >> 18) & 63];
    out += kBase64Alphabet[(v >> 12) & 63];
    out += n > 1 ? kBase64Alphabet[(v >> 6) & 63] : '=';
    out += n > 2 ? kBase64Alphabet[v & 63] : '=';
  }
  return out;
}

std::optional<std::string> DecodeBase64(std::string_view text) {
  static const std::array<int8_t, 256> kValue = [] {
    std::array<int8_t, 256> v{};
    v.fill(-1);
    for (int i = 0; i < 64; ++i) v[static_cast<unsigned char>(kBase64Alphabet[i])] = static_cast<int8_t>(i);
    return v;
  }();
  std::string out;
  out.reserve(text.size() / 4 * 3 + 3);
  uint32_t acc = 0;
  int bits = 0, padding = 0;
  size_t symbols = 0;
  for (char ch : text) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
    if (c == '=') {
      ++padding;
      continue;
    }
    if (padding > 0 || kValue[c] < 0) return std::nullopt;  // data after '=' or a bad symbol
    acc = (acc << 6) | static_cast<uint32_t>(kValue[c]);
    bits += 6;
    ++symbols;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  if (symbols % 4 == 1 || padding > 2) return std::nullopt;
  if (padding > 0 && (symbols + padding) % 4 != 0) return std::nullopt;
  if ((acc & ((1u << bits) - 1)) != 0) return std::nullopt;  // non-zero leftover bits
  return out;
}

StatusOr<ChatCompletionRequest> ParseChatCompletionRequest(std::string_view body,
                                                           const std::string& served_model) {
  json j = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad("the request body is not valid JSON");
  if (!j.is_object()) return Bad("the request body must be a JSON object");
  if (auto it = j.find("model"); it != j.end() && !it->is_null()) {
    if (!it->is_string()) return Bad("\"model\" must be a string");
    if (it->get<std::string>() != served_model) {
      return NotFound("model '" + it->get<std::string>() + "' is not served here; this server "
                      "serves '" + served_model + "' (GET /v1/models)");
    }
  }
  ChatCompletionRequest out;
  VTW_RETURN_IF_ERROR(RejectUnsupported(j));
  VTW_RETURN_IF_ERROR(ParseMessages(j, &out.spec));
  VTW_RETURN_IF_ERROR(ParseSampling(j, &out.spec));
  VTW_RETURN_IF_ERROR(ParseVtw(j, &out.spec));
  VTW_ASSIGN_OR_RETURN(out.stream, OptionalBool(j, "stream", false));
  VTW_ASSIGN_OR_RETURN(out.timeout_seconds, OptionalNumber(j, "vtw_timeout"));
  if (out.timeout_seconds && !(*out.timeout_seconds > 0 && *out.timeout_seconds < 1e7)) {
    return Bad("\"vtw_timeout\" must be a positive number of seconds");
  }
  return out;
}

int HttpStatusFor(const Status& status) {
  switch (status.code()) {
    case StatusCode::kOk: return 200;
    case StatusCode::kInvalidArgument:
    case StatusCode::kFailedPrecondition:
    case StatusCode::kOutOfRange: return 400;
    case StatusCode::kUnauthenticated: return 401;
    case StatusCode::kPermissionDenied: return 403;
    case StatusCode::kNotFound: return 404;
    case StatusCode::kResourceExhausted: return Engine::IsQueueFull(status) ? 429 : 413;
    case StatusCode::kCancelled: return 499;
    case StatusCode::kUnimplemented: return 501;
    case StatusCode::kUnavailable: return 503;
    case StatusCode::kDeadlineExceeded: return 504;
    default: return 500;
  }
}

json ErrorJson(const Status& status) {
  const int http = HttpStatusFor(status);
  const char* type = http == 401 ? "authentication_error"
                     : http == 429 ? "rate_limit_error"
                     : http == 503 ? "service_unavailable"
                     : http == 504 ? "timeout"
                     : http >= 500 ? "server_error"
                                   : "invalid_request_error";
  std::string code = StatusCodeName(status.code());
  std::transform(code.begin(), code.end(), code.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return {{"error", {{"message", status.message()}, {"type", type}, {"code", code}, {"param", nullptr}}}};
}

const char* OpenAiFinishReason(FinishReason reason) {
  return reason == FinishReason::kLength ? "length" : "stop";
}

json UsageJson(const RequestSummary& s) {
  const int64_t completion = static_cast<int64_t>(s.token_ids.size());
  return {{"prompt_tokens", s.prompt_tokens},
          {"completion_tokens", completion},
          {"total_tokens", s.prompt_tokens + completion}};
}

json VtwJson(const RequestSummary& s) {
  return {{"layer", s.withdraw_layer},
          {"applied", s.vtw_applied},
          {"image_tokens", s.image_tokens},
          {"flops", s.flops},
          {"flops_without_vtw", s.flops_without_vtw},
          {"flops_saved", s.flops_without_vtw - s.flops},
          {"kv_cache_bytes", s.kv_cache_bytes},
          {"kv_cache_bytes_saved", s.kv_cache_bytes_without_vtw - s.kv_cache_bytes}};
}

json CompletionJson(const std::string& id, int64_t created, const std::string& model,
                    const RequestSummary& s) {
  return {{"id", id},
          {"object", "chat.completion"},
          {"created", created},
          {"model", model},
          {"choices",
           json::array({{{"index", 0},
                         {"message", {{"role", "assistant"}, {"content", s.text}}},
                         {"finish_reason", OpenAiFinishReason(s.finish_reason)}}})},
          {"usage", UsageJson(s)},
          {"vtw", VtwJson(s)}};
}

json ChunkJson(const std::string& id, int64_t created, const std::string& model,
               const std::string& content, bool role, const RequestSummary* final) {
  json delta = json::object();
  if (role) delta["role"] = "assistant";
  if (!content.empty() || role) delta["content"] = content;
  json chunk = {{"id", id},
                {"object", "chat.completion.chunk"},
                {"created", created},
                {"model", model},
                {"choices",
                 json::array({{{"index", 0},
                               {"delta", delta},
                               {"finish_reason", final ? json(OpenAiFinishReason(final->finish_reason))
                                                       : json(nullptr)}}})}};
  if (final) {
    chunk["usage"] = UsageJson(*final);
    chunk["vtw"] = VtwJson(*final);
  }
  return chunk;
}

json ModelsJson(const std::string& served_model, int64_t created) {
  return {{"object", "list"},
          {"data", json::array({{{"id", served_model},
                                 {"object", "model"},
                                 {"created", created},
                                 {"owned_by", "vtw-serve"}}})}};
}

}  // namespace vtw
