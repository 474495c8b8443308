#include "server/service.h"

#include <deque>

#include <spdlog/spdlog.h>

namespace vtw {
namespace {

v1::FinishReason ToWire(FinishReason r) {
  switch (r) {
    case FinishReason::kLength: return v1::FINISH_REASON_LENGTH;
    case FinishReason::kEos: return v1::FINISH_REASON_EOS;
    case FinishReason::kStop: return v1::FINISH_REASON_STOP;
    case FinishReason::kNone: break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

Clock::time_point SteadyDeadline(const grpc::CallbackServerContext* context) {
  const auto deadline = context->deadline();
  if (deadline >= std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365)) {
    return Clock::time_point::max();
  }
  return Clock::now() + (deadline - std::chrono::system_clock::now());
}

// Unary Generate. The engine's OnDone is the last thing that touches this object before
// Finish; gRPC deletes it in OnDone() after Finish completes.
class UnaryCall final : public grpc::ServerUnaryReactor, public RequestSink {
 public:
  explicit UnaryCall(v1::GenerateResponse* response) : response_(response) {}

  void Start(InferenceServiceImpl* service, grpc::CallbackServerContext* context,
             const v1::GenerateRequest& wire) {
    if (grpc::Status auth = service->Authenticate(context, /*count=*/true); !auth.ok()) {
      Finish(auth);
      return;
    }
    Status st = service->Accept(context, wire, std::shared_ptr<RequestSink>(this, [](auto*) {}),
                                cancel_, &id_);
    if (!st.ok()) Finish(ToGrpcStatus(st));
  }

  void OnDelta(const std::string&, const std::vector<int32_t>&) override {}

  void OnDone(const Status& status, const RequestSummary& s) override {
    if (status.ok()) {
      response_->set_request_id(id_);
      response_->set_text(s.text);
      for (int32_t t : s.token_ids) response_->add_token_ids(static_cast<uint32_t>(t));
      InferenceServiceImpl::FillFinal(s, response_);
    }
    Finish(ToGrpcStatus(status));  // nothing of `this` may be touched after this line
  }

  void OnCancel() override {
    cancel_->store(true);
  }
  void OnDone() override { delete this; }

 private:
  v1::GenerateResponse* response_;
  // Created before the call is accepted, so OnCancel never races with Accept.
  const std::shared_ptr<std::atomic<bool>> cancel_ = std::make_shared<std::atomic<bool>>(false);
  std::string id_;
};

// Streaming GenerateStream: one write in flight at a time; deltas queue up behind it.
class StreamCall final : public grpc::ServerWriteReactor<v1::GenerateStreamResponse>,
                         public RequestSink {
 public:
  void Start(InferenceServiceImpl* service, grpc::CallbackServerContext* context,
             const v1::GenerateRequest& wire) {
    if (grpc::Status auth = service->Authenticate(context, /*count=*/true); !auth.ok()) {
      Finish(auth);
      return;
    }
    Status st = service->Accept(context, wire, std::shared_ptr<RequestSink>(this, [](auto*) {}),
                                cancel_, &id_);
    if (!st.ok()) Finish(ToGrpcStatus(st));
  }

  void OnDelta(const std::string& text, const std::vector<int32_t>& ids) override {
    v1::GenerateStreamResponse m;
    m.set_request_id(id_);
    m.set_text(text);
    for (int32_t t : ids) m.add_token_ids(static_cast<uint32_t>(t));
    Enqueue(std::move(m));
  }

  void OnDone(const Status& status, const RequestSummary& s) override {
    bool finish_now = false;
    const v1::GenerateStreamResponse* write = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
      final_status_ = ToGrpcStatus(status);
      if (status.ok()) {
        v1::GenerateStreamResponse m;
        m.set_request_id(id_);
        InferenceServiceImpl::FillFinal(s, &m);
        queue_.push_back(std::move(m));
      } else if (writing_) {
        // An error ends the stream without further messages; the one in flight (the front)
        // must live until OnWriteDone.
        queue_.erase(queue_.begin() + 1, queue_.end());
      } else {
        queue_.clear();
      }
      if (!writing_) {
        if (queue_.empty()) {
          finish_now = true;
        } else {
          writing_ = true;
          write = &queue_.front();
        }
      }
    }
    if (finish_now) {
      Finish(final_status_);
    } else if (write) {
      StartWrite(write);
    }
  }

  void OnWriteDone(bool ok) override {
    const v1::GenerateStreamResponse* write = nullptr;
    bool finish_now = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.pop_front();
      writing_ = false;
      if (!ok) {  // the client is gone: stop generating, drop what is queued
        cancel_->store(true);
        queue_.clear();
      }
      if (!queue_.empty()) {
        writing_ = true;
        write = &queue_.front();
      } else if (done_) {
        finish_now = true;
      }
    }
    if (write) {
      StartWrite(write);
    } else if (finish_now) {
      Finish(final_status_);
    }
  }

