#include "train/tokenizer_trainer.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "shapes/shapes_dataset.h"

namespace vtw::tools {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// Generic English so that words outside the task still tokenize sensibly (byte fallback
// covers anything else).
constexpr const char* kGenericText[] = {
    "The quick brown fox jumps over the lazy dog.",
    "A picture shows a few simple shapes on a light background.",
    "Please describe the image in one word.",
    "What is in the picture? There is a small object near the top.",
    "How are you today? I am fine, thank you.",
    "The model answers questions about colors, shapes, counts and positions.",
    "Where is the ball? It is on the table next to the box.",
    "This is a test of the tokenizer with some ordinary English words.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "The sky is blue and the grass is green; the sun is yellow.",
    "Can you tell me which one is bigger, the left or the right?",
    "Visual tokens are withdrawn after a few layers to save compute.",
    "Large language models read text and images and write answers.",
    "I think the answer is no, but I am not sure.",
    "Yes, there is a red apple and an orange on the plate.",
    "Count the objects carefully and answer with a number.",
    "The purple flower is between the white house and the black car.",
    "Hello world! This line has punctuation: commas, colons; and quotes \"like this\".",
    "Numbers such as 10, 42, 100 and 2024 appear in text too.",
    "She said that the circle was drawn at the center of the image.",
    "Questions: what, where, when, who, why, which and how.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "Machine learning needs data, a model, a loss and an optimizer.",
    "The server streams the generated text back to the client.",
    "A triangle has three sides, a square has four and a circle has none.",
};

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') out += "'\\''";
    else out += c;
  }
  return out + "'";
}

std::string TailOfFile(const std::string& path, size_t max_chars) {
  std::ifstream in(path);
  std::ostringstream os;
  os << in.rdbuf();
  std::string s = os.str();
  return s.size() > max_chars ? s.substr(s.size() - max_chars) : s;
}

}  // namespace

std::vector<std::string> AllTaskQuestions() {
  std::vector<std::string> out;
  std::vector<std::string> kinds, colors;
  for (int k = 0; k < kNumShapeKinds; ++k) kinds.push_back(ShapeKindName(static_cast<ShapeKind>(k)));
  for (int c = 0; c < kNumShapeColors; ++c) {
    colors.push_back(ShapeColorName(static_cast<ShapeColor>(c)));
  }
  for (const auto& k : kinds) out.push_back("What color is the " + k + "?");
  for (const auto& c : colors) out.push_back("What shape is the " + c + " object?");
  for (const auto& k : kinds) out.push_back("How many " + k + "s are there?");
  out.push_back("How many shapes are there?");
  for (const auto& c : colors) {
    for (const auto& k : kinds) out.push_back("Is there a " + c + " " + k + "?");
  }
  for (const auto& c : colors) {
    for (const auto& k : kinds) out.push_back("Which side is the " + c + " " + k + " on?");
  }
  return out;
}

std::vector<std::string> AllTaskAnswers() {
  std::vector<std::string> out;
  for (const char* type : kQuestionTypes) {
    for (const std::string& a : AllowedAnswers(type)) {
      bool seen = false;
      for (const auto& b : out) seen = seen || b == a;
      if (!seen) out.push_back(a);
    }
  }
  return out;
}

std::vector<std::string> TokenizerCorpus(int task_repeats) {
  std::vector<std::string> lines;
  const std::vector<std::string> questions = AllTaskQuestions();
  const std::vector<std::string> answers = AllTaskAnswers();
  for (int r = 0; r < task_repeats; ++r) {
    // The prompt as SentencePiece sees it: "USER: " before the image, the question and
    // "ASSISTANT: answer" after it (the <image> token is split off before SentencePiece runs).
    for (size_t i = 0; i < questions.size(); ++i) {
      lines.push_back("USER:");
      const std::string& a = answers[(i + r) % answers.size()];
      lines.push_back(questions[i] + " ASSISTANT: " + a);
    }
    for (const auto& a : answers) lines.push_back("ASSISTANT: " + a);
  }
  for (const char* g : kGenericText) {
    lines.push_back(g);
    lines.push_back(Lower(g));
  }
  return lines;
}

std::string FindExecutable(const std::string& name) {
  std::error_code ec;
  if (name.find('/') != std::string::npos) return fs::exists(name, ec) ? name : "";
  const char* path = std::getenv("PATH");
  std::string p = path ? path : "/usr/local/bin:/usr/bin:/bin";
  std::stringstream ss(p);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    fs::path candidate = fs::path(dir) / name;
    if (fs::exists(candidate, ec) && access(candidate.c_str(), X_OK) == 0) return candidate.string();
  }
  return "";
}

