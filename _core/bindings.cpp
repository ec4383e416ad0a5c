// Python bindings of the C++ core (module llmapi._core): numpy arrays in and out, no torch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "llmapi/batch.h"
#include "llmapi/block_manager.h"
#include "llmapi/config.h"
#include "llmapi/errors.h"
#include "llmapi/executor.h"
#include "llmapi/request.h"
#include "llmapi/response.h"
#include "llmapi/runner.h"
#include "llmapi/scheduler.h"
#include "llmapi/speculative.h"
#include "llmapi/stats.h"
#include "llmapi/step_result.h"

namespace py = pybind11;
using namespace pybind11::literals;
using namespace llmapi;

namespace {

// llmapi.errors classes, looked up once at import; never released (live until the process ends).
PyObject* g_request_error = nullptr;
PyObject* g_executor_dead_error = nullptr;
PyObject* g_executor_error = nullptr;

py::dict stats_dict(const Stats& s) {
  return py::dict("num_free_blocks"_a = s.num_free_blocks, "num_used_blocks"_a = s.num_used_blocks,
                  "num_cached_blocks"_a = s.num_cached_blocks, "num_running"_a = s.num_running,
                  "num_waiting"_a = s.num_waiting, "num_prefix_hit_tokens"_a = s.num_prefix_hit_tokens,
                  "num_preemptions"_a = s.num_preemptions, "num_steps"_a = s.num_steps,
                  "num_draft_tokens"_a = s.num_draft_tokens,
                  "num_accepted_draft_tokens"_a = s.num_accepted_draft_tokens);
}

// A read-only numpy view of a Batch vector; `owner` (the Python Batch) keeps the memory alive.
template <typename T>
py::array view(const py::object& owner, const std::vector<T>& v, std::vector<py::ssize_t> shape) {
  py::array a(py::dtype::of<T>(), std::move(shape), {}, v.data(), owner);
  a.attr("setflags")("write"_a = false);
  return a;
}

// A request's adapter settings (see Request), checked: RequestError names a bad one.
void set_adapters(Request& r, int32_t adapter_slot, uint64_t cache_salt, int32_t prompt_table_size) {
  if (adapter_slot < -1) {
    throw RequestError("adapter_slot=" + std::to_string(adapter_slot) + " is invalid: must be >= -1");
  }
  if (prompt_table_size < 0) {
    throw RequestError("prompt_table_size=" + std::to_string(prompt_table_size) + " is invalid: must be >= 0");
  }
  r.adapter_slot = adapter_slot;
  r.cache_salt = cache_salt;
  r.prompt_table_size = prompt_table_size;
}

template <typename T>
void def_view(py::class_<Batch, std::shared_ptr<Batch>>& cls, const char* name,
              std::vector<T> Batch::*member) {
  cls.def_property_readonly(name, [member](const py::object& self) {
    const std::vector<T>& v = self.cast<const Batch&>().*member;
    return view(self, v, {static_cast<py::ssize_t>(v.size())});
  });
}

template <typename T>
std::vector<T> flat(const py::object& value, int32_t rows, int32_t cols, const char* name) {
  using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;
  Array a = Array::ensure(value);
  if (!a || a.ndim() != 2 || a.shape(0) != rows || (cols >= 0 && a.shape(1) != cols)) {
    throw std::invalid_argument(std::string("step result field ") + name + " must be a [" +
                                std::to_string(rows) + ", " +
                                (cols >= 0 ? std::to_string(cols) : std::string("L")) +
                                "] array, got " + std::string(py::str(py::repr(value))));
  }
  return std::vector<T>(a.data(), a.data() + a.size());
}

// A runner's answer: a 1-D integer array (one token per row), or an object whose `tokens` is
// [R, K] with optional `scores`, `logprobs`, `ranks` ([R, K]), `top_ids`, `top_logprobs` ([R, L])
// and `errors` ({row: message} of rows whose request failed alone).
StepResult to_step_result(const py::object& out) {
  if (!py::hasattr(out, "tokens")) {
    using Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
    Array tokens = Array::ensure(out);
    if (!tokens || tokens.ndim() != 1) {
      throw std::invalid_argument("runner.collect must return a 1-D integer array, got " +
                                  std::string(py::str(py::repr(out))));
    }
    return StepResult::of_tokens(std::vector<int32_t>(tokens.data(), tokens.data() + tokens.size()));
  }
  using Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
  Array tokens = Array::ensure(out.attr("tokens"));
  if (!tokens || tokens.ndim() != 2) {
    throw std::invalid_argument("step result field tokens must be a 2-D integer array");
  }
  StepResult s;
  s.num_rows = static_cast<int32_t>(tokens.shape(0));
  s.num_candidates = static_cast<int32_t>(tokens.shape(1));
  s.tokens.assign(tokens.data(), tokens.data() + tokens.size());
  auto get = [&](const char* name) { return py::getattr(out, name, py::none()); };
  if (!get("scores").is_none()) s.scores = flat<float>(get("scores"), s.num_rows, s.num_candidates, "scores");
  if (!get("logprobs").is_none()) s.logprobs = flat<float>(get("logprobs"), s.num_rows, s.num_candidates, "logprobs");
  if (!get("ranks").is_none()) s.ranks = flat<int32_t>(get("ranks"), s.num_rows, s.num_candidates, "ranks");
  if (!get("top_ids").is_none()) {
    // [R, L], or [R, K * L] with top_per_token (a list per candidate).
    s.top_per_token = py::bool_(py::getattr(out, "top_per_token", py::bool_(false)));
    s.top_ids = flat<int32_t>(get("top_ids"), s.num_rows, -1, "top_ids");
    const int32_t lists = s.top_per_token ? s.num_candidates : 1;
    s.num_top = s.num_rows > 0 ? static_cast<int32_t>(s.top_ids.size() / s.num_rows) / lists : 0;
    if (static_cast<size_t>(s.num_top) * lists * s.num_rows != s.top_ids.size()) {
      throw std::invalid_argument("step result field top_ids must be [R, K * L] with top_per_token");
    }
    s.top_logprobs = flat<float>(get("top_logprobs"), s.num_rows, s.num_top * lists, "top_logprobs");
  }
  py::object errors = get("errors");
  if (!errors.is_none()) {
    if (!py::isinstance<py::dict>(errors)) {
      throw std::invalid_argument("step result field errors must be a dict {row: message}");
    }
    for (auto item : errors.cast<py::dict>()) {
      const int32_t row = item.first.cast<int32_t>();
      if (row < 0 || row >= s.num_rows) {
        throw std::invalid_argument("step result field errors names row " + std::to_string(row) +
                                    " of a batch of " + std::to_string(s.num_rows) + " rows");
      }
      s.row_errors.emplace_back(row, py::str(item.second).cast<std::string>());
    }
  }
  return s;
}

// Adapts a Python runner (submit(batch) -> handle, collect(handle) -> int array [R]). Called from
// the executor's loop thread: the GIL is taken for each call only.
class PyRunner final : public Runner {
 public:
  explicit PyRunner(py::object runner) : runner_(std::move(runner)) {}
  ~PyRunner() override {
    py::gil_scoped_acquire gil;  // Python handles die with the GIL held
    handles_.clear();
    runner_ = py::object();
  }

