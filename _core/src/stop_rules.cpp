// Stop rules: stop ids, EOS, max_tokens and max_seq_len.
#include "llmapi/stop_rules.h"

#include <algorithm>

namespace llmapi {

namespace {

bool contains(const std::vector<int32_t>& ids, int32_t id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

bool finish(Request& request, const char* reason, int32_t stop_reason) {
  request.status = RequestStatus::kFinished;
  request.finish_reason = reason;
  request.stop_reason = stop_reason;
  return true;
}

}  // namespace

bool apply_stop_rules(Request& request, int32_t max_seq_len) {
  const StopConfig& stop = request.stop;
  const int32_t last = request.token_ids.back();
  if (request.num_output_tokens() >= stop.min_tokens) {
    if (contains(stop.stop_token_ids, last)) return finish(request, "stop", last);
    if (!stop.ignore_eos && contains(stop.eos_token_ids, last)) return finish(request, "stop", last);
  }
  if (request.num_output_tokens() >= stop.max_tokens || request.num_tokens() >= max_seq_len) {
    return finish(request, "length", -1);
  }
  return false;
}

}  // namespace llmapi
