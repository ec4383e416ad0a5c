// Executor: the loop thread (schedule -> submit -> collect -> update) and its queues.
#include "llmapi/executor.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <utility>

#include "llmapi/errors.h"

namespace llmapi {

Executor::Executor(const ExecutorConfig& config, std::shared_ptr<Runner> runner)
    : config_(config), runner_(std::move(runner)), scheduler_(config) {
  if (!runner_) throw std::invalid_argument("the runner is null");
  stats_ = scheduler_.stats();
  thread_ = std::thread([this] { loop(); });
  loop_id_ = thread_.get_id();
}

Executor::~Executor() { shutdown(); }

uint64_t Executor::enqueue(Request request) {
  Scheduler::check_request(config_, request);
  const uint64_t id = request.request_id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (dead_) throw ExecutorDeadError(dead_message_);
    if (!live_ids_.insert(id).second) {
      throw RequestError("duplicate request id " + std::to_string(id) + ": it is still running");
    }
    incoming_.push_back(std::move(request));
  }
  work_cv_.notify_one();
  return id;
}

std::vector<uint64_t> Executor::enqueue_many(std::vector<Request> requests) {
  // All or nothing: every request is checked (rules, ids unique among themselves and the live ones)
  // before any is queued, and the loop wakes once, to a queue that holds them all.
  std::unordered_set<uint64_t> ids;
  std::vector<uint64_t> out;
  out.reserve(requests.size());
  for (const Request& request : requests) {
    Scheduler::check_request(config_, request);
    if (!ids.insert(request.request_id).second) {
      throw RequestError("duplicate request id " + std::to_string(request.request_id) +
                         " in one enqueue_many call");
    }
    out.push_back(request.request_id);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (dead_) throw ExecutorDeadError(dead_message_);
    for (uint64_t id : out) {
      if (live_ids_.count(id)) {
        throw RequestError("duplicate request id " + std::to_string(id) + ": it is still running");
      }
    }
    live_ids_.insert(out.begin(), out.end());
    for (Request& request : requests) incoming_.push_back(std::move(request));
  }
  work_cv_.notify_one();
  return out;
}

void Executor::abort(uint64_t request_id, int32_t seq_index) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (dead_) return;
    aborts_.emplace_back(request_id, seq_index);
  }
  work_cv_.notify_one();
}

std::vector<Response> Executor::await_responses(std::optional<double> timeout_s) {
  if (timeout_s && !(*timeout_s >= 0)) {
    throw std::invalid_argument("timeout_s=" + std::to_string(*timeout_s) +
                                " is invalid: must be >= 0 or None");
  }
  std::unique_lock<std::mutex> lock(mu_);
  auto ready = [this] { return !responses_.empty() || loop_done_; };
  if (!timeout_s) {
    response_cv_.wait(lock, ready);
  } else {
    // Capped so the deadline cannot overflow the clock; a year is "forever" here.
    const double seconds = std::min(*timeout_s, 365.0 * 24 * 3600);
    response_cv_.wait_for(lock, std::chrono::duration<double>(seconds), ready);
  }
  if (!responses_.empty()) {
    std::vector<Response> out(std::make_move_iterator(responses_.begin()),
                              std::make_move_iterator(responses_.end()));
    responses_.clear();
    return out;
  }
  if (loop_done_) throw ExecutorDeadError(dead_message_);
  return {};
}

bool Executor::loop_done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return loop_done_;
}

Stats Executor::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  Stats s = stats_;
  s.num_waiting += static_cast<int64_t>(incoming_.size());
  return s;
}

void Executor::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    if (!dead_) {
      dead_ = true;
      dead_message_ = "the executor was shut down";
    }
  }
  work_cv_.notify_all();
  if (on_loop_thread()) return;  // the loop exits after this step
  std::lock_guard<std::mutex> join_lock(join_mu_);
  if (thread_.joinable()) thread_.join();
}

