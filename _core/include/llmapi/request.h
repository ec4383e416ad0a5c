// Request: one generation request's settings and its mutable scheduling state.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace llmapi {

// Ids of sequences forked from a request have this bit set; users' ids must not.
constexpr uint64_t kForkedIdBit = 1ULL << 63;

enum class RequestStatus { kWaiting, kRunning, kFinished };
const char* to_string(RequestStatus status);

// How beam search ends (transformers' early_stopping): kHeuristic stops once no running beam can
// beat the worst finished one at its current length, kFirst as soon as beam-width hypotheses are
// finished, kNever only when the best possible score at the longest length cannot win.
enum class EarlyStopping : int32_t { kHeuristic = 0, kFirst = 1, kNever = 2 };

struct SamplingConfig {
  float temperature = 1.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // 1 = off
  float min_p = 0.0f;        // 0 = off
  int64_t seed = 0;          // uint63: keys the sampler's counter-based noise
  float repetition_penalty = 1.0f;  // 1 = off; on prompt and output tokens
  float presence_penalty = 0.0f;    // on output tokens
  float frequency_penalty = 0.0f;   // on output tokens
  std::vector<std::vector<int32_t>> bad_words;  // the last token of each is masked after the rest
  std::vector<int32_t> logit_bias_ids;          // added to the logits of these ids ...
  std::vector<float> logit_bias_values;         // ... by these amounts
  int32_t num_sequences = 1;  // sequences forked from the prompt: best_of samples or the beam width
  bool beam_search = false;
  float length_penalty = 1.0f;  // beam search: a finished beam scores sum_logprobs / length**this
  EarlyStopping early_stopping = EarlyStopping::kHeuristic;
  int32_t num_returned = 1;     // beam search: hypotheses returned (n <= beam width)
  int32_t logprobs = -1;        // -1: none; k >= 0: each token's logprob and rank, plus the top k
  int32_t prompt_logprobs = -1; // -1: none; k >= 0: the same for each prompt token
  bool context_logits = false;     // the runner keeps the logits of every prompt position
  bool generation_logits = false;  // the runner keeps the logits of every sampled token
  bool token_history = false;      // the runner's per-request state holds the token ids (a Python
                                   // logits processor reads them)
  // 0 = off; n > 0: a token that would complete an n-gram already present in the request's tokens
  // (prompt + generated; for an encoder-decoder request the decoder's) is suppressed (transformers'
  // NoRepeatNGramLogitsProcessor), computed in make_batch into the row's suppress_ids.
  int32_t no_repeat_ngram_size = 0;

  bool needs_state() const {
    return repetition_penalty != 1.0f || presence_penalty != 0.0f || frequency_penalty != 0.0f ||
           token_history;
  }
  bool needs_prompt_logits() const { return prompt_logprobs >= 0 || context_logits; }
};

struct StopConfig {
  int32_t max_tokens = 1;                // finish "length" after this many generated tokens
  int32_t min_tokens = 0;                // EOS / stop ids are suppressed and ignored before this many
  std::vector<int32_t> eos_token_ids;    // finish "stop" unless ignore_eos
  std::vector<int32_t> stop_token_ids;   // finish "stop", stop_reason = the id
  bool ignore_eos = false;
  // -1 = off; else the only id the row that samples the last allowed token (output index
  // max_tokens - 1) may produce (transformers' ForcedEOSTokenLogitsProcessor): Batch.forced_token_ids.
  int32_t forced_eos_token_id = -1;
  // -1 = off; else the only id the row that samples the token at position 1 may produce, i.e. the first
  // token after a one-token prompt (an encoder-decoder model's decoder start; transformers'
  // ForcedBOSTokenLogitsProcessor). Where both apply, the forced EOS wins (transformers applies it last).
  int32_t forced_bos_token_id = -1;
};

struct SequenceGroup;

struct Request {
  // Validates the settings; throws RequestError naming the bad field.
  Request(uint64_t request_id, std::vector<int32_t> prompt_token_ids, StopConfig stop,
          SamplingConfig sampling);

  // The scheduler's key: the user's id for a request's first sequence, an internal id (top bit
  // set) for the sequences forked from it.
  uint64_t request_id;
  uint64_t user_id;          // the id the user enqueued (responses carry it)
  int32_t seq_index = 0;     // which of the user request's sequences this is; keys its sampling noise
  std::shared_ptr<SequenceGroup> group;  // set once forked (num_sequences > 1)

  // Prompt followed by generated tokens: one vector so KV positions index it directly.
  std::vector<int32_t> token_ids;
  int32_t num_prompt_tokens;
  StopConfig stop;
  SamplingConfig sampling;

