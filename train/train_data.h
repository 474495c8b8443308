// The training data held in memory: a split of the shapes task generated exactly as `vtw
// dataset` would write it (same scenes, questions and encoded image bytes), decoded and
// preprocessed as the runtime does, with per-patch labels for the auxiliary loss, and tokenized.
// BuildSplit uses worker threads for rendering; the result is a plain value.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "model/forward_batch.h"
#include "model/image_processor.h"
#include "model/llava_config.h"
#include "model/status.h"
#include "model/tokenizer.h"
#include "shapes/shapes_dataset.h"

namespace vtw::tools {

// The preprocessing of a trained model (OpenAI CLIP mean/std, bicubic, rescale 1/255) at the
// model's image size; written to its preprocessor_config.json.
ImageProcessorConfig TrainImageProcessor(const LlavaConfig& config);

// One tokenized QA example over an image held in a dataset.
struct TrainExample {
  int32_t image = 0;                  // index into EncodedSplit::pixels
  std::vector<int64_t> prompt_ids;    // expanded layout ids (image rows carry the image id)
  std::vector<TokenKind> kinds;
  std::vector<int64_t> target_ids;    // answer tokens then EOS
  std::vector<int64_t> turn_ids;      // the question as a later turn: `USER: {q} ASSISTANT:`
  int type = 0;                       // index into kQuestionTypes
};

// A split held in memory: preprocessed images (as uint8 values that reproduce
// PreprocessImage's float output exactly) and tokenized examples.
struct EncodedSplit {
  at::Tensor pixels_u8;  // [N, 3, S, S] uint8
  at::Tensor patch_color;  // [N, P] int64: 0 background, 1 + ShapeColor of the covering shape
  at::Tensor patch_kind;   // [N, P] int64: 0 background, 1 + ShapeKind
  at::Tensor patch_side;   // [N, P] int64: 0 background, 1 left, 2 right (the shape's centre)
  std::vector<TrainExample> examples;
  // float pixel values of images `idx` exactly as PreprocessImage gives them: [n, 3, S, S].
  at::Tensor Pixels(const std::vector<int64_t>& idx) const;
  std::vector<float> lut;  // [3 * 256] float value per channel and byte
};

// Generates `split` (count examples, questions_per_image, seed) like `vtw dataset` does
// (same scenes, questions and encoded image bytes), decodes and preprocesses every image as
// the runtime does, tokenizes. Uses `threads` worker threads for rendering.
// `spec`: the scenes' knobs (the dataset's defaults unless given).
StatusOr<EncodedSplit> BuildSplit(const std::string& split, int64_t count, uint64_t seed,
                                  int questions_per_image, const Tokenizer& tokenizer,
                                  const LlavaConfig& config, int threads, std::ostream* log,
                                  const SceneSpec& spec = SceneSpec{});

}  // namespace vtw::tools
