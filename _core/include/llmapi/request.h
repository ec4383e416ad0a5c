// Request: one generation request's settings and its mutable scheduling state.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace llmapi {

enum class RequestStatus { kWaiting, kRunning, kFinished };
const char* to_string(RequestStatus status);

struct SamplingConfig {
  float temperature = 1.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // 1 = off
  int64_t seed = 0;          // uint63: keys the sampler's counter-based noise
};

struct StopConfig {
  int32_t max_tokens = 1;                // finish "length" after this many generated tokens
  int32_t min_tokens = 0;                // EOS / stop ids are suppressed and ignored before this many
  std::vector<int32_t> eos_token_ids;    // finish "stop" unless ignore_eos
  std::vector<int32_t> stop_token_ids;   // finish "stop", stop_reason = the id
  bool ignore_eos = false;
};

struct Request {
  // Validates the settings; throws RequestError naming the bad field.
  Request(uint64_t request_id, std::vector<int32_t> prompt_token_ids, StopConfig stop,
          SamplingConfig sampling);

  uint64_t request_id;
  // Prompt followed by generated tokens: one vector so KV positions index it directly.
  std::vector<int32_t> token_ids;
  int32_t num_prompt_tokens;
  StopConfig stop;
  SamplingConfig sampling;

  RequestStatus status = RequestStatus::kWaiting;
  int32_t num_computed_tokens = 0;   // tokens whose KV is in the cache
  std::vector<int32_t> block_ids;    // block table: block i holds positions [i*B, (i+1)*B)
  int32_t num_cached_tokens = 0;     // prefix-cache hit at the first admission
  int32_t num_preemptions = 0;
  bool in_flight = false;            // in a batch submitted and not collected: not schedulable
  bool abort_requested = false;      // abort arrived while in flight: settle it at collect

  std::string finish_reason;         // "" | "stop" | "length" | "abort" | "error"
  int32_t stop_reason = -1;          // the stop / eos token id that finished it
  std::string error;

  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  int32_t num_output_tokens() const { return num_tokens() - num_prompt_tokens; }
  std::vector<int32_t> prompt_token_ids() const;
  std::vector<int32_t> output_token_ids() const;
};

}  // namespace llmapi
