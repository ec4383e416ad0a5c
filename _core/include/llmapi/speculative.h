// Speculative decoding in the core: the n-gram proposer.
#pragma once

#include <cstdint>
#include <vector>

namespace llmapi {

// N-gram (prompt lookup) drafts, as TensorRT-LLM's and vLLM's n-gram proposers make them: for n from
// `max_ngram_size` down to 1, the most recent earlier occurrence of the last n tokens of `tokens`
// (the request's prompt and output); the up to `max_draft_len` tokens that followed it. Empty when no
// suffix occurs earlier.
std::vector<int32_t> propose_ngram(const std::vector<int32_t>& tokens, int32_t max_ngram_size,
                                   int32_t max_draft_len);

}  // namespace llmapi
