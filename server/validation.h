// Request validation: turns a wire GenerateRequest into an engine Request, or a Status a person
// can act on (INVALID_ARGUMENT for bad input). Runs on gRPC threads; pure apart from image
// decoding and tokenization. The one place that maps vtw::Status to grpc::Status lives here too.
#pragma once

#include <memory>
#include <string>

#include <grpcpp/support/status.h>

#include "model/image_processor.h"
#include "server/model_bundle.h"
#include "server/request.h"
#include "vtw/v1/inference.pb.h"

namespace vtw {

struct ServiceLimits {
  int default_max_new_tokens = 64;   // when the request leaves max_new_tokens unset
  int max_new_tokens_limit = 512;    // larger requests are INVALID_ARGUMENT
  size_t max_prompt_bytes = 16384;   // prompt text, before tokenization
  ImageLimits image;                 // encoded bytes and decoded pixels
};

// Validates `wire` against the model and the limits and prepares its prompt (decodes the image,
// applies the chat template, tokenizes). The returned Request has no sink, deadline or id set
// beyond what `wire` carries.
StatusOr<std::unique_ptr<Request>> BuildRequest(const ModelBundle& bundle,
                                                const v1::GenerateRequest& wire,
                                                const ServiceLimits& limits);

// vtw::Status -> grpc::Status (same code numbers; DATA_LOSS from model files becomes INTERNAL).
grpc::Status ToGrpcStatus(const Status& status);

}  // namespace vtw