Status WriteHfTokenizerFiles(const std::string& dir, int sp, int model_max_length) {
  auto token = [](const std::string& content) {
    return json{{"content", content}, {"lstrip", false}, {"normalized", false},
                {"rstrip", false},    {"single_word", false}, {"special", true}};
  };
  json decoder = json::object();
  decoder["0"] = token("<unk>");
  decoder["1"] = token("<s>");
  decoder["2"] = token("</s>");
  decoder[std::to_string(sp)] = token("<image>");
  decoder[std::to_string(sp + 1)] = token("<pad>");
  json config = {
      {"add_bos_token", true},
      {"add_eos_token", false},
      {"add_prefix_space", nullptr},
      {"added_tokens_decoder", decoder},
      {"bos_token", "<s>"},
      {"clean_up_tokenization_spaces", false},
      {"eos_token", "</s>"},
      {"legacy", false},
      {"model_max_length", model_max_length},
      {"pad_token", "<pad>"},
      {"padding_side", "left"},
      {"processor_class", "LlavaProcessor"},
      {"sp_model_kwargs", json::object()},
      {"spaces_between_special_tokens", false},
      {"tokenizer_class", "LlamaTokenizer"},
      {"unk_token", "<unk>"},
      {"use_default_system_prompt", false},
      {"chat_template",
       "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
       "{% else %}ASSISTANT: {% endif %}{% for item in message['content'] %}"
       "{% if item['type'] == 'text' %}{{ item['text'] }}{% elif item['type'] == 'image' %}"
       "<image>\n{% endif %}{% endfor %}{% if message['role'] == 'user' %} {% else %}"
       "{{eos_token}}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"}};
  // add_prefix_space null is what llava-hf ships; our loader defaults it to true (HF's default).
  config.erase("add_prefix_space");
  auto special = [](const std::string& content) {
    return json{{"content", content}, {"lstrip", false}, {"normalized", false},
                {"rstrip", false},    {"single_word", false}};
  };
  json special_map = {{"bos_token", special("<s>")},
                      {"eos_token", special("</s>")},
                      {"pad_token", special("<pad>")},
                      {"unk_token", special("<unk>")}};
  json added = {{"<image>", sp}, {"<pad>", sp + 1}};
  for (const auto& [name, j] : {std::pair<std::string, json>{"tokenizer_config.json", config},
                                {"special_tokens_map.json", special_map},
                                {"added_tokens.json", added}}) {
    std::ofstream out(fs::path(dir) / name);
    out << j.dump(2) << "\n";
    if (!out) return Internal("cannot write " + (fs::path(dir) / name).string());
  }
  return Status::Ok();
}

StatusOr<std::vector<int32_t>> AnswerTokenIds(const Tokenizer& tokenizer,
                                              const std::vector<int32_t>& prompt_ids,
                                              const std::string& prompt_text,
                                              const std::string& answer) {
  std::vector<int32_t> full = tokenizer.Encode(prompt_text + " " + answer, tokenizer.add_bos_token());
  if (full.size() <= prompt_ids.size() ||
      !std::equal(prompt_ids.begin(), prompt_ids.end(), full.begin())) {
    return InvalidArgument("tokenizer: '" + prompt_text + " " + answer +
                           "' does not tokenize as the prompt's ids followed by the answer's");
  }
  return std::vector<int32_t>(full.begin() + prompt_ids.size(), full.end());
}

