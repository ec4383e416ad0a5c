// Scheduler: settling a step (tokens, forks of samples, stop rules) and finishing requests.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "llmapi/scheduler.h"
#include "llmapi/stop_rules.h"

namespace llmapi {

std::vector<Response> Scheduler::update(const SchedulerOutput& output, const StepResult& result) {
  if (static_cast<size_t>(result.num_rows) != output.scheduled.size()) {
    throw std::invalid_argument("got " + std::to_string(result.num_rows) + " result rows for " +
                                std::to_string(output.scheduled.size()) + " scheduled requests");
  }
  ++num_steps_;
  std::unordered_map<int32_t, std::string> row_errors(result.row_errors.begin(),
                                                      result.row_errors.end());
  std::vector<Response> responses;
  std::vector<std::shared_ptr<SequenceGroup>> beam_groups;  // in order of their first row
  std::unordered_map<const SequenceGroup*, std::vector<std::pair<Request*, int32_t>>> beam_rows;
  for (size_t i = 0; i < output.scheduled.size(); ++i) {
    const ScheduledRequest& s = output.scheduled[i];
    const int32_t row = static_cast<int32_t>(i);
    Request* r = settle_row(s);
    if (r == nullptr) continue;  // settled already (finish_all, a beam abort, finished ahead)
    if (r->abort_requested) {
      for (Response& x : finish_any(r, "abort", "")) responses.push_back(std::move(x));
      continue;
    }
    // A failure that belongs to this row's request fails that request alone (its beam group with
    // it); the step's other rows are settled as usual.
    std::string error;
    auto e = row_errors.find(row);
    if (e != row_errors.end()) error = e->second;
    if (error.empty() && s.do_sample) error = check_candidates(result, row);
    const uint64_t id = r->request_id;
    if (error.empty()) {
      try {
        if (s.num_draft_tokens > 0) {  // a verified speculative step: one or more tokens
          settle_drafts(r, s, result, row, responses);
          continue;
        }
        r->num_computed_tokens = s.num_computed_tokens + s.num_new_tokens;
        if (s.num_encoder_tokens > 0) r->cross_ready = true;
        sync_drafter(r);
        blocks_.cache_full_blocks(r->block_ids, r->token_ids, r->num_computed_tokens,
                                  BlockManager::root_hash(r->cache_salt));
        release_out_of_window(r);  // no later step (nor one in flight) reads before its window
        if (!s.do_sample) continue;  // a prefill chunk before the last: nothing to report
        if (r->is_beam()) {
          auto& rows = beam_rows[r->group.get()];
          if (rows.empty()) beam_groups.push_back(r->group);
          rows.emplace_back(r, row);
        } else if (r->forks()) {
          fork_samples(r, result, row, responses);
        } else {
          append_candidate(r, result, row, 0);
          responses.push_back(settle(r));
        }
        continue;
      } catch (const std::exception& x) {
        error = std::string("internal executor error: ") + x.what();
      }
    }
    if (Request* again = get(id)) {
      for (Response& x : finish_any(again, "error", error)) responses.push_back(std::move(x));
    }
  }
  for (const auto& group : beam_groups) {
    if (!groups_.count(group->user_id)) continue;  // failed or aborted above
    try {
      step_beams(*group, beam_rows[group.get()], result, responses);
    } catch (const std::exception& x) {
      if (!groups_.count(group->user_id)) continue;
      for (Response& r : finish_beams(*group, "error", std::string("internal executor error: ") + x.what())) {
        responses.push_back(std::move(r));
      }
    }
  }
  return responses;
}

std::string Scheduler::check_candidates(const StepResult& result, int32_t row) const {
  if (config_.vocab_size <= 0) return {};
  for (int32_t c = 0; c < result.num_candidates; ++c) {
    const int32_t token = result.token(row, c);
    if (token >= config_.vocab_size) {
      return "the runner sampled token id " + std::to_string(token) +
             ", outside the vocabulary (vocab_size=" + std::to_string(config_.vocab_size) + ")";
    }
  }
  return {};
}

void Scheduler::append_candidate(Request* r, const StepResult& result, int32_t row, int32_t column) {
  const int32_t token = result.token(row, column);
  r->token_ids.push_back(token);
  if (result.logprobs.empty()) return;
  const float logprob = result.logprobs[static_cast<size_t>(row) * result.num_candidates + column];
  r->cumulative_logprob += logprob;
  if (r->sampling.logprobs >= 0) append_logprobs(*r, r->sampling.logprobs, result, row, column);
}

Response Scheduler::settle(Request* r) {
  const int32_t first = r->num_output_tokens() - 1;
  if (r->token_ids.back() < 0) {
    r->token_ids.pop_back();
    return finish(r, "error", "the runner sampled token id -1", false);
  }
  if (apply_stop_rules(*r, config_.max_seq_len)) return finish(r, r->finish_reason, "", true);
  const int32_t needed = blocks_to_hold(r);
  if (needed > blocks_.num_blocks()) {
    // Its next step needs more blocks than exist: fail now rather than preempt forever.
    return finish(r, "error",
                  "request " + std::to_string(r->user_id) + " needs " + std::to_string(needed) +
                      " KV blocks; the cache has " + std::to_string(blocks_.num_blocks()),
                  true);
  }
  Response response = Response::of(*r, first);
  response.request_finished = false;
  return response;
}

Request* Scheduler::fork(Request* parent, int32_t seq_index) {
  auto child = std::make_unique<Request>(*parent);
  child->request_id = next_fork_id_++;
  child->seq_index = seq_index;
  child->serial = next_serial_++;
  child->in_flight = false;
  child->ahead = false;
  child->abort_requested = false;
  child->block_ids = blocks_.fork(parent->block_ids);
  child->cross_block_ids = blocks_.fork(parent->cross_block_ids);  // shared, never written again
  child->slot = -1;
  if (parent->slot >= 0) {
    child->slot = take_slot();
    child->slot_copy_from = parent->slot;
    child->num_state_tokens = parent->num_state_tokens;
  }
  Request* raw = child.get();
  parent->group->members.push_back(raw->request_id);
  // Right after its parent's other sequences: preemption goes by admission order.
  auto at = std::find(running_.begin(), running_.end(), parent);
  while (at != running_.end() && (*at)->group == parent->group) ++at;
  running_.insert(at, raw);
  requests_.emplace(raw->request_id, std::move(child));
  return raw;
}

void Scheduler::fork_samples(Request* r, const StepResult& result, int32_t row,
                             std::vector<Response>& responses) {
  const int32_t n = r->sampling.num_sequences;
  r->group->forked = true;
  std::vector<Request*> seqs{r};
  for (int32_t c = 1; c < n; ++c) seqs.push_back(fork(r, c));
  for (int32_t c = 0; c < n; ++c) {
    append_candidate(seqs[c], result, row, std::min(c, result.num_candidates - 1));
  }
  for (Request* seq : seqs) responses.push_back(settle(seq));
}

std::vector<Response> Scheduler::fail(const SchedulerOutput& output, const std::string& error) {
  ++num_steps_;
  std::vector<Response> responses;
  for (const ScheduledRequest& s : output.scheduled) {
    Request* r = settle_row(s);
    if (r == nullptr) continue;
    const bool aborted = r->abort_requested;
    for (Response& x : finish_any(r, aborted ? "abort" : "error", aborted ? "" : error)) {
      responses.push_back(std::move(x));
    }
  }
  return responses;
}

std::vector<Response> Scheduler::abort(uint64_t request_id, int32_t seq_index) {
  std::vector<Request*> targets;
  auto g = groups_.find(request_id);
  if (g != groups_.end()) {
    for (Request* m : members(*g->second)) {
      if (seq_index < 0 || m->seq_index == seq_index) targets.push_back(m);
    }
    // A beam is only ever aborted with its group.
    if (!targets.empty() && targets.front()->is_beam() && seq_index >= 0) return {};
  } else if (Request* r = get(request_id)) {
    targets.push_back(r);
  }
  std::vector<Response> responses;
  const bool any_in_flight = std::any_of(targets.begin(), targets.end(),
                                         [](const Request* r) { return r->in_flight; });
  for (Request* r : targets) {
    // What is in flight may still be written by the runner: free it at collect. A beam group
    // with a member in flight waits for it as a whole.
    if (r->in_flight || (r->is_beam() && any_in_flight)) {
      r->abort_requested = true;
      continue;
    }
    if (get(r->request_id) != r) continue;  // gone with its beam group
    for (Response& x : finish_any(r, "abort", "")) responses.push_back(std::move(x));
  }
  return responses;
}

std::vector<Response> Scheduler::finish_all(const std::string& finish_reason,
                                            const std::string& error) {
  // Emptied first so that finishing N requests costs O(N), not O(N^2) unlinking.
  std::vector<Request*> all;
  all.swap(running_);
  all.insert(all.end(), waiting_.begin(), waiting_.end());
  waiting_.clear();
  std::vector<uint64_t> ids;
  for (Request* r : all) ids.push_back(r->request_id);
  // Nothing in flight is collected after this: what waited for a step goes now.
  for (auto& [serial, blocks] : dropped_blocks_) blocks_.free(blocks);
  dropped_blocks_.clear();
  std::vector<Response> responses;
  for (uint64_t id : ids) {
    Request* r = get(id);
    if (r == nullptr) continue;  // finished with its beam group
    r->in_flight = false;
    r->ahead = false;
    for (Response& x : finish_any(r, finish_reason, error)) responses.push_back(std::move(x));
  }
  return responses;
}

std::vector<Response> Scheduler::finish_any(Request* r, const std::string& reason,
                                            const std::string& error) {
  if (r->is_beam() && r->group) return finish_beams(*r->group, reason, error);
  return {finish(r, reason, error, false)};
}

Response Scheduler::finish(Request* r, const std::string& reason, const std::string& error,
                           bool last_token) {
  return finish_at(r, reason, error, r->num_output_tokens() - (last_token ? 1 : 0));
}

Response Scheduler::finish_at(Request* r, const std::string& reason, const std::string& error,
                              int32_t first_output) {
  // Unlink from the one queue that holds it (a stop rule may have marked it finished already:
  // it was running then). Aborting a waiting request is the only O(waiting) case.
  if (r->status == RequestStatus::kWaiting) {
    waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), r), waiting_.end());
  } else {
    running_.erase(std::remove(running_.begin(), running_.end(), r), running_.end());
  }
  r->status = RequestStatus::kFinished;
  r->finish_reason = reason;
  r->error = error;
  Response response = Response::of(*r, first_output);
  if (r->group) {
    auto& m = r->group->members;
    m.erase(std::remove(m.begin(), m.end(), r->request_id), m.end());
    response.request_finished = m.empty();
    if (m.empty()) groups_.erase(r->group->user_id);
  }
  const uint64_t id = r->request_id;  // erase() below destroys r
  if (r->in_flight) {
    // Only a request that ran ahead finishes in flight: that step still writes its KV. Its cross
    // blocks go last in the list, so they are freed first (free() releases it in reverse).
    std::vector<int32_t>& dropped = dropped_blocks_[r->serial];
    dropped = std::move(r->block_ids);
    dropped.insert(dropped.end(), r->cross_block_ids.begin(), r->cross_block_ids.end());
    r->block_ids.clear();
    r->cross_block_ids.clear();
  } else {
    blocks_.free(r->cross_block_ids);  // first: never cached, so reused before the decoder's blocks
    blocks_.free(r->block_ids);
  }
  release_slot(r);
  requests_.erase(id);
  return response;
}

}  // namespace llmapi
