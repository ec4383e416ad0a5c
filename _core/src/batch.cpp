// make_batch: flattens one step's scheduled requests into the runner's arrays.
#include "llmapi/batch.h"

#include <algorithm>

namespace llmapi {

namespace {

// The ids masked while a request is still under min_tokens: everything that would stop it.
void append_suppressed(const Request& r, std::vector<int32_t>& out) {
  const size_t start = out.size();
  auto add = [&](int32_t id) {
    if (std::find(out.begin() + start, out.end(), id) == out.end()) out.push_back(id);
  };
  if (!r.stop.ignore_eos) for (int32_t id : r.stop.eos_token_ids) add(id);
  for (int32_t id : r.stop.stop_token_ids) add(id);
}

}  // namespace

Batch make_batch(const std::vector<const Request*>& requests,
                 const std::vector<ScheduledRequest>& scheduled, int32_t tokens_per_block) {
  const int32_t B = tokens_per_block;
  Batch b;
  b.num_requests = static_cast<int32_t>(scheduled.size());
  b.tokens_per_block = B;
  b.max_blocks = 1;  // keeps block_tables 2-D with a column even for an empty batch
  for (const Request* r : requests) {
    b.max_blocks = std::max(b.max_blocks, static_cast<int32_t>(r->block_ids.size()));
  }
  const size_t R = scheduled.size();
  b.block_tables.assign(R * b.max_blocks, 0);
  b.suppress_offsets.reserve(R + 1);
  b.suppress_offsets.push_back(0);

  for (size_t i = 0; i < R; ++i) {
    const Request& r = *requests[i];
    const ScheduledRequest& s = scheduled[i];
    b.request_ids.push_back(r.request_id);
    b.query_lens.push_back(s.num_new_tokens);
    b.context_lens.push_back(s.num_computed_tokens + s.num_new_tokens);
    for (int32_t p = s.num_computed_tokens; p < s.num_computed_tokens + s.num_new_tokens; ++p) {
      b.input_ids.push_back(r.token_ids[p]);
      b.positions.push_back(p);
      b.slot_mapping.push_back(static_cast<int64_t>(r.block_ids[p / B]) * B + p % B);
    }
    std::copy(r.block_ids.begin(), r.block_ids.end(), b.block_tables.begin() + i * b.max_blocks);
    b.do_sample.push_back(s.do_sample ? 1 : 0);
    b.temperature.push_back(r.sampling.temperature);
    b.top_k.push_back(r.sampling.top_k);
    b.top_p.push_back(r.sampling.top_p);
    b.seeds.push_back(r.sampling.seed);
    b.output_index.push_back(r.num_output_tokens());
    if (s.do_sample && r.num_output_tokens() < r.stop.min_tokens) append_suppressed(r, b.suppress_ids);
    b.suppress_offsets.push_back(static_cast<int32_t>(b.suppress_ids.size()));
  }
  b.num_tokens = static_cast<int32_t>(b.input_ids.size());
  return b;
}

}  // namespace llmapi
