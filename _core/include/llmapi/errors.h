// Exception types of the core; the bindings map each to a class of llmapi.errors.
#pragma once

#include <stdexcept>
#include <string>

namespace llmapi {

// One request is invalid (empty prompt, prompt too long, duplicate id); the executor stays usable.
// -> llmapi.errors.RequestError (a ValueError).
class RequestError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// The executor stopped (shut down, or a fatal runner error); every later call raises this.
// -> llmapi.errors.ExecutorDeadError.
class ExecutorDeadError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A runner call failed. `fatal` means the runner is unusable and the executor must die;
// otherwise only the requests of that step fail. -> llmapi.errors.ExecutorError if it escapes.
class RunnerError : public std::runtime_error {
 public:
  RunnerError(const std::string& message, bool fatal) : std::runtime_error(message), fatal_(fatal) {}
  bool fatal() const { return fatal_; }

 private:
  bool fatal_;
};

}  // namespace llmapi
