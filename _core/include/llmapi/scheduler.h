// Scheduler: decides each step which requests compute how many tokens (vLLM v1 contract).
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "llmapi/batch.h"
#include "llmapi/block_manager.h"
#include "llmapi/config.h"
#include "llmapi/request.h"
#include "llmapi/response.h"
#include "llmapi/scheduler_output.h"
#include "llmapi/stats.h"

namespace llmapi {

// There is no prefill phase or decode phase: each step hands every request a number of tokens so
// that its computed tokens catch up with its known tokens (prompt + generated), under a budget of
// max_num_tokens tokens and max_batch_size running requests.
//
// schedule():
//  1. Running requests, in admission order, take min(known - computed, budget) tokens. One that
//     cannot get the blocks it needs preempts the most recently admitted running request (possibly
//     itself) until it can: the victim's blocks are freed (its full blocks stay cached), its
//     computed tokens reset to 0, and it goes to the FRONT of the waiting queue, to recompute its
//     prompt and generated tokens later (reusing its own cached blocks).
//  2. Only if nobody was preempted, waiting requests are admitted first come first served, each
//     after a prefix-cache lookup, while budget, batch slots and blocks last. The head of the queue
//     blocks the rest (no overtaking). Without chunked prefill a request is admitted only if all
//     its tokens fit in the remaining budget.
// Requests in flight (submitted, not yet collected) are neither scheduled nor preempted.
//
// A request never needs more blocks than the cache holds: add() rejects such prompts and update()
// fails a request (finish "error") as soon as its tokens outgrow the cache, so scheduling always
// makes progress when nothing is in flight.
class Scheduler {
 public:
  explicit Scheduler(const ExecutorConfig& config);

  // Throws RequestError if `request` can never run under `config` (prompt longer than
  // max_seq_len, or needing more blocks than the cache holds).
  static void check_request(const ExecutorConfig& config, const Request& request);

  // Queues a request at the tail of the waiting queue. Throws RequestError (duplicate id too).
  void add(Request request);
  SchedulerOutput schedule();
  // The step `output` ran; sampled[i] is the token of output.scheduled[i] (used where do_sample).
  // Advances computed tokens, caches newly full blocks, appends tokens, applies the stop rules and
  // frees finished requests. Returns one response per request that got a token or finished.
  std::vector<Response> update(const SchedulerOutput& output, const std::vector<int32_t>& sampled);
  // The step `output` failed: its requests finish "error" with `error`.
  std::vector<Response> fail(const SchedulerOutput& output, const std::string& error);
  // Finishes the request "abort" (freeing its blocks) and returns its response; if it is in
  // flight, it is finished when its step is collected instead. Unknown ids are ignored.
  std::optional<Response> abort(uint64_t request_id);
  // Finishes every request (in flight or not) with `finish_reason` and `error`.
  std::vector<Response> finish_all(const std::string& finish_reason, const std::string& error);

  Batch make_batch(const SchedulerOutput& output) const;

  bool has_unfinished() const { return !requests_.empty(); }
  const Request* find(uint64_t request_id) const;
  std::vector<uint64_t> waiting_ids() const;
  std::vector<uint64_t> running_ids() const;
  Stats stats() const;
  BlockManager& block_manager() { return blocks_; }
  const ExecutorConfig& config() const { return config_; }

 private:
  Request* get(uint64_t request_id) const;
  // Schedules the running requests; returns whether anyone was preempted.
  bool schedule_running(SchedulerOutput& out, int32_t& budget);
  void schedule_waiting(SchedulerOutput& out, int32_t& budget);
  void preempt(Request* request);
  void push_scheduled(SchedulerOutput& out, Request* request, int32_t num_new_tokens);
  // Marks `request` finished, frees its blocks, forgets it; returns its final response.
  Response finish(Request* request, const std::string& reason, const std::string& error,
                  std::vector<int32_t> new_tokens = {});

  ExecutorConfig config_;
  BlockManager blocks_;
  std::unordered_map<uint64_t, std::unique_ptr<Request>> requests_;  // every unfinished request
  std::deque<Request*> waiting_;
  std::vector<Request*> running_;  // admission order: the tail is preempted first
  int64_t num_prefix_hit_tokens_ = 0;
  int64_t num_preemptions_ = 0;
  int64_t num_steps_ = 0;
};

}  // namespace llmapi
