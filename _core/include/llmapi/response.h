// Response: what the executor reports about one request after a step (streamed deltas).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace llmapi {

struct Request;

struct Response {
  uint64_t request_id = 0;
  std::vector<int32_t> token_ids;  // tokens generated since this request's previous response
  bool finished = false;
  std::string finish_reason;       // "" | "stop" | "length" | "abort" | "error"
  int32_t stop_reason = -1;        // the stop / eos token id, -1 if none
  std::string error;
  int32_t num_prompt_tokens = 0;
  int32_t num_cached_tokens = 0;   // prefix-cache hit at the first admission

  // A response carrying `request`'s finish state (if any) and `new_tokens`.
  static Response of(const Request& request, std::vector<int32_t> new_tokens);
};

}  // namespace llmapi
