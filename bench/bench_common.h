// Pieces the benchmark programs share: the "medium" random-model geometry, a monotonic clock in
// seconds and a timestamped progress line on stderr.
#pragma once

#include <chrono>
#include <cstdio>
#include <string>

#include "model/llava_config.h"

namespace vtw::bench {

// A LLaVA-1.5-shaped model scaled down: 576 image tokens (336 px, patch 14) from a 4-layer
// 256-wide tower, 8-layer 1024-wide Llama with GQA (16 heads, 4 KV heads), vocab 32064.
inline LlavaConfig MediumConfig() {
  LlavaConfig c;
  c.vision.hidden_size = 256;
  c.vision.intermediate_size = 1024;
  c.vision.num_hidden_layers = 4;
  c.vision.num_attention_heads = 4;
  c.vision.image_size = 336;
  c.vision.patch_size = 14;
  c.text.vocab_size = 32064;
  c.text.hidden_size = 1024;
  c.text.intermediate_size = 2816;
  c.text.num_hidden_layers = 8;
  c.text.num_attention_heads = 16;
  c.text.num_key_value_heads = 4;
  c.text.head_dim = 64;
  c.text.max_position_embeddings = 4096;
  c.image_token_index = 32000;
  c.name = "medium-random";
  return c;
}

// Seconds on the steady clock.
inline double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// "[   12.3 s] msg" on stderr, time since the first call.
inline void Progress(const std::string& msg) {
  static const double start = Now();
  std::fprintf(stderr, "[%7.1f s] %s\n", Now() - start, msg.c_str());
  std::fflush(stderr);
}

}  // namespace vtw::bench
