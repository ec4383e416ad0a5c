// Scheduler: token-budget scheduling with chunked prefill, prefix reuse, preemption by recompute,
// and the lock-step of beam groups.
#include "llmapi/scheduler.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <unordered_set>

#include "llmapi/errors.h"

namespace llmapi {

namespace {

const ExecutorConfig& validated(const ExecutorConfig& config) {
  config.validate();
  return config;
}

// RequestError unless every id of `ids` is below the vocabulary size (when it is known).
void require_in_vocab(const std::vector<int32_t>& ids, int32_t vocab_size, const char* field) {
  if (vocab_size <= 0) return;
  for (int32_t id : ids) {
    if (id >= vocab_size) {
      throw RequestError(std::string(field) + " holds token id " + std::to_string(id) +
                         ", outside the vocabulary (vocab_size=" + std::to_string(vocab_size) + ")");
    }
  }
}

}  // namespace

Scheduler::Scheduler(const ExecutorConfig& config)
    : config_(validated(config)),
      blocks_(config.num_blocks, config.tokens_per_block, config.enable_prefix_caching) {}

void Scheduler::check_request(const ExecutorConfig& config, const Request& request) {
  const int32_t n = request.num_prompt_tokens;
  if (n > config.max_seq_len) {
    throw RequestError("the prompt has " + std::to_string(n) + " tokens, more than max_seq_len=" +
                       std::to_string(config.max_seq_len));
  }
  const int32_t e = request.num_encoder_tokens();
  if (e > 0) {
    if (config.max_encoder_input_len > 0 && e > config.max_encoder_input_len) {
      throw RequestError("the encoder input has " + std::to_string(e) +
                         " tokens, more than max_encoder_input_len=" +
                         std::to_string(config.max_encoder_input_len));
    }
    if (e > config.max_num_tokens - 1) {
      throw RequestError("the encoder input has " + std::to_string(e) +
                         " tokens, more than max_num_tokens - 1 = " + std::to_string(config.max_num_tokens - 1) +
                         " (max_num_tokens=" + std::to_string(config.max_num_tokens) +
                         "): the encoder runs unchunked in one step with at least one decoder token");
    }
    if (config.sliding_window > 0) {
      throw RequestError("an encoder-decoder request (encoder_token_ids) cannot run with sliding_window=" +
                         std::to_string(config.sliding_window));
    }
  }
  const int32_t cross = cross_blocks(config, request);
  const int32_t blocks = peak_blocks(config, n) + cross;
  if (blocks > config.num_blocks) {
    throw RequestError(std::string(cross > 0 ? "the prompt and its encoder input need " : "the prompt needs ") +
                       std::to_string(blocks) + " KV blocks of " + std::to_string(config.tokens_per_block) +
                       " tokens" + (cross > 0 ? " (" + std::to_string(cross) + " for cross-attention)" : "") +
                       "; the cache has " + std::to_string(config.num_blocks));
  }
  if (request.sampling.num_sequences > config.max_batch_size) {
    throw RequestError("num_sequences=" + std::to_string(request.sampling.num_sequences) +
                       " is invalid: a request's sequences must fit max_batch_size=" +
                       std::to_string(config.max_batch_size));
  }
  if (request.sampling.beam_search && request.sampling.num_sequences > config.max_num_tokens) {
    throw RequestError("num_sequences=" + std::to_string(request.sampling.num_sequences) +
                       " is invalid: the beams step together, so the beam width must fit "
                       "max_num_tokens=" + std::to_string(config.max_num_tokens));
  }
  // Out-of-vocabulary ids would fail the step's masks or embedding lookup for every request in it.
  const int32_t vocab = config.vocab_size;
  // A prompt-tuned request's prompt may hold ids past the vocabulary: rows of its prompt table.
  require_in_vocab(request.token_ids, vocab > 0 ? vocab + request.prompt_table_size : vocab,
                   "prompt_token_ids");
  require_in_vocab(request.stop.eos_token_ids, vocab, "eos_token_ids (end_id)");
  require_in_vocab(request.stop.stop_token_ids, vocab, "stop_token_ids");
  for (const auto& word : request.sampling.bad_words) require_in_vocab(word, vocab, "bad_words");
  require_in_vocab(request.sampling.logit_bias_ids, vocab, "logit_bias");
  if (request.stop.forced_eos_token_id >= 0) {
    require_in_vocab({request.stop.forced_eos_token_id}, vocab, "forced_eos_token_id");
  }
  if (request.stop.forced_bos_token_id >= 0) {
    require_in_vocab({request.stop.forced_bos_token_id}, vocab, "forced_bos_token_id");
  }
  // Encoder ids are not checked against vocab_size: the source vocabulary may differ (FSMT).
}

int32_t Scheduler::cross_blocks(const ExecutorConfig& config, const Request& request) {
  const int32_t B = config.tokens_per_block;
  return (request.num_encoder_tokens() + B - 1) / B;
}

int32_t Scheduler::blocks_to_hold(const Request* r) const {
  return peak_blocks(config_, r->num_tokens()) + cross_blocks(config_, *r);
}

int32_t Scheduler::completion_blocks(const Request* r) const {
  const int32_t B = config_.tokens_per_block;
  // The last token sampled is never computed, so prompt + max_tokens over-counts by at most a block.
  const int64_t last = std::min<int64_t>(static_cast<int64_t>(r->num_prompt_tokens) + r->stop.max_tokens,
                                         config_.max_seq_len);
  const int32_t per = peak_blocks(config_, static_cast<int32_t>(std::max<int64_t>(last, r->num_tokens())));
  // Sequences: num_sequences until the group forks, then those not finished yet.
  int64_t k = 1;
  if (r->group) {
    k = r->group->forked ? static_cast<int64_t>(r->group->members.size()) : r->group->num_sequences;
  }
  // Forks share the prompt's full blocks; a sequence's blocks after them are its own (the block
  // holding the prompt's tail is copied on write). Under a sliding window, no sharing is counted.
  const int64_t shared =
      k > 1 && config_.sliding_window <= 0 ? std::min(per, r->num_prompt_tokens / B) : 0;
  const int64_t total = shared + k * (per - shared) + cross_blocks(config_, *r);
  return static_cast<int32_t>(std::min<int64_t>(total, std::numeric_limits<int32_t>::max()));
}

int32_t Scheduler::held_blocks(const Request* r) const {
  const auto count = [](const std::vector<int32_t>& ids) {
    return static_cast<int32_t>(std::count_if(ids.begin(), ids.end(),
                                              [](int32_t id) { return id != BlockManager::kReleased; }));
  };
  if (!r->group) return count(r->block_ids) + count(r->cross_block_ids);
  std::unordered_set<int32_t> held;  // forks share blocks: each counted once
  for (const Request* m : members(*r->group)) {
    if (m->status != RequestStatus::kRunning) continue;
    for (int32_t id : m->block_ids) {
      if (id != BlockManager::kReleased) held.insert(id);
    }
    held.insert(m->cross_block_ids.begin(), m->cross_block_ids.end());
  }
  return static_cast<int32_t>(held.size());
}

int64_t Scheduler::reserved_blocks() const {
  int64_t total = 0;
  std::unordered_set<const SequenceGroup*> seen;
  for (const Request* r : running_) {
    if (r->group && !seen.insert(r->group.get()).second) continue;
    total += std::max(0, completion_blocks(r) - held_blocks(r));
  }
  return total;
}

int32_t Scheduler::peak_blocks(const ExecutorConfig& config, int32_t num_tokens) {
  const int32_t B = config.tokens_per_block;
  const int32_t all = (num_tokens + B - 1) / B;
  const int32_t W = config.sliding_window;
  // Without chunking, a recompute after preemption computes every token in one step.
  if (W <= 0 || !config.enable_chunked_prefill) return all;
  // A one-token step at position p reads blocks floor((p - W + 1) / B) .. floor(p / B).
  return std::min(all, (W - 1 + B - 1) / B + 1);
}

int32_t Scheduler::blocks_before_window(int32_t position) const {
  const int32_t W = config_.sliding_window;
  return W > 0 ? std::max(0, position - W + 1) / config_.tokens_per_block : 0;
}

void Scheduler::release_out_of_window(Request* r) {
  if (config_.sliding_window > 0) {
    blocks_.release_leading(r->block_ids, blocks_before_window(r->num_computed_tokens));
  }
}

int32_t Scheduler::max_step_tokens(const Request* r) const {
  if (config_.sliding_window <= 0 || !config_.enable_chunked_prefill) {
    return std::numeric_limits<int32_t>::max();
  }
  // Blocks from the first one in the window up to the last one written must fit the cache.
  const int64_t fit = (static_cast<int64_t>(blocks_before_window(r->num_computed_tokens)) +
                       config_.num_blocks) * config_.tokens_per_block - r->num_computed_tokens;
  return static_cast<int32_t>(std::clamp<int64_t>(fit, 1, std::numeric_limits<int32_t>::max()));
}

void Scheduler::add(Request request) {
  check_request(config_, request);
  const uint64_t id = request.request_id;
  if (requests_.count(id) || groups_.count(id)) {
    throw RequestError("duplicate request id " + std::to_string(id));
  }
  auto owned = std::make_unique<Request>(std::move(request));
  owned->serial = next_serial_++;
  if (owned->sampling.num_sequences > 1) {
    auto group = std::make_shared<SequenceGroup>();
    group->user_id = id;
    group->members.push_back(id);
    group->num_sequences = owned->sampling.num_sequences;
    if (owned->is_beam()) group->hypotheses.resize(owned->sampling.num_sequences);
    owned->group = group;
    groups_.emplace(id, std::move(group));
  }
  waiting_.push_back(owned.get());
  requests_.emplace(id, std::move(owned));
}

Request* Scheduler::get(uint64_t request_id) const {
  auto it = requests_.find(request_id);
  return it == requests_.end() ? nullptr : it->second.get();
}

const Request* Scheduler::find(uint64_t request_id) const { return get(request_id); }

std::vector<Request*> Scheduler::members(const SequenceGroup& group) const {
  std::vector<Request*> out;
  for (uint64_t id : group.members) {
    if (Request* r = get(id)) out.push_back(r);
  }
  return out;
}

int32_t Scheduler::seats(const Request* r) const { return r->forks() ? r->sampling.num_sequences : 1; }

int32_t Scheduler::take_slot() {
  if (free_slots_.empty()) return num_slots_++;
  std::pop_heap(free_slots_.begin(), free_slots_.end(), std::greater<int32_t>());
  const int32_t slot = free_slots_.back();
  free_slots_.pop_back();
  return slot;
}

void Scheduler::release_slot(Request* r) {
  if (r->slot >= 0) {
    free_slots_.push_back(r->slot);
    std::push_heap(free_slots_.begin(), free_slots_.end(), std::greater<int32_t>());
  }
  r->slot = -1;
  r->slot_copy_from = -1;
  r->num_state_tokens = 0;
}

SchedulerOutput Scheduler::schedule() {
  SchedulerOutput out;
  int32_t budget = config_.max_num_tokens;
  // A step that had to preempt is short of blocks: admitting new requests would only preempt again.
  if (!schedule_running(out, budget)) {
    const size_t running_before = running_.size();
    schedule_waiting(out, budget);
    const bool in_flight = std::any_of(running_.begin(), running_.end(),
                                       [](const Request* r) { return r->in_flight; });
    if (out.scheduled.empty() && !in_flight) {
      // Beams admitted without a step of their own (every token but the last cached) may complete
      // their group, whose last tokens can go now.
      if (running_.size() > running_before) schedule_running(out, budget);
      if (out.scheduled.empty() && release_stalled_beams()) schedule_waiting(out, budget);
    }
  }
  out.num_tokens = config_.max_num_tokens - budget;
  return out;
}

bool Scheduler::schedule_running(SchedulerOutput& out, int32_t& budget) {
  bool preempted = false;
  std::unordered_set<const SequenceGroup*> stepped;  // beam groups considered this step
  size_t i = 0;
  while (i < running_.size() && budget > 0) {
    Request* r = running_[i];
    const int32_t left = r->num_tokens() - r->num_computed_tokens;
    if (r->in_flight || left <= 0) {
      if (r->in_flight && can_run_ahead(r)) {
        const size_t before = out.scheduled.size();
        schedule_ahead(out, r);
        budget -= static_cast<int32_t>(out.scheduled.size() - before);
      }
      ++i;
      continue;
    }
    std::vector<Request*> unit{r};
    int32_t n = std::min({left, budget, max_step_tokens(r)});
    if (r->is_beam() && r->group && r->group->forked) {
      if (left > 1) {
        // Catching up after a preemption: never the last token.
        n = std::min({left - 1, budget, max_step_tokens(r)});
      } else {
        // The last token of every beam goes in one step, or none does.
        if (!stepped.insert(r->group.get()).second) {
          ++i;
          continue;
        }
        unit = members(*r->group);
        const bool ready = std::all_of(unit.begin(), unit.end(), [](const Request* m) {
          return m->status == RequestStatus::kRunning && !m->in_flight &&
                 m->num_tokens() - m->num_computed_tokens == 1;
        });
        if (!ready || static_cast<int32_t>(unit.size()) > budget) {
          ++i;
          continue;
        }
        n = 1;
      }
    }
    if (left == 1 && budget > 1 && spec_eligible(r)) n += plan_drafts(r, budget - 1);
    const size_t before = running_.size();
    if (!allocate_step(unit, n, i, out)) {
      preempted = true;
      continue;  // running_[i] is now the next request
    }
    preempted = preempted || running_.size() != before;
    for (Request* m : unit) {
      push_scheduled(out, m, n);
      budget -= n;
    }
    ++i;
  }
  return preempted;
}

bool Scheduler::try_allocate(const std::vector<Request*>& unit, int32_t n,
                             std::vector<int32_t>& copies) {
  if (unit.size() == 1) {
    Request* r = unit.front();
    return blocks_.allocate_for_write(r->block_ids, r->num_computed_tokens,
                                      r->num_computed_tokens + n, copies);
  }
  // Count exactly what the members need, copy-on-writes included: a block shared by several
  // members is copied until one reference is left.
  const int32_t B = config_.tokens_per_block;
  std::unordered_map<int32_t, int32_t> refs;
  int32_t need = 0;
  for (const Request* m : unit) {
    const size_t index = static_cast<size_t>(m->num_computed_tokens / B);
    if (index < m->block_ids.size()) {
      auto it = refs.emplace(m->block_ids[index], blocks_.ref_count(m->block_ids[index])).first;
      if (it->second > 1) {
        ++need;
        --it->second;
      }
    }
    need += std::max(0, blocks_.blocks_for(m->num_computed_tokens + n) -
                            static_cast<int32_t>(m->block_ids.size()));
  }
  if (need > blocks_.num_free_blocks()) return false;
  for (Request* m : unit) {
    const bool ok = blocks_.allocate_for_write(m->block_ids, m->num_computed_tokens,
                                               m->num_computed_tokens + n, copies);
    if (!ok) throw std::logic_error("a beam group's blocks were counted short");
  }
  return true;
}

bool Scheduler::allocate_step(const std::vector<Request*>& unit, int32_t n, size_t& index,
                              SchedulerOutput& out) {
  const std::unordered_set<const Request*> own(unit.begin(), unit.end());
  for (;;) {
    if (try_allocate(unit, n, out.block_copies)) return true;
    // Preempt the latest admitted request after `index` that is not in flight; the unit itself
    // is the last resort.
    size_t v = running_.size();
    while (v > index + 1 && (running_[v - 1]->in_flight || own.count(running_[v - 1]))) --v;
    Request* victim = v > index + 1 ? running_[v - 1] : unit.front();
    const bool self = own.count(victim) > 0 ||
                      (victim->group != nullptr && victim->group == unit.front()->group);
    for (const auto& [position, id] : preempt_unit(victim)) {
      out.preempted.push_back(id);
      if (position < index) --index;
    }
    if (self) return false;
  }
}

std::vector<std::pair<size_t, uint64_t>> Scheduler::preempt_unit(Request* victim) {
  std::vector<Request*> unit{victim};
  if (victim->is_beam() && victim->group && victim->group->forked) {
    unit.clear();
    for (Request* m : members(*victim->group)) {
      if (m->status == RequestStatus::kRunning && !m->in_flight) unit.push_back(m);
    }
  }
  std::vector<std::pair<size_t, uint64_t>> removed;
  // Latest first, so that push_front leaves the group in admission order at the queue's head.
  for (size_t k = running_.size(); k-- > 0;) {
    Request* r = running_[k];
    if (std::find(unit.begin(), unit.end(), r) == unit.end()) continue;
    removed.emplace_back(k, r->request_id);
    running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(k));
    preempt(r);
  }
  return removed;
}

