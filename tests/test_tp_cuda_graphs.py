"""Decode graphs at tensor / pipeline parallel > 1: every rank captures the same batch-size ladder and picks a
batch's graph from the batch alone; on GPUs (marked gpu, two of them) TP=2 with CUDA graphs gives one rank's fp32
greedy tokens, and the graphs were replayed. On the CPU the same path runs with eager replays
(LLMAPI_DECODE_GRAPHS_ON_CPU=1): padded static buffers, collectives at the graph's size on both ranks."""

import argparse
import json
import random

import pytest
import torch

from llmapi import LLM, KvCacheConfig, SamplingParams
from llmapi.config import LlmArgs
from llmapi.runtime.cuda_graph import GRAPHS_ON_CPU_ENV, graph_size, graph_sizes

MAX_BATCH = 16


def _prompts(model_dir, lengths, seed):
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def test_batch_size_ladder_and_bucketing():
    assert graph_sizes(16) == [1, 2, 4, 8, 16]
    assert graph_sizes(100) == [1, 2, 4, 8, 16, 32, 64, 96]
    assert graph_sizes(0) == [1]  # never empty
    sizes = graph_sizes(16)
    # (requests, tokens, block-table width) -> the smallest graph that holds the requests; 0: eager.
    assert [graph_size(sizes, 8, r, r, 3) for r in (1, 3, 5, 8, 9, 16)] == [1, 4, 8, 8, 16, 16]
    assert graph_size(sizes, 8, 17, 17, 3) == 0  # more requests than the largest graph
    assert graph_size(sizes, 8, 4, 9, 3) == 0  # a prefill chunk in the batch
    assert graph_size(sizes, 8, 4, 4, 9) == 0  # block tables wider than the graphs'


def test_large_decode_batches_pad_little():
    # Past 256 rows a decode step's GEMMs are bound by FLOPs, not by reading the weights: a padded row costs what a
    # real one does, so no batch of more than 256 requests runs in a graph that is a quarter padding or more (385
    # to 447 requests take the 512-row graph: the 448-row one ran slower on an H100).
    sizes = graph_sizes(2048)
    assert sizes[-1] == 2048
    for r in range(257, 2049):
        g = graph_size(sizes, 8, r, r, 3)
        assert r <= g and (g - r) / g < 0.25, (r, g)
    assert max((g - r) / g for r in range(513, 2049) for g in [graph_size(sizes, 8, r, r, 3)]) < 0.2


def test_cuda_graph_batch_sizes_setting():
    # LLM(cuda_graph_batch_sizes=[...]): those sizes, sorted and deduplicated, up to max_batch_size.
    assert graph_sizes(16, [8, 3, 8, 32]) == [3, 8]
    assert graph_sizes(2, [4]) == [1]  # never empty
    assert LlmArgs(model="m", cuda_graph_batch_sizes=[4, 2]).cuda_graph_batch_sizes == [4, 2]
    for bad in ([], [0], [2, -1], "8", [True], [2.0]):
        with pytest.raises(ValueError, match=r"cuda_graph_batch_sizes=.* is invalid: must be a non-empty list of "
                                             r"ints >= 1, or None"):
            LlmArgs(model="m", cuda_graph_batch_sizes=bad)


# ---------------------------------------------------------------- the path on the CPU, replays run eagerly
PARAMS = [SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=12, temperature=0.8, seed=5)]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """One rank, no graphs: the tokens every run below must give."""
    prompts = _prompts(tiny_llama_dir, [1, 5, 17, 3, 9, 2, 26], seed=3)
    params = [PARAMS[i % 2] for i in range(len(prompts))]
    with LLM(str(tiny_llama_dir), max_batch_size=MAX_BATCH) as llm:
        assert llm._runner.graphs is None
        outs = llm.generate(prompts, params, use_tqdm=False)
    return prompts, params, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["one-rank", "tp2", "pp2"])
def test_decode_graph_path_on_cpu_equals_eager_one_rank(tp, pp, tiny_llama_dir, reference, monkeypatch):
    prompts, params, want = reference
    monkeypatch.setenv(GRAPHS_ON_CPU_ENV, "1")  # the spawned ranks inherit it
    with LLM(str(tiny_llama_dir), tp=tp, pp=pp, max_batch_size=MAX_BATCH) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = llm._runner.stats.as_dict() if tp * pp == 1 else llm._executor.runner_stats()["rank0"]
        if tp * pp == 1:
            assert llm._runner.graphs.sizes == graph_sizes(MAX_BATCH)
    assert got == want
    # Every decode step (micro-batch, at PP=2) of 7 requests ran in a graph: all steps but the prefills.
    assert stats["graph_steps"] >= stats["steps"] - 4 * pp and stats["graph_steps"] >= 10