  uint64_t submit(std::shared_ptr<Batch> batch) override {
    py::gil_scoped_acquire gil;
    try {
      py::object handle = runner_.attr("submit")(std::move(batch));
      handles_.emplace(next_ticket_, std::move(handle));
      return next_ticket_++;
    } catch (py::error_already_set& e) {
      throw to_runner_error(e, "submit");
    }
  }

  StepResult collect(uint64_t ticket) override {
    py::gil_scoped_acquire gil;
    auto it = handles_.find(ticket);
    if (it == handles_.end()) throw RunnerError("collect of an unknown batch", true);
    py::object handle = std::move(it->second);
    handles_.erase(it);
    try {
      py::object out = runner_.attr("collect")(handle);
      try {
        return to_step_result(out);
      } catch (const std::invalid_argument& e) {
        throw RunnerError(e.what(), false);
      }
    } catch (py::error_already_set& e) {
      throw to_runner_error(e, "collect");
    }
  }

  void discard(uint64_t ticket) override {
    py::gil_scoped_acquire gil;
    handles_.erase(ticket);
  }

 private:
  // "Type: message"; fatal if the exception has a true `fatal` attribute. The traceback goes to
  // the "llmapi.executor" logger, since the response carries only the message.
  static RunnerError to_runner_error(py::error_already_set& e, const char* call) {
    bool fatal = false;
    std::string message;
    try {
      py::object flag = py::getattr(e.value(), "fatal", py::none());
      fatal = !flag.is_none() && PyObject_IsTrue(flag.ptr()) == 1;
      message = py::str(e.type().attr("__name__"));
      const std::string detail = py::str(e.value());
      if (!detail.empty()) message += ": " + detail;
      py::module_::import("logging").attr("getLogger")("llmapi.executor").attr("error")(
          "runner.%s failed%s", call, fatal ? " (fatal)" : "",
          "exc_info"_a = py::make_tuple(e.type(), e.value(), e.trace()));
    } catch (py::error_already_set&) {
      if (message.empty()) message = std::string("runner.") + call + " failed";
    }
    return RunnerError(message, fatal);
  }

