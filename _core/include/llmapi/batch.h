// Batch: one step's flat inputs for the model runner (plain arrays, no torch).
#pragma once

#include <cstdint>
#include <vector>

#include "llmapi/request.h"
#include "llmapi/scheduler_output.h"

namespace llmapi {

// R requests, T tokens. The bindings expose every vector as a read-only numpy view. CSR pairs
// (x_offsets [R+1], x_...) give row r the entries [off[r], off[r+1]).
struct Batch {
  int32_t num_tokens = 0;        // T
  int32_t num_requests = 0;      // R
  int32_t tokens_per_block = 0;
  int32_t max_blocks = 0;        // block_tables row length: the longest block table in the batch
  int32_t max_cross_blocks = 0;  // cross_block_tables row length: the longest cross table (0: none)

  std::vector<uint64_t> request_ids;   // [R] the user's request id (shared by forked sequences)
  std::vector<int32_t> seq_index;      // [R] which sequence of the request: keys its sampling noise
  std::vector<int32_t> input_ids;      // [T] requests' tokens back to back; -1 where prev_rows >= 0
  // [T] -1: input_ids[t] is known; j >= 0: input_ids[t] is the token sampled for row j of the
  // batch submitted (successfully) just before this one, still in flight: the runner fills it on
  // the device (async scheduling).
  std::vector<int32_t> prev_rows;
  std::vector<int32_t> positions;      // [T]
  std::vector<int32_t> query_lens;     // [R] new tokens per request
  std::vector<int32_t> context_lens;   // [R] tokens with KV after this step, this step's included
  std::vector<int32_t> block_tables;   // [R, max_blocks] row-major, padded with 0; -1: a block
                                       // handed back (before the sliding window), never read
  std::vector<int64_t> slot_mapping;   // [T] block * tokens_per_block + offset of each new token
  std::vector<int32_t> block_copies;   // [C, 2] (source, destination) blocks whose KV is copied
                                       // before this step runs: copy-on-write of shared blocks
  std::vector<int8_t> do_sample;       // [R] 1 if this row's sampled token is kept
  std::vector<int32_t> num_candidates; // [R] 1; n for a row whose request forks into n samples;
                                       // the top-K width for a beam-search row
  std::vector<int8_t> beam;            // [R] 1: a beam-search row (top-K by processed logprob)
  std::vector<float> temperature;      // [R]
  std::vector<int32_t> top_k;          // [R]
  std::vector<float> top_p;            // [R]
  std::vector<float> min_p;            // [R]
  std::vector<float> repetition_penalty;  // [R]
  std::vector<float> presence_penalty;    // [R]
  std::vector<float> frequency_penalty;   // [R]
  std::vector<int64_t> seeds;          // [R]
  std::vector<int32_t> output_index;   // [R] tokens generated so far = index of the token sampled now
  std::vector<int32_t> suppress_offsets;  // [R+1] row r masks suppress_ids[off[r]:off[r+1]]
  std::vector<int32_t> suppress_ids;      // [S] min_tokens stops, bad words, no-repeat n-grams
  std::vector<int32_t> bias_offsets;      // [R+1]
  std::vector<int32_t> bias_ids;          // [Bn] logit_bias
  std::vector<float> bias_values;         // [Bn]
  std::vector<int32_t> logprobs;          // [R] -1, or the top-k width of the row's logprobs
  std::vector<int32_t> prompt_logprobs;   // [R] -1, or k: logprobs of this step's prompt tokens
  std::vector<int8_t> context_logits;     // [R] 1: keep the logits of this step's prompt positions
  std::vector<int8_t> generation_logits;  // [R] 1: keep the logits of the sampled token
  std::vector<int32_t> prompt_lens;       // [R]
  std::vector<int32_t> next_token_ids;    // [R] the token after this step's last one, -1 if unknown
  std::vector<int32_t> adapter_slots;     // [R] the request's LoRA adapter slot, -1 for none
  // Per-request state rows of the runner (penalty counts, token history).
  std::vector<int32_t> slots;             // [R] the row's state slot, -1 for none
  std::vector<int32_t> slot_copy_from;    // [R] first copy this slot's state (a fork), -1 for none
  std::vector<int8_t> slot_reset;         // [R] 1: the slot is new: clear it first
  std::vector<int32_t> state_start;       // [R] position of the first token appended to the state
  std::vector<int32_t> state_offsets;     // [R+1]
  std::vector<int32_t> state_ids;         // [H] tokens appended to the row's state this step
  // Speculative decoding. A row with num_draft_tokens[r] = d > 0 computes its last known token and d
  // drafts (query length 1 + d, do_sample): n-gram drafts are in input_ids, a drafter's are -1 there
  // (the runner proposes them). Its result row holds the accepted drafts and one more token.
  std::vector<int32_t> num_draft_tokens;  // [R]
  // Draft model / EAGLE: the drafter's KV is valid before position draft_start[r] (-1: no drafting);
  // draft_input_ids[draft_offsets[r]:draft_offsets[r+1]] are the tokens at positions draft_start[r]
  // up to the row's last known token, which the drafter catches up on before it drafts.
  std::vector<int32_t> draft_start;       // [R]
  std::vector<int32_t> draft_offsets;     // [R+1]
  std::vector<int32_t> draft_input_ids;   // [D]
  // Encoder-decoder (E = sum of encoder_lens). Rows that run their encoder this step (the request's
  // first step, or its first after a preemption) hand their encoder tokens back to back in row order;
  // the encoder's positions are 0..len-1. Its cross-attention K/V go to cross_slot_mapping; every row
  // of an encoder-decoder request reads cross_lens[r] keys through its cross block table.
  std::vector<int32_t> encoder_input_ids;   // [E]
  std::vector<int32_t> encoder_lens;        // [R] encoder tokens run this step, else 0
  std::vector<int64_t> cross_slot_mapping;  // [E] block * tokens_per_block + offset in the cross blocks
  std::vector<int32_t> cross_lens;          // [R] the request's encoder length (0: decoder-only row)
  std::vector<int32_t> cross_block_tables;  // [R, max_cross_blocks] row-major, padded with 0
  // [R] -1, or the only id the row may sample (forced EOS on the last allowed token, forced BOS on
  // the token after a one-token prompt); it wins over the row's suppress_ids.
  std::vector<int32_t> forced_token_ids;
};

// Builds the batch for `scheduled`; requests[i] is the request of scheduled[i], its block table
// already grown to cover this step. Row r suppresses (EOS unless ignore_eos) + stop_token_ids
// while it samples and has generated fewer than min_tokens, and the bad words that its last
// tokens complete, and (no_repeat_ngram_size = n > 0) every token that would complete an n-gram
// already in its tokens. A row with input_row >= 0 counts its pending token as generated
// (output_index, min_tokens) and takes it from prev_rows.
Batch make_batch(const std::vector<const Request*>& requests, const SchedulerOutput& output,
                 int32_t tokens_per_block);

}  // namespace llmapi