void Scheduler::schedule_waiting(SchedulerOutput& out, int32_t& budget) {
  const int32_t B = config_.tokens_per_block;
  int32_t seats_used = 0;
  for (const Request* r : running_) seats_used += seats(r);
  // GUARANTEED_NO_EVICT: the free blocks left once the running requests' completions are set aside.
  const bool no_evict = config_.guaranteed_no_evict() && !waiting_.empty();
  int64_t available = no_evict ? blocks_.num_free_blocks() - reserved_blocks() : 0;
  while (!waiting_.empty() && budget > 0) {
    Request* r = waiting_.front();
    if (seats_used + seats(r) > config_.max_batch_size) break;
    // Prompt logits need every prompt position computed, so such requests skip the prefix cache.
    std::vector<int32_t> prefix =
        r->sampling.needs_prompt_logits()
            ? std::vector<int32_t>{}
            : blocks_.lookup(r->token_ids, BlockManager::root_hash(r->cache_salt));
    // A beam catching up computes all but its last token alone (see schedule_running).
    const bool beam_member = r->is_beam() && r->group && r->group->forked;
    // An encoder-decoder request runs its encoder now, beside at least one decoder token, unless a
    // sibling's cross blocks hold its encoder's K/V already; it waits for a sibling's pending encoder.
    const Request* sibling = nullptr;
    if (r->is_encoder_decoder() && r->cross_block_ids.empty() && r->group) {
      bool pending = false;
      for (const Request* m : members(*r->group)) {
        if (m == r || m->cross_block_ids.empty()) continue;
        if (m->cross_ready) {
          sibling = m;
          break;
        }
        pending = true;
      }
      if (sibling == nullptr && pending) break;
    }
    const int32_t encoder = r->cross_block_ids.empty() && sibling == nullptr ? r->num_encoder_tokens() : 0;
    if (encoder > 0 && beam_member && !prefix.empty() &&
        r->num_tokens() - static_cast<int32_t>(prefix.size()) * B <= 1) {
      prefix.pop_back();
    }
    const int32_t cached = static_cast<int32_t>(prefix.size()) * B;
    int32_t n = r->num_tokens() - cached;
    if (beam_member) n -= 1;
    if (encoder > 0) {
      if (!config_.enable_chunked_prefill) n = std::min(n, config_.max_num_tokens - encoder);
      if (budget < encoder + 1 || (!config_.enable_chunked_prefill && encoder + n > budget)) break;
      n = std::min(n, budget - encoder);
      if (n < 1) throw std::logic_error("an encoder step without a decoder token");
    } else {
      if (!config_.enable_chunked_prefill && n > budget) break;
      n = std::min(n, budget);
    }
    // GUARANTEED_NO_EVICT (see scheduler.h): its completion must fit beside the running requests'.
    // A sequence of a forked group (back after a fallback preemption) is not counted again.
    int64_t need = 0;
    if (no_evict && !(r->group && r->group->forked)) {
      need = completion_blocks(r);
      if (need <= config_.num_blocks) {
        // Prefix blocks others hold already cost no free block; those in the free queue do.
        for (int32_t id : prefix) need -= blocks_.ref_count(id) > 0;
        if (need > available) break;
      }
      // Else it could never pass: MAX_UTILIZATION's rule admits it, and nobody behind it while it runs.
    }
    if (config_.sliding_window > 0) {
      if (encoder > 0) throw std::logic_error("an encoder-decoder request under a sliding window");
      // The prefix hit is taken first (no new block), its blocks before the window handed back
      // at once, then the step's blocks; if those are short, everything goes back.
      r->num_computed_tokens = cached;
      const bool taken = blocks_.allocate(r->block_ids, cached, prefix);
      if (!taken) throw std::logic_error("a prefix hit needs no new block");
      release_out_of_window(r);
      n = std::min(n, max_step_tokens(r));
      if (!blocks_.allocate(r->block_ids, cached + n)) {
        blocks_.free(r->block_ids);
        r->num_computed_tokens = 0;
        break;
      }
    } else if (!allocate_admission(r, cached + n, prefix, encoder)) {
      break;
    }
    waiting_.pop_front();
    available -= need;
    if (sibling != nullptr) {
      r->cross_block_ids = blocks_.fork(sibling->cross_block_ids);
      r->cross_ready = true;
    }
    if (r->num_preemptions == 0) r->num_cached_tokens = cached;
    num_prefix_hit_tokens_ += cached;
    r->num_computed_tokens = cached;
    sync_drafter(r);  // a cached block's drafter KV was computed with it
    r->status = RequestStatus::kRunning;
    if (r->sampling.needs_state()) r->slot = take_slot();
    running_.push_back(r);
    seats_used += seats(r);
    if (n > 0) {
      push_scheduled(out, r, n, encoder);
      budget -= n + encoder;
    }
  }
}

