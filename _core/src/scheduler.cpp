// Scheduler: token-budget scheduling with chunked prefill, prefix reuse and preemption by recompute.
#include "llmapi/scheduler.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "llmapi/errors.h"
#include "llmapi/stop_rules.h"

namespace llmapi {

namespace {

const ExecutorConfig& validated(const ExecutorConfig& config) {
  config.validate();
  return config;
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
  const int32_t blocks = (n + config.tokens_per_block - 1) / config.tokens_per_block;
  if (blocks > config.num_blocks) {
    throw RequestError("the prompt needs " + std::to_string(blocks) + " KV blocks of " +
                       std::to_string(config.tokens_per_block) + " tokens; the cache has " +
                       std::to_string(config.num_blocks));
  }
}

void Scheduler::add(Request request) {
  check_request(config_, request);
  const uint64_t id = request.request_id;
  if (requests_.count(id)) throw RequestError("duplicate request id " + std::to_string(id));
  auto owned = std::make_unique<Request>(std::move(request));
  waiting_.push_back(owned.get());
  requests_.emplace(id, std::move(owned));
}

Request* Scheduler::get(uint64_t request_id) const {
  auto it = requests_.find(request_id);
  return it == requests_.end() ? nullptr : it->second.get();
}

const Request* Scheduler::find(uint64_t request_id) const { return get(request_id); }

SchedulerOutput Scheduler::schedule() {
  SchedulerOutput out;
  int32_t budget = config_.max_num_tokens;
  // A step that had to preempt is short of blocks: admitting new requests would only preempt again.
  if (!schedule_running(out, budget)) schedule_waiting(out, budget);
  out.num_tokens = config_.max_num_tokens - budget;
  return out;
}

bool Scheduler::schedule_running(SchedulerOutput& out, int32_t& budget) {
  bool preempted = false;
  size_t i = 0;
  while (i < running_.size() && budget > 0) {
    Request* r = running_[i];
    const int32_t n = std::min(r->num_tokens() - r->num_computed_tokens, budget);
    if (r->in_flight || n <= 0) {
      ++i;
      continue;
    }
    bool got_blocks = false;
    for (;;) {
      if (blocks_.allocate(r->block_ids, r->num_computed_tokens + n)) {
        got_blocks = true;
        break;
      }
      // Requests after i are not scheduled yet; the latest admitted one not in flight goes.
      // r itself (index i, not in flight) is the last resort.
      size_t v = running_.size();
      while (v > i + 1 && running_[v - 1]->in_flight) --v;
      Request* victim = running_[v - 1];
      running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(v - 1));
      preempt(victim);
      out.preempted.push_back(victim->request_id);
      preempted = true;
      if (victim == r) break;  // running_[i] is now the next request
    }
    if (got_blocks) {
      push_scheduled(out, r, n);
      budget -= n;
      ++i;
    }
  }
  return preempted;
}

void Scheduler::schedule_waiting(SchedulerOutput& out, int32_t& budget) {
  const int32_t B = config_.tokens_per_block;
  while (!waiting_.empty() && budget > 0 &&
         static_cast<int32_t>(running_.size()) < config_.max_batch_size) {
    Request* r = waiting_.front();
    const std::vector<int32_t> prefix = blocks_.lookup(r->token_ids);
    const int32_t cached = static_cast<int32_t>(prefix.size()) * B;
    int32_t n = r->num_tokens() - cached;
    if (!config_.enable_chunked_prefill && n > budget) break;
    n = std::min(n, budget);
    if (!blocks_.allocate(r->block_ids, cached + n, prefix)) break;
    waiting_.pop_front();
    if (r->num_preemptions == 0) r->num_cached_tokens = cached;
    num_prefix_hit_tokens_ += cached;
    r->num_computed_tokens = cached;
    r->status = RequestStatus::kRunning;
    running_.push_back(r);
    push_scheduled(out, r, n);
    budget -= n;
  }
}

void Scheduler::preempt(Request* r) {
  blocks_.free(r->block_ids);  // its full blocks stay cached: the recompute can reuse them
  r->num_computed_tokens = 0;
  r->status = RequestStatus::kWaiting;
  ++r->num_preemptions;
  ++num_preemptions_;
  waiting_.push_front(r);
}

void Scheduler::push_scheduled(SchedulerOutput& out, Request* r, int32_t n) {
  ScheduledRequest s;
  s.request_id = r->request_id;
  s.num_computed_tokens = r->num_computed_tokens;
  s.num_new_tokens = n;
  s.do_sample = r->num_computed_tokens + n == r->num_tokens();
  out.scheduled.push_back(s);
  r->in_flight = true;
}

std::vector<Response> Scheduler::update(const SchedulerOutput& output,
                                        const std::vector<int32_t>& sampled) {
  if (sampled.size() != output.scheduled.size()) {
    throw std::invalid_argument("got " + std::to_string(sampled.size()) + " sampled tokens for " +
                                std::to_string(output.scheduled.size()) + " scheduled requests");
  }
  ++num_steps_;
  std::vector<Response> responses;
  for (size_t i = 0; i < output.scheduled.size(); ++i) {
    const ScheduledRequest& s = output.scheduled[i];
    Request* r = get(s.request_id);
    if (r == nullptr || !r->in_flight) continue;  // settled already (finish_all)
    r->in_flight = false;
    if (r->abort_requested) {
      responses.push_back(finish(r, "abort", ""));
      continue;
    }
    r->num_computed_tokens = s.num_computed_tokens + s.num_new_tokens;
    blocks_.cache_full_blocks(r->block_ids, r->token_ids, r->num_computed_tokens);
    if (!s.do_sample) continue;  // a prefill chunk before the last: nothing to report
    const int32_t token = sampled[i];
    if (token < 0) {
      responses.push_back(finish(r, "error", "the runner sampled token id " + std::to_string(token)));
      continue;
    }
    r->token_ids.push_back(token);
    if (apply_stop_rules(*r, config_.max_seq_len)) {
      responses.push_back(finish(r, r->finish_reason, "", {token}));
    } else if (blocks_.blocks_for(r->num_tokens()) > blocks_.num_blocks()) {
      // Its next step needs more blocks than exist: fail now rather than preempt forever.
      responses.push_back(finish(
          r, "error",
          "request " + std::to_string(r->request_id) + " needs " +
              std::to_string(blocks_.blocks_for(r->num_tokens())) + " KV blocks; the cache has " +
              std::to_string(blocks_.num_blocks()),
          {token}));
    } else {
      responses.push_back(Response::of(*r, {token}));
    }
  }
  return responses;
}

std::vector<Response> Scheduler::fail(const SchedulerOutput& output, const std::string& error) {
  ++num_steps_;
  std::vector<Response> responses;
  for (const ScheduledRequest& s : output.scheduled) {
    Request* r = get(s.request_id);
    if (r == nullptr || !r->in_flight) continue;
    r->in_flight = false;
    responses.push_back(r->abort_requested ? finish(r, "abort", "") : finish(r, "error", error));
  }
  return responses;
}

std::optional<Response> Scheduler::abort(uint64_t request_id) {
  Request* r = get(request_id);
  if (r == nullptr) return std::nullopt;
  if (r->in_flight) {
    r->abort_requested = true;  // its blocks may still be written: free them at collect
    return std::nullopt;
  }
  return finish(r, "abort", "");
}

std::vector<Response> Scheduler::finish_all(const std::string& finish_reason,
                                            const std::string& error) {
  // Emptied first so that finishing N requests costs O(N), not O(N^2) unlinking.
  std::vector<Request*> all;
  all.swap(running_);
  all.insert(all.end(), waiting_.begin(), waiting_.end());
  waiting_.clear();
  std::vector<Response> responses;
  for (Request* r : all) {
    r->in_flight = false;
    responses.push_back(finish(r, finish_reason, error));
  }
  return responses;
}

Response Scheduler::finish(Request* r, const std::string& reason, const std::string& error,
                           std::vector<int32_t> new_tokens) {
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
  Response response = Response::of(*r, std::move(new_tokens));
  const uint64_t id = r->request_id;  // erase() below destroys r
  blocks_.free(r->block_ids);
  requests_.erase(id);
  return response;
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
  return llmapi::make_batch(requests, output.scheduled, config_.tokens_per_block);
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
  return s;
}

}  // namespace llmapi
