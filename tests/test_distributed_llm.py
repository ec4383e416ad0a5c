"""LLM over 2 MPI ranks on the CPU: TP=2 and PP=2 greedy output equals TP=1 (tiny Llama with GQA, GPT-2, an MQA
Llama), the API works the same (streaming, async, abort), and a killed rank fails requests fast and leaves
no process behind."""

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmapi import LLM, SamplingParams, UnsupportedModelError, WorkerDiedError
from processes import running as _running

MAX_TOKENS = 20
LENGTHS = [1, 5, 17, 33, 2, 48, 9, 26]


def _prompts(model_dir, seed=1):
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in LENGTHS]


def _greedy(llm, prompts):
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _job_pids(llm):
    return [llm._executor.job.proc.pid] + llm._executor.rank_pids


@pytest.fixture(scope="module")
def mqa_llama_dir(tmp_path_factory):
    """A tiny Llama with one KV head (MQA): TP=2 replicates it on both ranks."""
    from tiny_models import make_tiny_llama
    from tiny_tokenizer import save_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama-mqa")
    model = make_tiny_llama(path, num_key_value_heads=1)
    save_tiny_tokenizer(path, vocab_size=model.config.vocab_size)
    return path


@pytest.mark.parametrize("model,tp,pp", [("llama", 2, 1), ("llama", 1, 2), ("gpt2", 2, 1), ("gpt2", 1, 2),
                                         ("mqa", 2, 1)])
def test_two_ranks_greedy_equal_one_rank(model, tp, pp, tiny_llama_dir, tiny_gpt2_dir, mqa_llama_dir):
    model_dir = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir, "mqa": mqa_llama_dir}[model]
    prompts = _prompts(model_dir)
    with LLM(str(model_dir)) as llm:
        want = _greedy(llm, prompts)
    with LLM(str(model_dir), tensor_parallel_size=tp, pipeline_parallel_size=pp) as llm:
        assert llm.engine_info.config["mapping"] == {"world_size": 2, "tp_size": tp, "pp_size": pp}
        assert sorted(p.name for p in llm.engine_info.path.glob("rank*.safetensors")) == [
            "rank0.safetensors", "rank1.safetensors"]
        got = _greedy(llm, prompts)
        pids = _job_pids(llm)
    assert got == want
    assert len(set(map(tuple, want))) >= 3  # the prompts really lead to different outputs
    assert not any(_running(p) for p in pids)  # shutdown() leaves no process


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_two_ranks_logprobs_equal_one_rank(tp, pp, tiny_llama_dir):
    """Logprobs (the sampled token's, its rank, the top 3) cross from the sampling rank to rank 0; rows that
    asked for none share the step (PP=2 cuts it into micro-batches with and without logprobs)."""
    prompts = _prompts(tiny_llama_dir, seed=5)[:6]
    params = [SamplingParams(max_tokens=8, temperature=0, logprobs=3 if i % 3 else None) for i in range(6)]
    params[4] = SamplingParams(max_tokens=8, temperature=0, logprobs=0)

    def run(**kw):
        with LLM(str(tiny_llama_dir), **kw) as llm:
            return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    want, got = run(), run(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    for w, g, p in zip(want, got, params):
        assert g.token_ids == w.token_ids
        if p.logprobs is None:
            assert g.logprobs is None or g.logprobs == []
            continue
        assert len(g.logprobs) == len(w.logprobs) == len(w.token_ids)
        for wd, gd in zip(w.logprobs, g.logprobs):
            assert list(gd) == list(wd)  # the same token ids (chosen first, then the top), in order
            for token in wd:
                assert gd[token].rank == wd[token].rank
                assert gd[token].logprob == pytest.approx(wd[token].logprob, abs=1e-4)


def test_tp2_streaming_async_abort_and_hidden_split_embedding(tiny_gpt2_dir):
    """The API of one rank at two: streaming, awaiting, abort, stats; GPT-2's tied embedding split by hidden size."""
    prompts = _prompts(tiny_gpt2_dir, seed=3)[:4]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    with LLM(str(tiny_gpt2_dir)) as llm:
        want = _greedy(llm, prompts)
    with LLM(str(tiny_gpt2_dir), tensor_parallel_size=2, embedding_sharding_dim=1) as llm:
        streamed = []
        for chunk in llm.generate_async(prompts[0], greedy, streaming=True):
            streamed.extend(chunk.outputs[0].token_ids[len(streamed):])
        assert streamed == want[0]

        async def gather():
            return await asyncio.gather(*(llm.generate_async(p, greedy) for p in prompts[1:]))
        outs = asyncio.run(gather())
        assert [o.outputs[0].token_ids for o in outs] == want[1:]

        long = llm.generate_async(prompts[0], SamplingParams(max_tokens=200, ignore_eos=True), streaming=True)
        next(iter(long))
        long.abort()
        assert long.result(timeout=10).outputs[0].finish_reason == "abort"
        assert llm.get_stats()["num_running"] == 0


def test_killed_worker_fails_pending_requests_fast_and_leaves_no_process(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), tensor_parallel_size=2)
    pids = _job_pids(llm)
    params = SamplingParams(max_tokens=240, ignore_eos=True)
    outs = [llm.generate_async(p, params, streaming=True) for p in _prompts(tiny_llama_dir)[:4]]
    next(iter(outs[0]))  # generation is under way
    os.kill(llm._executor.rank_pids[1], signal.SIGKILL)
    start = time.monotonic()
    for out in outs:
        with pytest.raises(WorkerDiedError):
            out.result(timeout=10)
    assert time.monotonic() - start < 10
    deadline = time.monotonic() + 10
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _running(p)]
    with pytest.raises(WorkerDiedError):
        llm.generate([5, 6, 7])
    llm.shutdown()


