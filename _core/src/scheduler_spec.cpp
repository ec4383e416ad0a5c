// Scheduler: speculative decoding (draft tokens in a decode step, their verification settled).
#include <algorithm>
#include <string>

#include "llmapi/scheduler.h"
#include "llmapi/speculative.h"
#include "llmapi/stop_rules.h"

namespace llmapi {

std::vector<int32_t> propose_ngram(const std::vector<int32_t>& tokens, int32_t max_ngram_size,
                                   int32_t max_draft_len) {
  const int64_t len = static_cast<int64_t>(tokens.size());
  if (max_draft_len <= 0) return {};
  for (int64_t n = std::min<int64_t>(max_ngram_size, len - 1); n >= 1; --n) {
    const int32_t* suffix = tokens.data() + (len - n);
    // Latest start first; a match must end before the suffix starts, or at least one token earlier
    // than the end, so that something follows it (it may overlap the suffix).
    for (int64_t start = len - n - 1; start >= 0; --start) {
      if (!std::equal(suffix, suffix + n, tokens.data() + start)) continue;
      const int64_t from = start + n;
      const int64_t to = std::min(len, from + max_draft_len);
      return {tokens.begin() + from, tokens.begin() + to};
    }
  }
  return {};
}

bool Scheduler::runner_drafts() const {
  const auto mode = static_cast<SpeculativeMode>(config_.speculative_mode);
  return mode == SpeculativeMode::kDraftModel || mode == SpeculativeMode::kEagle;
}

void Scheduler::sync_drafter(Request* r) const {
  const auto mode = static_cast<SpeculativeMode>(config_.speculative_mode);
  if (mode == SpeculativeMode::kDraftModel) {
    r->num_draft_computed = r->num_computed_tokens;
  } else if (mode == SpeculativeMode::kEagle) {
    r->num_draft_computed = std::max(0, r->num_computed_tokens - 1);
  }
}

bool Scheduler::spec_eligible(const Request* r) const {
  if (config_.speculative_mode == static_cast<int32_t>(SpeculativeMode::kNone)) return false;
  // Each verified position must be sampled as a plain decode step would sample it, from settings
  // that do not change within the step: no forks or beams, no penalties or token history (Python
  // logits processors, grammars), no per-token logits outputs, no bad words longer than a token.
  // A prompt table's virtual tokens (ids past the vocabulary) are no drafter's input.
  const SamplingConfig& s = r->sampling;
  // Nor do encoder-decoder requests, a no-repeat n-gram rule (its bans change with each token) or a
  // forced EOS / BOS (it binds one position).
  if (r->group != nullptr || r->is_beam() || s.needs_state() || s.generation_logits ||
      r->prompt_table_size > 0 || r->is_encoder_decoder() || s.no_repeat_ngram_size > 0 ||
      r->stop.forced_eos_token_id >= 0 || r->stop.forced_bos_token_id >= 0) {
    return false;
  }
  return std::none_of(s.bad_words.begin(), s.bad_words.end(),
                      [](const std::vector<int32_t>& word) { return word.size() > 1; });
}

int32_t Scheduler::plan_drafts(Request* r, int32_t room) {
  r->draft_token_ids.clear();
  // Decode steps only, and none while min_tokens still suppresses EOS and stop ids (that changes
  // from one position to the next).
  if (r->num_computed_tokens < r->num_prompt_tokens || r->num_output_tokens() < r->stop.min_tokens) {
    return 0;
  }
  // The step's tokens (accepted drafts and one more) must not run past max_tokens or max_seq_len.
  int32_t k = std::min({config_.max_draft_len, room, r->stop.max_tokens - r->num_output_tokens() - 1,
                        config_.max_seq_len - r->num_tokens() - 1});
  if (k <= 0) return 0;
  if (config_.speculative_mode == static_cast<int32_t>(SpeculativeMode::kNgram)) {
    r->draft_token_ids = propose_ngram(r->token_ids, config_.max_matching_ngram_size, k);
    k = static_cast<int32_t>(r->draft_token_ids.size());
  }
  // Drafts never preempt anyone: without free blocks for them the step decodes one token.
  const int32_t need = blocks_.blocks_for(r->num_computed_tokens + 1 + k) -
                       static_cast<int32_t>(r->block_ids.size());
  if (need > 0 && need > blocks_.num_free_blocks()) {
    r->draft_token_ids.clear();
    return 0;
  }
  return k;
}

void Scheduler::settle_drafts(Request* r, const ScheduledRequest& s, const StepResult& result, int32_t row,
                              std::vector<Response>& responses) {
  const int32_t drafts = s.num_draft_tokens;
  // The row's tokens: the accepted drafts, then the target's own token (a correction or the bonus).
  int32_t count = 0;
  while (count < std::min(drafts + 1, result.num_candidates) && result.token(row, count) >= 0) ++count;
  if (count == 0) {
    responses.push_back(finish(r, "error", "the runner sampled token id -1", false));
    return;
  }
  const int32_t accepted = count - 1;
  r->num_draft_tokens += drafts;
  r->num_accepted_draft_tokens += accepted;
  num_draft_tokens_ += drafts;
  num_accepted_draft_tokens_ += accepted;
  const int32_t c = s.num_computed_tokens;  // the position of the last known token
  // KV is right for that token and the accepted drafts; the rejected drafts' slots are dropped.
  r->num_computed_tokens = c + 1 + accepted;
  sync_drafter(r);
  const int32_t first = r->num_output_tokens();
  bool stopped = false;
  for (int32_t column = 0; column < count && !stopped; ++column) {
    append_candidate(r, result, row, column);
    stopped = apply_stop_rules(*r, config_.max_seq_len);
  }
  blocks_.cache_full_blocks(r->block_ids, r->token_ids, r->num_computed_tokens,
                            BlockManager::root_hash(r->cache_salt));
  if (stopped) {
    responses.push_back(finish_at(r, r->finish_reason, "", first));
    return;
  }
  blocks_.truncate(r->block_ids, r->num_tokens());
  const int32_t needed = blocks_to_hold(r);
  if (needed > blocks_.num_blocks()) {
    responses.push_back(finish_at(r, "error",
                                  "request " + std::to_string(r->user_id) + " needs " + std::to_string(needed) +
                                      " KV blocks; the cache has " + std::to_string(blocks_.num_blocks()),
                                  first));
    return;
  }
  Response response = Response::of(*r, first);
  response.request_finished = false;
  responses.push_back(std::move(response));
}

}  // namespace llmapi
