// SchedulerOutput: the decisions of one scheduling step.
#pragma once

#include <cstdint>
#include <vector>

namespace llmapi {

struct ScheduledRequest {
  uint64_t request_id = 0;
  int32_t num_computed_tokens = 0;  // before this step: the first new token's position
  int32_t num_new_tokens = 0;       // tokens computed this step
  bool do_sample = false;           // this step reaches the request's last known token
};

struct SchedulerOutput {
  std::vector<ScheduledRequest> scheduled;  // running requests first (admission order), then new
  std::vector<uint64_t> preempted;          // in preemption order
  int32_t num_tokens = 0;
};

}  // namespace llmapi
