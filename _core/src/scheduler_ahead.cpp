// Scheduler: async scheduling, where a request in the step in flight runs one token ahead.
#include <algorithm>

#include "llmapi/scheduler.h"

namespace llmapi {

bool Scheduler::can_run_ahead(const Request* r) const {
  if (!config_.async_scheduling || !r->in_flight || r->ahead || !r->inflight_samples ||
      r->abort_requested || r->status != RequestStatus::kRunning) {
    return false;
  }
  // Its step in flight gives it exactly one token, and the next step needs nothing from the host
  // but that token: no forks or beams, no per-token outputs, no state row, no history-dependent
  // bad words (see make_batch and the runner's decode path).
  const SamplingConfig& s = r->sampling;
  // Nor a no-repeat n-gram rule (its bans need the pending token). An encoder-decoder request does
  // run ahead, also of its encoder step: its cross blocks are fixed from admission, and the step ahead
  // reads their K/V after the step in flight wrote them (one stream order on every rank).
  if (r->group != nullptr || r->is_beam() || s.logprobs >= 0 || s.needs_prompt_logits() ||
      s.generation_logits || s.needs_state() || s.no_repeat_ngram_size > 0) {
    return false;
  }
  // A request that may speculate waits for its step's accepted count instead (scheduler.h).
  if (spec_eligible(r)) return false;
  if (std::any_of(s.bad_words.begin(), s.bad_words.end(),
                  [](const std::vector<int32_t>& word) { return word.size() > 1; })) {
    return false;
  }
  // The pending token must leave it running (apply_stop_rules' length limits), and its next step
  // must fit the cache (settle() fails it otherwise).
  const int32_t pending_tokens = r->num_tokens() + 1;
  return r->num_output_tokens() + 1 < r->stop.max_tokens && pending_tokens < config_.max_seq_len &&
         peak_blocks(config_, pending_tokens) <= blocks_.num_blocks();
}

void Scheduler::schedule_ahead(SchedulerOutput& out, Request* r) {
  const int32_t position = r->num_tokens();  // of the token its step in flight samples
  // Never preempts: a request short of a block waits for its step to be collected instead.
  if (!blocks_.allocate_for_write(r->block_ids, position, position + 1, out.block_copies)) return;
  ScheduledRequest s;
  s.request_id = r->request_id;
  s.serial = r->serial;
  s.num_computed_tokens = position;
  s.num_new_tokens = 1;
  s.do_sample = true;
  s.input_row = r->inflight_row;
  r->ahead = true;
  r->inflight_row = static_cast<int32_t>(out.scheduled.size());
  out.scheduled.push_back(s);
}

Request* Scheduler::settle_row(const ScheduledRequest& row) {
  Request* r = get(row.request_id);
  if (r == nullptr || r->serial != row.serial || !r->in_flight) {
    auto dropped = dropped_blocks_.find(row.serial);
    if (dropped != dropped_blocks_.end()) {
      blocks_.free(dropped->second);
      dropped_blocks_.erase(dropped);
    }
    return nullptr;
  }
  // Steps are collected in order: with a step ahead in flight, this row is of the earlier one.
  if (r->ahead) {
    r->ahead = false;
  } else {
    r->in_flight = false;
  }
  return r;
}

}  // namespace llmapi
