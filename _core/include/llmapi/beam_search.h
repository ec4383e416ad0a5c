// Beam search: one step's choice of running beams and finished hypotheses (transformers' rules).
#pragma once

#include <cstdint>
#include <vector>

#include "llmapi/request.h"

namespace llmapi {

// Candidates a beam row offers: max(2, 1 + number of stop ids) * beam width, as transformers'
// beams_to_keep (so that beam-width beams can go on even if the best ones all stop).
int32_t beam_candidates(const Request& request);

struct BeamCandidate {
  int32_t beam = 0;       // index of the parent beam
  int32_t column = 0;     // index among the parent row's candidates
  int32_t token = 0;
  float score = 0.0f;     // parent's running score + the token's processed logprob
  bool stops = false;     // ends the sequence: a stop id, or the length limit
};

struct BeamStep {
  std::vector<BeamCandidate> running;   // the next beams, best first (beam-width many)
  std::vector<BeamCandidate> finished;  // candidates that enter the hypotheses, with score length-penalised
  bool done = false;                    // the search is over: return the hypotheses
};

// One step for a group whose beams have generated `num_generated` tokens each. candidates[b]
// holds beam b's (token, processed logprob) pairs (one beam on the first step). `hypotheses`
// (beam-width places, best first) is updated in place by `add_hypothesis` afterwards; `improvable`
// is the group's flag, updated here. Arithmetic is float32 as in transformers, so scores tie-break
// the same way.
BeamStep beam_search_step(const Request& first_beam, const std::vector<float>& beam_scores,
                          const std::vector<std::vector<std::pair<int32_t, float>>>& candidates,
                          int32_t num_generated, std::vector<BeamHypothesis>& hypotheses,
                          bool& improvable);

// Inserts `hypothesis` into the best-first list of beam-width places if it beats the last one.
void add_hypothesis(std::vector<BeamHypothesis>& hypotheses, BeamHypothesis hypothesis);

}  // namespace llmapi
