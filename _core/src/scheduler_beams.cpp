// Scheduler: beam groups: one beam-search step, the end of a search, and un-stalling beams.
#include <algorithm>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "llmapi/beam_search.h"
#include "llmapi/scheduler.h"

namespace llmapi {

void Scheduler::step_beams(SequenceGroup& group, const std::vector<std::pair<Request*, int32_t>>& rows,
                           const StepResult& result, std::vector<Response>& responses) {
  std::vector<Request*> beams = members(group);
  std::unordered_map<const Request*, int32_t> row_of(rows.begin(), rows.end());
  if (row_of.size() != beams.size()) {  // cannot happen: beams step together
    for (Response& x : finish_beams(group, "error", "a beam step lacked some beams")) {
      responses.push_back(std::move(x));
    }
    return;
  }
  std::vector<float> scores;
  std::vector<std::vector<std::pair<int32_t, float>>> candidates;
  for (const Request* b : beams) {
    const int32_t row = row_of.at(b);
    scores.push_back(b->beam_score);
    candidates.emplace_back();
    for (int32_t c = 0; c < result.num_candidates; ++c) {
      candidates.back().emplace_back(result.token(row, c), result.score(row, c));
    }
  }
  Request& first = *beams.front();
  const int32_t k = first.sampling.logprobs;
  const BeamStep step = beam_search_step(first, scores, candidates, first.num_output_tokens(),
                                         group.hypotheses, group.improvable);
  for (const BeamCandidate& x : step.finished) {
    const Request& parent = *beams[x.beam];
    BeamHypothesis h;
    h.score = x.score;
    h.finished = true;
    h.sum_logprobs = scores[x.beam] + result.score(row_of.at(&parent), x.column);
    h.token_ids = parent.output_token_ids();
    h.token_ids.push_back(x.token);
    h.logprobs = parent.logprobs;
    h.ranks = parent.ranks;
    h.top_ids = parent.top_ids;
    h.top_logprobs = parent.top_logprobs;
    if (k >= 0) append_logprobs(h, k, result, row_of.at(&parent), x.column);
    const auto& eos = first.stop.eos_token_ids;
    const auto& stops = first.stop.stop_token_ids;
    const bool stop_id = std::find(stops.begin(), stops.end(), x.token) != stops.end() ||
                         (!first.stop.ignore_eos && std::find(eos.begin(), eos.end(), x.token) != eos.end());
    h.stop_reason = stop_id ? x.token : -1;
    add_hypothesis(group.hypotheses, std::move(h));
  }
  const int32_t width = first.sampling.num_sequences;
  if (step.done || static_cast<int32_t>(step.running.size()) < width) {
    for (Response& x : finish_beams(group, "", "")) responses.push_back(std::move(x));
    return;
  }
  group.forked = true;
  while (static_cast<int32_t>(beams.size()) < width) {
    beams.push_back(fork(beams.front(), static_cast<int32_t>(beams.size())));
  }
  // New beam j continues running[j]'s parent: build every new state before freeing the old ones.
  // Cross blocks (encoder-decoder) are forked from the parent as well: after a preemption the beams
  // may hold copies of their own.
  struct State {
    std::vector<int32_t> token_ids, block_ids, cross_block_ids, ranks, top_ids;
    std::vector<float> logprobs, top_logprobs;
    int32_t num_computed, slot, num_state_tokens;
    bool cross_ready;
  };
  std::vector<State> next;
  for (const BeamCandidate& x : step.running) {
    Request& parent = *beams[x.beam];
    State s{parent.token_ids, blocks_.fork(parent.block_ids), blocks_.fork(parent.cross_block_ids),
            parent.ranks, parent.top_ids, parent.logprobs, parent.top_logprobs, parent.num_computed_tokens,
            parent.slot, parent.num_state_tokens, parent.cross_ready};
    s.token_ids.push_back(x.token);
    if (k >= 0) append_logprobs(s, k, result, row_of.at(&parent), x.column);
    next.push_back(std::move(s));
  }
  int32_t blocks_needed = 0;
  for (int32_t j = 0; j < width; ++j) {
    Request& b = *beams[j];
    State& s = next[j];
    blocks_.free(b.cross_block_ids);
    blocks_.free(b.block_ids);
    b.token_ids = std::move(s.token_ids);
    b.block_ids = std::move(s.block_ids);
    b.cross_block_ids = std::move(s.cross_block_ids);
    b.cross_ready = s.cross_ready;
    b.logprobs = std::move(s.logprobs);
    b.ranks = std::move(s.ranks);
    b.top_ids = std::move(s.top_ids);
    b.top_logprobs = std::move(s.top_logprobs);
    b.num_computed_tokens = s.num_computed;
    b.beam_score = step.running[j].score;
    if (b.slot >= 0) {
      b.slot_copy_from = s.slot != b.slot ? s.slot : -1;
      b.num_state_tokens = s.num_state_tokens;
    }
    blocks_needed += peak_blocks(config_, b.num_tokens());
  }
  // Beams share at most the prompt's full blocks (those not before the window); beyond that each
  // needs its own.
  const int32_t shared = std::max(0, first.num_prompt_tokens / config_.tokens_per_block -
                                         blocks_before_window(first.num_tokens() - 1));
  // Their cross blocks are shared too (the first beam's count: they all have the same encoder input).
  blocks_needed += cross_blocks(config_, first);
  if (blocks_needed - (width - 1) * shared > blocks_.num_blocks()) {
    for (Response& x : finish_beams(group, "error",
                                    "the beams of request " + std::to_string(group.user_id) +
                                        " need more KV blocks than the cache has")) {
      responses.push_back(std::move(x));
    }
  }
}

bool Scheduler::release_stalled_beams() {
  std::unordered_set<const SequenceGroup*> waiting_groups;
  for (const Request* r : waiting_) {
    if (r->is_beam() && r->group) waiting_groups.insert(r->group.get());
  }
  bool any = false;
  for (size_t k = running_.size(); k-- > 0;) {
    Request* r = running_[k];
    if (r->group && waiting_groups.count(r->group.get()) && !r->in_flight) {
      running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(k));
      preempt(r);
      any = true;
    }
  }
  return any;
}

