// Stop rules applied after a request's newest token is appended.
#pragma once

#include <cstdint>

#include "llmapi/request.h"

namespace llmapi {

// Sets finish_reason / stop_reason and returns true if `request` must stop. Order: once at least
// min_tokens are generated, a stop_token_id finishes "stop" (stop_reason = that id), then an EOS
// id unless ignore_eos ("stop", stop_reason = that id); then max_tokens or max_seq_len reached
// finishes "length" (these two apply whatever min_tokens says).
bool apply_stop_rules(Request& request, int32_t max_seq_len);

}  // namespace llmapi
