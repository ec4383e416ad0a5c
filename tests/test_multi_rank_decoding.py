"""Every decoding setting over 2 MPI ranks on the CPU (TP=2 and PP=2, spelt tp= / pp=), and over one rank in a
process of its own (engine_process=True), gives the tokens one rank in the caller's process gives, and logprobs,
prompt logprobs and logits outputs within 1e-5 (relative): n / best_of, beam search, each penalty, min_p, bad
words, logit bias, Python logits processors (importable by name; a closure is refused, a failing one fails its
request alone), and all of them in one batch under preemption."""

import json
import math
import random

import pytest

from llmapi import LLM, KvCacheConfig, LogitsProcessorError, SamplingParams
from mr_processors import FavourRecent, ban_even_tokens, fails_on_third_token

TOL = 1e-5
# Small blocks and a small cache: the mixed batch below is preempted; the other tests fit.
SETTINGS = dict(tokens_per_block=4, kv_cache_config=KvCacheConfig(max_tokens=256, enable_block_reuse=False))


def _prompts(model_dir, lengths, seed):
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def one_rank(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), **SETTINGS) as llm:
        yield llm


@pytest.fixture(scope="module", params=[(2, 1, False), (1, 2, False), (1, 1, True)],
                ids=["tp2", "pp2", "engine-process"])
def two_ranks(request, tiny_llama_dir):
    """Two ranks, or one in a process of its own (engine_process=True): ranks of a spawned MPI job either way."""
    tp, pp, apart = request.param
    with LLM(str(tiny_llama_dir), tp=tp, pp=pp, engine_process=apart, **SETTINGS) as llm:
        assert (llm.args.tensor_parallel_size, llm.args.pipeline_parallel_size) == (tp, pp)
        assert llm._runner is None and llm._executor.rank_pids  # the executor runs in the job's rank 0
        yield llm


def _close(a, b):
    return math.isclose(a, b, rel_tol=TOL, abs_tol=TOL) or (math.isnan(a) and math.isnan(b))


def _close_logits(want, got):
    """Within TOL of their scale: float32 sums taken in another order (a TP split, another batch shape) differ
    by a few ulps of the largest logit (7e-6 for logits up to 9 here)."""
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL * max(1.0, want.abs().max().item())


def _same_logprobs(want, got):
    assert (want is None) == (got is None) and len(want or []) == len(got or [])
    for w, g in zip(want or [], got or []):
        if w is None:
            assert g is None
            continue
        assert list(g) == list(w)  # the same ids (the chosen one first, then the top), in order
        for token in w:
            assert g[token].rank == w[token].rank and _close(g[token].logprob, w[token].logprob)


def assert_same(want, got):
    """Outputs of one rank and of two: the same tokens; logprobs, logits and scores within TOL."""
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in w.outputs]
        _same_logprobs(w.prompt_logprobs, g.prompt_logprobs)
        assert (w.context_logits is None) == (g.context_logits is None)
        if w.context_logits is not None:
            _close_logits(w.context_logits, g.context_logits)
        for wo, go in zip(w.outputs, g.outputs):
            assert go.finish_reason == wo.finish_reason
            _same_logprobs(wo.logprobs, go.logprobs)
            if wo.cumulative_logprob is not None:
                assert _close(go.cumulative_logprob, wo.cumulative_logprob)
            assert (wo.generation_logits is None) == (go.generation_logits is None)
            if wo.generation_logits is not None:
                _close_logits(wo.generation_logits, go.generation_logits)


def _compare(one_rank, two_ranks, prompts, params):
    want = one_rank.generate(prompts, params, use_tqdm=False)
    got = two_ranks.generate(prompts, params, use_tqdm=False)
    assert_same(want, got)
    return want


