// The gRPC service end to end, in-process on loopback with real gRPC clients: unary vs stream,
// batching equals running alone, per-request VTW, cancellation and deadlines free the KV cache,
// a full queue, health, reflection, metrics, and every kind of bad input.
#include <fstream>
#include <future>
#include <sstream>
#include <thread>

#include <google/protobuf/unknown_field_set.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/impl/codegen/client_context.h>
#include <gtest/gtest.h>
#include <opencv2/imgcodecs.hpp>

#include "server/generator.h"
#include "tests/util/oracle.h"
#include "tests/util/test_server.h"

namespace vtw {
namespace {

using testing::OracleCases;
using testing::OracleDir;

std::string ImageBytes(int c) { return testing::OracleImageBytes(c); }

v1::GenerateRequest MakeRequest(int case_index, int max_new_tokens, v1::VtwMode mode,
                                int layer = 0) {
  v1::GenerateRequest r;
  r.set_request_id("case-" + std::to_string(case_index));
  r.set_image(ImageBytes(case_index));
  r.set_prompt(OracleCases()[case_index]["question"].get<std::string>());
  r.mutable_sampling()->set_max_new_tokens(max_new_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  r.mutable_vtw()->set_mode(mode);
  r.mutable_vtw()->set_layer(layer);
  return r;
}

// Limits that allow the very long generations the cancel/deadline/queue tests need.
ServiceLimits LongLimits() {
  ServiceLimits limits;
  limits.max_new_tokens_limit = 8000;
  return limits;
}

grpc::Status Call(v1::InferenceService::Stub& stub, const v1::GenerateRequest& req,
                  v1::GenerateResponse* resp, int timeout_ms = 60000) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  return stub.Generate(&ctx, req, resp);
}

TEST(Server, UnaryAndStreamingAgreeAndMatchTheOracle) {
  testing::TestServer server(testing::OracleBundle());
  auto stub = server.Stub();
  for (int c = 0; c < 8; ++c) {
    v1::GenerateRequest req = MakeRequest(c, 12, v1::VTW_MODE_OFF);
    v1::GenerateResponse unary;
    ASSERT_TRUE(Call(*stub, req, &unary).ok());
    EXPECT_EQ(unary.request_id(), req.request_id());
    std::vector<int> want =
        OracleCases()[c]["models"]["tiny-llava"]["greedy"]["new_ids"].get<std::vector<int>>();
    const auto& margins = OracleCases()[c]["models"]["tiny-llava"]["greedy"]["step_top1_top2_margin"];
    const size_t steps = testing::StepsToCompare(margins, 2e-4);
    ASSERT_EQ(unary.token_ids_size(), 12);
    for (size_t i = 0; i < steps; ++i) EXPECT_EQ(unary.token_ids(i), static_cast<uint32_t>(want[i]));
    EXPECT_EQ(unary.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(unary.usage().image_tokens(), 16u);
    EXPECT_EQ(unary.usage().completion_tokens(), 12u);
    EXPECT_FALSE(unary.vtw().applied());

    grpc::ClientContext ctx;
    auto reader = stub->GenerateStream(&ctx, req);
    v1::GenerateStreamResponse m;
    std::string text;
    std::vector<uint32_t> ids;
    int messages = 0;
    v1::GenerateStreamResponse last;
    while (reader->Read(&m)) {
      ++messages;
      text += m.text();
      ids.insert(ids.end(), m.token_ids().begin(), m.token_ids().end());
      last = m;
    }
    ASSERT_TRUE(reader->Finish().ok());
    EXPECT_GT(messages, 1);
    EXPECT_EQ(text, unary.text());
    EXPECT_EQ(ids, std::vector<uint32_t>(unary.token_ids().begin(), unary.token_ids().end()));
    EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
    // The stream's image came from the cache: the same work less one vision encoding.
    const ComputeModel cm(server.bundle().model->config(), 4);
    EXPECT_EQ(last.vtw().flops() + cm.VisionFlops(), unary.vtw().flops());
    EXPECT_EQ(last.usage().completion_tokens(), 12u);
  }
}

TEST(Server, SixteenConcurrentRequestsEqualAlone) {
  EngineOptions options;
  options.scheduler.max_batch_tokens = 64;  // forces chunked prefill mixed with decode
  testing::TestServer server(testing::OracleBundle(), options);
  auto stub = server.Stub();
  struct Job {
    v1::GenerateRequest req;
    v1::GenerateResponse alone, batched;
  };
  std::vector<Job> jobs(16);
  for (int i = 0; i < 16; ++i) {
    const int c = i % 8;
    jobs[i].req = i < 8 ? MakeRequest(c, 4 + i, v1::VTW_MODE_LAYER, i % 5)
                        : MakeRequest(c, 20 - i % 8, i % 3 ? v1::VTW_MODE_OFF : v1::VTW_MODE_LAYER,
                                      1);
    ASSERT_TRUE(Call(*stub, jobs[i].req, &jobs[i].alone).ok());
  }
  std::vector<std::thread> threads;
  std::vector<grpc::Status> statuses(16);
  for (int i = 0; i < 16; ++i) {
    threads.emplace_back([&, i] { statuses[i] = Call(*stub, jobs[i].req, &jobs[i].batched); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 16; ++i) {
    ASSERT_TRUE(statuses[i].ok()) << statuses[i].error_message();
    EXPECT_EQ(std::vector<uint32_t>(jobs[i].batched.token_ids().begin(),
                                    jobs[i].batched.token_ids().end()),
              std::vector<uint32_t>(jobs[i].alone.token_ids().begin(),
                                    jobs[i].alone.token_ids().end()))
        << "request " << i;
    // The same decoder work (vision may have come from the image cache in either run).
    auto saved = [](const v1::GenerateResponse& r) {
      return r.vtw().flops_without_vtw() - r.vtw().flops();
    };
    EXPECT_EQ(saved(jobs[i].batched), saved(jobs[i].alone)) << "request " << i;
  }
  // The batch really mixed requests: more than one row per step on average.
  const std::string text = testing::ScrapeMetrics(server.metrics_port());
  const double steps = testing::MetricValue(text, "vtw_engine_steps_total");
  const double rows = testing::MetricValue(text, "vtw_batch_tokens_sum");
  EXPECT_GT(rows / steps, 1.5) << text;
}

TEST(Server, PerRequestVtwStatsAndFlopsMatchTheComputeModel) {
  testing::TestServer server(testing::OracleBundle());
  auto stub = server.Stub();
  v1::GenerateResponse off, k2;
  ASSERT_TRUE(Call(*stub, MakeRequest(3, 5, v1::VTW_MODE_OFF), &off).ok());
  ASSERT_TRUE(Call(*stub, MakeRequest(4, 5, v1::VTW_MODE_LAYER, 2), &k2).ok());
  EXPECT_FALSE(off.vtw().applied());
  EXPECT_EQ(off.vtw().layer(), 4u);
  EXPECT_EQ(off.vtw().flops(), off.vtw().flops_without_vtw());
  EXPECT_TRUE(k2.vtw().applied());
  EXPECT_EQ(k2.vtw().layer(), 2u);
  EXPECT_LT(k2.vtw().flops(), k2.vtw().flops_without_vtw());
  EXPECT_LT(k2.vtw().kv_cache_bytes(), k2.vtw().kv_cache_bytes_without_vtw());
  // The same numbers as the single-request generator.
  GenerateOptions options;
  options.withdraw_layer = 2;
  options.stop.max_new_tokens = 5;
  options.stop.ignore_eos = true;
  const auto& model = *server.bundle().model;
  at::Tensor features =
      model.EncodeImages(testing::OracleTensor(OracleCases()[4]["pixel_values"]["file"]))[0];
  auto r = GenerateOne(model, nullptr, testing::OracleLayout(OracleCases()[4]), features, options);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(k2.vtw().flops(),
            static_cast<uint64_t>(r->vision_flops + r->prefill_flops.flops + r->decode_flops.flops));
  EXPECT_EQ(k2.vtw().kv_cache_bytes(), static_cast<uint64_t>(r->kv_cache_bytes));
}

TEST(Server, CancellationAndDeadlinesFreeTheKvCache) {
  EngineOptions options;
  testing::TestServer server(testing::LongContextBundle(4, 256, 8192), options, LongLimits());
  auto stub = server.Stub();
  {  // cancel a stream after its first message
    grpc::ClientContext ctx;
    auto reader = stub->GenerateStream(&ctx, MakeRequest(0, 4000, v1::VTW_MODE_OFF));
    v1::GenerateStreamResponse m;
    ASSERT_TRUE(reader->Read(&m));
    for (int i = 0; i < 100 && server.engine().kv_bytes_used() == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    EXPECT_GT(server.engine().kv_bytes_used(), 0);  // generating, cache held
    ctx.TryCancel();
    while (reader->Read(&m)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  {  // a deadline that passes during generation
    v1::GenerateResponse resp;
    grpc::Status st = Call(*stub, MakeRequest(1, 4000, v1::VTW_MODE_OFF), &resp, 300);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  // The engine drops both within a step: nothing running, no KV bytes held.
  for (int i = 0; i < 200 && (server.engine().num_running() > 0 || server.engine().kv_bytes_used() > 0); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(server.engine().num_running(), 0);
  EXPECT_EQ(server.engine().kv_bytes_used(), 0);
  const std::string text = testing::ScrapeMetrics(server.metrics_port());
  EXPECT_EQ(testing::MetricValue(text, "vtw_kv_cache_bytes"), 0);
  EXPECT_GE(testing::MetricValue(text, "vtw_requests_total{code=\"CANCELLED\",protocol=\"grpc\"}") +
                testing::MetricValue(text, "vtw_requests_total{code=\"DEADLINE_EXCEEDED\",protocol=\"grpc\"}"),
            2);
}

TEST(Server, FullQueueIsResourceExhausted) {
  EngineOptions options;
  options.max_queue = 1;
  options.scheduler.max_running = 1;
  testing::TestServer server(testing::LongContextBundle(4, 256, 8192), options, LongLimits());
  auto stub = server.Stub();
  grpc::ClientContext running_ctx, waiting_ctx;
  auto running = stub->GenerateStream(&running_ctx, MakeRequest(0, 4000, v1::VTW_MODE_OFF));
  v1::GenerateStreamResponse m;
  ASSERT_TRUE(running->Read(&m));  // running now
  auto waiting = stub->GenerateStream(&waiting_ctx, MakeRequest(1, 10, v1::VTW_MODE_OFF));
  for (int i = 0; i < 100 && server.engine().num_waiting() < 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(server.engine().num_waiting(), 1);
  v1::GenerateResponse resp;
  grpc::Status st = Call(*stub, MakeRequest(2, 10, v1::VTW_MODE_OFF), &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
  EXPECT_NE(st.error_message().find("capacity"), std::string::npos) << st.error_message();
  running_ctx.TryCancel();
  while (running->Read(&m)) {
  }
  EXPECT_EQ(running->Finish().error_code(), grpc::StatusCode::CANCELLED);
  while (waiting->Read(&m)) {
  }
  EXPECT_TRUE(waiting->Finish().ok());  // the waiting one ran after the first was cancelled
}

TEST(Server, HealthDrainAndShutdownStatuses) {
  testing::TestServer server(testing::LongContextBundle(4, 256, 8192), {}, LongLimits());
  EXPECT_EQ(server.HealthStatus(), "SERVING");
  auto stub = server.Stub();
  grpc::ClientContext ctx;
  auto long_stream = stub->GenerateStream(&ctx, MakeRequest(0, 4000, v1::VTW_MODE_OFF));
  v1::GenerateStreamResponse m;
  ASSERT_TRUE(long_stream->Read(&m));
  server.server().GetHealthCheckService()->SetServingStatus(false);
  server.engine().Drain();
  EXPECT_EQ(server.HealthStatus(), "NOT_SERVING");
  v1::GenerateResponse resp;
  EXPECT_EQ(Call(*stub, MakeRequest(1, 4, v1::VTW_MODE_OFF), &resp).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // The drain deadline passes: the running request ends with UNAVAILABLE, not silence.
  EXPECT_FALSE(server.engine().WaitIdle(Clock::now() + std::chrono::milliseconds(100)));
  server.engine().Stop(Status(StatusCode::kUnavailable, "shutting down"));
  while (long_stream->Read(&m)) {
  }
  grpc::Status st = long_stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST(Server, ReflectionListsTheService) {
  testing::TestServer server(testing::OracleBundle());
  // grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo, list_services = "*" (field 7),
  // through the generic API with hand-encoded bytes.
  grpc::GenericStub stub(server.channel());
  grpc::ClientContext ctx;
  grpc::CompletionQueue cq;
  auto call = stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                               &cq);
  void* tag;
  bool ok;
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  const std::string request("\x3a\x01*", 3);
  grpc::Slice slice(request);
  grpc::ByteBuffer out(&slice, 1);
  call->Write(out, reinterpret_cast<void*>(2));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  grpc::ByteBuffer in;
  call->Read(&in, reinterpret_cast<void*>(3));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  std::vector<grpc::Slice> slices;
  in.Dump(&slices);
  std::string bytes;
  for (auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  google::protobuf::UnknownFieldSet response;
  ASSERT_TRUE(response.ParseFromString(bytes));
  std::vector<std::string> services;
  for (int i = 0; i < response.field_count(); ++i) {
    if (response.field(i).number() != 6) continue;  // list_services_response
    google::protobuf::UnknownFieldSet list;
    ASSERT_TRUE(list.ParseFromString(response.field(i).length_delimited()));
    for (int j = 0; j < list.field_count(); ++j) {
      google::protobuf::UnknownFieldSet service;
      ASSERT_TRUE(service.ParseFromString(list.field(j).length_delimited()));
      services.push_back(service.field(0).length_delimited());
    }
  }
  EXPECT_NE(std::find(services.begin(), services.end(), "vtw.v1.InferenceService"), services.end());
  EXPECT_NE(std::find(services.begin(), services.end(), "grpc.health.v1.Health"), services.end());
  call->WritesDone(reinterpret_cast<void*>(4));
  cq.Next(&tag, &ok);
  grpc::Status st;
  call->Finish(&st, reinterpret_cast<void*>(5));
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
}

TEST(Server, MetricsMoveAndFlopsSavedAddUp) {
  testing::TestServer server(testing::OracleBundle());
  auto stub = server.Stub();
  uint64_t saved = 0, done = 0;
  for (int c = 0; c < 4; ++c) {
    v1::GenerateResponse resp;
    ASSERT_TRUE(Call(*stub, MakeRequest(c, 6, v1::VTW_MODE_LAYER, 1 + c % 2), &resp).ok());
    saved += resp.vtw().flops_without_vtw() - resp.vtw().flops();
    done += resp.vtw().flops();
  }
  v1::GenerateResponse again;  // the same image again: a cache hit
  ASSERT_TRUE(Call(*stub, MakeRequest(0, 2, v1::VTW_MODE_OFF), &again).ok());
  done += again.vtw().flops();
  const std::string text = testing::ScrapeMetrics(server.metrics_port());
  auto value = [&](const std::string& s) { return testing::MetricValue(text, s); };
  EXPECT_EQ(value("vtw_requests_total{code=\"OK\",protocol=\"grpc\"}"), 5);
  const double metric_saved = value("vtw_flops_saved_total{phase=\"prefill\"}") +
                              value("vtw_flops_saved_total{phase=\"decode\"}") +
                              value("vtw_flops_saved_total{phase=\"vision\"}");
  EXPECT_DOUBLE_EQ(metric_saved, static_cast<double>(saved));
  const double metric_done = value("vtw_flops_total{phase=\"prefill\"}") +
                             value("vtw_flops_total{phase=\"decode\"}") +
                             value("vtw_flops_total{phase=\"vision\"}");
  EXPECT_DOUBLE_EQ(metric_done, static_cast<double>(done));
  EXPECT_EQ(value("vtw_image_cache_hits_total"), 1);
  EXPECT_EQ(value("vtw_image_cache_misses_total"), 4);
  EXPECT_EQ(value("vtw_generated_tokens_total"), 4 * 6 + 2);
  EXPECT_EQ(value("vtw_visual_tokens_withdrawn_total"), 4 * 16);
  EXPECT_EQ(value("vtw_time_to_first_token_seconds_count"), 5);
  EXPECT_EQ(value("vtw_model_layers"), 4);
  EXPECT_EQ(value("vtw_withdrawal_layer"), 4);  // not calibrated: off
  EXPECT_GT(value("vtw_kv_cache_capacity_bytes"), 0);
  EXPECT_EQ(value("vtw_kv_cache_bytes"), 0);
}

TEST(Server, BadInputGetsClearStatusAndTheServerKeepsServing) {
  ServiceLimits limits;
  limits.image.max_pixels = 100 * 100;
  limits.image.max_bytes = 1 << 20;
  limits.max_new_tokens_limit = 64;
  testing::TestServer server(testing::OracleBundle(), {}, limits);
  auto stub = server.Stub();
  struct Case {
    std::string name;
    std::function<void(v1::GenerateRequest&)> mutate;
    grpc::StatusCode code;
    std::string needle;
  };
  std::string big_png;
  {  // a valid 200x200 PNG: over the 100x100 pixel cap
    cv::Mat m(200, 200, CV_8UC3, cv::Scalar(200, 100, 50));
    std::vector<uint8_t> buf;
    cv::imencode(".png", m, buf);
    big_png.assign(buf.begin(), buf.end());
  }
  std::string long_prompt;
  for (int i = 0; i < 300; ++i) long_prompt += "circle ";
  std::vector<Case> cases = {
      {"corrupt image", [](auto& r) { r.set_image("\x89PNG\r\n\x1a\nnot really"); },
       grpc::StatusCode::INVALID_ARGUMENT, "invalid image"},
      {"not an image", [](auto& r) { r.set_image("hello world, not an image at all"); },
       grpc::StatusCode::INVALID_ARGUMENT, "invalid image"},
      {"pixel cap", [&](auto& r) { r.set_image(big_png); }, grpc::StatusCode::INVALID_ARGUMENT,
       "pixels"},
      {"<image> in prompt without image",
       [](auto& r) { r.clear_image(); r.set_prompt("<image>\nWhat is it?"); },
       grpc::StatusCode::INVALID_ARGUMENT, "<image>"},
      {"two <image>", [](auto& r) { r.set_prompt("<image><image> what?"); },
       grpc::StatusCode::INVALID_ARGUMENT, "<image>"},
      {"empty prompt", [](auto& r) { r.set_prompt(""); }, grpc::StatusCode::INVALID_ARGUMENT,
       "prompt is empty"},
      {"over context", [&](auto& r) { r.set_prompt(long_prompt); },
       grpc::StatusCode::INVALID_ARGUMENT, "context length"},
      {"max_new_tokens 0", [](auto& r) { r.mutable_sampling()->set_max_new_tokens(0); },
       grpc::StatusCode::INVALID_ARGUMENT, "max_new_tokens"},
      {"max_new_tokens over limit", [](auto& r) { r.mutable_sampling()->set_max_new_tokens(65); },
       grpc::StatusCode::INVALID_ARGUMENT, "max_new_tokens"},
      {"negative temperature", [](auto& r) { r.mutable_sampling()->set_temperature(-0.5f); },
       grpc::StatusCode::INVALID_ARGUMENT, "temperature"},
      {"top_p 0", [](auto& r) { r.mutable_sampling()->set_top_p(0.0f); },
       grpc::StatusCode::INVALID_ARGUMENT, "top_p"},
      {"top_p 1.5", [](auto& r) { r.mutable_sampling()->set_top_p(1.5f); },
       grpc::StatusCode::INVALID_ARGUMENT, "top_p"},
      {"layer past count",
       [](auto& r) { r.mutable_vtw()->set_mode(v1::VTW_MODE_LAYER); r.mutable_vtw()->set_layer(9); },
       grpc::StatusCode::INVALID_ARGUMENT, "outside"},
      {"unknown profile",
       [](auto& r) { r.mutable_vtw()->set_mode(v1::VTW_MODE_PROFILE); r.mutable_vtw()->set_profile("nope"); },
       grpc::StatusCode::INVALID_ARGUMENT, "profile"},
      {"message over size limit", [](auto& r) { r.set_image(std::string(2 << 20, 'x')); },
       grpc::StatusCode::RESOURCE_EXHAUSTED, ""},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::GenerateRequest req = MakeRequest(0, 4, v1::VTW_MODE_OFF);
    c.mutate(req);
    v1::GenerateResponse resp;
    grpc::Status st = Call(*stub, req, &resp);
    EXPECT_EQ(st.error_code(), c.code) << st.error_message();
    EXPECT_NE(st.error_message().find(c.needle), std::string::npos) << st.error_message();
    // Still serving, and a good request still works.
    v1::GenerateResponse good;
    ASSERT_TRUE(Call(*stub, MakeRequest(1, 2, v1::VTW_MODE_OFF), &good).ok());
  }
  const std::string text = testing::ScrapeMetrics(server.metrics_port());
  EXPECT_EQ(testing::MetricValue(text, "vtw_requests_total{code=\"INVALID_ARGUMENT\",protocol=\"grpc\"}"),
            static_cast<double>(cases.size() - 1));
}

}  // namespace
}  // namespace vtw
