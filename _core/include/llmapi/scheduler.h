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
#include "llmapi/step_result.h"

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
// Requests in flight (submitted, not yet collected) are never preempted, and scheduled only ahead:
//
// Async scheduling (config.async_scheduling): the executor schedules and submits step N+1 before
// it collects step N. A plain request (one sequence, no logprobs, logits outputs, penalties,
// history or multi-token bad words: nothing that needs its token ids on the host) that is in
// step N alone, and will get exactly one token from it, may run ahead: step N+1 computes one more
// token for it, whose input is a placeholder for the token step N samples (ScheduledRequest::
// input_row; Batch::prev_rows). Its known tokens count that pending token; it takes its block as
// usual but never preempts anyone for it (it skips the step instead), and it never runs past
// max_tokens or max_seq_len. If step N's token finishes it (EOS, stop id, an abort, an error),
// it finishes then and step N+1's token for it is dropped; its blocks are freed only when step
// N+1 is collected (or fails), since that step still writes its KV.
//
// Speculative decoding (config.speculative_mode): a request that may speculate (spec_eligible: one
// sequence, no beams, penalties, token history, generation logits or multi-token bad words), once its
// prompt is computed and min_tokens reached, takes 1 + d tokens in a decode step: its last token and d
// drafts (n-gram drafts proposed here from its own tokens; a draft model's or EAGLE head's proposed by
// the runner, the batch holding placeholders). d is at most max_draft_len, keeps the step within the
// budget, max_tokens and max_seq_len, and drafts never preempt anyone (short of blocks, d = 0). The
// row's result holds the accepted drafts and one more token; they are appended one by one under the
// stop rules, the computed tokens advance past the accepted ones only, and the blocks past the new
// length go back (truncate). A request that may speculate never runs ahead (async scheduling): its
// next step waits for this one's accepted count. A drafter in the runner (draft model, EAGLE head)
// computes what the target computes each step; a request's num_draft_computed (sync_drafter) says
// how far its drafter KV is valid, and a speculating row hands the drafter the tokens from there.
//
// Capacity policy (config.capacity_scheduler_policy, TensorRT-LLM's CapacitySchedulerPolicy): step 2
// above is MAX_UTILIZATION. Under GUARANTEED_NO_EVICT a waiting request is admitted only if, besides
// its step's blocks, the free blocks (evictable cached blocks counted free, as allocation does) cover
// its completion_blocks -- prompt + max_tokens (capped to max_seq_len) for every sequence it will run:
// the prompt's full blocks once and each sequence's blocks after them (an extra sample's or beam's
// own blocks and its copy-on-write block), plus its cross blocks -- less the prefix-cache blocks it
// reuses that others reference already, plus what every running request still needs to reach its
// own completion (its completion_blocks less the blocks it holds). Running requests then never lack
// a block, so they are never preempted; preemption stays as the fallback should an estimate fall
// short. A request whose completion_blocks exceed the whole cache could never pass this rule: it is
// admitted under MAX_UTILIZATION's rule instead (it runs, and may be preempted by those admitted
// before it, which keep their guarantee: nobody is admitted behind it while it runs), and like any
// request fails once its tokens outgrow the cache. One that fits an empty cache waits for the running
// requests to finish. A sequence of a forked group back in the queue after such a fallback
// preemption is re-admitted under MAX_UTILIZATION's rule too (its group was admitted already).
//
// A request never needs more blocks than the cache holds: add() rejects such prompts and update()
// fails a request (finish "error") as soon as its tokens outgrow the cache, so scheduling always
// makes progress when nothing is in flight.
//
// Sliding window (config.sliding_window W > 0): a query at position i reads positions > i - W
// only. Once a request's computed tokens reach p (each update, and at admission after a prefix
// hit), the blocks wholly before p - W + 1 -- which neither the next step nor one in flight reads
// -- are handed back (BlockManager::release_leading; forks and beams hold their own references).
// With chunked prefill a request then holds at most peak_blocks() blocks at once, whatever its
// length: a step's new tokens are capped to what fits the cache, so a long prompt or a preempted
// request's recompute goes in chunks, and only peak_blocks() must fit the cache.
//
// Sequences (n / best_of samples, beams): a request with num_sequences > 1 runs as one sequence
// until it samples; that step's row offers several candidates and the request forks into
// num_sequences requests (internal ids) that share its blocks by reference count. A block a
// sequence writes into while another still references it is copied first (copy-on-write, listed
// in SchedulerOutput.block_copies). A request with n sequences takes n of the max_batch_size
// places from its admission on. Samples then run independently. Beams step together: a beam
// computes its tokens but the last on its own (after a preemption), and the last tokens of all
// beams go in one step, whose candidates the beam search turns into the next beams (forking
// their parents' blocks again) and finished hypotheses; preempting a beam preempts its group.
//
// Encoder-decoder requests (Request::encoder_token_ids non-empty): the step that admits one (its
// first, or its first after a preemption) also runs its encoder (ScheduledRequest::
// num_encoder_tokens): the encoder tokens count against the step's budget besides its decoder tokens,
// are never chunked, and need room for at least one decoder token beside them (without chunked
// prefill: all its decoder tokens, or if even an empty step could not hold them, as many as such a
// step holds). Its cross blocks are allocated in that step, all or nothing together with the step's
// decoder blocks; a prefix-cache hit on decoder blocks (their hash chain seeded with the encoder
// input, see Request::cache_salt) still runs the encoder, since cross KV is never cached. A beam
// catching up after a preemption whose tokens are all cached but its last gives up its last cached
// block, so that its admission step computes a decoder token beside the encoder. Forks share the
// cross blocks by reference count (they are never written again); finish, abort and preemption free
// them. A sequence of a group (samples, beams) re-admitted after a preemption shares the cross blocks
// of a sibling whose encoder step was collected instead of running the encoder, and while a sibling's
// encoder step is pending it waits for it (so a preempted beam group holds one copy again, as before
// its preemption); alone, it runs the encoder again. Such requests, and those with
// no_repeat_ngram_size > 0, never run ahead; neither they nor those with a forced EOS or BOS
// speculate. add() refuses an encoder input longer than max_encoder_input_len or max_num_tokens - 1,
// and any encoder input under a sliding window.
class Scheduler {
 public:
  explicit Scheduler(const ExecutorConfig& config);

