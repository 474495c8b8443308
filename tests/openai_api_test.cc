// Tests for server/openai_api: the OpenAI chat-completions request parser (fields, chat
// template, images, errors that name the field), base64, the Status -> HTTP status map, and the
// response JSON. No network, no model.
#include "server/openai_api.h"

#include <gtest/gtest.h>

#include <string>

#include <nlohmann/json.hpp>

#include "model/tokenizer.h"
#include "server/engine.h"

namespace vtw {
namespace {

using json = nlohmann::json;

const std::string kModel = "tiny-llava";
// "PNG" bytes do not matter to the parser: it only decodes base64 (validation decodes images).
const std::string kImageBytes = "\x89PNG\r\n\x1a\nfake";
const std::string kImageUrl = "data:image/png;base64,iVBORw0KGgpmYWtl";

json UserWithImage(const std::string& text) {
  return {{"role", "user"},
          {"content", json::array({{{"type", "image_url"}, {"image_url", {{"url", kImageUrl}}}},
                                   {{"type", "text"}, {"text", text}}})}};
}

StatusOr<ChatCompletionRequest> Parse(const json& body) {
  return ParseChatCompletionRequest(body.dump(), kModel);
}

// The parse fails with INVALID_ARGUMENT and a message containing `needle`.
void ExpectInvalid(const json& body, const std::string& needle) {
  StatusOr<ChatCompletionRequest> r = Parse(body);
  ASSERT_FALSE(r.ok()) << body.dump();
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status().message();
  EXPECT_NE(r.status().message().find(needle), std::string::npos)
      << "message: " << r.status().message() << "\nexpected to contain: " << needle;
}

TEST(Base64, EncodesWithPaddingAndRoundTrips) {
  EXPECT_EQ(EncodeBase64(""), "");
  EXPECT_EQ(EncodeBase64("h"), "aA==");
  EXPECT_EQ(EncodeBase64("he"), "aGU=");
  EXPECT_EQ(EncodeBase64("hello"), "aGVsbG8=");
  EXPECT_EQ(EncodeBase64("hello world"), "aGVsbG8gd29ybGQ=");
  EXPECT_EQ(EncodeBase64(std::string("\xff\xfe\x00", 3)), "//4A");
  std::string all;
  for (int n = 0; n < 256; ++n) all.push_back(static_cast<char>(n));
  for (size_t len = 0; len <= all.size(); len += 37) {
    const std::string bytes = all.substr(0, len);
    EXPECT_EQ(DecodeBase64(EncodeBase64(bytes)), std::optional<std::string>(bytes)) << len;
  }
}

TEST(Base64, DecodesAndRejects) {
  EXPECT_EQ(DecodeBase64("aGVsbG8="), std::optional<std::string>("hello"));
  EXPECT_EQ(DecodeBase64("aGVsbG8"), std::optional<std::string>("hello"));  // padding optional
  EXPECT_EQ(DecodeBase64("aGVs\nbG8g\r\nd29y bGQ="), std::optional<std::string>("hello world"));
  EXPECT_EQ(DecodeBase64(""), std::optional<std::string>(""));
  EXPECT_EQ(DecodeBase64("iVBORw0KGgpmYWtl"), std::optional<std::string>(kImageBytes));
  EXPECT_FALSE(DecodeBase64("aGVsbG8*"));     // not in the alphabet
  EXPECT_FALSE(DecodeBase64("aGVsbG8=x"));    // data after padding
  EXPECT_FALSE(DecodeBase64("a"));            // 6 bits cannot make a byte
  EXPECT_FALSE(DecodeBase64("aGVsbG8==="));   // too much padding
  EXPECT_FALSE(DecodeBase64("aGVsbG9="));     // non-zero leftover bits
  EXPECT_FALSE(DecodeBase64("aGVsbG8-"));     // base64url is not base64
}

TEST(ChatRequest, SingleTurnWithImageIsTheLlavaPrompt) {
  auto r = Parse({{"model", kModel}, {"messages", json::array({UserWithImage("What color?")})}});
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->spec.prompt, ApplyLlavaChatTemplate("What color?", true));
  EXPECT_TRUE(r->spec.raw_prompt);
  EXPECT_EQ(r->spec.image, kImageBytes);
  EXPECT_FALSE(r->stream);
  // Defaults: greedy (as over gRPC), the server's max tokens, the model's default K.
  EXPECT_EQ(r->spec.temperature, 0.0f);
  EXPECT_FALSE(r->spec.max_new_tokens.has_value());
  EXPECT_EQ(r->spec.vtw_mode, VtwMode::kDefault);
}

TEST(ChatRequest, StringContentAndNoModelField) {
  auto r = Parse({{"messages", json::array({{{"role", "user"}, {"content", "hi"}}})}});
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->spec.prompt, ApplyLlavaChatTemplate("hi", false));
  EXPECT_TRUE(r->spec.image.empty());
}