CASES = {
    "n=3 seeded": SamplingParams(max_tokens=8, temperature=0.9, top_k=40, n=3, seed=7, logprobs=2),
    "best_of=4": SamplingParams(max_tokens=8, temperature=1.0, best_of=4, n=2, seed=11, logprobs=1),
    "beams=2": SamplingParams(max_tokens=8, use_beam_search=True, best_of=2, n=2, logprobs=1),
    "beams=4": SamplingParams(max_tokens=8, use_beam_search=True, best_of=4, n=3, length_penalty=0.8),
    "repetition_penalty": SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.5, logprobs=3),
    "presence_penalty": SamplingParams(max_tokens=10, temperature=0, presence_penalty=1.5, logprobs=0),
    "frequency_penalty": SamplingParams(max_tokens=10, temperature=0.7, seed=3, frequency_penalty=1.0),
    "min_p": SamplingParams(max_tokens=10, temperature=1.5, seed=5, min_p=0.2, logprobs=2),
    "bad words": SamplingParams(max_tokens=10, temperature=0, bad_token_ids=[[21, 22], 30, 31]),
    "logit_bias": SamplingParams(max_tokens=10, temperature=0, logit_bias={40: 4.0, 41: 3.5, 7: -100.0}),
    "processor": SamplingParams(max_tokens=10, temperature=0, logits_processor=ban_even_tokens),
    "processors in turn": SamplingParams(max_tokens=10, temperature=0.8, seed=1,
                                         logits_processor=[FavourRecent(2.0), ban_even_tokens]),
    "prompt_logprobs=5": SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=5),
    "logits outputs": SamplingParams(max_tokens=5, temperature=0.8, seed=2, n=2, return_context_logits=True,
                                     return_generation_logits=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_setting_equals_one_rank(one_rank, two_ranks, tiny_llama_dir, case):
    prompts = _prompts(tiny_llama_dir, [3, 11, 6], seed=len(case))
    want = _compare(one_rank, two_ranks, prompts, CASES[case])
    if "processor" in case and "turn" not in case:
        assert all(t % 2 for o in want for s in o.outputs for t in s.token_ids)
    if case == "bad words":  # 22 never follows 21, 30 and 31 never come
        assert all(t not in (30, 31) for o in want for t in o.outputs[0].token_ids)
    if case == "prompt_logprobs=5":
        assert [len(o.prompt_logprobs) for o in want] == [3, 11, 6]
    if case == "logits outputs":
        assert want[1].context_logits.shape[0] == 11
        assert all(s.generation_logits.shape[0] == len(s.token_ids) for o in want for s in o.outputs)
    if case.startswith("beams"):
        assert all(len(o.outputs) == CASES[case].n for o in want)


def test_mixed_batch_under_preemption_frees_every_block(one_rank, two_ranks, tiny_llama_dir):
    """Every case at once, twice over, in one generate call: more sequences than the cache holds."""
    cases = list(CASES.values()) * 2
    prompts = _prompts(tiny_llama_dir, [random.Random(i).randrange(2, 20) for i in range(len(cases))], seed=9)
    before = two_ranks.get_stats()["num_preemptions"]
    _compare(one_rank, two_ranks, prompts, cases)
    stats = two_ranks.get_stats()
    assert stats["num_preemptions"] > before and stats["num_used_blocks"] == 0


def test_failing_processor_fails_only_its_request(one_rank, two_ranks, tiny_llama_dir):
    prompts = _prompts(tiny_llama_dir, [4, 9, 5], seed=4)
    good = [SamplingParams(max_tokens=6, temperature=0), SamplingParams(max_tokens=6, temperature=0,
                                                                        logits_processor=ban_even_tokens)]
    want = one_rank.generate([prompts[0], prompts[2]], good, use_tqdm=False)
    bad = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logits_processor=fails_on_third_token)
    outs = [two_ranks.generate_async(prompts[0], good[0]), two_ranks.generate_async(prompts[1], bad),
            two_ranks.generate_async(prompts[2], good[1])]
    with pytest.raises(LogitsProcessorError, match="fails on purpose"):
        outs[1].result()
    assert_same(want, [outs[0].result(), outs[2].result()])
    assert_same(want[:1], two_ranks.generate([prompts[0]], good[0], use_tqdm=False))  # it serves on


def test_closure_processor_is_refused_at_generate(two_ranks):
    bonus = 1.0

    def closure(output_ids, logits):
        return logits + bonus

    for processor in (closure, lambda ids, logits: logits, [ban_even_tokens, closure]):
        with pytest.raises(ValueError, match="logits_processor: .*must be importable there, a module-level "
                                             "function or an instance of a module-level class"):
            two_ranks.generate([[5, 6, 7]], SamplingParams(max_tokens=2, logits_processor=processor),
                               use_tqdm=False)


def test_gpt2_mixed_settings_equal_one_rank(tiny_gpt2_dir):
    cases = [CASES[name] for name in ("n=3 seeded", "beams=4", "repetition_penalty", "logit_bias", "processor",
                                      "prompt_logprobs=5", "logits outputs")]
    prompts = _prompts(tiny_gpt2_dir, [5, 12, 3, 8, 2, 9, 6], seed=3)
    with LLM(str(tiny_gpt2_dir)) as llm:
        want = llm.generate(prompts, cases, use_tqdm=False)
    for tp, pp in ((2, 1), (1, 2)):
        with LLM(str(tiny_gpt2_dir), tensor_parallel_size=tp, pipeline_parallel_size=pp) as llm:
            assert_same(want, llm.generate(prompts, cases, use_tqdm=False))


