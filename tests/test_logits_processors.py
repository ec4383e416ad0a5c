"""Each sampling knob's effect on fixed logits equals its reference: transformers' processors
(repetition penalty, bad words, sequence bias, min-p) or the OpenAI formula (presence, frequency).
Token histories go through the executor's batch (C++) and the runner's per-request state rows."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, NoBadWordsLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor,
                                                    SequenceBiasLogitsProcessor)

from llmapi._core import ExecutorConfig, Request, Scheduler
from llmapi.runtime.logits_processing import apply_logit_bias_, apply_penalties_
from llmapi.runtime.request_state import RequestState
from llmapi.runtime.sampler import sample, suppress_

VOCAB = 40


def chi2_critical_0_001(df: int) -> float:
    """Upper 0.1% point of chi-square with `df` degrees of freedom (Wilson-Hilferty; z = 3.0902)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + 3.0902 * a ** 0.5) ** 3


def _logits(rows, seed=0):
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _histories():
    """(prompt, output) token histories of three requests, with repeats and overlaps."""
    return [([3, 5, 5, 9], [5, 7, 7, 7, 11]), ([1, 2], [2, 2, 30]), ([4, 8, 15, 16, 23, 33], [])]


def _batch_for(requests, **scheduler_overrides):
    """Schedule `requests` (whole prompt + output as known tokens) and return the C++ batch."""
    config = dict(max_batch_size=8, max_num_tokens=256, max_seq_len=128, tokens_per_block=4,
                  num_blocks=64, enable_prefix_caching=False)
    config.update(scheduler_overrides)
    s = Scheduler(ExecutorConfig(**config))
    for r in requests:
        s.add(r)
    return s.make_batch(s.schedule())


def _state_rows(batch):
    state = RequestState(VOCAB, torch.device("cpu"))
    state.update(batch, np.zeros(batch.num_requests, dtype=bool))
    return state.rows(np.asarray(batch.slots))


def test_repetition_penalty_equals_transformers():
    hist = _histories()
    # The prompt carries the whole history: the state counts tokens past prompt_len as output,
    # so split each history with a request whose "prompt" is everything (the penalty covers both).
    requests = [Request(i, p + o, max_tokens=4, repetition_penalty=1.7) for i, (p, o) in enumerate(hist)]
    batch = _batch_for(requests)
    counts, in_prompt = _state_rows(batch)
    logits = _logits(3)
    ones = torch.ones(3)
    got = apply_penalties_(logits.clone(), counts, in_prompt, 1.7 * ones, 0 * ones, 0 * ones)
    for r, (p, o) in enumerate(hist):
        want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([p + o]), logits[r:r + 1].clone())
        assert torch.equal(got[r:r + 1], want)
    assert not torch.equal(got, logits)


def test_presence_and_frequency_equal_the_openai_formula():
    hist = [([3, 5, 5, 9], [5, 7, 7, 7, 11]), ([1, 2], [2, 2, 30, 2, 1]), ([4, 8, 15], [16, 23, 33, 0, 39])]
    state = RequestState(VOCAB, torch.device("cpu"))
    # Feed each history as the executor does: the prompt first, then output tokens one by one.
    requests = [Request(i, p, max_tokens=8, presence_penalty=0.6, frequency_penalty=0.35)
                for i, (p, _) in enumerate(hist)]
    s = Scheduler(ExecutorConfig(max_batch_size=8, max_num_tokens=256, max_seq_len=128, tokens_per_block=4,
                                 num_blocks=64))
    for r in requests:
        s.add(r)
    longest = max(len(o) for _, o in hist)
    for step in range(longest + 1):
        out = s.schedule()
        batch = s.make_batch(out)
        state.update(batch, np.zeros(batch.num_requests, dtype=bool))
        ids = [int(i) for i in batch.request_ids]
        tokens = [hist[i][1][step] if step < longest else 0 for i in ids]
        if step == longest:
            break
        s.update(out, tokens)
    counts, in_prompt = state.rows(np.asarray(batch.slots))
    logits = _logits(3, seed=1)
    n = len(ids)
    got = apply_penalties_(logits[ids].clone(), counts, in_prompt, torch.ones(n), 0.6 * torch.ones(n),
                           0.35 * torch.ones(n))
    for row, i in enumerate(ids):
        outputs = hist[i][1][:longest]
        want = logits[i].clone()
        for t in set(outputs):  # OpenAI: logit -= count * frequency + (count > 0) * presence
            want[t] -= outputs.count(t) * 0.35 + 0.6
        torch.testing.assert_close(got[row], want, rtol=0, atol=1e-6)


def test_bad_words_equal_transformers():
    bad = [[7], [5, 7], [9, 10, 12], [2, 2, 30], [11, 4]]
    hist = [p + o for p, o in _histories()] + [[3, 9, 10]]
    requests = [Request(i, h, max_tokens=4, bad_words=bad) for i, h in enumerate(hist)]
    batch = _batch_for(requests)
    logits = _logits(len(hist), seed=2)
    got = suppress_(logits.clone(), torch.tensor(batch.suppress_offsets), torch.tensor(batch.suppress_ids))
    for r, h in enumerate(hist):
        want = NoBadWordsLogitsProcessor(bad)(torch.tensor([h]), logits[r:r + 1].clone())
        assert torch.equal(got[r:r + 1], want), r
    assert torch.isinf(got[3, 12])  # [..., 9, 10] ends request 3: 12 is banned there only
    assert not torch.isinf(got[0, 12])


def test_logit_bias_equals_transformers_sequence_bias():
    bias = {3: 4.5, 17: -2.25, 39: 0.75}
    requests = [Request(0, [1, 2, 3], max_tokens=4, logit_bias=bias), Request(1, [5], max_tokens=4)]
    batch = _batch_for(requests)
    logits = _logits(2, seed=3)
    got = apply_logit_bias_(logits.clone(), torch.tensor(batch.bias_offsets), torch.tensor(batch.bias_ids),
                            torch.tensor(batch.bias_values))
    want = SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})(torch.tensor([[1, 2, 3]]),
                                                                          logits[:1].clone())
    assert torch.equal(got[:1], want)
    assert torch.equal(got[1], logits[1])  # the other request has no bias


def _chi_square(counts, probs):
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_keeps_transformers_set_and_its_distribution(min_p):
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(11)) * 0.8
    kept_logits = MinPLogitsWarper(min_p)(None, logits.clone())[0]
    kept = torch.isfinite(kept_logits)
    assert 2 <= int(kept.sum()) < VOCAB  # the test means something: min_p drops some, keeps several
    num = 40000
    rows = logits.expand(num, VOCAB)
    tokens = sample(rows, temperature=torch.ones(num), top_k=torch.zeros(num, dtype=torch.int32),
                    top_p=torch.ones(num), seeds=torch.arange(num) + 12345, output_index=torch.zeros(num),
                    suppress_offsets=torch.zeros(num + 1, dtype=torch.int32),
                    suppress_ids=torch.zeros(0, dtype=torch.long), min_p=torch.full((num,), min_p))
    assert bool(kept[tokens].all())  # every sample lies in the kept set
    probs = kept_logits.softmax(-1)  # the renormalised kept probabilities
    ids = torch.nonzero(kept)[:, 0].tolist()
    counts = torch.bincount(tokens, minlength=VOCAB)[ids].tolist()
    assert _chi_square(counts, probs[ids].tolist()) < chi2_critical_0_001(len(ids) - 1)