TEST(ChatRequest, MultiTurnFollowsTheChatTemplate) {
  json messages = json::array({{{"role", "system"}, {"content", "Be brief."}},
                               UserWithImage("What shape?"),
                               {{"role", "assistant"}, {"content", "circle"}},
                               {{"role", "user"}, {"content", "And the color?"}}});
  auto r = Parse({{"messages", messages}});
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->spec.prompt,
            "Be brief. USER: <image>\nWhat shape? ASSISTANT: circle</s>USER: And the color? "
            "ASSISTANT:");
  std::vector<ChatMessage> expected = {{ChatMessage::Role::kSystem, "Be brief.", false},
                                       {ChatMessage::Role::kUser, "What shape?", true},
                                       {ChatMessage::Role::kAssistant, "circle", false},
                                       {ChatMessage::Role::kUser, "And the color?", false}};
  EXPECT_EQ(r->spec.prompt, ApplyLlavaChatTemplate(expected));
}

TEST(ChatRequest, SamplingFields) {
  auto r = Parse({{"messages", json::array({UserWithImage("q")})},
                  {"max_tokens", 7},
                  {"temperature", 0.5},
                  {"top_p", 0.9},
                  {"seed", 42},
                  {"stop", "\n"},
                  {"stream", true},
                  {"vtw_timeout", 2.5}});
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->spec.max_new_tokens, std::optional<int64_t>(7));
  EXPECT_STREQ(r->spec.max_new_tokens_field, "max_tokens");
  EXPECT_FLOAT_EQ(r->spec.temperature, 0.5f);
  EXPECT_FLOAT_EQ(*r->spec.top_p, 0.9f);
  EXPECT_EQ(r->spec.seed, 42u);
  EXPECT_EQ(r->spec.stop, std::vector<std::string>{"\n"});
  EXPECT_TRUE(r->stream);
  EXPECT_DOUBLE_EQ(*r->timeout_seconds, 2.5);
  // max_completion_tokens wins over the deprecated max_tokens; stop as a list.
  auto r2 = Parse({{"messages", json::array({UserWithImage("q")})},
                   {"max_tokens", 7},
                   {"max_completion_tokens", 3},
                   {"stop", {"a", "b"}}});
  ASSERT_TRUE(r2.ok()) << r2.status().message();
  EXPECT_EQ(r2->spec.max_new_tokens, std::optional<int64_t>(3));
  EXPECT_STREQ(r2->spec.max_new_tokens_field, "max_completion_tokens");
  EXPECT_EQ(r2->spec.stop, (std::vector<std::string>{"a", "b"}));
}

TEST(ChatRequest, VtwLayerForms) {
  json base = {{"messages", json::array({UserWithImage("q")})}};
  json b = base;
  b["vtw_layer"] = 2;
  auto r = Parse(b);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->spec.vtw_mode, VtwMode::kLayer);
  EXPECT_EQ(r->spec.vtw_layer, 2);
  b["vtw_layer"] = "off";
  r = Parse(b);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->spec.vtw_mode, VtwMode::kOff);
  b["vtw_layer"] = "auto";
  r = Parse(b);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->spec.vtw_mode, VtwMode::kDefault);
  b["vtw_layer"] = "sometimes";
  ExpectInvalid(b, "\"vtw_layer\" must be a layer number, \"off\" or \"auto\"");
  b["vtw_layer"] = 1.5;
  ExpectInvalid(b, "\"vtw_layer\" must be an integer");
  b = base;
  b["vtw_profile"] = "fast";
  r = Parse(b);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->spec.vtw_mode, VtwMode::kProfile);
  EXPECT_EQ(r->spec.vtw_profile, "fast");
}