  py::object runner_;
  std::unordered_map<uint64_t, py::object> handles_;  // touched only with the GIL held
  uint64_t next_ticket_ = 0;
};

// Owns the Executor so that its loop thread is joined with the GIL released (the thread may be
// waiting for the GIL to call the runner) and the runner is destroyed with the GIL held.
class PyExecutor;
std::set<PyExecutor*>& live_executors() {  // guarded by the GIL; leaked: used at exit
  static auto* executors = new std::set<PyExecutor*>();
  return *executors;
}

class PyExecutor {
 public:
  PyExecutor(const ExecutorConfig& config, py::object runner)
      : executor_(std::make_unique<Executor>(config, std::make_shared<PyRunner>(std::move(runner)))) {
    live_executors().insert(this);
  }
  ~PyExecutor() {
    live_executors().erase(this);
    if (executor_->on_loop_thread()) {
      // Collected by a garbage collection inside a runner call: the loop must finish its step
      // before the executor can go, so a helper thread joins it, then destroys it.
      executor_->shutdown();  // from the loop thread: only asks it to stop after this step
      std::thread([executor = std::move(executor_)]() mutable {
        executor->shutdown();
        py::gil_scoped_acquire gil;
        executor.reset();
      }).detach();
      return;
    }
    shutdown();
  }
  Executor& get() { return *executor_; }
  void shutdown() {
    shutting_down_ = true;
    py::gil_scoped_release release;
    executor_->shutdown();
  }
  // Another thread is already shutting this executor down (and joins its loop thread).
  bool shutting_down() const { return shutting_down_; }

 private:
  std::unique_ptr<Executor> executor_;
  std::atomic<bool> shutting_down_{false};
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "llmapi's C++ core: requests, paged-KV block manager, scheduler and executor loop.";