def test_tp_spellings_that_disagree_are_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="tp=2 and tensor_parallel_size=4 disagree"):
        LLM(str(tiny_llama_dir), tp=2, tensor_parallel_size=4)
    with pytest.raises(ValueError, match="pp=1 and pipeline_parallel_size=2 disagree"):
        LLM(str(tiny_llama_dir), pp=1, pipeline_parallel_size=2)


def test_processor_the_ranks_cannot_import_fails_its_request(two_ranks, tmp_path, monkeypatch):
    """A module on the user's sys.path only after the ranks started: loading its processor fails there."""
    (tmp_path / "mr_late_module.py").write_text("def keep(output_ids, logits):\n    return logits\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from mr_late_module import keep

    late = two_ranks.generate_async([5, 6, 7], SamplingParams(max_tokens=3, logits_processor=keep))
    plain = two_ranks.generate_async([5, 6, 7], SamplingParams(max_tokens=3, temperature=0))
    with pytest.raises(LogitsProcessorError, match="could not be loaded on the sampling rank.*mr_late_module"):
        late.result()
    assert len(plain.result().outputs[0].token_ids) == 3


def test_launched_script_decodes_as_one_rank(tiny_llama_dir, tmp_path, monkeypatch):
    """`mpiexec -n 2 llmapi-launch script.py` at PP=2: the script's process is rank 0, the sampling rank is rank 1;
    the processor's module lies beside the script."""
    import os
    import subprocess
    import sys
    import textwrap

    from llmapi.distributed.spawn import find_mpiexec

    (tmp_path / "script_processors.py").write_text(textwrap.dedent("""
        def ban_odd(output_ids, logits):
            logits[1::2] = float("-inf")
            return logits
    """))
    prompts = _prompts(tiny_llama_dir, [4, 10], seed=8)
    settings = ("dict(max_tokens=6, temperature=0.8, seed=4, n=2, prompt_logprobs=2, logprobs=1, "
                "return_generation_logits=True, repetition_penalty=1.2, logits_processor=ban_odd)")
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import json
        from llmapi import LLM, SamplingParams
        from script_processors import ban_odd

        with LLM({str(tiny_llama_dir)!r}, pp=2) as llm:
            outs = llm.generate({prompts!r}, SamplingParams(**{settings}), use_tqdm=False)
        print("OUT", json.dumps([[[s.token_ids, [lp[t].logprob for lp, t in zip(s.logprobs, s.token_ids)],
                                   s.generation_logits.sum(dim=-1).tolist()] for s in o.outputs]
                                 + [[lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], ids[1:])]]
                                 for o, ids in zip(outs, {prompts!r})]), flush=True)
    """))
    mpiexec = str(find_mpiexec())
    env = dict(os.environ, PATH=os.path.dirname(mpiexec) + os.pathsep + os.environ.get("PATH", ""))
    launched = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "llmapi.launch", str(script)],
                              capture_output=True, text=True, timeout=120, env=env, cwd="/")
    assert launched.returncode == 0, launched.stdout + launched.stderr
    got = json.loads(next(line[4:] for line in launched.stdout.splitlines() if line.startswith("OUT ")))

    monkeypatch.syspath_prepend(str(tmp_path))
    from script_processors import ban_odd

    with LLM(str(tiny_llama_dir)) as llm:
        outs = llm.generate(prompts, SamplingParams(**eval(settings, {"ban_odd": ban_odd})), use_tqdm=False)
    for o, ids, g in zip(outs, prompts, got):
        for s, (tokens, logprobs, logit_sums) in zip(o.outputs, g):
            assert s.token_ids == tokens and all(t % 2 == 0 for t in tokens)
            chosen = [s_lp[t].logprob for s_lp, t in zip(s.logprobs, tokens)]
            assert chosen == pytest.approx(logprobs, rel=TOL, abs=TOL)
            assert s.generation_logits.sum(dim=-1).tolist() == pytest.approx(logit_sums, abs=1e-3)
        prompt_logprobs = [lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], ids[1:])]
        assert prompt_logprobs == pytest.approx(g[-1], rel=TOL, abs=TOL)