  void OnCancel() override {
    cancel_->store(true);
  }
  void OnDone() override { delete this; }

 private:
  void Enqueue(v1::GenerateStreamResponse m) {
    const v1::GenerateStreamResponse* write = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (done_) return;
      queue_.push_back(std::move(m));
      if (!writing_) {
        writing_ = true;
        write = &queue_.front();
      }
    }
    if (write) StartWrite(write);
  }

  // Created before the call is accepted, so OnCancel never races with Accept.
  const std::shared_ptr<std::atomic<bool>> cancel_ = std::make_shared<std::atomic<bool>>(false);
  std::string id_;
  std::mutex mu_;
  std::deque<v1::GenerateStreamResponse> queue_;  // front = in flight when writing_
  bool writing_ = false;
  bool done_ = false;
  grpc::Status final_status_;
};

}  // namespace

grpc::Status ToGrpcStatus(const Status& status) {
  if (status.ok()) return grpc::Status::OK;
  grpc::StatusCode code = static_cast<grpc::StatusCode>(static_cast<int>(status.code()));
  if (status.code() == StatusCode::kDataLoss) code = grpc::StatusCode::INTERNAL;
  return grpc::Status(code, status.message());
}

StatusOr<RequestSpec> SpecFromWire(const v1::GenerateRequest& wire) {
  RequestSpec spec;
  spec.request_id = wire.request_id();
  spec.image = wire.image();
  spec.prompt = wire.prompt();
  const v1::SamplingParams& sp = wire.sampling();
  if (sp.has_max_new_tokens()) spec.max_new_tokens = sp.max_new_tokens();
  spec.temperature = sp.temperature();
  spec.top_k = sp.top_k();
  if (sp.has_top_p()) spec.top_p = sp.top_p();
  spec.seed = sp.seed();
  spec.stop.assign(sp.stop().begin(), sp.stop().end());
  spec.ignore_eos = sp.ignore_eos();
  spec.vtw_layer = wire.vtw().layer();
  spec.vtw_profile = wire.vtw().profile();
  switch (wire.vtw().mode()) {
    case v1::VTW_MODE_DEFAULT: spec.vtw_mode = VtwMode::kDefault; break;
    case v1::VTW_MODE_OFF: spec.vtw_mode = VtwMode::kOff; break;
    case v1::VTW_MODE_LAYER: spec.vtw_mode = VtwMode::kLayer; break;
    case v1::VTW_MODE_PROFILE: spec.vtw_mode = VtwMode::kProfile; break;
    default: return InvalidArgument("unknown vtw.mode " + std::to_string(wire.vtw().mode()));
  }
  spec.max_new_tokens_field = "sampling.max_new_tokens";
  spec.stop_field = "sampling.stop";
  return spec;
}

grpc::Status InferenceServiceImpl::Authenticate(const grpc::CallbackServerContext* context,
                                                bool count) {
  if (!intake_.token_required()) return grpc::Status::OK;
  std::string_view authorization;
  const auto& metadata = context->client_metadata();
  if (auto it = metadata.find("authorization"); it != metadata.end()) {
    authorization = std::string_view(it->second.data(), it->second.size());
  }
  return ToGrpcStatus(intake_.Authenticate(authorization, context->peer(), kProtocolGrpc, count,
                                           kUnauthenticatedMessage));
}