def test_interpreter_exit_leaves_no_process(tiny_llama_dir, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        from llmapi import LLM, SamplingParams
        llm = LLM({str(tiny_llama_dir)!r}, pipeline_parallel_size=2)
        print([llm._executor.job.proc.pid] + llm._executor.rank_pids, flush=True)
        print(llm.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0)).outputs[0].token_ids)
    """))  # no shutdown(), no __main__ guard
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    pids = json.loads(out.stdout.splitlines()[0])
    assert len(json.loads(out.stdout.splitlines()[1])) == 4
    assert len(pids) == 3 and not [p for p in pids if _running(p)]


def test_unsplittable_model_is_refused_and_leaves_no_process(tmp_path, monkeypatch):
    from llmapi.distributed import spawn
    from tiny_models import make_tiny_llama

    jobs = []
    init = spawn.MpiJob.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        jobs.append(self)

    monkeypatch.setattr(spawn.MpiJob, "__init__", recording_init)
    make_tiny_llama(tmp_path, num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    with pytest.raises(UnsupportedModelError, match="num_key_value_heads=3"):
        LLM(str(tmp_path), tensor_parallel_size=2, skip_tokenizer_init=True)
    assert len(jobs) == 1 and jobs[0].proc.poll() is not None  # the job started early is stopped and reaped


def test_notebook_with_two_ranks_runs():
    import nbformat
    from nbclient import NotebookClient

    path = Path(__file__).resolve().parent.parent / "notebooks" / "tensor_parallel.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "same tokens as one rank" in printed and "streamed 12 tokens" in printed


def test_launcher_under_mpiexec(tiny_llama_dir, tmp_path):
    """`mpiexec -n 2 llmapi-launch script.py`: rank 0 runs the script, rank 1 serves; a bare mpiexec is refused."""
    from llmapi.distributed.spawn import find_mpiexec

    prompts = _prompts(tiny_llama_dir)[:3]
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from llmapi import LLM, SamplingParams

        def greedy(llm):
            outs = llm.generate({prompts!r}, SamplingParams(max_tokens={MAX_TOKENS}, temperature=0), use_tqdm=False)
            print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)

        with LLM({str(tiny_llama_dir)!r}, tensor_parallel_size=int(sys.argv[1])) as llm:
            greedy(llm)
        # The same ranks, split another way; shut down with a pipeline step in flight: a small token budget
        # puts two prompts in one step and two in the next, and the two groups then alternate.
        with LLM({str(tiny_llama_dir)!r}, pipeline_parallel_size=2, max_num_tokens=16) as llm:
            long = [llm.generate_async([9 + j] * 12, SamplingParams(max_tokens=200, ignore_eos=True), streaming=True)
                    for j in range(4)]
            next(iter(long[0]))
        with LLM({str(tiny_llama_dir)!r}, pipeline_parallel_size=2) as llm:
            greedy(llm)
    """))
    mpiexec = str(find_mpiexec())
    env = dict(os.environ, PATH=os.path.dirname(mpiexec) + os.pathsep + os.environ.get("PATH", ""))
    launched = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "llmapi.launch", str(script), "2"],
                              capture_output=True, text=True, timeout=90, env=env)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    got = [json.loads(line[len("TOKENS "):]) for line in launched.stdout.splitlines() if line.startswith("TOKENS")]
    assert len(got) == 2  # only rank 0 ran the script
    with LLM(str(tiny_llama_dir)) as llm:
        want = _greedy(llm, prompts)
    assert got == [want, want]

    bare = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script), "2"], capture_output=True, text=True,
                          timeout=90, env=env)
    assert bare.returncode != 0 and "llmapi-launch" in bare.stdout + bare.stderr