def test_cuda_graph_batch_sizes_options():
    # `llmapi bench` and `llmapi serve` take --cuda-graph-batch-sizes to LLM(cuda_graph_batch_sizes=[...]).
    from llmapi.bench import add_arguments as bench_arguments
    from llmapi.serve.cli import add_arguments as serve_arguments, llm_kwargs

    for add, rest in ((bench_arguments, []), (serve_arguments, ["m"])):
        p = argparse.ArgumentParser()
        add(p)
        assert p.parse_args(rest).cuda_graph_batch_sizes is None
        assert p.parse_args(rest + ["--cuda-graph-batch-sizes", "64,8,16"]).cuda_graph_batch_sizes == [64, 8, 16]
        for bad in ("0", "8,x", ""):
            with pytest.raises(SystemExit):
                p.parse_args(rest + ["--cuda-graph-batch-sizes", bad])
        if add is serve_arguments:
            a = p.parse_args(rest + ["--cuda-graph-batch-sizes", "4,2"])
            assert llm_kwargs(a)["cuda_graph_batch_sizes"] == [4, 2]
            assert "cuda_graph_batch_sizes" not in llm_kwargs(p.parse_args(rest))


@pytest.mark.parametrize("tp", [1, 2], ids=["one-rank", "tp2"])
def test_custom_graph_sizes_on_cpu_equal_eager(tp, tiny_llama_dir, reference, monkeypatch):
    # The sizes reach every rank: 7 requests decode in the graph of 7, fewer (as they finish) in 3's or 7's.
    prompts, params, want = reference
    monkeypatch.setenv(GRAPHS_ON_CPU_ENV, "1")
    with LLM(str(tiny_llama_dir), tp=tp, max_batch_size=MAX_BATCH, cuda_graph_batch_sizes=[7, 3]) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if tp == 1:
            stats, sizes = llm._runner.stats.as_dict(), llm._runner.graphs.sizes
        else:
            ranks = llm._executor.runner_stats()
            stats, sizes = ranks["rank0"], ranks["graph_sizes"]
    assert sizes == [3, 7]
    assert got == want
    assert stats["graph_steps"] >= stats["steps"] - 4 and stats["graph_steps"] >= 10


def test_graph_ladder_stops_at_the_cache_blocks(tiny_llama_dir, monkeypatch):
    # A cache of 12 blocks runs at most 12 sequences at once: no graph is captured past that, whatever
    # max_batch_size says; the decode steps still replay graphs, with the same tokens.
    monkeypatch.setenv(GRAPHS_ON_CPU_ENV, "1")
    prompts = _prompts(tiny_llama_dir, [1, 5, 17, 3], seed=3)
    params = SamplingParams(max_tokens=12, temperature=0)
    with LLM(str(tiny_llama_dir), max_batch_size=2048, tokens_per_block=8,
             kv_cache_config=KvCacheConfig(max_tokens=96)) as llm:
        assert llm._runner.num_blocks == 12
        assert llm._runner.graphs.sizes == graph_sizes(12) == [1, 2, 4, 8]
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm._runner.stats.as_dict()["graph_steps"] > 0
    monkeypatch.delenv(GRAPHS_ON_CPU_ENV)
    with LLM(str(tiny_llama_dir), max_batch_size=2048, tokens_per_block=8,
             kv_cache_config=KvCacheConfig(max_tokens=96)) as eager:
        assert eager._runner.graphs is None
        assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]


# ---------------------------------------------------------------- GPUs
def _two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA GPUs (tensor parallel over NCCL)")
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_cuda_graphs_at_two_ranks_equal_one_rank_fp32_greedy(tp, pp, tiny_llama_dir):
    prompts = _prompts(tiny_llama_dir, [1, 5, 17, 33, 2, 48, 9, 26], seed=1)
    greedy = SamplingParams(max_tokens=20, temperature=0)
    settings = dict(dtype="float32", device="cuda", max_batch_size=MAX_BATCH)
    with LLM(str(tiny_llama_dir), **settings) as llm:
        assert llm._runner.graphs is not None
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    with LLM(str(tiny_llama_dir), tp=tp, pp=pp, **settings) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        stats = llm._executor.runner_stats()["rank0"]
    assert got == want
    assert len(set(map(tuple, want))) >= 3  # the prompts lead to different outputs
    assert stats["graph_steps"] >= 10  # the decode steps were replays of captured graphs
