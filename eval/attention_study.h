// StudyAttention: where the last prompt token's attention goes, per decoder layer, in the full
// model (the VTW paper's attention-sink observation), averaged over heads and samples.
// Single-threaded; reads the model only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "eval/vqa_dataset.h"
#include "model/status.h"
#include "server/model_bundle.h"

namespace vtw::tools {

// Attention-sink study: where the last prompt token's attention goes, per decoder layer, in the
// full model (no withdrawal), averaged over heads and samples.

struct AttentionLayerStats {
  // Mass (sums to 1): the BOS token, other text before the image, the image tokens, the text
  // after the image except the last token, the last token itself.
  double bos = 0, prefix_text = 0, image = 0, question_text = 0, self = 0;
  // Mass per token: image mass / image tokens and text mass / text keys (all text incl. BOS).
  double image_per_token = 0, text_per_token = 0;
};

struct AttentionStudy {
  int num_samples = 0;
  int64_t mean_image_tokens = 0;
  double mean_text_tokens = 0;
  std::vector<AttentionLayerStats> layers;  // per decoder layer
};

// Uses the first `samples` examples that have an image.
StatusOr<AttentionStudy> StudyAttention(const ModelBundle& bundle,
                                        const std::vector<VqaExample>& examples, int samples,
                                        bool progress = true);
nlohmann::json AttentionStudyJson(const AttentionStudy& s);
std::string AttentionStudyTable(const AttentionStudy& s);

}  // namespace vtw::tools
