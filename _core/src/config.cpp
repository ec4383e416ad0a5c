// ExecutorConfig validation.
#include "llmapi/config.h"

#include <sstream>
#include <stdexcept>

namespace llmapi {

namespace {

void require_positive(const char* name, int32_t value) {
  if (value < 1) {
    throw std::invalid_argument(std::string(name) + "=" + std::to_string(value) +
                                " is invalid: must be >= 1");
  }
}

}  // namespace

void ExecutorConfig::validate() const {
  require_positive("max_batch_size", max_batch_size);
  require_positive("max_num_tokens", max_num_tokens);
  require_positive("max_seq_len", max_seq_len);
  require_positive("tokens_per_block", tokens_per_block);
  require_positive("num_blocks", num_blocks);
  require_positive("max_inflight_batches", max_inflight_batches);
  if (vocab_size < 0) {
    throw std::invalid_argument("vocab_size=" + std::to_string(vocab_size) +
                                " is invalid: must be >= 0 (0: not checked)");
  }
  if (sliding_window < 0) {
    throw std::invalid_argument("sliding_window=" + std::to_string(sliding_window) +
                                " is invalid: must be >= 0 (0: no window)");
  }
  if (max_encoder_input_len < 0) {
    throw std::invalid_argument("max_encoder_input_len=" + std::to_string(max_encoder_input_len) +
                                " is invalid: must be >= 0 (0: no limit besides max_num_tokens - 1)");
  }
  if (speculative_mode < 0 || speculative_mode > static_cast<int32_t>(SpeculativeMode::kEagle)) {
    throw std::invalid_argument("speculative_mode=" + std::to_string(speculative_mode) +
                                " is invalid: must be 0 (none), 1 (n-gram), 2 (draft model) or 3 (EAGLE)");
  }
  if (capacity_scheduler_policy < 0 ||
      capacity_scheduler_policy > static_cast<int32_t>(CapacitySchedulerPolicy::kGuaranteedNoEvict)) {
    throw std::invalid_argument("capacity_scheduler_policy=" + std::to_string(capacity_scheduler_policy) +
                                " is invalid: must be 0 (max utilization) or 1 (guaranteed no evict)");
  }
  if (speculative_mode != 0) require_positive("max_draft_len", max_draft_len);
  if (max_draft_len < 0) {
    throw std::invalid_argument("max_draft_len=" + std::to_string(max_draft_len) + " is invalid: must be >= 0");
  }
  if (speculative_mode == static_cast<int32_t>(SpeculativeMode::kNgram)) {
    require_positive("max_matching_ngram_size", max_matching_ngram_size);
  }
  if (speculative_mode != 0 && sliding_window > 0) {
    throw std::invalid_argument("speculative_mode=" + std::to_string(speculative_mode) +
                                " is invalid with sliding_window=" + std::to_string(sliding_window) +
                                ": speculative decoding does not support a sliding window");
  }
  if (async_scheduling && max_inflight_batches != 1) {
    throw std::invalid_argument("max_inflight_batches=" + std::to_string(max_inflight_batches) +
                                " is invalid with async_scheduling: it keeps two steps in flight "
                                "itself and needs max_inflight_batches=1");
  }
  // Without chunking a prompt (or a preempted request's recompute) runs in one step, so the step
  // budget must hold the longest sequence, or such a request could never be scheduled.
  if (!enable_chunked_prefill && max_num_tokens < max_seq_len) {
    throw std::invalid_argument(
        "max_num_tokens=" + std::to_string(max_num_tokens) +
        " is invalid: without chunked prefill it must be >= max_seq_len (" +
        std::to_string(max_seq_len) + ")");
  }
}

std::string ExecutorConfig::repr() const {
  std::ostringstream s;
  s << "ExecutorConfig(max_batch_size=" << max_batch_size << ", max_num_tokens=" << max_num_tokens
    << ", max_seq_len=" << max_seq_len << ", tokens_per_block=" << tokens_per_block
    << ", num_blocks=" << num_blocks
    << ", enable_prefix_caching=" << (enable_prefix_caching ? "True" : "False")
    << ", enable_chunked_prefill=" << (enable_chunked_prefill ? "True" : "False")
    << ", max_inflight_batches=" << max_inflight_batches
    << ", async_scheduling=" << (async_scheduling ? "True" : "False")
    << ", vocab_size=" << vocab_size << ", sliding_window=" << sliding_window
    << ", speculative_mode=" << speculative_mode << ", max_draft_len=" << max_draft_len
    << ", max_matching_ngram_size=" << max_matching_ngram_size
    << ", max_encoder_input_len=" << max_encoder_input_len
    << ", capacity_scheduler_policy=" << capacity_scheduler_policy << ")";
  return s.str();
}

}  // namespace llmapi
