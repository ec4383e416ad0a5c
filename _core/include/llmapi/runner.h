// Runner: the executor's view of a model runner (the bindings adapt a Python object to it).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "llmapi/batch.h"
#include "llmapi/step_result.h"

namespace llmapi {

// submit and collect are separate so that several batches can be in flight. Both are called from
// the executor's loop thread only; a failure throws RunnerError (fatal or not).
class Runner {
 public:
  virtual ~Runner() = default;
  // Starts running `batch`; returns a ticket for collect().
  virtual uint64_t submit(std::shared_ptr<Batch> batch) = 0;
  // Waits for the batch of `ticket`; returns its rows' candidates (one sampled token per row
  // unless the batch asked for more).
  virtual StepResult collect(uint64_t ticket) = 0;
  // Forgets a ticket that will never be collected (shutdown or death with batches in flight).
  virtual void discard(uint64_t ticket) { (void)ticket; }
};

}  // namespace llmapi