bool Scheduler::allocate_admission(Request* r, int32_t num_tokens, const std::vector<int32_t>& prefix,
                                   int32_t encoder_tokens) {
  if (encoder_tokens == 0) return blocks_.allocate(r->block_ids, num_tokens, prefix);
  // Counted first, so that a refusal changes nothing (no evictions either).
  const int32_t cross = blocks_.blocks_for(encoder_tokens);
  if (blocks_.blocks_taken(r->block_ids, num_tokens, prefix) + cross > blocks_.num_free_blocks()) return false;
  if (!blocks_.allocate(r->block_ids, num_tokens, prefix) ||
      !blocks_.allocate(r->cross_block_ids, encoder_tokens)) {
    throw std::logic_error("an admission's blocks were counted short");
  }
  return true;
}

void Scheduler::preempt(Request* r) {
  blocks_.free(r->cross_block_ids);  // first, so they are reused before the cached blocks below
  r->cross_ready = false;
  blocks_.free(r->block_ids);  // its full blocks stay cached: the recompute can reuse them
  release_slot(r);
  r->num_computed_tokens = 0;
  r->num_draft_computed = 0;
  r->draft_token_ids.clear();
  r->status = RequestStatus::kWaiting;
  ++r->num_preemptions;
  ++num_preemptions_;
  waiting_.push_front(r);
}

