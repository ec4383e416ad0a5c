"""no_repeat_ngram_size and forced EOS: make_batch's suppressed ids equal the tokens transformers'
NoRepeatNGramLogitsProcessor bans for the same token history (per sampling row, per beam, over an
encoder-decoder request's decoder tokens only); the forced id sits on the row that samples the last allowed
token, where transformers' ForcedEOSTokenLogitsProcessor forces it; and greedy and beam search with
no_repeat_ngram_size=2 through LLM on the tiny Llama give exactly transformers' generate tokens."""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (ForcedBOSTokenLogitsProcessor, ForcedEOSTokenLogitsProcessor,
                                                   NoRepeatNGramLogitsProcessor)

from llmapi import LLM, SamplingParams
from llmapi._core import ExecutorConfig, Request, Scheduler

VOCAB = 16


def make_scheduler(**overrides) -> Scheduler:
    config = dict(max_batch_size=64, max_num_tokens=2048, max_seq_len=64, tokens_per_block=4, num_blocks=512)
    config.update(overrides)
    return Scheduler(ExecutorConfig(**config))


def hf_banned(tokens, n, vocab=VOCAB) -> list:
    """The ids transformers' processor sets to -inf after `tokens`."""
    scores = NoRepeatNGramLogitsProcessor(n)(torch.tensor([list(tokens)]), torch.zeros(1, vocab))
    return sorted(torch.nonzero(torch.isinf(scores[0])).flatten().tolist())


def row_suppressed(batch, row) -> list:
    off = batch.suppress_offsets
    return batch.suppress_ids[off[row]:off[row + 1]].tolist()


def step(tokens, scores=None):
    tokens = np.asarray(tokens, dtype=np.int32)
    return SimpleNamespace(tokens=tokens, scores=None if scores is None else np.asarray(scores, np.float32),
                           logprobs=None, ranks=None, top_ids=None, top_logprobs=None)


def test_hand_computed_bans():
    s = make_scheduler()
    history = [5, 6, 7, 5, 6]
    for rid, n in enumerate((1, 2, 3, 4, 5, 6), start=1):
        s.add(Request(rid, history, max_tokens=2, no_repeat_ngram_size=n))
    b = s.make_batch(s.schedule())
    # n=1: every token seen; n=2: "6" was followed by 7; n=3: "5 6" by 7; n=4: "7 5 6" never before;
    # n=5: the history itself is the only 5-gram; n=6: no 6-gram yet.
    assert [sorted(row_suppressed(b, r)) for r in range(6)] == [[5, 6, 7], [7], [7], [], [], []]


def test_bans_equal_transformers_for_random_histories():
    rng = random.Random(3)
    s = make_scheduler()
    cases = []
    for rid in range(1, 61):
        alphabet = rng.randint(2, 6)  # few distinct ids: n-grams repeat
        history = [rng.randrange(alphabet) for _ in range(rng.randint(1, 30))]
        n = rng.randint(1, 4)
        cases.append((history, n))
        s.add(Request(rid, history, max_tokens=2, no_repeat_ngram_size=n))
    b = s.make_batch(s.schedule())
    got = [row_suppressed(b, r) for r in range(len(cases))]
    assert all(len(ids) == len(set(ids)) for ids in got)  # each id once
    assert [sorted(ids) for ids in got] == [hf_banned(h, n) for h, n in cases]
    assert sum(map(len, got)) > 30  # the histories did repeat


def test_bans_follow_generated_tokens_and_only_sampling_rows_get_them():
    s = make_scheduler(max_num_tokens=6)
    prompt = [1, 2, 3, 1, 2, 4, 1, 2, 3]  # 9 tokens: a first chunk of 6 samples nothing
    s.add(Request(1, prompt, max_tokens=6, no_repeat_ngram_size=2))
    out = s.schedule()
    b = s.make_batch(out)
    assert (b.do_sample.tolist(), row_suppressed(b, 0)) == ([0], [])
    s.update(out, [0])
    tokens = list(prompt)
    for generated in (1, 5, 1, 2, 9):
        out = s.schedule()
        b = s.make_batch(out)
        assert b.do_sample.tolist() == [1]
        assert sorted(row_suppressed(b, 0)) == hf_banned(tokens, 2)
        s.update(out, [generated])
        tokens.append(generated)


def test_bans_join_min_tokens_and_bad_words_each_once():
    s = make_scheduler()
    prompt = [3, 6, 7, 3, 6]
    s.add(Request(1, prompt, max_tokens=4, min_tokens=2, eos_token_ids=[7], bad_words=[[6, 9], [3, 6, 8]],
                  no_repeat_ngram_size=2))
    b = s.make_batch(s.schedule())
    # EOS 7 (under min_tokens) is also the n-gram ban after "6"; bad words "6 9" and "3 6 8" end in 9 and 8.
    assert sorted(row_suppressed(b, 0)) == sorted({7} | {9, 8} | set(hf_banned(prompt, 2)))
    assert len(row_suppressed(b, 0)) == 3


