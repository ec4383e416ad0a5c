// SchedulerOutput: the decisions of one scheduling step.
#pragma once

#include <cstdint>
#include <vector>

namespace llmapi {

struct ScheduledRequest {
  uint64_t request_id = 0;
  uint64_t serial = 0;              // the request's Request::serial
  int32_t num_computed_tokens = 0;  // before this step: the first new token's position
  int32_t num_new_tokens = 0;       // tokens computed this step
  // Encoder-decoder: > 0 when this step runs the request's encoder over its encoder_token_ids (this
  // many, counted against the step's budget besides num_new_tokens), writing its cross blocks.
  int32_t num_encoder_tokens = 0;
  bool do_sample = false;           // this step reaches the request's last known token
  // The runner's state row: a fresh slot is cleared, a forked one starts as a copy of another;
  // then the request's tokens from state_from on are appended to it.
  int32_t slot = -1;
  bool slot_reset = false;
  int32_t slot_copy_from = -1;
  int32_t state_from = 0;
  // Async scheduling: >= 0 when the request is also in the step in flight, whose row input_row
  // samples the token this step takes as its first input (a placeholder until then).
  int32_t input_row = -1;
  // Speculative decoding: the query's last num_draft_tokens tokens are drafts after the request's
  // last known token (do_sample; the row's result holds the accepted drafts and one token more).
  int32_t num_draft_tokens = 0;
  // Draft model / EAGLE: the first position the drafter computes for this row (its KV before it is
  // valid); -1 when the runner drafts nothing for it.
  int32_t draft_start = -1;
};

struct SchedulerOutput {
  std::vector<ScheduledRequest> scheduled;  // running requests first (admission order), then new
  std::vector<uint64_t> preempted;          // in preemption order
  std::vector<int32_t> block_copies;        // [C, 2] (source, destination), copy-on-write
  int32_t num_tokens = 0;                   // the budget used: new tokens and encoder tokens
};

}  // namespace llmapi
