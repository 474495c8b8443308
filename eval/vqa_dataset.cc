#include "eval/vqa_dataset.h"

#include <cctype>
#include <filesystem>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

namespace vtw::tools {
namespace {

namespace fs = std::filesystem;

std::string Where(const std::string& path, int line) {
  return path + ":" + std::to_string(line);
}

}  // namespace

StatusOr<std::vector<VqaExample>> LoadVqaJsonl(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return NotFound("data file '" + path + "' does not exist");
  if (fs::is_directory(path, ec)) {
    return InvalidArgument("data file '" + path + "' is a directory (pass the .jsonl file)");
  }
  std::ifstream in(path);
  if (!in) return InvalidArgument("cannot read data file '" + path + "'");
  const fs::path base = fs::path(path).parent_path();
  std::vector<VqaExample> out;
  std::string text;
  int line = 0;
  while (std::getline(in, text)) {
    ++line;
    if (!text.empty() && text.back() == '\r') text.pop_back();
    if (text.find_first_not_of(" \t") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return InvalidArgument(Where(path, line) + ": malformed JSON line");
    if (!j.is_object()) return InvalidArgument(Where(path, line) + ": not a JSON object");
    VqaExample e;
    e.line = line;
    auto get = [&](const char* key, std::string* value, bool required) -> Status {
      auto it = j.find(key);
      if (it == j.end() || it->is_null()) {
        if (required) {
          return InvalidArgument(Where(path, line) + ": missing field \"" + key + "\"");
        }
        return Status::Ok();
      }
      if (!it->is_string()) {
        return InvalidArgument(Where(path, line) + ": field \"" + key + "\" must be a string");
      }
      *value = it->get<std::string>();
      return Status::Ok();
    };
    VTW_RETURN_IF_ERROR(get("question", &e.question, true));
    VTW_RETURN_IF_ERROR(get("answer", &e.answer, false));
    VTW_RETURN_IF_ERROR(get("type", &e.type, false));
    VTW_RETURN_IF_ERROR(get("image", &e.image, false));
    if (e.question.empty()) return InvalidArgument(Where(path, line) + ": empty question");
    if (e.type.empty()) e.type = "unknown";
    if (!e.image.empty()) {
      fs::path p(e.image);
      if (p.is_relative()) p = base / p;
      e.image = p.lexically_normal().string();
      if (!fs::is_regular_file(e.image, ec)) {
        return NotFound(Where(path, line) + ": image file '" + e.image + "' does not exist");
      }
    }
    out.push_back(std::move(e));
  }
  if (in.bad()) return Internal("error reading data file '" + path + "'");
  if (out.empty()) return InvalidArgument("data file '" + path + "' holds no examples");
  return out;
}

std::vector<VqaExample> SelectFirst(const std::vector<VqaExample>& examples, int n,
                                    bool per_type) {
  std::vector<VqaExample> out;
  if (n <= 0) return out;
  std::map<std::string, int> taken;
  for (const VqaExample& e : examples) {
    if (!per_type) {
      if (static_cast<int>(out.size()) >= n) break;
      out.push_back(e);
    } else if (taken[e.type] < n) {
      ++taken[e.type];
      out.push_back(e);
    }
  }
  return out;
}

std::string NormalizeAnswer(const std::string& text) {
  size_t b = 0;
  while (b < text.size() && std::isspace(static_cast<unsigned char>(text[b]))) ++b;
  size_t e = b;
  while (e < text.size() && !std::isspace(static_cast<unsigned char>(text[e]))) ++e;
  std::string word;
  for (size_t i = b; i < e; ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (std::ispunct(c)) continue;
    word.push_back(static_cast<char>(std::tolower(c)));
  }
  return word;
}

StatusOr<PromptLayout> QuestionLayout(const ModelBundle& bundle, const std::string& question,
                                      bool has_image, int max_new_tokens) {
  return BuildPromptLayout(bundle, question, /*raw=*/false, has_image, max_new_tokens);
}

}  // namespace vtw::tools
