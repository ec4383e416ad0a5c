// Stats: the executor's counters, as Executor.stats() reports them.
#pragma once

#include <cstdint>

namespace llmapi {

struct Stats {
  int64_t num_free_blocks = 0;        // includes cached blocks nobody references (evictable)
  int64_t num_used_blocks = 0;
  int64_t num_cached_blocks = 0;      // blocks findable by prefix hash, referenced or not
  int64_t num_running = 0;            // admitted requests, partly prefilled ones included
  int64_t num_waiting = 0;            // queued or preempted requests
  int64_t num_prefix_hit_tokens = 0;  // tokens taken from the prefix cache over all admissions
  int64_t num_preemptions = 0;
  int64_t num_steps = 0;              // batches collected (or failed) so far
  int64_t num_draft_tokens = 0;       // speculative decoding: draft tokens verified so far ...
  int64_t num_accepted_draft_tokens = 0;  // ... and accepted
};

}  // namespace llmapi