template <typename Message>
void InferenceServiceImpl::FillFinal(const RequestSummary& s, Message* m) {
  m->set_finish_reason(ToWire(s.finish_reason));
  auto* usage = m->mutable_usage();
  usage->set_prompt_tokens(static_cast<uint32_t>(s.prompt_tokens));
  usage->set_image_tokens(static_cast<uint32_t>(s.image_tokens));
  usage->set_completion_tokens(static_cast<uint32_t>(s.token_ids.size()));
  auto* vtw = m->mutable_vtw();
  vtw->set_applied(s.vtw_applied);
  vtw->set_layer(static_cast<uint32_t>(s.withdraw_layer));
  vtw->set_flops(static_cast<uint64_t>(s.flops));
  vtw->set_flops_without_vtw(static_cast<uint64_t>(s.flops_without_vtw));
  vtw->set_kv_cache_bytes(static_cast<uint64_t>(s.kv_cache_bytes));
  vtw->set_kv_cache_bytes_without_vtw(static_cast<uint64_t>(s.kv_cache_bytes_without_vtw));
  auto* timing = m->mutable_timing();
  timing->set_queue_seconds(s.queue_seconds);
  timing->set_time_to_first_token_seconds(s.ttft_seconds);
  timing->set_total_seconds(s.total_seconds);
}

Status InferenceServiceImpl::Accept(grpc::CallbackServerContext* context,
                                    const v1::GenerateRequest& wire,
                                    std::shared_ptr<RequestSink> sink,
                                    std::shared_ptr<std::atomic<bool>> cancel,
                                    std::string* request_id) {
  StatusOr<RequestSpec> spec = SpecFromWire(wire);
  if (!spec.ok()) return intake_.Reject(spec.status(), kProtocolGrpc, wire.request_id());
  return intake_.Accept(*spec, kProtocolGrpc, SteadyDeadline(context), std::move(sink),
                        std::move(cancel), request_id);
}

grpc::ServerUnaryReactor* InferenceServiceImpl::Generate(grpc::CallbackServerContext* context,
                                                         const v1::GenerateRequest* request,
                                                         v1::GenerateResponse* response) {
  auto* call = new UnaryCall(response);
  call->Start(this, context, *request);
  return call;
}

grpc::ServerWriteReactor<v1::GenerateStreamResponse>* InferenceServiceImpl::GenerateStream(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto* call = new StreamCall();
  call->Start(this, context, *request);
  return call;
}

grpc::ServerUnaryReactor* InferenceServiceImpl::GetModelInfo(grpc::CallbackServerContext* context,
                                                             const v1::GetModelInfoRequest*,
                                                             v1::ModelInfo* info) {
  auto* reactor = context->DefaultReactor();
  if (grpc::Status auth = Authenticate(context, /*count=*/false); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  const ModelBundle* bundle = intake_.bundle();
  if (!bundle) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is not loaded"));
    return reactor;
  }
  const LlavaConfig& c = bundle->model->config();
  info->set_model_name(c.name);
  info->set_architecture("LlavaForConditionalGeneration");
  info->set_num_layers(static_cast<uint32_t>(c.text.num_hidden_layers));
  info->set_image_tokens_per_image(static_cast<uint32_t>(c.num_image_tokens()));
  info->set_dtype(DTypeName(bundle->model->dtype()));
  if (bundle->vtw.default_layer) info->set_default_withdraw_layer(*bundle->vtw.default_layer);
  for (const auto& [name, k] : bundle->vtw.profiles) (*info->mutable_profiles())[name] = k;
  info->set_context_length(static_cast<uint32_t>(c.text.max_position_embeddings));
  info->set_vocab_size(static_cast<uint32_t>(c.text.vocab_size));
  info->set_image_size(static_cast<uint32_t>(c.vision.image_size));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace vtw
