// Beam search step: transformers' _beam_search (top-K continuations, running beams, finished
// hypotheses with length penalty, early-stopping heuristic), per request on the host.
#include "llmapi/beam_search.h"

#include <algorithm>
#include <cmath>

namespace llmapi {

namespace {

constexpr float kMasked = -1.0e9f;  // transformers' "very large negative value"

bool is_stop_id(const Request& r, int32_t token) {
  const StopConfig& s = r.stop;
  if (std::find(s.stop_token_ids.begin(), s.stop_token_ids.end(), token) != s.stop_token_ids.end()) {
    return true;
  }
  return !s.ignore_eos &&
         std::find(s.eos_token_ids.begin(), s.eos_token_ids.end(), token) != s.eos_token_ids.end();
}

float length_normalised(float score, int32_t length, float length_penalty) {
  return score / static_cast<float>(std::pow(static_cast<double>(length),
                                             static_cast<double>(length_penalty)));
}

}  // namespace

int32_t beam_candidates(const Request& r) {
  int32_t num_stop = static_cast<int32_t>(r.stop.stop_token_ids.size());
  if (!r.stop.ignore_eos) num_stop += static_cast<int32_t>(r.stop.eos_token_ids.size());
  return std::max(2, 1 + num_stop) * r.sampling.num_sequences;
}

BeamStep beam_search_step(const Request& first, const std::vector<float>& beam_scores,
                          const std::vector<std::vector<std::pair<int32_t, float>>>& candidates,
                          int32_t num_generated, std::vector<BeamHypothesis>& hypotheses,
                          bool& improvable) {
  const SamplingConfig& sc = first.sampling;
  const int32_t width = sc.num_sequences;
  const int32_t keep = beam_candidates(first);
  const int32_t length = num_generated + 1;  // of a sequence that takes a candidate now

  // Top `keep` of all beams' continuations by accumulated score (each row's top `keep` holds
  // every member of the overall top `keep`). Ties go to the lower (beam, token), as a flat topk.
  std::vector<BeamCandidate> all;
  for (size_t b = 0; b < candidates.size(); ++b) {
    for (size_t c = 0; c < candidates[b].size(); ++c) {
      const auto& [token, logprob] = candidates[b][c];
      if (token < 0) continue;
      BeamCandidate x;
      x.beam = static_cast<int32_t>(b);
      x.column = static_cast<int32_t>(c);
      x.token = token;
      x.score = beam_scores[b] + logprob;
      all.push_back(x);
    }
  }
  std::stable_sort(all.begin(), all.end(), [](const BeamCandidate& a, const BeamCandidate& b) {
    if (a.score != b.score) return a.score > b.score;
    return a.beam != b.beam ? a.beam < b.beam : a.token < b.token;
  });
  if (static_cast<int32_t>(all.size()) > keep) all.resize(keep);
  bool all_stop = true;
  for (BeamCandidate& x : all) {
    x.stops = (is_stop_id(first, x.token) && length >= first.stop.min_tokens) ||
              length >= first.stop.max_tokens;
    all_stop = all_stop && x.stops;
  }

  BeamStep step;
  // Running beams: the best candidates that do not stop; stopping ones only fill places left.
  std::vector<BeamCandidate> ranked = all;
  for (BeamCandidate& x : ranked) x.score = x.score + (x.stops ? kMasked : 0.0f);
  std::stable_sort(ranked.begin(), ranked.end(),
                   [](const BeamCandidate& a, const BeamCandidate& b) { return a.score > b.score; });
  ranked.resize(std::min<size_t>(ranked.size(), width));
  step.running = ranked;

  // Finished hypotheses: stopping candidates among the top beam-width, unless no new one may enter.
  bool all_finished = std::all_of(hypotheses.begin(), hypotheses.end(),
                                  [](const BeamHypothesis& h) { return h.finished; });
  const bool closed = (all_finished && sc.early_stopping == EarlyStopping::kFirst) || !improvable;
  for (int32_t i = 0; i < static_cast<int32_t>(all.size()) && i < width && !closed; ++i) {
    if (!all[i].stops) continue;
    BeamCandidate x = all[i];
    x.score = length_normalised(x.score, length, sc.length_penalty);
    step.finished.push_back(x);
  }

  // The early-stopping heuristic and the end of the search, as after transformers' step.
  // (The caller adds step.finished to the hypotheses; do it here on scores alone.)
  std::vector<float> scores;
  std::vector<bool> finished;
  {
    std::vector<BeamHypothesis> merged = hypotheses;
    for (const BeamCandidate& x : step.finished) {
      BeamHypothesis h;
      h.score = x.score;
      h.finished = true;
      add_hypothesis(merged, std::move(h));
    }
    for (const BeamHypothesis& h : merged) {
      scores.push_back(h.score);
      finished.push_back(h.finished);
    }
  }
  all_finished = std::all_of(finished.begin(), finished.end(), [](bool f) { return f; });
  const int32_t best_length = (sc.early_stopping == EarlyStopping::kNever && sc.length_penalty > 0)
                                  ? first.stop.max_tokens
                                  : length;
  const float best_running = step.running.empty()
                                 ? kMasked
                                 : length_normalised(step.running[0].score, best_length,
                                                     sc.length_penalty);
  const float worst = *std::min_element(scores.begin(), scores.end());
  bool any_better = false;
  for (size_t i = 0; i < scores.size(); ++i) any_better |= best_running > (finished[i] ? worst : kMasked);
  improvable = improvable && any_better;
  const bool open_beam = !(all_finished && sc.early_stopping == EarlyStopping::kFirst);
  step.done = !(improvable && open_beam && !all_stop) || step.running.empty();
  return step;
}

void add_hypothesis(std::vector<BeamHypothesis>& hypotheses, BeamHypothesis h) {
  // Ties keep the earlier entry first, as topk over [old, new] does in practice.
  auto at = std::upper_bound(hypotheses.begin(), hypotheses.end(), h.score,
                             [](float s, const BeamHypothesis& x) { return s > x.score; });
  if (at == hypotheses.end()) return;
  hypotheses.insert(at, std::move(h));
  hypotheses.pop_back();
}

}  // namespace llmapi
