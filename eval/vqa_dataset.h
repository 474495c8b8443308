// VqaExample and the JSON-lines datasets that hold them: one JSON object per line,
// {"image", "question", "answer", "type"} (shapes/shapes_dataset.h writes them; other fields,
// such as the independent set's "style", are ignored); "image" is a path relative to the
// JSON-lines file's directory (or absolute); "answer" is needed by evaluation only; "type" names
// the question type (task profile) and defaults to "unknown". Blank lines are skipped. Also how
// a question becomes a prompt and how an answer is scored. Thread-compatible values; functions
// are reentrant.
#pragma once

#include <string>
#include <vector>

#include "model/prompt_layout.h"
#include "model/status.h"
#include "server/model_bundle.h"

namespace vtw::tools {

struct VqaExample {
  std::string image;     // resolved path (relative entries joined to the jsonl's directory);
                         // empty: a text-only question
  std::string question;
  std::string answer;    // may be empty when the file has none (calibration needs none)
  std::string type;      // "unknown" when the line has none
  int line = 0;          // 1-based line number in the file
};

// Reads a JSON-lines dataset. Errors name the file and, for a bad line, the line number:
// NotFound for a missing file or a missing image file; InvalidArgument for a malformed line,
// a line that is not an object, a missing or non-string "question", or a non-string field; an
// empty dataset is InvalidArgument too.
StatusOr<std::vector<VqaExample>> LoadVqaJsonl(const std::string& path);

// The first `n` examples in file order; with `per_type`, the first `n` of every question type
// (still in file order). n must be >= 1.
std::vector<VqaExample> SelectFirst(const std::vector<VqaExample>& examples, int n, bool per_type);

// The prediction scored against the answer: the first whitespace-separated word of `text`,
// lowercased, with ASCII punctuation removed ("  Red." -> "red"; "" when there is none).
std::string NormalizeAnswer(const std::string& text);

// The layout of `question` wrapped in the LLaVA chat template, with or without an image, exactly
// as PreparePrompt builds it (same errors), leaving room for `max_new_tokens`.
StatusOr<PromptLayout> QuestionLayout(const ModelBundle& bundle, const std::string& question,
                                      bool has_image, int max_new_tokens);

}  // namespace vtw::tools