def test_each_beam_bans_from_its_own_tokens():
    s = make_scheduler()
    prompt = [4, 5, 4, 6, 4]
    s.add(Request(1, prompt, max_tokens=6, num_sequences=2, beam_search=True, eos_token_ids=[2],
                  no_repeat_ngram_size=2))
    out = s.schedule()
    b = s.make_batch(out)
    assert sorted(row_suppressed(b, 0)) == hf_banned(prompt, 2) == [5, 6]
    s.update(out, step([[7, 8, 9, 10]], [[-0.5, -1.0, -1.5, -2.0]]))
    for _ in range(3):
        out = s.schedule()
        b = s.make_batch(out)
        beams = [s.request(x.request_id) for x in out.scheduled]
        histories = [beam.prompt_token_ids + beam.output_token_ids for beam in beams]
        assert len(beams) == 2 and histories[0] != histories[1]
        for row, history in enumerate(histories):
            assert sorted(row_suppressed(b, row)) == hf_banned(history, 2)
        s.update(out, step([[4, 5, 6, 7], [4, 8, 9, 10]], [[-0.1, -0.2, -5, -6], [-0.3, -0.4, -5, -6]]))


def test_encoder_tokens_do_not_count_for_the_bans():
    s = make_scheduler()
    decoder = [0, 5, 6, 5]
    s.add(Request(1, decoder, max_tokens=3, no_repeat_ngram_size=2, encoder_token_ids=[5, 7, 5, 8]))
    b = s.make_batch(s.schedule())
    assert sorted(row_suppressed(b, 0)) == hf_banned(decoder, 2) == [6]


def test_no_repeat_requests_never_run_ahead():
    s = make_scheduler(async_scheduling=True)
    s.add(Request(1, [3, 4, 5], max_tokens=4, no_repeat_ngram_size=2))
    s.add(Request(2, [3, 4, 5], max_tokens=4))
    s.schedule()
    assert [x.request_id for x in s.schedule().scheduled] == [2]  # only the plain request runs ahead


@pytest.mark.parametrize("prompt_len, max_tokens", [(3, 5), (9, 5), (2, 1)])
def test_forced_eos_sits_on_the_last_allowed_token(prompt_len, max_tokens):
    forced = 9
    prompt = list(range(3, 3 + prompt_len))
    s = make_scheduler(max_num_tokens=4)  # the 9-token prompt goes in chunks that sample nothing
    s.add(Request(1, prompt, max_tokens=max_tokens, eos_token_ids=[2], forced_eos_token_id=forced))
    reference = ForcedEOSTokenLogitsProcessor(max_length=prompt_len + max_tokens, eos_token_id=forced)
    tokens, rows = list(prompt), []
    while s.has_unfinished:
        out = s.schedule()
        b = s.make_batch(out)
        if b.do_sample[0]:
            scores = reference(torch.tensor([tokens]), torch.zeros(1, VOCAB))
            hf_forced = forced if bool(torch.isinf(scores[0]).any()) else -1
            assert b.forced_token_ids.tolist() == [hf_forced]
            rows.append(hf_forced)
        else:
            assert b.forced_token_ids.tolist() == [-1]
        token = int(b.forced_token_ids[0]) if b.forced_token_ids[0] >= 0 else 4  # a runner that obeys it
        s.update(out, [token])
        if b.do_sample[0]:
            tokens.append(token)
    assert rows == [-1] * (max_tokens - 1) + [forced]
    assert tokens[prompt_len:] == [4] * (max_tokens - 1) + [forced]


@pytest.mark.parametrize("prompt, max_tokens", [([2], 4), ([2, 7], 4), ([2], 1), ([2], 2)])
def test_forced_bos_and_eos_where_transformers_forces_them(prompt, max_tokens):
    """BART's generation config: forced BOS 0 after the decoder start, forced EOS 2 last. transformers applies
    ForcedBOS then ForcedEOS, so EOS wins where both apply (max_tokens=1)."""
    s = make_scheduler()
    s.add(Request(1, prompt, max_tokens=max_tokens, forced_bos_token_id=0, forced_eos_token_id=2))
    processors = [ForcedBOSTokenLogitsProcessor(bos_token_id=0),
                  ForcedEOSTokenLogitsProcessor(max_length=len(prompt) + max_tokens, eos_token_id=2)]
    tokens, seen = list(prompt), []
    while s.has_unfinished:
        out = s.schedule()
        b = s.make_batch(out)
        scores = torch.zeros(1, VOCAB)
        for processor in processors:
            scores = processor(torch.tensor([tokens]), scores)
        want = int(scores[0].argmax()) if bool(torch.isinf(scores[0]).any()) else -1
        assert b.forced_token_ids.tolist() == [want]
        seen.append(want)
        token = want if want >= 0 else 5
        s.update(out, [token])
        tokens.append(token)
    assert (0 in seen) == (len(prompt) == 1 and max_tokens > 1) and seen[-1] == 2