void Scheduler::push_scheduled(SchedulerOutput& out, Request* r, int32_t n, int32_t encoder_tokens) {
  if (r->is_encoder_decoder() && r->cross_block_ids.empty()) {  // allocated at admission
    throw std::logic_error("an encoder-decoder request scheduled without its cross blocks");
  }
  ScheduledRequest s;
  s.request_id = r->request_id;
  s.serial = r->serial;
  s.num_computed_tokens = r->num_computed_tokens;
  s.num_new_tokens = n;
  s.num_encoder_tokens = encoder_tokens;
  s.do_sample = r->num_computed_tokens + n >= r->num_tokens();
  s.num_draft_tokens = std::max(0, r->num_computed_tokens + n - r->num_tokens());
  if (s.num_draft_tokens > 0 && runner_drafts()) s.draft_start = r->num_draft_computed;
  if (r->slot >= 0) {
    s.slot = r->slot;
    s.slot_copy_from = r->slot_copy_from;
    s.slot_reset = r->num_state_tokens == 0 && r->slot_copy_from < 0;
    s.state_from = r->num_state_tokens;
    r->num_state_tokens = r->num_tokens();
    r->slot_copy_from = -1;
  }
  r->in_flight = true;
  r->inflight_samples = s.do_sample;
  r->inflight_row = static_cast<int32_t>(out.scheduled.size());
  out.scheduled.push_back(s);
}