Status CheckTaskTokenization(const Tokenizer& tok, int* single_token_answers) {
  if (tok.image_token_id() < 0) return InvalidArgument("tokenizer: no <image> token");
  if (tok.bos_id() != 1 || tok.eos_id() != 2 || tok.unk_id() != 0) {
    return InvalidArgument("tokenizer: expected unk=0 bos=1 eos=2");
  }
  int singles = 0;
  const std::vector<std::string> answers = AllTaskAnswers();
  for (const std::string& q : AllTaskQuestions()) {
    const std::string prompt = ApplyLlavaChatTemplate(q, /*has_image=*/true);
    std::vector<int32_t> ids = tok.Encode(prompt, true);
    int images = 0;
    for (int32_t id : ids) images += id == tok.image_token_id();
    if (images != 1) return InvalidArgument("tokenizer: '" + prompt + "' has " +
                                            std::to_string(images) + " <image> ids");
    // HF sets special tokens off by spaces when decoding: compare the text around <image>.
    const auto image_at = std::find(ids.begin(), ids.end(), tok.image_token_id());
    const std::string before = tok.Decode(std::vector<int32_t>(ids.begin(), image_at), true);
    const std::string after = tok.Decode(std::vector<int32_t>(image_at + 1, ids.end()), true);
    if (before + "<image>" + after != prompt) {
      return InvalidArgument("tokenizer: '" + prompt + "' decodes as '" + before + "<image>" +
                             after + "'");
    }
    if (tok.Decode(tok.Encode(q, false), true) != q) {
      return InvalidArgument("tokenizer: question '" + q + "' does not round-trip");
    }
    for (const std::string& a : answers) {
      VTW_ASSIGN_OR_RETURN(std::vector<int32_t> answer_ids, AnswerTokenIds(tok, ids, prompt, a));
      if (tok.Decode(answer_ids, true) != a) {
        return InvalidArgument("tokenizer: answer '" + a + "' decodes as '" +
                               tok.Decode(answer_ids, true) + "'");
      }
      for (int32_t id : answer_ids) {
        if (id == tok.unk_id()) return InvalidArgument("tokenizer: answer '" + a + "' has <unk>");
      }
      if (q == AllTaskQuestions().front() && answer_ids.size() == 1) ++singles;
    }
  }
  if (single_token_answers) *single_token_answers = singles;
  return Status::Ok();
}

Status TrainTokenizer(const TokenizerTrainOptions& o, std::ostream* log) {
  const std::string spm = FindExecutable(o.spm_train);
  if (spm.empty()) {
    return NotFound("'" + o.spm_train + "' not found on PATH: install SentencePiece's command-line "
                    "tools (Debian/Ubuntu: apt-get install sentencepiece)");
  }
  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  if (ec) return Internal("cannot create " + o.out_dir + ": " + ec.message());
  const fs::path corpus = fs::path(o.out_dir) / "tokenizer_corpus.txt";
  {
    std::ofstream out(corpus);
    for (const std::string& line : TokenizerCorpus(o.task_repeats)) out << line << "\n";
    if (!out) return Internal("cannot write " + corpus.string());
  }
  const fs::path prefix = fs::path(o.out_dir) / "tokenizer";
  const fs::path spm_log = fs::path(o.out_dir) / "spm_train.log";
  // LLaMA's SentencePiece settings: BPE, identity normalisation, dummy prefix, whitespace kept,
  // byte fallback; <unk>=0 <s>=1 </s>=2 and no pad piece (pad is an added token, llava-hf style).
  std::string cmd = ShellQuote(spm) + " --input=" + ShellQuote(corpus.string()) +
                    " --model_prefix=" + ShellQuote(prefix.string()) +
                    " --model_type=bpe --vocab_size=" + std::to_string(o.vocab_size) +
                    " --character_coverage=1.0 --byte_fallback=true"
                    " --normalization_rule_name=identity --add_dummy_prefix=true"
                    " --remove_extra_whitespaces=false --split_digits=false"
                    " --allow_whitespace_only_pieces=true --max_sentencepiece_length=16"
                    " --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1"
                    " --hard_vocab_limit=false --num_threads=1 --minloglevel=1";
  if (log) *log << "[tokenizer] " << cmd << "\n";
  const int rc = std::system((cmd + " > " + ShellQuote(spm_log.string()) + " 2>&1").c_str());
  if (rc != 0) {
    return Internal("spm_train failed (status " + std::to_string(rc) + "); its log " +
                    spm_log.string() + " ends with:\n" + TailOfFile(spm_log.string(), 2000));
  }
  fs::remove(fs::path(o.out_dir) / "tokenizer.vocab", ec);
  fs::remove(corpus, ec);
  fs::remove(spm_log, ec);
  // The piece count: read it back through our own loader with provisional HF files.
  VTW_RETURN_IF_ERROR(WriteHfTokenizerFiles(o.out_dir, o.vocab_size, o.model_max_length));
  VTW_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> probe, Tokenizer::Load(o.out_dir));
  const int sp = probe->sp_vocab_size();
  VTW_RETURN_IF_ERROR(WriteHfTokenizerFiles(o.out_dir, sp, o.model_max_length));
  VTW_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tok, Tokenizer::Load(o.out_dir));
  int singles = 0;
  VTW_RETURN_IF_ERROR(CheckTaskTokenization(*tok, &singles));
  if (log) {
    *log << "[tokenizer] " << sp << " SentencePiece pieces + <image>=" << tok->image_token_id()
         << " <pad>=" << tok->pad_id() << "; " << singles << "/" << AllTaskAnswers().size()
         << " answers are one token\n";
  }
  return Status::Ok();
}

}  // namespace vtw::tools