def test_forced_eos_counts_the_token_pending_in_a_step_ahead():
    s = make_scheduler(async_scheduling=True)
    s.add(Request(1, [3, 4], max_tokens=4, forced_eos_token_id=9))
    pending, ahead, tokens, finish = [], 0, [], []
    while s.has_unfinished:
        while len(pending) < 2:  # as the executor: step N + 1 is scheduled before step N is collected
            out = s.schedule()
            if not out.scheduled:
                break
            pending.append((out, s.make_batch(out)))
        done, b = pending.pop(0)
        ahead += int(done.scheduled[0].input_row >= 0)
        # Output index 3 is the 4th and last token: forced, whether its row runs ahead or not.
        assert b.forced_token_ids.tolist() == [9 if b.output_index[0] == 3 else -1]
        token = int(b.forced_token_ids[0]) if b.forced_token_ids[0] >= 0 else 5
        for r in s.update(done, [token]):
            tokens += r.token_ids
            finish += [r.finish_reason] if r.finished else []
    assert ahead > 0 and tokens == [5, 5, 5, 9] and finish == ["length"]


# ------------------------------------------------------------------------------------------- end to end

MAX_TOKENS = 20


@pytest.fixture(scope="module")
def setup(tiny_llama_dir):
    vocab = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(2)  # prompts whose greedy and beam outputs the rule changes (checked below)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (4, 11, 20)]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with LLM(str(tiny_llama_dir), tokens_per_block=4) as llm:
        yield llm, hf, prompts


def _repeats_a_bigram(tokens) -> bool:
    bigrams = list(zip(tokens, tokens[1:]))
    return len(bigrams) != len(set(bigrams))


def _hf_generate(hf, prompt, **kwargs):
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                          pad_token_id=0, **kwargs)
    return out


def _hf_beams(hf, prompt, **kwargs):
    """transformers' two best hypotheses of a 2-beam search, each cut at its own end."""
    ref = _hf_generate(hf, prompt, num_beams=2, num_return_sequences=2, return_dict_in_generate=True,
                       output_scores=True, **kwargs)
    hyps = []
    for row, beam_indices in zip(ref.sequences, ref.beam_indices):
        length = int((beam_indices >= 0).sum())  # generated tokens of this hypothesis (pad follows)
        hyps.append(row[len(prompt):len(prompt) + length].tolist())
    return hyps


def test_greedy_no_repeat_ngram_matches_transformers(setup):
    llm, hf, prompts = setup
    plain = [_hf_generate(hf, p)[0, len(p):].tolist() for p in prompts]
    want = [_hf_generate(hf, p, no_repeat_ngram_size=2)[0, len(p):].tolist() for p in prompts]
    assert want != plain  # the rule changes what the tiny model says
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, no_repeat_ngram_size=2)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert not any(_repeats_a_bigram(p + o) for p, o in zip(prompts, got))
    assert llm.get_stats()["num_used_blocks"] == 0


def test_beam_search_no_repeat_ngram_matches_transformers(setup):
    llm, hf, prompts = setup
    params = SamplingParams(max_tokens=MAX_TOKENS, use_beam_search=True, best_of=2, n=2, no_repeat_ngram_size=2)
    outs = llm.generate(prompts, params, use_tqdm=False)
    changed = 0
    for p, out in zip(prompts, outs):
        want = _hf_beams(hf, p, no_repeat_ngram_size=2)
        assert [o.token_ids for o in out.outputs] == want
        assert not any(_repeats_a_bigram(p + o.token_ids) for o in out.outputs)
        changed += want != _hf_beams(hf, p)
    assert changed > 0  # the rule changes what the tiny model's beams say
    assert llm.get_stats()["num_used_blocks"] == 0


def test_no_repeat_ngram_size_is_validated():
    with pytest.raises(ValueError, match=r"SamplingParams\.no_repeat_ngram_size=-1 is invalid: must be an int >= 0"):
        SamplingParams(no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match=r"SamplingParams\.no_repeat_ngram_size=2\.0 is invalid"):
        SamplingParams(no_repeat_ngram_size=2.0)
    with pytest.raises(ValueError, match=r"SamplingParams\.no_repeat_ngram_size=True is invalid"):
        SamplingParams(no_repeat_ngram_size=True)
    with pytest.raises(ValueError, match=r"no_repeat_ngram_size=2147483648 is invalid: must be < 2\*\*31"):
        SamplingParams(no_repeat_ngram_size=2 ** 31)
    params = SamplingParams(no_repeat_ngram_size=3)
    with pytest.raises(ValueError, match=r"no_repeat_ngram_size"):
        params.no_repeat_ngram_size = -2
    assert params.no_repeat_ngram_size == 3  # a refused write leaves the old value


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_no_repeat_ngram_at_two_ranks_equals_one_rank(setup, tiny_llama_dir, tp, pp):
    """The bans come with the batch (make_batch's suppressed ids), so two ranks give one rank's tokens."""
    llm, hf, prompts = setup
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, no_repeat_ngram_size=2)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with LLM(str(tiny_llama_dir), tokens_per_block=4, tensor_parallel_size=tp, pipeline_parallel_size=pp) as ranks:
        got = [o.outputs[0].token_ids for o in ranks.generate(prompts, params, use_tqdm=False)]
    assert got == want
