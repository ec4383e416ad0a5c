// Response: what the executor reports about one request after a step (streamed deltas).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace llmapi {

struct Request;

struct Response {
  uint64_t request_id = 0;         // the user's id
  int32_t seq_index = 0;           // which of the request's sequences (n / best_of / beams)
  std::vector<int32_t> token_ids;  // tokens generated since this sequence's previous response
  bool finished = false;           // this sequence is finished
  bool request_finished = false;   // every sequence of the request is finished
  std::string finish_reason;       // "" | "stop" | "length" | "abort" | "error"
  int32_t stop_reason = -1;        // the stop / eos token id, -1 if none
  std::string error;
  int32_t num_prompt_tokens = 0;
  int32_t num_cached_tokens = 0;   // prefix-cache hit at the first admission
  // When the request asked for logprobs (k >= 0): per token in token_ids its logprob and rank,
  // and the k most likely tokens ([tokens, k]).
  int32_t num_top_logprobs = -1;
  std::vector<float> logprobs;
  std::vector<int32_t> ranks;
  std::vector<int32_t> top_ids;
  std::vector<float> top_logprobs;
  double cumulative_logprob = 0.0;  // of every token of the sequence so far
  int64_t num_draft_tokens = 0;           // speculative decoding: drafts verified for the request so far ...
  int64_t num_accepted_draft_tokens = 0;  // ... and accepted

  // A response carrying `request`'s finish state (if any) and its output tokens from index
  // `first_output` on (with their logprobs).
  static Response of(const Request& request, int32_t first_output);
  // A response carrying `request`'s finish state and no tokens.
  static Response of(const Request& request);
};

// Responses as bytes (a flat little-endian layout, every field), for another process: rank 0 of a spawned job
// sends each step's responses to the user's process so, in one piece instead of a Python object per field.
std::string encode_responses(const std::vector<Response>& responses);
// The responses encode_responses wrote; std::invalid_argument if `data` is not such bytes (cut short, or longer).
std::vector<Response> decode_responses(const std::string& data);

}  // namespace llmapi
