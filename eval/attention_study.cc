#include "eval/attention_study.h"

#include <cstdio>
#include <sstream>

#include <ATen/ATen.h>

#include "eval/format.h"
#include "eval/image_features.h"
#include "eval/progress_bar.h"
#include "vtw/withdrawal.h"

namespace vtw::tools {

StatusOr<AttentionStudy> StudyAttention(const ModelBundle& bundle,
                                        const std::vector<VqaExample>& examples, int samples,
                                        bool progress) {
  if (samples < 1) return InvalidArgument("--samples must be >= 1, got " + std::to_string(samples));
  const LlavaModel& model = *bundle.model;
  const int num_layers = model.num_layers();
  std::vector<const VqaExample*> chosen;
  for (const VqaExample& e : examples) {
    if (static_cast<int>(chosen.size()) >= samples) break;
    if (!e.image.empty()) chosen.push_back(&e);
  }
  if (chosen.empty()) return InvalidArgument("no example with an image");
  AttentionStudy study;
  study.layers.resize(num_layers);
  ImageFeatureCache cache(bundle);
  ProgressBar bar("attention", chosen.size(), progress);
  const int32_t bos = bundle.tokenizer->bos_id();
  int64_t image_tokens = 0;
  double text_tokens = 0;
  for (size_t i = 0; i < chosen.size(); ++i) {
    const VqaExample& e = *chosen[i];
    auto layout_or = QuestionLayout(bundle, e.question, true, 1);
    if (!layout_or.ok()) {
      return InvalidArgument("line " + std::to_string(e.line) + ": " +
                             layout_or.status().message());
    }
    const PromptLayout& layout = *layout_or;
    VTW_ASSIGN_OR_RETURN(at::Tensor features, cache.Get(e.image));
    ForwardBatch b;
    b.AppendRows(layout.token_ids, layout.kinds, 0, layout.size());
    b.image_embeds = features;
    b.seqs.push_back({nullptr, static_cast<int>(layout.size()), WithdrawalOff(num_layers), true});
    ForwardTrace trace;
    trace.last_row_attention = true;
    model.Forward(b, &trace);
    const int64_t n = layout.size();
    const int64_t last = n - 1;
    image_tokens += layout.num_image_tokens;
    text_tokens += static_cast<double>(layout.num_text_tokens());
    for (int l = 0; l < num_layers; ++l) {
      at::Tensor probs = trace.attention[l][0].to(at::kDouble).mean(0).contiguous();  // [keys]
      TORCH_CHECK(probs.size(0) == n, "attention keys != prompt length");
      const double* p = probs.data_ptr<double>();
      AttentionLayerStats& s = study.layers[l];
      double img = 0, text = 0;
      for (int64_t key = 0; key < n; ++key) {
        if (layout.kinds[key] == TokenKind::kImage) {
          s.image += p[key];
          img += p[key];
          continue;
        }
        text += p[key];
        if (key == last) {
          s.self += p[key];
        } else if (key == 0 && layout.token_ids[0] == bos) {
          s.bos += p[key];
        } else if (layout.image_start < 0 || key < layout.image_start) {
          s.prefix_text += p[key];
        } else {
          s.question_text += p[key];
        }
      }
      if (layout.num_image_tokens > 0) s.image_per_token += img / layout.num_image_tokens;
      s.text_per_token += text / static_cast<double>(layout.num_text_tokens());
    }
    bar.Update(i + 1);
  }
  bar.Finish();
  const double m = static_cast<double>(chosen.size());
  for (AttentionLayerStats& s : study.layers) {
    s.bos /= m;
    s.prefix_text /= m;
    s.image /= m;
    s.question_text /= m;
    s.self /= m;
    s.image_per_token /= m;
    s.text_per_token /= m;
  }
  study.num_samples = static_cast<int>(chosen.size());
  study.mean_image_tokens = image_tokens / static_cast<int64_t>(chosen.size());
  study.mean_text_tokens = text_tokens / m;
  return study;
}

nlohmann::json AttentionStudyJson(const AttentionStudy& s) {
  nlohmann::json layers = nlohmann::json::array();
  for (size_t l = 0; l < s.layers.size(); ++l) {
    const AttentionLayerStats& a = s.layers[l];
    layers.push_back({{"layer", l},
                      {"bos", a.bos},
                      {"prefix_text", a.prefix_text},
                      {"image", a.image},
                      {"question_text", a.question_text},
                      {"self", a.self},
                      {"text", a.bos + a.prefix_text + a.question_text + a.self},
                      {"image_per_token", a.image_per_token},
                      {"text_per_token", a.text_per_token}});
  }
  return {{"num_samples", s.num_samples},
          {"mean_image_tokens", s.mean_image_tokens},
          {"mean_text_tokens", s.mean_text_tokens},
          {"layers", layers}};
}

std::string AttentionStudyTable(const AttentionStudy& s) {
  std::ostringstream os;
  char buf[256];
  std::snprintf(buf, sizeof buf, "%-5s %7s %7s %7s %7s %7s %11s %11s\n", "layer", "BOS", "prefix",
                "image", "quest.", "self", "img/token", "text/token");
  os << buf;
  for (size_t l = 0; l < s.layers.size(); ++l) {
    const AttentionLayerStats& a = s.layers[l];
    std::snprintf(buf, sizeof buf, "%-5zu %7.3f %7.3f %7.3f %7.3f %7.3f %11.5f %11.5f\n", l, a.bos,
                  a.prefix_text, a.image, a.question_text, a.self, a.image_per_token,
                  a.text_per_token);
    os << buf;
  }
  os << "last prompt token's attention mass (mean over heads and " << s.num_samples
     << " samples; " << s.mean_image_tokens << " image tokens, "
     << Format("%.1f", s.mean_text_tokens) << " text tokens per prompt)\n";
  return os.str();
}

}  // namespace vtw::tools