void Executor::loop() {
  try {
    while (!loop_dead_) {
      std::deque<Request> incoming;
      std::vector<std::pair<uint64_t, int32_t>> aborts;
      {
        std::unique_lock<std::mutex> lock(mu_);
        work_cv_.wait(lock, [this] {
          return stop_ || !incoming_.empty() || !aborts_.empty() || scheduler_.has_unfinished() ||
                 !inflight_.empty();
        });
        if (stop_) break;
        incoming.swap(incoming_);
        aborts.swap(aborts_);
      }
      std::vector<Response> responses;
      for (Request& request : incoming) {
        try {
          scheduler_.add(std::move(request));
        } catch (const RequestError& e) {  // enqueue checked the same rules; kept for safety
          request.status = RequestStatus::kFinished;
          request.finish_reason = "error";
          request.error = e.what();
          responses.push_back(Response::of(request));
        }
      }
      for (const auto& [id, seq_index] : aborts) {
        for (Response& r : scheduler_.abort(id, seq_index)) responses.push_back(std::move(r));
      }
      publish(std::move(responses));
      run_steps();
    }
  } catch (const std::exception& e) {
    // A bug in the core, not in the runner: the state cannot be trusted, so the executor dies.
    const std::string message = std::string("internal executor error: ") + e.what();
    finish_loop("error", message, "the executor is dead: " + message);
    return;
  }
  if (!loop_dead_) finish_loop("abort", "", "the executor was shut down");
}

void Executor::run_steps() {
  // Async scheduling submits step N+1 before it collects step N, so the runner's device works
  // through N+1 while this thread settles N.
  const int32_t max_inflight = config_.async_scheduling ? 2 : config_.max_inflight_batches;
  while (static_cast<int32_t>(inflight_.size()) < max_inflight) {
    SchedulerOutput output = scheduler_.schedule();
    if (output.scheduled.empty()) break;
    auto batch = std::make_shared<Batch>(scheduler_.make_batch(output));
    uint64_t ticket = 0;
    try {
      ticket = runner_->submit(std::move(batch));
    } catch (const RunnerError& e) {
      on_runner_error(output, e.what(), e.fatal());
      if (loop_dead_) return;
      continue;
    }
    inflight_.push_back({std::move(output), ticket});
  }
  if (inflight_.empty()) {
    // Unreachable by the scheduler's invariants (see scheduler.h); never spin on it.
    if (scheduler_.has_unfinished()) {
      publish(scheduler_.finish_all("error", "internal executor error: no request could be scheduled"));
    }
    return;
  }
  InflightStep step = std::move(inflight_.front());
  inflight_.pop_front();
  StepResult result;
  try {
    result = runner_->collect(step.ticket);
  } catch (const RunnerError& e) {
    on_runner_error(step.output, e.what(), e.fatal());
    return;
  }
  if (static_cast<size_t>(result.num_rows) != step.output.scheduled.size()) {
    on_runner_error(step.output,
                    "runner.collect returned " + std::to_string(result.num_rows) +
                        " tokens for a batch of " + std::to_string(step.output.scheduled.size()) +
                        " requests",
                    false);
    return;
  }
  publish(scheduler_.update(step.output, result));
}

void Executor::on_runner_error(const SchedulerOutput& output, const std::string& message,
                               bool fatal) {
  if (!fatal) {
    publish(scheduler_.fail(output, message));
    return;
  }
  finish_loop("error", message, "the executor is dead: " + message);
}

void Executor::finish_loop(const std::string& reason, const std::string& error,
                           const std::string& dead_message) {
  loop_dead_ = true;
  for (const InflightStep& step : inflight_) runner_->discard(step.ticket);
  inflight_.clear();
  std::vector<Response> responses = scheduler_.finish_all(reason, error);
  const Stats stats = scheduler_.stats();
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Requests enqueued after the loop's last look at the queue end the same way.
    for (Request& request : incoming_) {
      request.status = RequestStatus::kFinished;
      request.finish_reason = reason;
      request.error = error;
      responses.push_back(Response::of(request));
    }
    incoming_.clear();
    aborts_.clear();
    if (!dead_) {
      dead_ = true;
      dead_message_ = dead_message;
    }
    for (Response& r : responses) responses_.push_back(std::move(r));
    live_ids_.clear();
    stats_ = stats;
    loop_done_ = true;
  }
  response_cv_.notify_all();
}

void Executor::publish(std::vector<Response> responses) {
  const Stats stats = scheduler_.stats();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_ = stats;
    for (Response& r : responses) {
      if (r.request_finished) live_ids_.erase(r.request_id);
      responses_.push_back(std::move(r));
    }
  }
  if (!responses.empty()) response_cv_.notify_all();
}

}  // namespace llmapi
