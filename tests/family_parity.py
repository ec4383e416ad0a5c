"""Family parity harness: a model (any source LLM accepts) against a reference, greedy, token for token, in fp32.

For a new model family (or source format), build a tiny random-weight model, then in a test:

    from family_parity import check_parity, check_multi_rank

    def test_my_family(tiny_dir):
        check_parity(tiny_dir, vocab=320)                  # the directory is also transformers' reference
        check_parity(other_format, vocab=320, ref_dir=hf_dir)   # a non-HF source against its HF twin
        check_multi_rank(tiny_dir, vocab=320)              # TP=2 and PP=2 (2 MPI ranks on CPU) equal one rank

check_parity runs 10 prompts of mixed lengths (1 to 60 tokens, plus two longer than `window` when the family
has a sliding window) through LLM with chunked prefill forced (max_num_tokens=16: every prompt longer than
that must be computed in several chunks, which is checked), then prompts that share a long prefix with prefix
caching on (the second round must hit the cache, which is checked), and compares every output with the
reference: transformers' greedy generate on `ref_dir` (default: the model directory itself), one prompt at a
time, fp32, stopping at EOS as LLM does. A `reference` callable replaces transformers for a format it cannot
read. Keep models tiny (hidden 64, 2-3 layers): each check starts one LLM per setting (check_multi_rank one
MPI job per mapping).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from llmapi import LLM, SamplingParams

MAX_TOKENS = 20
LENGTHS = (1, 5, 17, 33, 2, 48, 9, 26, 60, 12)
"""Prompt lengths of the mixed batch (10 prompts; 17, 33, 48, 26 and 60 exceed CHUNK_TOKENS)."""
CHUNK_TOKENS = 16
"""max_num_tokens of the chunked-prefill run: a step's token budget, so longer prompts are split."""
TOKENS_PER_BLOCK = 8
PREFIX_LEN = 40

Reference = Callable[[list, int], list]
"""reference(prompts, max_tokens) -> greedy continuations (lists of ids), each ending at EOS if it came."""


def mixed_prompts(vocab: int, seed: int = 1, window: Optional[int] = None) -> list[list[int]]:
    """10 random prompts of LENGTHS (ids 3..vocab-1: no BOS/EOS/pad); with a sliding `window`, the last two are
    window + 5 and 2 * window + 9 tokens long, so attention must drop the oldest tokens."""
    lengths = list(LENGTHS)
    if window is not None:
        lengths[-2:] = [window + 5, 2 * window + 9]
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def prefix_prompts(vocab: int, seed: int = 2, window: Optional[int] = None) -> tuple[list, list, int]:
    """(first round, second round, prefix length): 4 + 4 prompts that start with one shared random prefix of
    PREFIX_LEN tokens (longer than `window` when given) followed by 1-30 tokens of their own."""
    rng = random.Random(seed)
    prefix_len = PREFIX_LEN if window is None else max(PREFIX_LEN, window + TOKENS_PER_BLOCK)
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]

    def round_(lengths):
        return [prefix + [rng.randrange(3, vocab) for _ in range(n)] for n in lengths]

    return round_((3, 11, 20, 1)), round_((7, 2, 30, 15)), prefix_len