  // Throws RequestError if `request` can never run under `config` (prompt longer than
  // max_seq_len, or needing more blocks than the cache holds).
  static void check_request(const ExecutorConfig& config, const Request& request);
  // The most KV blocks a request of `num_tokens` tokens must hold at once: all of them, or with a
  // sliding window and chunked prefill at most those of one window and the block being written.
  static int32_t peak_blocks(const ExecutorConfig& config, int32_t num_tokens);
  // The cross-attention blocks of `request`'s encoder input (0 for a decoder-only request).
  static int32_t cross_blocks(const ExecutorConfig& config, const Request& request);

  // Queues a request at the tail of the waiting queue. Throws RequestError (duplicate id too).
  void add(Request request);
  SchedulerOutput schedule();
  // The step `output` ran; `result` holds the candidates of output.scheduled[i] in row i (used
  // where do_sample). Advances computed tokens, caches newly full blocks, appends tokens (forking
  // and stepping beam searches), applies the stop rules and frees finished requests. Returns one
  // response per sequence that got a token or finished.
  std::vector<Response> update(const SchedulerOutput& output, const StepResult& result);
  // The step `output` failed: its requests finish "error" with `error`.
  std::vector<Response> fail(const SchedulerOutput& output, const std::string& error);
  // Finishes the user's request (every sequence, or only sequence `seq_index` if >= 0) "abort",
  // freeing its blocks, and returns the responses; what is in flight is finished when its step
  // is collected instead. Unknown ids are ignored.
  std::vector<Response> abort(uint64_t request_id, int32_t seq_index = -1);
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
  // Preempts the running requests that hold back waiting beams of their group (all of which
  // must step together) when nothing else can run; returns whether it preempted any.
  bool release_stalled_beams();
  // Allocates `units` (running_[index] first) their next step's blocks, all or nothing,
  // preempting the most recently admitted others as needed. False: `units` themselves were
  // preempted. Adjusts `index` for requests removed before it.
  bool allocate_step(const std::vector<Request*>& units, int32_t num_new_tokens, size_t& index,
                     SchedulerOutput& out);
  // The blocks of one step of `unit` (copy-on-write included), all or nothing.
  bool try_allocate(const std::vector<Request*>& unit, int32_t num_new_tokens,
                    std::vector<int32_t>& copies);
  void preempt(Request* request);
  // peak_blocks of `request`'s tokens plus its cross blocks: what it must be able to hold at once.
  int32_t blocks_to_hold(const Request* request) const;
  // Admission: `request`'s decoder blocks for `num_tokens` tokens after `prefix` (a lookup hit) and, if
  // `encoder_tokens` > 0, its cross blocks, all or nothing.
  bool allocate_admission(Request* request, int32_t num_tokens, const std::vector<int32_t>& prefix,
                          int32_t encoder_tokens);
  // GUARANTEED_NO_EVICT: the most blocks `request` (with the unfinished sequences of its group, its
  // cross blocks included) holds at once up to its completion (prompt + max_tokens, within max_seq_len).
  int32_t completion_blocks(const Request* request) const;
  // The distinct blocks (cross blocks included) that `request` and the running sequences of its group hold.
  int32_t held_blocks(const Request* request) const;
  // Blocks the running requests still need to reach their completion (each group counted once).
  int64_t reserved_blocks() const;
  // Sliding window: the leading blocks no query at `position` or later reads (0 without a window).
  int32_t blocks_before_window(int32_t position) const;
  // Hands back the blocks before the window of `request`'s next token (num_computed_tokens).
  void release_out_of_window(Request* request);
  // The most new tokens `request` may compute in one step for its blocks to fit the cache (its
  // blocks before the window handed back); unbounded without a window or chunked prefill.
  int32_t max_step_tokens(const Request* request) const;
  // Async scheduling: whether `request`, in flight, may run ahead; if so, schedules it (one token
  // on a placeholder input) when its block is free, without preempting anyone.
  bool can_run_ahead(const Request* request) const;
  void schedule_ahead(SchedulerOutput& out, Request* request);
  // A row of a collected or failed step: the request it still belongs to, or nullptr when that
  // request finished meanwhile (its blocks kept for this step are freed then).
  Request* settle_row(const ScheduledRequest& row);
  // Preempts `victim` and, for a beam, its whole group; returns (running_ index, id) of each.
  std::vector<std::pair<size_t, uint64_t>> preempt_unit(Request* victim);
  void push_scheduled(SchedulerOutput& out, Request* request, int32_t num_new_tokens,
                      int32_t num_encoder_tokens = 0);
  int32_t seats(const Request* request) const;
  int32_t take_slot();
  void release_slot(Request* request);
  // A copy of `parent` as sequence `seq_index` (a new internal id), sharing its blocks.
  Request* fork(Request* parent, int32_t seq_index);
  // "" if every candidate of result row `row` is a token of the vocabulary (or -1 padding), else why not.
  std::string check_candidates(const StepResult& result, int32_t row) const;
  // Appends candidate `column` of result row `row` to `request` with its logprobs.
  void append_candidate(Request* request, const StepResult& result, int32_t row, int32_t column);
  // The token appended last settles `request`: a response, or its finish.
  Response settle(Request* request);
  void fork_samples(Request* request, const StepResult& result, int32_t row,
                    std::vector<Response>& responses);
  void step_beams(SequenceGroup& group, const std::vector<std::pair<Request*, int32_t>>& rows,
                  const StepResult& result, std::vector<Response>& responses);
  // Marks `request` finished, frees its blocks, forgets it; returns its final response (with
  // the token appended last if `last_token`).
  Response finish(Request* request, const std::string& reason, const std::string& error,
                  bool last_token);
  // finish() whose response carries the output tokens from index `first_output` on.
  Response finish_at(Request* request, const std::string& reason, const std::string& error,
                     int32_t first_output);
  // Speculative decoding (scheduler_spec.cpp): whether the runner proposes the drafts (draft model,
  // EAGLE); whether `request` may ever speculate; the drafts of its next decode step (at most
  // `room`; n-gram drafts stored in request->draft_token_ids); settling a verified row.
  bool runner_drafts() const;
  // The runner's drafter computes every token the target computes (its forward follows each target
  // forward), so its KV is valid up to the request's computed tokens: all of them for a draft model;
  // for an EAGLE head all but the last, whose pair needs the token after it.
  void sync_drafter(Request* request) const;
  bool spec_eligible(const Request* request) const;
  int32_t plan_drafts(Request* request, int32_t room);
  void settle_drafts(Request* request, const ScheduledRequest& s, const StepResult& result, int32_t row,
                     std::vector<Response>& responses);
  // Ends a beam search: frees every beam, returns the best hypotheses (or, with an abort or
  // error reason, the reason alone).
  std::vector<Response> finish_beams(SequenceGroup& group, const std::string& reason,
                                     const std::string& error);
  // finish() for a plain or sampled sequence, finish_beams() for a beam.
  std::vector<Response> finish_any(Request* request, const std::string& reason,
                                   const std::string& error);
  std::vector<Request*> members(const SequenceGroup& group) const;

  ExecutorConfig config_;
  BlockManager blocks_;
  std::unordered_map<uint64_t, std::unique_ptr<Request>> requests_;  // every unfinished request
  std::deque<Request*> waiting_;
  std::vector<Request*> running_;  // admission order: the tail is preempted first
  std::unordered_map<uint64_t, std::shared_ptr<SequenceGroup>> groups_;  // by user id
  uint64_t next_fork_id_ = kForkedIdBit;
  uint64_t next_serial_ = 0;
  // By serial: the blocks of requests that finished while a step was still writing them.
  std::unordered_map<uint64_t, std::vector<int32_t>> dropped_blocks_;
  std::vector<int32_t> free_slots_;  // a min-heap: low slots are reused first
  int32_t num_slots_ = 0;
  int64_t num_prefix_hit_tokens_ = 0;
  int64_t num_preemptions_ = 0;
  int64_t num_steps_ = 0;
  int64_t num_draft_tokens_ = 0;
  int64_t num_accepted_draft_tokens_ = 0;
};

}  // namespace llmapi