  RequestStatus status = RequestStatus::kWaiting;
  int32_t num_computed_tokens = 0;   // tokens whose KV is in the cache
  std::vector<int32_t> block_ids;    // block table: block i holds positions [i*B, (i+1)*B)
  int32_t num_cached_tokens = 0;     // prefix-cache hit at the first admission
  int32_t num_preemptions = 0;
  // Adapters: the runner's device slot of the request's LoRA adapter (-1: none); the seed of its
  // prefix-cache hash chain (0: none), so that KV computed under an adapter or prompt table is never
  // shared with requests under another or none; how many ids past the vocabulary its prompt may
  // hold (its prompt table's rows).
  int32_t adapter_slot = -1;
  uint64_t cache_salt = 0;
  int32_t prompt_table_size = 0;
  // Encoder-decoder: the encoder's input (empty: a decoder-only request), and the request's cross-
  // attention KV blocks (blocks_for(encoder length), from the same BlockManager). Empty cross blocks
  // mean the encoder runs in the request's next scheduled step, which allocates them with that step's
  // decoder blocks. Forks share them by reference count; they are never hashed into the prefix cache
  // and freed at finish, abort and preemption (which recomputes the encoder).
  std::vector<int32_t> encoder_token_ids;
  std::vector<int32_t> cross_block_ids;
  bool cross_ready = false;  // its cross blocks hold the encoder's K/V: the step that ran it was collected
  bool in_flight = false;            // in a batch submitted and not collected
  // Async scheduling: also in a second, later batch in flight, which takes the token the first
  // samples as its input. Batches are collected in order: the next one collected is the first.
  bool ahead = false;
  bool inflight_samples = false;     // its latest batch in flight samples its next token ...
  int32_t inflight_row = -1;         // ... in this row
  uint64_t serial = 0;               // unique per scheduler: tells a finished request's row in a
                                     // batch still in flight from a new request with its id
  bool abort_requested = false;      // abort arrived while in flight: settle it at collect

  // The runner's per-request state row (penalty counts, token history), if sampling needs one.
  int32_t slot = -1;
  int32_t slot_copy_from = -1;  // next step: the row starts as a copy of this one (a fork)
  int32_t num_state_tokens = 0; // tokens the row holds; the next step sends the rest

  // Per generated token, when sampling.logprobs >= 0: its logprob and rank, and the top k.
  std::vector<float> logprobs;
  std::vector<int32_t> ranks;
  std::vector<int32_t> top_ids;       // [tokens, k]
  std::vector<float> top_logprobs;    // [tokens, k]
  double cumulative_logprob = 0.0;    // sum of the generated tokens' logprobs
  float beam_score = 0.0f;            // beam search: the running beam's accumulated score

  // Speculative decoding.
  std::vector<int32_t> draft_token_ids;  // n-gram drafts of the step last scheduled (its query's tail)
  int32_t num_draft_computed = 0;        // draft model / EAGLE: positions whose drafter KV is valid
  int64_t num_draft_tokens = 0;          // drafts verified over the request's life ...
  int64_t num_accepted_draft_tokens = 0; // ... and how many of them were accepted

  std::string finish_reason;         // "" | "stop" | "length" | "abort" | "error"
  int32_t stop_reason = -1;          // the stop / eos token id that finished it
  std::string error;

  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  int32_t num_output_tokens() const { return num_tokens() - num_prompt_tokens; }
  bool forks() const;        // its next sampled token forks it into num_sequences sequences
  bool is_beam() const { return sampling.beam_search; }
  bool is_encoder_decoder() const { return !encoder_token_ids.empty(); }
  int32_t num_encoder_tokens() const { return static_cast<int32_t>(encoder_token_ids.size()); }
  // Sets the encoder input (RequestError for an id < 0) and, if it is non-empty, makes cache_salt
  // encoder_cache_salt(cache_salt, ids): set cache_salt first.
  void set_encoder_input(std::vector<int32_t> ids);
  std::vector<int32_t> prompt_token_ids() const;
  std::vector<int32_t> output_token_ids() const;
};

// The prefix-cache salt of a request with encoder input `encoder_ids` and salt `cache_salt` (its adapters'):
// a 64-bit hash of both, never 0, so that decoder blocks computed for another source never match.
uint64_t encoder_cache_salt(uint64_t cache_salt, const std::vector<int32_t>& encoder_ids);

// A finished beam-search hypothesis.
struct BeamHypothesis {
  float score = -1.0e9f;        // length-penalised; -1e9 marks an empty place
  bool finished = false;
  float sum_logprobs = 0.0f;
  std::vector<int32_t> token_ids;  // generated tokens
  std::vector<float> logprobs;
  std::vector<int32_t> ranks;
  std::vector<int32_t> top_ids;
  std::vector<float> top_logprobs;
  int32_t stop_reason = -1;
};

// The sequences forked from one user request: best_of samples, or the beams of a beam search.
struct SequenceGroup {
  uint64_t user_id = 0;
  bool forked = false;               // the first sequence has sampled and forked the others
  std::vector<uint64_t> members;     // scheduler ids of the unfinished sequences, by seq_index
  int32_t num_sequences = 0;
  // Beam search only.
  std::vector<BeamHypothesis> hypotheses;  // beam-width places, best first
  bool improvable = true;  // a running beam may still beat a finished one
};

}  // namespace llmapi
