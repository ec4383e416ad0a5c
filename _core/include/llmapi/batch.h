// Batch: one step's flat inputs for the model runner (plain arrays, no torch).
#pragma once

#include <cstdint>
#include <vector>

#include "llmapi/request.h"
#include "llmapi/scheduler_output.h"

namespace llmapi {

// R requests, T tokens. The bindings expose every vector as a read-only numpy view.
struct Batch {
  int32_t num_tokens = 0;        // T
  int32_t num_requests = 0;      // R
  int32_t tokens_per_block = 0;
  int32_t max_blocks = 0;        // block_tables row length: the longest block table in the batch

  std::vector<uint64_t> request_ids;   // [R]
  std::vector<int32_t> input_ids;      // [T] requests' tokens back to back
  std::vector<int32_t> positions;      // [T]
  std::vector<int32_t> query_lens;     // [R] new tokens per request
  std::vector<int32_t> context_lens;   // [R] tokens with KV after this step, this step's included
  std::vector<int32_t> block_tables;   // [R, max_blocks] row-major, padded with 0
  std::vector<int64_t> slot_mapping;   // [T] block * tokens_per_block + offset of each new token
  std::vector<int8_t> do_sample;       // [R] 1 if this row's sampled token is kept
  std::vector<float> temperature;      // [R]
  std::vector<int32_t> top_k;          // [R]
  std::vector<float> top_p;            // [R]
  std::vector<int64_t> seeds;          // [R]
  std::vector<int32_t> output_index;   // [R] tokens generated so far = index of the token sampled now
  std::vector<int32_t> suppress_offsets;  // [R+1] row r masks suppress_ids[off[r]:off[r+1]]
  std::vector<int32_t> suppress_ids;      // [S]
};

// Builds the batch for `scheduled`; requests[i] is the request of scheduled[i], its block table
// already grown to cover this step. Row r suppresses (EOS unless ignore_eos) + stop_token_ids
// while it samples and has generated fewer than min_tokens.
Batch make_batch(const std::vector<const Request*>& requests,
                 const std::vector<ScheduledRequest>& scheduled, int32_t tokens_per_block);

}  // namespace llmapi
