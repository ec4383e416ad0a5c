// make_batch: flattens one step's scheduled requests into the runner's arrays.
#include "llmapi/batch.h"

#include <algorithm>
#include <stdexcept>

#include "llmapi/beam_search.h"

namespace llmapi {

namespace {

// transformers' NoRepeatNGramLogitsProcessor: each n-token window of `tokens` whose first n - 1 tokens
// equal the last n - 1 tokens of `tokens` bans its last token (n = 1: every token present). Appends
// the banned ids (with repeats) to `banned`.
void append_repeated_ngrams(const std::vector<int32_t>& tokens, int32_t n, std::vector<int32_t>& banned) {
  const size_t len = tokens.size();
  const size_t size = static_cast<size_t>(n);
  if (n <= 0 || len < size) return;
  const int32_t* suffix = tokens.data() + (len - (size - 1));
  for (size_t i = 0; i + size <= len; ++i) {
    if (std::equal(suffix, suffix + (size - 1), tokens.data() + i)) banned.push_back(tokens[i + size - 1]);
  }
}

// The ids a sampling row masks: everything that would stop it while it is under min_tokens,
// the last token of each bad word whose other tokens end the sequence, and every token that
// would repeat an n-gram (no_repeat_ngram_size).
void append_suppressed(const Request& r, int32_t pending, std::vector<int32_t>& out) {
  const size_t start = out.size();
  auto add = [&](int32_t id) {
    if (std::find(out.begin() + start, out.end(), id) == out.end()) out.push_back(id);
  };
  if (r.num_output_tokens() + pending < r.stop.min_tokens) {
    if (!r.stop.ignore_eos) for (int32_t id : r.stop.eos_token_ids) add(id);
    for (int32_t id : r.stop.stop_token_ids) add(id);
  }
  const auto& tokens = r.token_ids;
  for (const auto& word : r.sampling.bad_words) {
    const size_t head = word.size() - 1;
    // The scheduler runs a request ahead (pending > 0) only if its bad words are single tokens.
    if (pending > 0 && head > 0) throw std::logic_error("a row ahead needs its token history");
    if (head <= tokens.size() && std::equal(word.begin(), word.end() - 1, tokens.end() - head)) {
      add(word.back());
    }
  }
  if (r.sampling.no_repeat_ngram_size > 0) {
    // The scheduler never runs such a request ahead.
    if (pending > 0) throw std::logic_error("a row ahead needs its token history");
    std::vector<int32_t> banned;
    append_repeated_ngrams(tokens, r.sampling.no_repeat_ngram_size, banned);
    std::sort(banned.begin(), banned.end());
    banned.erase(std::unique(banned.begin(), banned.end()), banned.end());
    const size_t others = out.size();  // the few ids above: a long history bans many, each once
    for (int32_t id : banned) {
      if (std::find(out.begin() + start, out.begin() + others, id) == out.begin() + others) out.push_back(id);
    }
  }
}

}  // namespace

Batch make_batch(const std::vector<const Request*>& requests, const SchedulerOutput& output,
                 int32_t tokens_per_block) {
  const std::vector<ScheduledRequest>& scheduled = output.scheduled;
  const int32_t B = tokens_per_block;
  Batch b;
  b.num_requests = static_cast<int32_t>(scheduled.size());
  b.tokens_per_block = B;
  b.max_blocks = 1;  // keeps block_tables 2-D with a column even for an empty batch
  for (const Request* r : requests) {
    b.max_blocks = std::max(b.max_blocks, static_cast<int32_t>(r->block_ids.size()));
  }
  for (const Request* r : requests) {
    b.max_cross_blocks = std::max(b.max_cross_blocks, static_cast<int32_t>(r->cross_block_ids.size()));
  }
  const size_t R = scheduled.size();
  b.block_tables.assign(R * b.max_blocks, 0);
  b.cross_block_tables.assign(R * b.max_cross_blocks, 0);
  b.block_copies = output.block_copies;
  b.suppress_offsets.push_back(0);
  b.bias_offsets.push_back(0);
  b.state_offsets.push_back(0);
  b.draft_offsets.push_back(0);

  for (size_t i = 0; i < R; ++i) {
    const Request& r = *requests[i];
    const ScheduledRequest& s = scheduled[i];
    const SamplingConfig& sc = r.sampling;
    const int32_t end = s.num_computed_tokens + s.num_new_tokens;
    // Ahead of its step in flight: the token at position num_tokens() is being sampled there.
    const int32_t pending = s.input_row >= 0 ? 1 : 0;
    if (pending > 0 && s.slot >= 0) {
      throw std::logic_error("a row ahead has a state row, which would miss its pending token");
    }
    b.request_ids.push_back(r.user_id);
    b.seq_index.push_back(r.seq_index);
    b.query_lens.push_back(s.num_new_tokens);
    b.context_lens.push_back(end);
    for (int32_t p = s.num_computed_tokens; p < end; ++p) {
      const bool known = p < r.num_tokens();
      // Past the known tokens: a draft (n-gram drafts are known here, a drafter's are -1 for the
      // runner), or the placeholder of a row ahead.
      const size_t draft = static_cast<size_t>(p - r.num_tokens());
      const bool ngram = !known && s.num_draft_tokens > 0 && draft < r.draft_token_ids.size();
      b.input_ids.push_back(known ? r.token_ids[p] : ngram ? r.draft_token_ids[draft] : -1);
      b.prev_rows.push_back(known || s.num_draft_tokens > 0 ? -1 : s.input_row);
      b.positions.push_back(p);
      b.slot_mapping.push_back(static_cast<int64_t>(r.block_ids[p / B]) * B + p % B);
    }
    std::copy(r.block_ids.begin(), r.block_ids.end(), b.block_tables.begin() + i * b.max_blocks);

    b.do_sample.push_back(s.do_sample ? 1 : 0);
    int32_t candidates = 1;
    if (s.do_sample && r.is_beam()) candidates = beam_candidates(r);
    else if (s.do_sample && r.forks()) candidates = sc.num_sequences;
    b.num_candidates.push_back(candidates);
    b.beam.push_back(r.is_beam() ? 1 : 0);
    b.temperature.push_back(sc.temperature);
    b.top_k.push_back(sc.top_k);
    b.top_p.push_back(sc.top_p);
    b.min_p.push_back(sc.min_p);
    b.repetition_penalty.push_back(sc.repetition_penalty);
    b.presence_penalty.push_back(sc.presence_penalty);
    b.frequency_penalty.push_back(sc.frequency_penalty);
    b.seeds.push_back(sc.seed);
    b.output_index.push_back(r.num_output_tokens() + pending);
    if (s.do_sample) {
      append_suppressed(r, pending, b.suppress_ids);
      b.bias_ids.insert(b.bias_ids.end(), sc.logit_bias_ids.begin(), sc.logit_bias_ids.end());
      b.bias_values.insert(b.bias_values.end(), sc.logit_bias_values.begin(),
                           sc.logit_bias_values.end());
    }
    b.suppress_offsets.push_back(static_cast<int32_t>(b.suppress_ids.size()));
    b.bias_offsets.push_back(static_cast<int32_t>(b.bias_ids.size()));

    // Sampled samples of one request are ranked by cumulative logprob: they need their logprob.
    int32_t logprobs = sc.logprobs;
    if (logprobs < 0 && r.group && !r.is_beam()) logprobs = 0;
    b.logprobs.push_back(s.do_sample ? logprobs : -1);
    const bool prompt_step = s.num_computed_tokens < r.num_prompt_tokens;
    b.prompt_logprobs.push_back(prompt_step ? sc.prompt_logprobs : -1);
    b.context_logits.push_back(prompt_step && sc.context_logits ? 1 : 0);
    b.generation_logits.push_back(s.do_sample && sc.generation_logits ? 1 : 0);
    b.prompt_lens.push_back(r.num_prompt_tokens);
    b.next_token_ids.push_back(end < r.num_tokens() ? r.token_ids[end] : -1);
    b.adapter_slots.push_back(r.adapter_slot);

    b.slots.push_back(s.slot);
    b.slot_copy_from.push_back(s.slot_copy_from);
    b.slot_reset.push_back(s.slot_reset ? 1 : 0);
    b.state_start.push_back(s.state_from);
    if (s.slot >= 0) {
      b.state_ids.insert(b.state_ids.end(), r.token_ids.begin() + s.state_from, r.token_ids.end());
    }
    b.state_offsets.push_back(static_cast<int32_t>(b.state_ids.size()));

    b.num_draft_tokens.push_back(s.num_draft_tokens);
    b.draft_start.push_back(s.draft_start);
    if (s.draft_start >= 0) {  // the drafter catches up on its inputs up to the last known token
      b.draft_input_ids.insert(b.draft_input_ids.end(), r.token_ids.begin() + s.draft_start,
                               r.token_ids.begin() + s.num_computed_tokens + 1);
    }
    b.draft_offsets.push_back(static_cast<int32_t>(b.draft_input_ids.size()));

    const int32_t encoder_len = r.num_encoder_tokens();
    b.encoder_lens.push_back(s.num_encoder_tokens);
    if (s.num_encoder_tokens > 0) {
      if (s.num_encoder_tokens != encoder_len ||
          static_cast<int64_t>(r.cross_block_ids.size()) * B < encoder_len) {
        throw std::logic_error("an encoder step without the whole encoder input or its cross blocks");
      }
      b.encoder_input_ids.insert(b.encoder_input_ids.end(), r.encoder_token_ids.begin(),
                                 r.encoder_token_ids.end());
      for (int32_t p = 0; p < encoder_len; ++p) {
        b.cross_slot_mapping.push_back(static_cast<int64_t>(r.cross_block_ids[p / B]) * B + p % B);
      }
    }
    b.cross_lens.push_back(encoder_len);
    std::copy(r.cross_block_ids.begin(), r.cross_block_ids.end(),
              b.cross_block_tables.begin() + i * b.max_cross_blocks);
    int32_t forced = -1;
    if (s.do_sample && r.stop.forced_eos_token_id >= 0 &&
        r.num_output_tokens() + pending == r.stop.max_tokens - 1) {
      forced = r.stop.forced_eos_token_id;
    } else if (s.do_sample && r.stop.forced_bos_token_id >= 0 && r.num_tokens() + pending == 1) {
      forced = r.stop.forced_bos_token_id;
    }
    b.forced_token_ids.push_back(forced);
  }
  b.num_tokens = static_cast<int32_t>(b.input_ids.size());
  return b;
}

}  // namespace llmapi