Batch Scheduler::make_batch(const SchedulerOutput& output) const {
  std::vector<const Request*> requests;
  requests.reserve(output.scheduled.size());
  for (const ScheduledRequest& s : output.scheduled) {
    const Request* r = get(s.request_id);
    if (r == nullptr || !r->in_flight) {
      throw std::invalid_argument("request " + std::to_string(s.request_id) +
                                  " of this output is no longer scheduled");
    }
    requests.push_back(r);
  }
  return llmapi::make_batch(requests, output, config_.tokens_per_block);
}

std::vector<uint64_t> Scheduler::waiting_ids() const {
  std::vector<uint64_t> ids;
  for (const Request* r : waiting_) ids.push_back(r->request_id);
  return ids;
}

std::vector<uint64_t> Scheduler::running_ids() const {
  std::vector<uint64_t> ids;
  for (const Request* r : running_) ids.push_back(r->request_id);
  return ids;
}

Stats Scheduler::stats() const {
  Stats s;
  s.num_free_blocks = blocks_.num_free_blocks();
  s.num_used_blocks = blocks_.num_used_blocks();
  s.num_cached_blocks = blocks_.num_cached_blocks();
  s.num_running = static_cast<int64_t>(running_.size());
  s.num_waiting = static_cast<int64_t>(waiting_.size());
  s.num_prefix_hit_tokens = num_prefix_hit_tokens_;
  s.num_preemptions = num_preemptions_;
  s.num_steps = num_steps_;
  s.num_draft_tokens = num_draft_tokens_;
  s.num_accepted_draft_tokens = num_accepted_draft_tokens_;
  return s;
}

}  // namespace llmapi