@contextmanager
def one_thread():
    """torch on one CPU thread (threads started inside inherit it): a tiny model's ops are too small to share, and
    on a busy machine the threads' hand-offs cost ten times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def hf_greedy(ref_dir, prompts: Sequence[Sequence[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """transformers' greedy generate of the HF model in `ref_dir`, fp32, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([list(p)])
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                              do_sample=False, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def llm_greedy(llm: LLM, prompts, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """LLM.generate's greedy token ids of each prompt."""
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


class PrefillChunks:
    """Counts, per request id, the prompt chunks the executor's batches carried (one LLM on one rank).

    A batch row whose do_sample is 0 is a prompt chunk that ends inside the prompt (the scheduler splits a
    prompt when the step's token budget runs out); the row that finishes the prompt samples. So a request's
    prompt took (rows with do_sample 0) + 1 chunks. Installed on the LLM's model runner, whose submit() the
    executor calls with each batch.
    """

    def __init__(self, llm: LLM):
        runner = llm._runner
        if runner is None:
            raise RuntimeError("PrefillChunks needs a one-rank LLM (its model runner in this process)")
        self._submit = runner.submit
        self.partial: Counter = Counter()
        runner.submit = self._count

    def _count(self, batch):
        for rid, sample in zip(batch.request_ids.tolist(), batch.do_sample.tolist()):
            if not sample:
                self.partial[rid] += 1
        return self._submit(batch)

    def chunks(self, request_id: int) -> int:
        return self.partial[request_id] + 1


def _first_difference(got, want, prompts, what: str) -> str:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return f"{what}: prompt {i} ({len(prompts[i])} tokens) gives {g}, the reference {w}"
    return f"{what}: {len(got)} outputs against {len(want)}"


def check_parity(model, vocab: int, window: Optional[int] = None, ref_dir=None,
                 reference: Optional[Reference] = None, max_tokens: int = MAX_TOKENS, **llm_kwargs) -> dict:
    """Greedy outputs of LLM(model) equal the reference token for token, with chunked prefill and prefix reuse.

    model: a path LLM accepts (HF directory, Meta checkpoint, GGUF file, ...). vocab: its vocabulary size (prompt
    ids are drawn below it). window: the family's sliding window, if any (prompts and the shared prefix then
    exceed it). ref_dir: the HF directory transformers generates from (default `model`). reference: a callable
    (prompts, max_tokens) -> continuations used instead of transformers. llm_kwargs go to every LLM (e.g.
    tokenizer=..., skip_tokenizer_init=True). Returns {"chunks": chunks per mixed prompt, "prefix_hit_tokens":
    the second round's cache hits}. Fails with an AssertionError naming the first prompt that differs.
    """
    if reference is None:
        ref_dir = model if ref_dir is None else ref_dir
        reference = lambda prompts, n: hf_greedy(ref_dir, prompts, n)  # noqa: E731
    llm_kwargs.setdefault("dtype", "float32")
    with one_thread():  # LLM's runner thread and the reference alike
        return _check_parity(model, vocab, window, reference, max_tokens, llm_kwargs)


def _check_parity(model, vocab, window, reference, max_tokens, llm_kwargs) -> dict:
    mixed = mixed_prompts(vocab, window=window)
    first, second, prefix_len = prefix_prompts(vocab, window=window)

    # Chunked prefill: a 16-token step budget splits every longer prompt over several steps.
    with LLM(str(model), max_num_tokens=CHUNK_TOKENS, tokens_per_block=TOKENS_PER_BLOCK, **llm_kwargs) as llm:
        assert llm.engine_info.config["dtype"] == "float32"
        counter = PrefillChunks(llm)
        outs = llm.generate(mixed, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
        chunked = [list(o.outputs[0].token_ids) for o in outs]
        chunks = [counter.chunks(o.request_id) for o in outs]
    for prompt, n in zip(mixed, chunks):
        if len(prompt) > CHUNK_TOKENS:
            assert n >= 2, f"a {len(prompt)}-token prompt ran in {n} chunk(s) with max_num_tokens={CHUNK_TOKENS}"
    want = reference(mixed, max_tokens)
    assert chunked == want, _first_difference(chunked, want, mixed, "chunked prefill")
    assert len({tuple(w) for w in want}) >= 3, "the prompts should lead to different outputs"

    # Prefix reuse: the second round finds the shared prefix's full blocks in the cache.
    with LLM(str(model), tokens_per_block=TOKENS_PER_BLOCK, **llm_kwargs) as llm:
        got = llm_greedy(llm, first, max_tokens)
        hits_before = llm.get_stats()["num_prefix_hit_tokens"]
        got += llm_greedy(llm, second, max_tokens)
        hits = llm.get_stats()["num_prefix_hit_tokens"] - hits_before
    cached = prefix_len // TOKENS_PER_BLOCK * TOKENS_PER_BLOCK
    assert hits > 0, "the second round found nothing in the prefix cache"
    if window is None:
        assert hits >= len(second) * cached, f"{hits} prefix-hit tokens, expected >= {len(second)} x {cached}"
    want = reference(first + second, max_tokens)
    assert got == want, _first_difference(got, want, first + second, "prefix reuse")
    return {"chunks": chunks, "prefix_hit_tokens": hits}


def check_multi_rank(model, vocab: int, window: Optional[int] = None,
                     mappings: Sequence[tuple[int, int]] = ((2, 1), (1, 2)), **llm_kwargs) -> list[list[int]]:
    """Greedy outputs under each (tensor_parallel_size, pipeline_parallel_size) mapping equal one rank's.

    Each mapping starts one LLM (an MPI job of tp * pp ranks on the CPU, gloo) over the 10 mixed prompts, with
    chunked prefill forced as in check_parity. Returns one rank's outputs.
    """
    llm_kwargs.setdefault("dtype", "float32")
    llm_kwargs.setdefault("max_num_tokens", CHUNK_TOKENS)
    prompts = mixed_prompts(vocab, seed=3, window=window)
    with one_thread(), LLM(str(model), **llm_kwargs) as llm:
        want = llm_greedy(llm, prompts)
    assert len({tuple(w) for w in want}) >= 3, "the prompts should lead to different outputs"
    for tp, pp in mappings:
        with _ranks_on_one_thread(), LLM(str(model), tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                         **llm_kwargs) as llm:
            assert llm.engine_info.config["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
            got = llm_greedy(llm, prompts)
        assert got == want, _first_difference(got, want, prompts, f"tp={tp}, pp={pp} against one rank")
    return want


@contextmanager
def _ranks_on_one_thread():
    # The ranks are processes of their own: torch reads OMP_NUM_THREADS when they start.
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


def vocab_size(model_dir) -> int:
    """config.json's vocab_size of an HF directory."""
    import json

    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
