// encode_responses / decode_responses: the responses of a step as one byte string between processes.
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "llmapi/response.h"

namespace llmapi {
namespace {

class Writer {
 public:
  template <typename T>
  void put(T value) {
    static_assert(std::is_trivially_copyable<T>::value, "plain values only");
    const auto* p = reinterpret_cast<const char*>(&value);
    out_.append(p, sizeof(T));
  }
  template <typename T>
  void put_vector(const std::vector<T>& values) {
    put<uint32_t>(static_cast<uint32_t>(values.size()));
    out_.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
  }
  void put_string(const std::string& value) {
    put<uint32_t>(static_cast<uint32_t>(value.size()));
    out_.append(value);
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

class Reader {
 public:
  explicit Reader(const std::string& data) : data_(data) {}
  template <typename T>
  T get() {
    T value;
    std::memcpy(&value, take(sizeof(T)), sizeof(T));
    return value;
  }
  template <typename T>
  std::vector<T> get_vector() {
    const uint32_t n = get<uint32_t>();
    std::vector<T> values(n);
    if (n) std::memcpy(values.data(), take(static_cast<size_t>(n) * sizeof(T)), n * sizeof(T));
    return values;
  }
  std::string get_string() {
    const uint32_t n = get<uint32_t>();
    return std::string(take(n), n);
  }
  bool done() const { return pos_ == data_.size(); }

 private:
  const char* take(size_t n) {
    if (n > data_.size() - pos_) throw std::invalid_argument("encoded responses are cut short");
    const char* p = data_.data() + pos_;
    pos_ += n;
    return p;
  }
  const std::string& data_;
  size_t pos_ = 0;
};

}  // namespace

std::string encode_responses(const std::vector<Response>& responses) {
  Writer w;
  w.put<uint32_t>(static_cast<uint32_t>(responses.size()));
  for (const Response& r : responses) {
    w.put<uint64_t>(r.request_id);
    w.put<int32_t>(r.seq_index);
    w.put<uint8_t>(static_cast<uint8_t>(r.finished) | static_cast<uint8_t>(r.request_finished) << 1);
    w.put<int32_t>(r.stop_reason);
    w.put<int32_t>(r.num_prompt_tokens);
    w.put<int32_t>(r.num_cached_tokens);
    w.put<int32_t>(r.num_top_logprobs);
    w.put<double>(r.cumulative_logprob);
    w.put<int64_t>(r.num_draft_tokens);
    w.put<int64_t>(r.num_accepted_draft_tokens);
    w.put_string(r.finish_reason);
    w.put_string(r.error);
    w.put_vector(r.token_ids);
    w.put_vector(r.logprobs);
    w.put_vector(r.ranks);
    w.put_vector(r.top_ids);
    w.put_vector(r.top_logprobs);
  }
  return w.take();
}

std::vector<Response> decode_responses(const std::string& data) {
  Reader in(data);
  const uint32_t n = in.get<uint32_t>();
  std::vector<Response> responses;
  responses.reserve(n);
  for (uint32_t i = 0; i < n; ++i) {
    Response r;
    r.request_id = in.get<uint64_t>();
    r.seq_index = in.get<int32_t>();
    const uint8_t flags = in.get<uint8_t>();
    r.finished = flags & 1;
    r.request_finished = flags & 2;
    r.stop_reason = in.get<int32_t>();
    r.num_prompt_tokens = in.get<int32_t>();
    r.num_cached_tokens = in.get<int32_t>();
    r.num_top_logprobs = in.get<int32_t>();
    r.cumulative_logprob = in.get<double>();
    r.num_draft_tokens = in.get<int64_t>();
    r.num_accepted_draft_tokens = in.get<int64_t>();
    r.finish_reason = in.get_string();
    r.error = in.get_string();
    r.token_ids = in.get_vector<int32_t>();
    r.logprobs = in.get_vector<float>();
    r.ranks = in.get_vector<int32_t>();
    r.top_ids = in.get_vector<int32_t>();
    r.top_logprobs = in.get_vector<float>();
    responses.push_back(std::move(r));
  }
  if (!in.done()) throw std::invalid_argument("encoded responses have bytes past their last response");
  return responses;
}

}  // namespace llmapi