TEST(ChatRequest, ErrorsNameTheField) {
  ExpectInvalid(json::parse("[1]"), "must be a JSON object");
  {
    auto r = ParseChatCompletionRequest("{\"messages\": [", kModel);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("not valid JSON"), std::string::npos);
  }
  ExpectInvalid(json::object(), "\"messages\" must be a non-empty list");
  ExpectInvalid({{"messages", "hi"}}, "\"messages\" must be a non-empty list");
  json ok_messages = json::array({UserWithImage("q")});
  ExpectInvalid({{"messages", ok_messages}, {"max_tokens", "ten"}},
                "\"max_tokens\" must be an integer, got string");
  ExpectInvalid({{"messages", ok_messages}, {"temperature", "hot"}},
                "\"temperature\" must be a number");
  ExpectInvalid({{"messages", ok_messages}, {"stream", "yes"}}, "\"stream\" must be true or false");
  ExpectInvalid({{"messages", ok_messages}, {"stop", 5}}, "\"stop\" must be a string or a list");
  ExpectInvalid({{"messages", ok_messages}, {"n", 2}}, "\"n\" must be 1");
  ExpectInvalid({{"messages", ok_messages}, {"tools", json::array()}}, "does not call tools");
  ExpectInvalid({{"messages", ok_messages}, {"vtw_timeout", -1}}, "\"vtw_timeout\" must be");
  ExpectInvalid({{"messages", json::array({{{"role", "robot"}, {"content", "x"}}})}},
                "role 'robot' is not supported");
  ExpectInvalid({{"messages", json::array({{{"role", "user"}}})}}, "\"content\" is required");
  ExpectInvalid({{"messages", json::array({{{"role", "assistant"}, {"content", "x"}}})}},
                "roles must alternate");
  ExpectInvalid({{"messages", json::array({{{"role", "user"}, {"content", "a"}},
                                           {{"role", "assistant"}, {"content", "b"}}})}},
                "the last message must be the user's");
  ExpectInvalid({{"messages", json::array({{{"role", "user"}, {"content", "<image> what?"}}})}},
                "send the image as an image_url part");
  ExpectInvalid({{"messages", json::array({UserWithImage("")})}}, "no user text");
  ExpectInvalid({{"messages", json::array({{{"role", "user"},
                                            {"content", json::array({{{"type", "audio"}}})}}})}},
                "content part type 'audio' is not supported");
}

TEST(ChatRequest, ImageUrlErrors) {
  auto with_url = [](const std::string& url) {
    return json{{"messages",
                 json::array({{{"role", "user"},
                               {"content", json::array({{{"type", "image_url"},
                                                         {"image_url", {{"url", url}}}},
                                                        {{"type", "text"}, {"text", "q"}}})}}})}};
  };
  ExpectInvalid(with_url("https://example.com/cat.png"), "the server never fetches URLs");
  ExpectInvalid(with_url("HTTP://example.com/cat.png"), "the server never fetches URLs");
  ExpectInvalid(with_url("file:///etc/passwd"), "only data: URLs are accepted");
  ExpectInvalid(with_url("data:text/plain;base64,aGk="), "expected \"data:image/<type>;base64");
  ExpectInvalid(with_url("data:image/png,rawbytes"), "expected \"data:image/<type>;base64");
  ExpectInvalid(with_url("data:image/png;base64,!!!!"), "not valid base64");
  ExpectInvalid(with_url("data:image/png;base64,"), "the image is empty");
  json two = {{"messages", json::array({UserWithImage("a"),
                                        {{"role", "assistant"}, {"content", "b"}},
                                        UserWithImage("c")})}};
  ExpectInvalid(two, "more than one image");
  json two_in_one = UserWithImage("a");
  two_in_one["content"].push_back({{"type", "image_url"}, {"image_url", {{"url", kImageUrl}}}});
  ExpectInvalid({{"messages", json::array({two_in_one})}}, "more than one image");
}

