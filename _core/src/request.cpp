// Request construction (validation) and Response building.
#include "llmapi/request.h"

#include <cmath>

#include "llmapi/block_manager.h"
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
      user_id(id),
      token_ids(std::move(prompt)),
      num_prompt_tokens(static_cast<int32_t>(token_ids.size())),
      stop(std::move(stop_config)),
      sampling(std::move(sampling_config)) {
  require(id < kForkedIdBit, "request_id", std::to_string(id), "must be < 2**63");
  if (token_ids.empty()) throw RequestError("the prompt is empty (no token ids)");
  require_token_ids(token_ids, "prompt_token_ids");
  require_token_ids(stop.eos_token_ids, "eos_token_ids");
  require_token_ids(stop.stop_token_ids, "stop_token_ids");
  require(stop.max_tokens >= 1, "max_tokens", std::to_string(stop.max_tokens), "must be >= 1");
  require(stop.min_tokens >= 0 && stop.min_tokens <= stop.max_tokens, "min_tokens",
          std::to_string(stop.min_tokens), "must be in [0, max_tokens]");
  require(stop.forced_eos_token_id >= -1, "forced_eos_token_id", std::to_string(stop.forced_eos_token_id),
          "must be -1 (off) or a token id >= 0");
  require(stop.forced_bos_token_id >= -1, "forced_bos_token_id", std::to_string(stop.forced_bos_token_id),
          "must be -1 (off) or a token id >= 0");
  const SamplingConfig& s = sampling;
  require(std::isfinite(s.temperature) && s.temperature >= 0, "temperature",
          std::to_string(s.temperature), "must be a finite number >= 0");
  require(s.top_k >= 0, "top_k", std::to_string(s.top_k), "must be >= 0");
  require(s.top_p > 0 && s.top_p <= 1, "top_p", std::to_string(s.top_p), "must be in (0, 1]");
  require(s.min_p >= 0 && s.min_p <= 1, "min_p", std::to_string(s.min_p), "must be in [0, 1]");
  require(s.seed >= 0, "seed", std::to_string(s.seed), "must be in [0, 2**63)");
  require(std::isfinite(s.repetition_penalty) && s.repetition_penalty > 0, "repetition_penalty",
          std::to_string(s.repetition_penalty), "must be a finite number > 0");
  require(std::isfinite(s.presence_penalty), "presence_penalty", std::to_string(s.presence_penalty),
          "must be finite");
  require(std::isfinite(s.frequency_penalty), "frequency_penalty",
          std::to_string(s.frequency_penalty), "must be finite");
  for (const auto& word : s.bad_words) {
    require(!word.empty(), "bad_words", "[[]]", "a bad word needs at least one token");
    require_token_ids(word, "bad_words");
  }
  require_token_ids(s.logit_bias_ids, "logit_bias");
  require(s.logit_bias_ids.size() == s.logit_bias_values.size(), "logit_bias",
          std::to_string(s.logit_bias_values.size()) + " values", "needs one value per token id");
  for (float v : s.logit_bias_values) {
    require(std::isfinite(v), "logit_bias", std::to_string(v), "values must be finite");
  }
  require(s.num_sequences >= 1, "num_sequences", std::to_string(s.num_sequences), "must be >= 1");
  require(s.num_returned >= 1 && s.num_returned <= s.num_sequences, "num_returned",
          std::to_string(s.num_returned), "must be in [1, num_sequences]");
  require(std::isfinite(s.length_penalty), "length_penalty", std::to_string(s.length_penalty),
          "must be finite");
  require(s.logprobs >= -1, "logprobs", std::to_string(s.logprobs), "must be >= -1");
  require(s.prompt_logprobs >= -1, "prompt_logprobs", std::to_string(s.prompt_logprobs),
          "must be >= -1");
  require(s.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", std::to_string(s.no_repeat_ngram_size),
          "must be >= 0 (0: off)");
  if (sampling.beam_search && sampling.num_sequences == 1) {
    // A beam of width 1 is greedy search (transformers runs num_beams=1 as greedy decoding).
    sampling.beam_search = false;
    sampling.temperature = 0.0f;
  }
}

void Request::set_encoder_input(std::vector<int32_t> ids) {
  require_token_ids(ids, "encoder_token_ids");
  encoder_token_ids = std::move(ids);
  if (!encoder_token_ids.empty()) cache_salt = encoder_cache_salt(cache_salt, encoder_token_ids);
}

uint64_t encoder_cache_salt(uint64_t cache_salt, const std::vector<int32_t>& encoder_ids) {
  // The encoder ids chained from a root of the salt's own, as a block of tokens is hashed; a tag keeps
  // it apart from the salt's decoder root (BlockManager::root_hash).
  constexpr uint64_t kEncoderTag = 0x656e636f646572ULL;  // "encoder"
  const uint64_t h = BlockManager::hash_block_tokens(BlockManager::root_hash(cache_salt) ^ kEncoderTag,
                                                     encoder_ids.data(),
                                                     static_cast<int32_t>(encoder_ids.size()));
  return h == 0 ? kEncoderTag : h;
}

bool Request::forks() const { return group != nullptr && !group->forked; }

std::vector<int32_t> Request::prompt_token_ids() const {
  return {token_ids.begin(), token_ids.begin() + num_prompt_tokens};
}

std::vector<int32_t> Request::output_token_ids() const {
  return {token_ids.begin() + num_prompt_tokens, token_ids.end()};
}

Response Response::of(const Request& request) { return of(request, request.num_output_tokens()); }

Response Response::of(const Request& request, int32_t first_output) {
  Response r;
  r.request_id = request.user_id;
  r.seq_index = request.seq_index;
  const auto begin = request.token_ids.begin() + request.num_prompt_tokens + first_output;
  r.token_ids.assign(begin, request.token_ids.end());
  r.finished = request.status == RequestStatus::kFinished;
  r.request_finished = r.finished;  // the scheduler clears it while other sequences run
  r.finish_reason = request.finish_reason;
  r.stop_reason = request.stop_reason;
  r.error = request.error;
  r.num_prompt_tokens = request.num_prompt_tokens;
  r.num_cached_tokens = request.num_cached_tokens;
  r.cumulative_logprob = request.cumulative_logprob;
  r.num_draft_tokens = request.num_draft_tokens;
  r.num_accepted_draft_tokens = request.num_accepted_draft_tokens;
  const int32_t k = request.sampling.logprobs;
  r.num_top_logprobs = k;
  if (k >= 0 && static_cast<size_t>(first_output) <= request.logprobs.size()) {
    const size_t f = static_cast<size_t>(first_output);
    r.logprobs.assign(request.logprobs.begin() + f, request.logprobs.end());
    r.ranks.assign(request.ranks.begin() + f, request.ranks.end());
    r.top_ids.assign(request.top_ids.begin() + f * k, request.top_ids.end());
    r.top_logprobs.assign(request.top_logprobs.begin() + f * k, request.top_logprobs.end());
  }
  return r;
}

}  // namespace llmapi
