// Executor: the loop thread that schedules, runs and settles steps, and its request/response queues.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "llmapi/config.h"
#include "llmapi/request.h"
#include "llmapi/response.h"
#include "llmapi/runner.h"
#include "llmapi/scheduler.h"
#include "llmapi/stats.h"

namespace llmapi {

// Thread model: public methods may be called from any thread; they only touch the queues under
// mu_. The scheduler, block manager and runner belong to the loop thread alone, which sleeps on
// work_cv_ when it has nothing to do. Each iteration: take new requests and aborts, then
// schedule -> make_batch -> runner.submit while fewer than max_inflight_batches are in flight
// (2 with async_scheduling: step N+1 is submitted before step N is collected, see scheduler.h),
// then runner.collect the oldest -> update -> queue responses.
//
// Runner failures fail that step's requests ("error"); a fatal one kills the executor: every
// pending request fails and later enqueue / await_responses (once drained) throw ExecutorDeadError.
// shutdown() aborts pending requests ("abort") and joins the loop thread.
class Executor {
 public:
  Executor(const ExecutorConfig& config, std::shared_ptr<Runner> runner);
  ~Executor();  // shutdown()
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Throws RequestError (invalid / duplicate id) or ExecutorDeadError.
  uint64_t enqueue(Request request);
  // enqueue for several requests at once: all are queued or, on any error, none.
  std::vector<uint64_t> enqueue_many(std::vector<Request> requests);
  // Finishes the request (or only its sequence `seq_index` if >= 0) "abort"; unknown or
  // finished ids and a dead executor are ignored.
  void abort(uint64_t request_id, int32_t seq_index = -1);
  // Waits up to `timeout_s` (forever if nullopt) for responses and takes all queued ones; [] on
  // timeout. Once the executor is dead and drained, throws ExecutorDeadError.
  std::vector<Response> await_responses(std::optional<double> timeout_s);
  Stats stats() const;
  // Idempotent; safe from any thread. Blocks until the loop thread has exited (except when
  // called from the loop thread itself, e.g. by the runner: then the loop stops after this step).
  void shutdown();
  bool on_loop_thread() const { return std::this_thread::get_id() == loop_id_; }
  // Whether the loop thread has queued its last response (it returns right after).
  bool loop_done() const;

 private:
  struct InflightStep {
    SchedulerOutput output;
    uint64_t ticket;
  };

  void loop();
  void run_steps();
  void on_runner_error(const SchedulerOutput& output, const std::string& message, bool fatal);
  // Ends the loop: every pending request finishes with `reason`; the executor is dead after.
  void finish_loop(const std::string& reason, const std::string& error,
                   const std::string& dead_message);
  void publish(std::vector<Response> responses);

  const ExecutorConfig config_;
  std::shared_ptr<Runner> runner_;

  mutable std::mutex mu_;                // guards everything down to the loop-thread-only part
  std::condition_variable work_cv_;      // the loop thread waits for requests / aborts / stop
  std::condition_variable response_cv_;  // await_responses waits for responses / the end
  std::deque<Request> incoming_;
  std::vector<std::pair<uint64_t, int32_t>> aborts_;  // (request id, sequence or -1)
  std::unordered_set<uint64_t> live_ids_;  // enqueued and not finished: duplicate check
  std::deque<Response> responses_;
  Stats stats_;                           // published by the loop thread after each iteration
  bool stop_ = false;                     // shutdown() asked
  bool dead_ = false;                     // no more requests accepted
  bool loop_done_ = false;                // the loop thread queued its last response
  std::string dead_message_;

  // Loop thread only.
  Scheduler scheduler_;
  std::deque<InflightStep> inflight_;
  bool loop_dead_ = false;  // a fatal error ended the loop

  std::thread::id loop_id_;  // a runner calling shutdown() from the loop thread must not join

  std::mutex join_mu_;  // two threads calling shutdown() must not both join
  std::thread thread_;  // last: starts after everything above is constructed
};

}  // namespace llmapi
