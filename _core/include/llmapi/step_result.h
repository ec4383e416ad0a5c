// StepResult: what the runner returns for one batch (candidate tokens and their logprobs).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace llmapi {

// Row r of the batch offers num_candidates[r] candidates (the batch's field), best first:
// 1 sampled token; a forking sampler row's samples 0..n-1; a beam row's top-K tokens. Arrays
// are row-major with K columns (the widest row); unused places hold token -1.
struct StepResult {
  int32_t num_rows = 0;        // R
  int32_t num_candidates = 1;  // K
  int32_t num_top = 0;         // L
  std::vector<int32_t> tokens;        // [R, K]
  std::vector<float> scores;          // [R, K] beam rows: the processed logprob that ranks beams; or empty
  std::vector<float> logprobs;        // [R, K] raw logprob of each candidate (rows that asked); or empty
  std::vector<int32_t> ranks;         // [R, K] 1 + tokens with a higher raw logprob; or empty
  std::vector<int32_t> top_ids;       // [R, L] the row's most likely tokens, most likely first
  std::vector<float> top_logprobs;    // [R, L]
  // top_ids / top_logprobs are [R, K, L]: a list per candidate (a speculative row's tokens come from
  // different positions, each with its own top tokens); num_top is still L.
  bool top_per_token = false;
  // Rows whose request failed on its own (a user logits processor raised, ...): that request
  // finishes "error" with the message; the step's other rows are settled as usual.
  std::vector<std::pair<int32_t, std::string>> row_errors;

  // A result of one token per row and nothing else (the simplest runner's answer).
  static StepResult of_tokens(std::vector<int32_t> tokens) {
    StepResult s;
    s.num_rows = static_cast<int32_t>(tokens.size());
    s.tokens = std::move(tokens);
    return s;
  }
  int32_t token(int32_t row, int32_t c) const { return tokens[static_cast<size_t>(row) * num_candidates + c]; }
  float score(int32_t row, int32_t c) const {
    return scores.empty() ? 0.0f : scores[static_cast<size_t>(row) * num_candidates + c];
  }
};

// Appends candidate (row, column)'s logprob, rank and the row's top-k to a sequence's per-token
// vectors (logprobs, ranks, top_ids, top_logprobs: a Request, a BeamHypothesis, ...).
template <typename Seq>
inline void append_logprobs(Seq& seq, int32_t k, const StepResult& result, int32_t row, int32_t column) {
  const size_t at = static_cast<size_t>(row) * result.num_candidates + column;
  const float logprob = result.logprobs.empty() ? 0.0f : result.logprobs[at];
  seq.logprobs.push_back(logprob);
  seq.ranks.push_back(result.ranks.empty() ? 0 : result.ranks[at]);
  const size_t list = result.top_per_token ? at : static_cast<size_t>(row);
  for (int32_t j = 0; j < k; ++j) {
    const bool have = j < result.num_top;
    const size_t t = list * result.num_top + j;
    seq.top_ids.push_back(have ? result.top_ids[t] : -1);
    seq.top_logprobs.push_back(have ? result.top_logprobs[t] : 0.0f);
  }
}

}  // namespace llmapi