TEST(ChatRequest, UnknownModelIsNotFound) {
  auto r = Parse({{"model", "gpt-4o"}, {"messages", json::array({UserWithImage("q")})}});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_NE(r.status().message().find("serves 'tiny-llava'"), std::string::npos);
}

TEST(HttpStatus, MapsEveryOutcome) {
  EXPECT_EQ(HttpStatusFor(Status::Ok()), 200);
  EXPECT_EQ(HttpStatusFor(InvalidArgument("x")), 400);
  EXPECT_EQ(HttpStatusFor(Status(StatusCode::kUnauthenticated, "x")), 401);
  EXPECT_EQ(HttpStatusFor(NotFound("x")), 404);
  EXPECT_EQ(HttpStatusFor(ResourceExhausted("the request needs 5 bytes of KV cache")), 413);
  EXPECT_EQ(HttpStatusFor(ResourceExhausted("the server is at capacity (3 requests waiting)")),
            429);
  EXPECT_EQ(HttpStatusFor(Status(StatusCode::kUnavailable, "x")), 503);
  EXPECT_EQ(HttpStatusFor(Status(StatusCode::kDeadlineExceeded, "x")), 504);
  EXPECT_EQ(HttpStatusFor(Internal("x")), 500);
  EXPECT_TRUE(Engine::IsQueueFull(ResourceExhausted("the server is at capacity (1)")));
  EXPECT_FALSE(Engine::IsQueueFull(InvalidArgument("the server is at capacity")));
}

TEST(ResponseJson, ErrorCompletionChunkModels) {
  json e = ErrorJson(ResourceExhausted("the server is at capacity (9 requests waiting)"));
  EXPECT_EQ(e["error"]["type"], "rate_limit_error");
  EXPECT_EQ(e["error"]["code"], "resource_exhausted");
  EXPECT_EQ(e["error"]["message"], "the server is at capacity (9 requests waiting)");
  EXPECT_EQ(ErrorJson(InvalidArgument("x"))["error"]["type"], "invalid_request_error");

  RequestSummary s;
  s.text = "red";
  s.token_ids = {5, 6, 2};
  s.finish_reason = FinishReason::kEos;
  s.prompt_tokens = 40;
  s.image_tokens = 16;
  s.withdraw_layer = 2;
  s.vtw_applied = true;
  s.flops = 600;
  s.flops_without_vtw = 1000;
  s.kv_cache_bytes = 100;
  s.kv_cache_bytes_without_vtw = 180;
  json c = CompletionJson("chatcmpl-1", 7, kModel, s);
  EXPECT_EQ(c["object"], "chat.completion");
  EXPECT_EQ(c["choices"][0]["message"]["content"], "red");
  EXPECT_EQ(c["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(c["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(c["usage"], (json{{"prompt_tokens", 40}, {"completion_tokens", 3}, {"total_tokens", 43}}));
  EXPECT_EQ(c["vtw"]["layer"], 2);
  EXPECT_EQ(c["vtw"]["flops_saved"], 400);
  EXPECT_EQ(c["vtw"]["kv_cache_bytes_saved"], 80);
  EXPECT_EQ(c["vtw"]["image_tokens"], 16);

  json first = ChunkJson("chatcmpl-1", 7, kModel, "", true, nullptr);
  EXPECT_EQ(first["choices"][0]["delta"], (json{{"role", "assistant"}, {"content", ""}}));
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  EXPECT_FALSE(first.contains("usage"));
  s.finish_reason = FinishReason::kLength;
  json last = ChunkJson("chatcmpl-1", 7, kModel, "", false, &s);
  EXPECT_EQ(last["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(last["usage"]["completion_tokens"], 3);
  EXPECT_EQ(ModelsJson(kModel, 7)["data"][0]["id"], kModel);
}

}  // namespace
}  // namespace vtw
