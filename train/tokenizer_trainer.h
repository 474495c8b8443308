// Tokenizer training for the shipped shapes model: a SentencePiece BPE model trained by
// SentencePiece's own trainer (the `spm_train` command-line tool, run as a subprocess: the
// sentencepiece library cannot share a process with LibTorch) on the task's text, saved the
// llava-hf way (tokenizer.model + `<image>` and `<pad>` as added special tokens after the
// SentencePiece vocabulary, tokenizer_config.json with legacy=false, added_tokens.json,
// special_tokens_map.json). Thread-compatible free functions; TrainTokenizer writes files.
#pragma once

#include <ostream>
#include <string>
#include <vector>

#include "model/status.h"
#include "model/tokenizer.h"

namespace vtw::tools {

struct TokenizerTrainOptions {
  std::string out_dir;                 // receives tokenizer.model and the HF json files
  int vocab_size = 512;                // SentencePiece pieces (256 byte pieces included)
  int task_repeats = 20;               // copies of the task text in the corpus (vs generic text)
  std::string spm_train = "spm_train"; // the trainer executable (PATH lookup)
  int model_max_length = 256;
};

// Every question the dataset's templates can produce (all shapes and colours).
std::vector<std::string> AllTaskQuestions();
// Every answer word.
std::vector<std::string> AllTaskAnswers();

// The training corpus, one sentence per line: the task text (chat-template words, questions,
// answers) repeated `task_repeats` times, then generic English sentences.
std::vector<std::string> TokenizerCorpus(int task_repeats);

// Full path of `name` found on PATH (or `name` itself when it contains '/' and exists);
// empty when not found.
std::string FindExecutable(const std::string& name);

// Trains OUT/tokenizer.model with spm_train and writes the HF tokenizer files. Logs the
// spm_train command line to `log` (may be null; spm_train's own chatter goes to
// OUT/spm_train.log and the file is removed on success). Errors: NotFound when spm_train is
// missing, Internal when it fails (with the tail of its log), plus CheckTaskTokenization's.
Status TrainTokenizer(const TokenizerTrainOptions& options, std::ostream* log);

// Writes tokenizer_config.json, added_tokens.json and special_tokens_map.json for a
// SentencePiece model with `sp_vocab_size` pieces (<unk>=0, <s>=1, </s>=2): `<image>` gets id
// sp_vocab_size and `<pad>` sp_vocab_size + 1, both special.
Status WriteHfTokenizerFiles(const std::string& dir, int sp_vocab_size, int model_max_length);

// Checks that `tokenizer` handles the task: every chat-formatted question decodes back to its
// text, <image> maps to one id, and every answer, after "ASSISTANT:", encodes as tokens that
// decode to the answer word. `single_token_answers` receives how many answers are a single
// token (may be null). InvalidArgument naming the first failing text.
Status CheckTaskTokenization(const Tokenizer& tokenizer, int* single_token_answers);

// The answer's token ids as the model must generate them after a prompt ending in
// "ASSISTANT:" (HF tokenisation of prompt + " " + answer, minus the prompt's ids), without EOS.
StatusOr<std::vector<int32_t>> AnswerTokenIds(const Tokenizer& tokenizer,
                                              const std::vector<int32_t>& prompt_ids,
                                              const std::string& prompt_text,
                                              const std::string& answer);

}  // namespace vtw::tools
