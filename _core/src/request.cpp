// Request construction (validation) and Response building.
#include "llmapi/request.h"

#include <cmath>

#include "llmapi/errors.h"
#include "llmapi/response.h"

namespace llmapi {

namespace {

void require(bool ok, const std::string& field, const std::string& value, const char* must) {
  if (!ok) throw RequestError(field + "=" + value + " is invalid: " + must);
}

void require_token_ids(const std::vector<int32_t>& ids, const char* field) {
  for (int32_t id : ids) require(id >= 0, field, "[... " + std::to_string(id) + " ...]",
                                 "token ids must be >= 0");
}

}  // namespace

const char* to_string(RequestStatus status) {
  switch (status) {
    case RequestStatus::kWaiting: return "waiting";
    case RequestStatus::kRunning: return "running";
    case RequestStatus::kFinished: return "finished";
  }
  return "?";
}

Request::Request(uint64_t id, std::vector<int32_t> prompt, StopConfig stop_config,
                 SamplingConfig sampling_config)
    : request_id(id),
      token_ids(std::move(prompt)),
      num_prompt_tokens(static_cast<int32_t>(token_ids.size())),
      stop(std::move(stop_config)),
      sampling(sampling_config) {
  if (token_ids.empty()) throw RequestError("the prompt is empty (no token ids)");
  require_token_ids(token_ids, "prompt_token_ids");
  require_token_ids(stop.eos_token_ids, "eos_token_ids");
  require_token_ids(stop.stop_token_ids, "stop_token_ids");
  require(stop.max_tokens >= 1, "max_tokens", std::to_string(stop.max_tokens), "must be >= 1");
  require(stop.min_tokens >= 0 && stop.min_tokens <= stop.max_tokens, "min_tokens",
          std::to_string(stop.min_tokens), "must be in [0, max_tokens]");
  require(std::isfinite(sampling.temperature) && sampling.temperature >= 0, "temperature",
          std::to_string(sampling.temperature), "must be a finite number >= 0");
  require(sampling.top_k >= 0, "top_k", std::to_string(sampling.top_k), "must be >= 0");
  require(sampling.top_p > 0 && sampling.top_p <= 1, "top_p", std::to_string(sampling.top_p),
          "must be in (0, 1]");
  require(sampling.seed >= 0, "seed", std::to_string(sampling.seed), "must be in [0, 2**63)");
}

std::vector<int32_t> Request::prompt_token_ids() const {
  return {token_ids.begin(), token_ids.begin() + num_prompt_tokens};
}

std::vector<int32_t> Request::output_token_ids() const {
  return {token_ids.begin() + num_prompt_tokens, token_ids.end()};
}

Response Response::of(const Request& request, std::vector<int32_t> new_tokens) {
  Response r;
  r.request_id = request.request_id;
  r.token_ids = std::move(new_tokens);
  r.finished = request.status == RequestStatus::kFinished;
  r.finish_reason = request.finish_reason;
  r.stop_reason = request.stop_reason;
  r.error = request.error;
  r.num_prompt_tokens = request.num_prompt_tokens;
  r.num_cached_tokens = request.num_cached_tokens;
  return r;
}

}  // namespace llmapi