std::vector<Response> Scheduler::finish_beams(SequenceGroup& group, const std::string& reason,
                                              const std::string& error) {
  std::vector<Request*> beams = members(group);
  if (beams.empty()) return {};
  const std::shared_ptr<SequenceGroup> alive = beams.front()->group;  // finish() drops the last hold
  Request& first = *beams.front();
  std::vector<Response> responses;
  if (reason.empty()) {
    // The best finished hypotheses; running beams fill any place none finished into.
    std::vector<BeamHypothesis> best;
    for (const BeamHypothesis& h : group.hypotheses) {
      if (h.finished) best.push_back(h);
    }
    for (const Request* b : beams) {
      if (static_cast<int32_t>(best.size()) >= first.sampling.num_returned) break;
      BeamHypothesis h;
      h.token_ids = b->output_token_ids();
      h.sum_logprobs = b->beam_score;
      h.logprobs = b->logprobs;
      h.ranks = b->ranks;
      h.top_ids = b->top_ids;
      h.top_logprobs = b->top_logprobs;
      best.push_back(std::move(h));
    }
    best.resize(std::min<size_t>(best.size(), first.sampling.num_returned));
    for (size_t i = 0; i < best.size(); ++i) {
      BeamHypothesis& h = best[i];
      Response x;
      x.request_id = group.user_id;
      x.seq_index = static_cast<int32_t>(i);
      x.token_ids = std::move(h.token_ids);
      x.finished = true;
      x.finish_reason = h.stop_reason >= 0 ? "stop" : "length";
      x.stop_reason = h.stop_reason;
      x.num_prompt_tokens = first.num_prompt_tokens;
      x.num_cached_tokens = first.num_cached_tokens;
      x.num_top_logprobs = first.sampling.logprobs;
      x.logprobs = std::move(h.logprobs);
      x.ranks = std::move(h.ranks);
      x.top_ids = std::move(h.top_ids);
      x.top_logprobs = std::move(h.top_logprobs);
      x.cumulative_logprob = h.sum_logprobs;
      responses.push_back(std::move(x));
    }
  }
  for (Request* b : beams) {
    b->in_flight = false;
    Response x = finish(b, reason.empty() ? "length" : reason, error, false);
    if (!reason.empty() && responses.empty()) {
      x.token_ids.clear();
      x.logprobs.clear();
      x.ranks.clear();
      x.top_ids.clear();
      x.top_logprobs.clear();
      x.seq_index = 0;
      responses.push_back(std::move(x));
    }
  }
  for (Response& x : responses) x.request_finished = false;
  responses.back().request_finished = true;
  return responses;
}

}  // namespace llmapi
