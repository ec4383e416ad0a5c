// ExecutorConfig: the limits and policies the scheduler and block manager run under.
#pragma once

#include <cstdint>
#include <string>

namespace llmapi {

// Where a speculating request's draft tokens come from. kNgram: the scheduler proposes them from the
// request's own tokens (Batch.input_ids holds them). kDraftModel / kEagle: the runner proposes them
// before the verify forward (a draft model, or an EAGLE head over the target's hidden states); the
// batch holds placeholders (-1) and the tokens the drafter must catch up on (Batch.draft_input_ids).
enum class SpeculativeMode : int32_t { kNone = 0, kNgram = 1, kDraftModel = 2, kEagle = 3 };

// How admission weighs the KV cache (TensorRT-LLM's CapacitySchedulerPolicy).
// kMaxUtilization: a waiting request is admitted when the blocks of its next step fit; a running
// request short of a block later preempts the latest admitted one (recompute).
// kGuaranteedNoEvict: a waiting request is admitted only if the free blocks also cover its own blocks
// to completion (prompt + max_tokens, every sequence) and what the running requests still need to
// reach theirs, so running requests are not preempted for lack of blocks (see scheduler.h).
enum class CapacitySchedulerPolicy : int32_t { kMaxUtilization = 0, kGuaranteedNoEvict = 1 };

struct ExecutorConfig {
  int32_t max_batch_size = 0;   // most requests admitted (running) at once, so at most this many per step
  int32_t max_num_tokens = 0;   // token budget of one step (all requests' new tokens together)
  int32_t max_seq_len = 0;      // prompt + generated tokens of one request; reaching it finishes "length"
  int32_t tokens_per_block = 0; // KV cache block size in tokens
  int32_t num_blocks = 0;       // KV cache size in blocks
  bool enable_prefix_caching = true;   // reuse full blocks across requests by chained content hash
  bool enable_chunked_prefill = true;  // a prompt may be split over several steps
  int32_t max_inflight_batches = 1;    // batches submitted to the runner and not yet collected
  // Schedule step N+1 while step N runs (one rank): two steps in flight, and a plain request in
  // step N also in step N+1, its input the token step N samples (Batch.prev_rows). Needs
  // max_inflight_batches = 1 and a runner that fills prev_rows.
  bool async_scheduling = false;
  // Token ids a request names (prompt, EOS, stop, bad words, logit bias) and the runner samples
  // must be below this; 0: not checked.
  int32_t vocab_size = 0;
  // The model's attention sees only the last this many positions (Mistral's sliding window); KV
  // blocks wholly before a request's window are handed back as it moves on. 0: no window.
  int32_t sliding_window = 0;
  // Speculative decoding (SpeculativeMode): a decode step of a request that speculates carries up
  // to max_draft_len draft tokens after its last token, verified in one forward of the target.
  int32_t speculative_mode = 0;
  int32_t max_draft_len = 0;
  // kNgram: the longest suffix of a request's tokens that the scheduler looks for earlier in them.
  int32_t max_matching_ngram_size = 0;
  // Encoder-decoder requests: the longest encoder input accepted (0: no limit besides max_num_tokens - 1,
  // since the encoder runs unchunked in one step together with at least one decoder token).
  int32_t max_encoder_input_len = 0;
  // CapacitySchedulerPolicy: 0 max utilization, 1 guaranteed no evict.
  int32_t capacity_scheduler_policy = 0;

  bool guaranteed_no_evict() const {
    return capacity_scheduler_policy == static_cast<int32_t>(CapacitySchedulerPolicy::kGuaranteedNoEvict);
  }
  // Throws std::invalid_argument naming the field and the bad value.
  void validate() const;
  std::string repr() const;
};

}  // namespace llmapi