  py::module_ errors = py::module_::import("llmapi.errors");
  g_request_error = py::object(errors.attr("RequestError")).release().ptr();
  g_executor_dead_error = py::object(errors.attr("ExecutorDeadError")).release().ptr();
  g_executor_error = py::object(errors.attr("ExecutorError")).release().ptr();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const RequestError& e) {
      PyErr_SetString(g_request_error, e.what());
    } catch (const ExecutorDeadError& e) {
      PyErr_SetString(g_executor_dead_error, e.what());
    } catch (const RunnerError& e) {
      PyErr_SetString(g_executor_error, e.what());
    }
  });

  m.def("propose_ngram", &propose_ngram, "tokens"_a, "max_ngram_size"_a, "max_draft_len"_a,
        "N-gram drafts: the tokens after the most recent earlier occurrence of the longest suffix of "
        "`tokens` (max_ngram_size tokens down to 1), at most max_draft_len of them.");

  m.def("encode_responses", [](const std::vector<Response>& responses) {
    return py::bytes(encode_responses(responses));
  }, "responses"_a, "Responses as one byte string for another process (decode_responses reads it).");
  m.def("decode_responses", [](const py::bytes& data) { return decode_responses(std::string(data)); }, "data"_a,
        "The Responses encode_responses wrote (ValueError for bytes that are not such).");

  py::class_<ExecutorConfig>(m, "ExecutorConfig")
      .def(py::init([](int32_t max_batch_size, int32_t max_num_tokens, int32_t max_seq_len,
                       int32_t tokens_per_block, int32_t num_blocks, bool enable_prefix_caching,
                       bool enable_chunked_prefill, int32_t max_inflight_batches,
                       bool async_scheduling, int32_t vocab_size, int32_t sliding_window,
                       int32_t speculative_mode, int32_t max_draft_len, int32_t max_matching_ngram_size,
                       int32_t max_encoder_input_len, int32_t capacity_scheduler_policy) {
             ExecutorConfig c{max_batch_size, max_num_tokens, max_seq_len, tokens_per_block,
                              num_blocks, enable_prefix_caching, enable_chunked_prefill,
                              max_inflight_batches, async_scheduling, vocab_size, sliding_window,
                              speculative_mode, max_draft_len, max_matching_ngram_size,
                              max_encoder_input_len, capacity_scheduler_policy};
             c.validate();
             return c;
           }),
           "max_batch_size"_a, "max_num_tokens"_a, "max_seq_len"_a, "tokens_per_block"_a,
           "num_blocks"_a, "enable_prefix_caching"_a = true, "enable_chunked_prefill"_a = true,
           "max_inflight_batches"_a = 1, "async_scheduling"_a = false, "vocab_size"_a = 0,
           "sliding_window"_a = 0, "speculative_mode"_a = 0, "max_draft_len"_a = 0,
           "max_matching_ngram_size"_a = 0, "max_encoder_input_len"_a = 0, "capacity_scheduler_policy"_a = 0)
      .def_readonly("max_batch_size", &ExecutorConfig::max_batch_size)
      .def_readonly("max_num_tokens", &ExecutorConfig::max_num_tokens)
      .def_readonly("max_seq_len", &ExecutorConfig::max_seq_len)
      .def_readonly("tokens_per_block", &ExecutorConfig::tokens_per_block)
      .def_readonly("num_blocks", &ExecutorConfig::num_blocks)
      .def_readonly("enable_prefix_caching", &ExecutorConfig::enable_prefix_caching)
      .def_readonly("enable_chunked_prefill", &ExecutorConfig::enable_chunked_prefill)
      .def_readonly("max_inflight_batches", &ExecutorConfig::max_inflight_batches)
      .def_readonly("async_scheduling", &ExecutorConfig::async_scheduling)
      .def_readonly("vocab_size", &ExecutorConfig::vocab_size)
      .def_readonly("sliding_window", &ExecutorConfig::sliding_window)
      .def_readonly("speculative_mode", &ExecutorConfig::speculative_mode)
      .def_readonly("max_draft_len", &ExecutorConfig::max_draft_len)
      .def_readonly("max_matching_ngram_size", &ExecutorConfig::max_matching_ngram_size)
      .def_readonly("max_encoder_input_len", &ExecutorConfig::max_encoder_input_len)
      .def_readonly("capacity_scheduler_policy", &ExecutorConfig::capacity_scheduler_policy)
      .def("__repr__", &ExecutorConfig::repr);

  py::class_<Request>(m, "Request")
      .def(py::init([](uint64_t request_id, std::vector<int32_t> prompt_token_ids,
                       int32_t max_tokens, int32_t min_tokens, std::vector<int32_t> eos_token_ids,
                       std::vector<int32_t> stop_token_ids, bool ignore_eos, float temperature,
                       int32_t top_k, float top_p, int64_t seed, float min_p,
                       float repetition_penalty, float presence_penalty, float frequency_penalty,
                       std::vector<std::vector<int32_t>> bad_words,
                       std::map<int32_t, float> logit_bias, int32_t num_sequences,
                       bool beam_search, float length_penalty, int32_t early_stopping,
                       int32_t num_returned, int32_t logprobs, int32_t prompt_logprobs,
                       bool context_logits, bool generation_logits, bool token_history,
                       int32_t adapter_slot, uint64_t cache_salt, int32_t prompt_table_size,
                       std::vector<int32_t> encoder_token_ids, int32_t no_repeat_ngram_size,
                       int32_t forced_eos_token_id, int32_t forced_bos_token_id) {
             StopConfig stop{max_tokens, min_tokens, std::move(eos_token_ids),
                             std::move(stop_token_ids), ignore_eos, forced_eos_token_id, forced_bos_token_id};
             if (early_stopping < 0 || early_stopping > 2) {
               throw RequestError("early_stopping=" + std::to_string(early_stopping) +
                                  " is invalid: must be 0 (heuristic), 1 (true) or 2 (never)");
             }
             SamplingConfig c;
             c.temperature = temperature;
             c.top_k = top_k;
             c.top_p = top_p;
             c.min_p = min_p;
             c.seed = seed;
             c.repetition_penalty = repetition_penalty;
             c.presence_penalty = presence_penalty;
             c.frequency_penalty = frequency_penalty;
             c.bad_words = std::move(bad_words);
             for (const auto& [id, bias] : logit_bias) {
               c.logit_bias_ids.push_back(id);
               c.logit_bias_values.push_back(bias);
             }
             c.num_sequences = num_sequences;
             c.beam_search = beam_search;
             c.length_penalty = length_penalty;
             c.early_stopping = static_cast<EarlyStopping>(early_stopping);
             c.num_returned = num_returned;
             c.logprobs = logprobs;
             c.prompt_logprobs = prompt_logprobs;
             c.context_logits = context_logits;
             c.generation_logits = generation_logits;
             c.token_history = token_history;
             c.no_repeat_ngram_size = no_repeat_ngram_size;
             Request r(request_id, std::move(prompt_token_ids), std::move(stop), std::move(c));
             set_adapters(r, adapter_slot, cache_salt, prompt_table_size);
             r.set_encoder_input(std::move(encoder_token_ids));  // after the salt: it mixes into it
             return r;
           }),
           "request_id"_a, "prompt_token_ids"_a, "max_tokens"_a, "min_tokens"_a = 0,
           "eos_token_ids"_a = std::vector<int32_t>{}, "stop_token_ids"_a = std::vector<int32_t>{},
           "ignore_eos"_a = false, "temperature"_a = 1.0f, "top_k"_a = 0, "top_p"_a = 1.0f,
           "seed"_a = 0, "min_p"_a = 0.0f, "repetition_penalty"_a = 1.0f,
           "presence_penalty"_a = 0.0f, "frequency_penalty"_a = 0.0f,
           "bad_words"_a = std::vector<std::vector<int32_t>>{},
           "logit_bias"_a = std::map<int32_t, float>{}, "num_sequences"_a = 1,
           "beam_search"_a = false, "length_penalty"_a = 1.0f, "early_stopping"_a = 0,
           "num_returned"_a = 1, "logprobs"_a = -1, "prompt_logprobs"_a = -1,
           "context_logits"_a = false, "generation_logits"_a = false, "token_history"_a = false,
           "adapter_slot"_a = -1, "cache_salt"_a = 0, "prompt_table_size"_a = 0,
           "encoder_token_ids"_a = std::vector<int32_t>{}, "no_repeat_ngram_size"_a = 0,
           "forced_eos_token_id"_a = -1, "forced_bos_token_id"_a = -1)
      // A new request with this one's settings and another prompt, id, length limits and seed: what
      // the constructor would make of the same settings, without converting them again (the fast way
      // to build many requests that share their SamplingParams).
      .def(
          "with_prompt",
          [](const Request& r, uint64_t request_id, std::vector<int32_t> prompt_token_ids,
             int32_t max_tokens, int32_t min_tokens, int64_t seed, int32_t adapter_slot,
             uint64_t cache_salt, int32_t prompt_table_size, std::vector<int32_t> encoder_token_ids) {
            StopConfig stop = r.stop;
            stop.max_tokens = max_tokens;
            stop.min_tokens = min_tokens;
            SamplingConfig sampling = r.sampling;
            sampling.seed = seed;
            Request made(request_id, std::move(prompt_token_ids), std::move(stop), std::move(sampling));
            set_adapters(made, adapter_slot, cache_salt, prompt_table_size);
            made.set_encoder_input(std::move(encoder_token_ids));
            return made;
          },
          "request_id"_a, "prompt_token_ids"_a, "max_tokens"_a, "min_tokens"_a, "seed"_a,
          "adapter_slot"_a = -1, "cache_salt"_a = 0, "prompt_table_size"_a = 0,
          py::kw_only(), "encoder_token_ids"_a = std::vector<int32_t>{})
      .def_readonly("request_id", &Request::request_id)
      .def_property_readonly("prompt_token_ids", &Request::prompt_token_ids)
      .def_property_readonly("output_token_ids", &Request::output_token_ids)
      .def_property_readonly("num_tokens", &Request::num_tokens)
      .def_property_readonly("max_tokens", [](const Request& r) { return r.stop.max_tokens; })
      .def_property_readonly("min_tokens", [](const Request& r) { return r.stop.min_tokens; })
      .def_property_readonly("eos_token_ids", [](const Request& r) { return r.stop.eos_token_ids; })
      .def_property_readonly("stop_token_ids", [](const Request& r) { return r.stop.stop_token_ids; })
      .def_property_readonly("ignore_eos", [](const Request& r) { return r.stop.ignore_eos; })
      .def_property_readonly("temperature", [](const Request& r) { return r.sampling.temperature; })
      .def_property_readonly("top_k", [](const Request& r) { return r.sampling.top_k; })
      .def_property_readonly("top_p", [](const Request& r) { return r.sampling.top_p; })
      .def_property_readonly("seed", [](const Request& r) { return r.sampling.seed; })
      .def_property_readonly("num_sequences", [](const Request& r) { return r.sampling.num_sequences; })
      .def_property_readonly("beam_search", [](const Request& r) { return r.sampling.beam_search; })
      .def_property_readonly("requested_logprobs", [](const Request& r) { return r.sampling.logprobs; })
      // The rest of the constructor's settings, so that a Request can be sent to another process.
      .def_property_readonly("min_p", [](const Request& r) { return r.sampling.min_p; })
      .def_property_readonly("repetition_penalty", [](const Request& r) { return r.sampling.repetition_penalty; })
      .def_property_readonly("presence_penalty", [](const Request& r) { return r.sampling.presence_penalty; })
      .def_property_readonly("frequency_penalty", [](const Request& r) { return r.sampling.frequency_penalty; })
      .def_property_readonly("bad_words", [](const Request& r) { return r.sampling.bad_words; })
      .def_property_readonly("logit_bias",
                             [](const Request& r) {
                               std::map<int32_t, float> bias;
                               for (size_t i = 0; i < r.sampling.logit_bias_ids.size(); ++i) {
                                 bias[r.sampling.logit_bias_ids[i]] += r.sampling.logit_bias_values[i];
                               }
                               return bias;
                             })
      .def_property_readonly("length_penalty", [](const Request& r) { return r.sampling.length_penalty; })
      .def_property_readonly("early_stopping",
                             [](const Request& r) { return static_cast<int32_t>(r.sampling.early_stopping); })
      .def_property_readonly("num_returned", [](const Request& r) { return r.sampling.num_returned; })
      .def_property_readonly("prompt_logprobs", [](const Request& r) { return r.sampling.prompt_logprobs; })
      .def_property_readonly("context_logits", [](const Request& r) { return r.sampling.context_logits; })
      .def_property_readonly("generation_logits", [](const Request& r) { return r.sampling.generation_logits; })
      .def_property_readonly("token_history", [](const Request& r) { return r.sampling.token_history; })
      .def_property_readonly("no_repeat_ngram_size", [](const Request& r) { return r.sampling.no_repeat_ngram_size; })
      .def_property_readonly("forced_eos_token_id", [](const Request& r) { return r.stop.forced_eos_token_id; })
      .def_property_readonly("forced_bos_token_id", [](const Request& r) { return r.stop.forced_bos_token_id; })
      .def_readonly("encoder_token_ids", &Request::encoder_token_ids)
      .def_readonly("cross_block_ids", &Request::cross_block_ids)
      .def_readonly("adapter_slot", &Request::adapter_slot)
      .def_readonly("cache_salt", &Request::cache_salt)
      .def_readonly("prompt_table_size", &Request::prompt_table_size)
      .def_readonly("user_id", &Request::user_id)
      .def_readonly("seq_index", &Request::seq_index)
      .def_readonly("slot", &Request::slot)
      .def_property_readonly("status", [](const Request& r) { return to_string(r.status); })
      .def_readonly("num_computed_tokens", &Request::num_computed_tokens)
      .def_readonly("block_ids", &Request::block_ids)
      .def_readonly("num_cached_tokens", &Request::num_cached_tokens)
      .def_readonly("num_preemptions", &Request::num_preemptions)
      .def_readonly("num_draft_computed", &Request::num_draft_computed)
      .def_readonly("num_draft_tokens", &Request::num_draft_tokens)
      .def_readonly("num_accepted_draft_tokens", &Request::num_accepted_draft_tokens)
      .def("__repr__", [](const Request& r) {
        return "Request(request_id=" + std::to_string(r.request_id) + ", status='" +
               to_string(r.status) + "', num_tokens=" + std::to_string(r.num_tokens()) +
               ", num_computed_tokens=" + std::to_string(r.num_computed_tokens) + ")";
      });

  py::class_<Response>(m, "Response")
      .def_readonly("request_id", &Response::request_id)
      .def_readonly("seq_index", &Response::seq_index)
      .def_readonly("token_ids", &Response::token_ids)
      .def_readonly("finished", &Response::finished)
      .def_readonly("request_finished", &Response::request_finished)
      .def_readonly("num_top_logprobs", &Response::num_top_logprobs)
      .def_readonly("logprobs", &Response::logprobs)
      .def_readonly("ranks", &Response::ranks)
      .def_readonly("top_ids", &Response::top_ids)
      .def_readonly("top_logprobs", &Response::top_logprobs)
      .def_readonly("cumulative_logprob", &Response::cumulative_logprob)
      .def_readonly("finish_reason", &Response::finish_reason)
      .def_readonly("stop_reason", &Response::stop_reason)
      .def_readonly("error", &Response::error)
      .def_readonly("num_prompt_tokens", &Response::num_prompt_tokens)
      .def_readonly("num_cached_tokens", &Response::num_cached_tokens)
      .def_readonly("num_draft_tokens", &Response::num_draft_tokens)
      .def_readonly("num_accepted_draft_tokens", &Response::num_accepted_draft_tokens)
      .def("__repr__", [](const Response& r) {
        return "Response(request_id=" + std::to_string(r.request_id) + ", seq_index=" +
               std::to_string(r.seq_index) + ", token_ids=" +
               std::string(py::str(py::cast(r.token_ids))) + ", finished=" +
               (r.finished ? "True" : "False") + ", finish_reason='" + r.finish_reason +
               "', stop_reason=" + std::to_string(r.stop_reason) + ", error='" + r.error + "')";
      });

  py::class_<Batch, std::shared_ptr<Batch>> batch(m, "Batch");
  batch.def_readonly("num_tokens", &Batch::num_tokens)
      .def_readonly("num_requests", &Batch::num_requests)
      .def_readonly("tokens_per_block", &Batch::tokens_per_block)
      .def_property_readonly("block_tables", [](const py::object& self) {
        const Batch& b = self.cast<const Batch&>();
        return view(self, b.block_tables, {b.num_requests, b.max_blocks});
      })
      .def_property_readonly("block_copies", [](const py::object& self) {
        const Batch& b = self.cast<const Batch&>();
        return view(self, b.block_copies, {static_cast<py::ssize_t>(b.block_copies.size() / 2), 2});
      })
      .def_readonly("max_cross_blocks", &Batch::max_cross_blocks)
      .def_property_readonly("cross_block_tables", [](const py::object& self) {
        const Batch& b = self.cast<const Batch&>();
        return view(self, b.cross_block_tables, {b.num_requests, b.max_cross_blocks});
      });
  def_view(batch, "request_ids", &Batch::request_ids);
  def_view(batch, "input_ids", &Batch::input_ids);
  def_view(batch, "prev_rows", &Batch::prev_rows);
  def_view(batch, "positions", &Batch::positions);
  def_view(batch, "query_lens", &Batch::query_lens);
  def_view(batch, "context_lens", &Batch::context_lens);
  def_view(batch, "slot_mapping", &Batch::slot_mapping);
  def_view(batch, "do_sample", &Batch::do_sample);
  def_view(batch, "temperature", &Batch::temperature);
  def_view(batch, "top_k", &Batch::top_k);
  def_view(batch, "top_p", &Batch::top_p);
  def_view(batch, "seeds", &Batch::seeds);
  def_view(batch, "output_index", &Batch::output_index);
  def_view(batch, "suppress_offsets", &Batch::suppress_offsets);
  def_view(batch, "suppress_ids", &Batch::suppress_ids);
  def_view(batch, "seq_index", &Batch::seq_index);
  def_view(batch, "num_candidates", &Batch::num_candidates);
  def_view(batch, "beam", &Batch::beam);
  def_view(batch, "min_p", &Batch::min_p);
  def_view(batch, "repetition_penalty", &Batch::repetition_penalty);
  def_view(batch, "presence_penalty", &Batch::presence_penalty);
  def_view(batch, "frequency_penalty", &Batch::frequency_penalty);
  def_view(batch, "bias_offsets", &Batch::bias_offsets);
  def_view(batch, "bias_ids", &Batch::bias_ids);
  def_view(batch, "bias_values", &Batch::bias_values);
  def_view(batch, "logprobs", &Batch::logprobs);
  def_view(batch, "prompt_logprobs", &Batch::prompt_logprobs);
  def_view(batch, "context_logits", &Batch::context_logits);
  def_view(batch, "generation_logits", &Batch::generation_logits);
  def_view(batch, "prompt_lens", &Batch::prompt_lens);
  def_view(batch, "next_token_ids", &Batch::next_token_ids);
  def_view(batch, "adapter_slots", &Batch::adapter_slots);
  def_view(batch, "slots", &Batch::slots);
  def_view(batch, "slot_copy_from", &Batch::slot_copy_from);
  def_view(batch, "slot_reset", &Batch::slot_reset);
  def_view(batch, "state_start", &Batch::state_start);
  def_view(batch, "state_offsets", &Batch::state_offsets);
  def_view(batch, "state_ids", &Batch::state_ids);
  def_view(batch, "num_draft_tokens", &Batch::num_draft_tokens);
  def_view(batch, "draft_start", &Batch::draft_start);
  def_view(batch, "draft_offsets", &Batch::draft_offsets);
  def_view(batch, "draft_input_ids", &Batch::draft_input_ids);
  def_view(batch, "encoder_input_ids", &Batch::encoder_input_ids);
  def_view(batch, "encoder_lens", &Batch::encoder_lens);
  def_view(batch, "cross_slot_mapping", &Batch::cross_slot_mapping);
  def_view(batch, "cross_lens", &Batch::cross_lens);
  def_view(batch, "forced_token_ids", &Batch::forced_token_ids);

  py::class_<BlockManager> block_manager(m, "BlockManager");
  block_manager.attr("ROOT_HASH") = BlockManager::kRootHash;
  block_manager.attr("RELEASED") = BlockManager::kReleased;
  block_manager
      .def(py::init<int32_t, int32_t, bool>(), "num_blocks"_a, "tokens_per_block"_a,
           "enable_prefix_caching"_a = true)
      .def_static("hash_block_tokens",
                  [](std::optional<uint64_t> parent_hash, const std::vector<int32_t>& tokens) {
                    return BlockManager::hash_block_tokens(
                        parent_hash.value_or(BlockManager::kRootHash), tokens.data(),
                        static_cast<int32_t>(tokens.size()));
                  }, "parent_hash"_a, "tokens"_a)
      .def_static("root_hash", &BlockManager::root_hash, "cache_salt"_a)
      .def("lookup", &BlockManager::lookup, "tokens"_a, "root"_a = BlockManager::kRootHash)
      .def("fork", &BlockManager::fork, "block_ids"_a)
      .def("allocate_for_write",
           [](BlockManager& bm, std::vector<int32_t> block_ids, int32_t write_from,
              int32_t num_tokens) -> std::optional<py::tuple> {
             std::vector<int32_t> copies;
             if (!bm.allocate_for_write(block_ids, write_from, num_tokens, copies)) return std::nullopt;
             return py::make_tuple(block_ids, copies);
           }, "block_ids"_a, "write_from"_a, "num_tokens"_a)
      .def("allocate",
           [](BlockManager& bm, std::vector<int32_t> block_ids, int32_t num_tokens,
              const std::vector<int32_t>& cached_prefix) -> std::optional<std::vector<int32_t>> {
             if (!bm.allocate(block_ids, num_tokens, cached_prefix)) return std::nullopt;
             return block_ids;
           }, "block_ids"_a, "num_tokens"_a, "cached_prefix"_a = std::vector<int32_t>{})
      .def("free", [](BlockManager& bm, std::vector<int32_t> block_ids) { bm.free(block_ids); },
           "block_ids"_a)
      .def("release_leading",
           [](BlockManager& bm, std::vector<int32_t> block_ids, int32_t count) {
             bm.release_leading(block_ids, count);
             return block_ids;
           }, "block_ids"_a, "count"_a)
      .def("cache_full_blocks", &BlockManager::cache_full_blocks, "block_ids"_a, "tokens"_a,
           "num_computed_tokens"_a, "root"_a = BlockManager::kRootHash)
      .def("truncate",
           [](BlockManager& bm, std::vector<int32_t> block_ids, int32_t num_tokens) {
             bm.truncate(block_ids, num_tokens);
             return block_ids;
           }, "block_ids"_a, "num_tokens"_a)
      .def("ref_count", &BlockManager::ref_count, "block_id"_a)
      .def("block_hash", &BlockManager::block_hash, "block_id"_a)
      .def("free_queue", &BlockManager::free_queue)
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("tokens_per_block", &BlockManager::tokens_per_block)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
      .def_property_readonly("num_used_blocks", &BlockManager::num_used_blocks)
      .def_property_readonly("num_cached_blocks", &BlockManager::num_cached_blocks);

  py::class_<ScheduledRequest>(m, "ScheduledRequest")
      .def_readonly("request_id", &ScheduledRequest::request_id)
      .def_readonly("num_computed_tokens", &ScheduledRequest::num_computed_tokens)
      .def_readonly("num_new_tokens", &ScheduledRequest::num_new_tokens)
      .def_readonly("num_encoder_tokens", &ScheduledRequest::num_encoder_tokens)
      .def_readonly("do_sample", &ScheduledRequest::do_sample)
      .def_readonly("input_row", &ScheduledRequest::input_row)
      .def_readonly("num_draft_tokens", &ScheduledRequest::num_draft_tokens)
      .def_readonly("draft_start", &ScheduledRequest::draft_start);

  py::class_<SchedulerOutput>(m, "SchedulerOutput")
      .def_readonly("scheduled", &SchedulerOutput::scheduled)
      .def_readonly("preempted", &SchedulerOutput::preempted)
      .def_readonly("num_tokens", &SchedulerOutput::num_tokens)
      .def_readonly("block_copies", &SchedulerOutput::block_copies)
      .def_property_readonly("num_scheduled_tokens", [](const SchedulerOutput& o) {
        py::dict d;  // request id -> tokens this step, in schedule order
        for (const ScheduledRequest& s : o.scheduled) d[py::int_(s.request_id)] = s.num_new_tokens;
        return d;
      });

  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init<const ExecutorConfig&>(), "config"_a)
      // The rules Executor.enqueue checks a request against (RequestError naming the rule): what a process that
      // hands its requests to another process's executor checks before it sends them.
      .def_static("check_request", &Scheduler::check_request, "config"_a, "request"_a)
      .def("add", [](Scheduler& s, const Request& r) { s.add(r); }, "request"_a)
      .def("schedule", &Scheduler::schedule)
      .def("update", [](Scheduler& s, const SchedulerOutput& o, const py::object& result) {
        return s.update(o, to_step_result(result));
      }, "output"_a, "result"_a)
      .def("fail", &Scheduler::fail, "output"_a, "error"_a)
      .def("abort", &Scheduler::abort, "request_id"_a, "seq_index"_a = -1)
      .def("finish_all", &Scheduler::finish_all, "finish_reason"_a, "error"_a = "")
      .def("make_batch", [](const Scheduler& s, const SchedulerOutput& o) {
        return std::make_shared<Batch>(s.make_batch(o));
      }, "output"_a)
      .def("request", [](const Scheduler& s, uint64_t id) {
        const Request* r = s.find(id);
        if (r == nullptr) throw py::key_error("no unfinished request " + std::to_string(id));
        return *r;  // a snapshot
      }, "request_id"_a)
      .def_property_readonly("waiting_ids", &Scheduler::waiting_ids)
      .def_property_readonly("running_ids", &Scheduler::running_ids)
      .def_property_readonly("has_unfinished", &Scheduler::has_unfinished)
      .def_property_readonly("block_manager", &Scheduler::block_manager,
                             py::return_value_policy::reference_internal)
      .def("stats", [](const Scheduler& s) { return stats_dict(s.stats()); });

  py::class_<PyExecutor>(m, "Executor")
      .def(py::init<const ExecutorConfig&, py::object>(), "config"_a, "runner"_a)
      .def("enqueue", [](PyExecutor& e, const Request& r) { return e.get().enqueue(r); },
           "request"_a)
      .def("enqueue_many",
           [](PyExecutor& e, std::vector<Request> requests) { return e.get().enqueue_many(std::move(requests)); },
           "requests"_a)
      .def("abort", [](PyExecutor& e, uint64_t id, int32_t seq_index) { e.get().abort(id, seq_index); },
           "request_id"_a, "seq_index"_a = -1)
      .def("await_responses",
           [](PyExecutor& e, std::optional<double> timeout_s) {
             return e.get().await_responses(timeout_s);
           }, "timeout_s"_a = py::none(), py::call_guard<py::gil_scoped_release>())
      .def("stats", [](PyExecutor& e) { return stats_dict(e.get().stats()); })
      .def("shutdown", &PyExecutor::shutdown);

  // Join every loop thread while threads may still take the GIL: once the interpreter finalizes,
  // a thread asking for the GIL is terminated mid-call.
  // An executor that another thread is already shutting down gets a few seconds for its loop to
  // end, not a join: its loop thread may be stuck in a call that never returns (a hung logits
  // processor the step watchdog gave up on), and exit must not wait for it forever.
  py::module_::import("atexit").attr("register")(py::cpp_function([] {
    const std::vector<PyExecutor*> executors(live_executors().begin(), live_executors().end());
    for (PyExecutor* e : executors) {
      if (!live_executors().count(e)) continue;  // destroyed while the GIL was released
      if (!e->shutting_down()) {
        e->shutdown();
        continue;
      }
      // Checked with the GIL held: the thread shutting it down may destroy it meanwhile.
      for (int i = 0; i < 500 && live_executors().count(e) && !e->get().loop_done(); ++i) {
        py::gil_scoped_release release;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
  }));
}
