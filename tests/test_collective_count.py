"""The collectives of a step at TP=2 (2 MPI ranks on the CPU, under llmapi-launch): per layer exactly one
all-reduce after attention and one after the MLP; per step one all-reduce of the vocab-parallel embedding and
one all-gather of the head's logits; nothing else. Counted by a CountingComm around rank 0's communicator."""

import json
import os
import subprocess
import sys
import textwrap

from llmapi.distributed.comm import CountingComm

SCRIPT = """
import json, sys
from llmapi import LLM, SamplingParams
from llmapi.distributed import rank_worker
from llmapi.distributed.comm import CountingComm, GroupComm

comms = []

def counting(group, size):
    comms.append(CountingComm(GroupComm(group, size)))
    return comms[-1]

rank_worker.GroupComm = counting  # rank 0's worker builds its model's communicator with this
with LLM(sys.argv[1], tp=2) as llm:
    model = llm._runner.worker.runner.model
    comm = comms[-1]
    model.register_forward_pre_hook(lambda module, args: comm.mark("step"))
    for i, layer in enumerate(model.transformer.layers):
        layer.attention.register_forward_pre_hook(lambda module, args, i=i: comm.mark(f"layer {i} attention"))
        layer.mlp.register_forward_pre_hook(lambda module, args, i=i: comm.mark(f"layer {i} mlp"))
    model.lm_head.register_forward_pre_hook(lambda module, args: comm.mark("head"))
    out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    cfg = model.config
    print("LOG", json.dumps({"log": comm.log, "tokens": out[0].outputs[0].token_ids, "hidden": cfg["hidden_size"],
                             "vocab": cfg["vocab_size"], "layers": len(model.transformer.layers)}), flush=True)
"""


def test_counting_comm_passes_calls_on_and_records_them():
    class Sum:  # a one-rank "group": what a rank's own part sums / gathers to
        size = 1

        def all_reduce(self, x):
            return x

        def all_gather(self, x, dim):
            return x

    import torch

    comm = CountingComm(Sum())
    x = torch.ones(3, 4)
    comm.mark("a")
    assert comm.all_reduce(x) is x and comm.all_gather(x, -1) is x
    assert comm.log == [("mark", "a"), ("all_reduce", (3, 4)), ("all_gather", (3, 4), -1)]


def test_one_all_reduce_per_attention_and_per_mlp_per_layer(tiny_llama_dir, tmp_path):
    from llmapi.distributed.spawn import find_mpiexec

    script = tmp_path / "count.py"
    script.write_text(textwrap.dedent(SCRIPT))
    mpiexec = str(find_mpiexec())
    env = dict(os.environ, PATH=os.path.dirname(mpiexec) + os.pathsep + os.environ.get("PATH", ""))
    run = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "llmapi.launch", str(script), str(tiny_llama_dir)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    got = json.loads(next(line[4:] for line in run.stdout.splitlines() if line.startswith("LOG ")))
    log = [tuple(tuple(x) if isinstance(x, list) else x for x in entry) for entry in got["log"]]
    assert len(got["tokens"]) == 4

    # Cut the log at each step's start; every step must be exactly this sequence (T tokens, R requests).
    starts = [i for i, e in enumerate(log) if e == ("mark", "step")]
    assert starts and starts[0] == 0
    steps = [log[a:b] for a, b in zip(starts, starts[1:] + [len(log)])]
    assert len(steps) == 4  # the prompt's step, then one per later token (async scheduling computes no extra)
    h, v = got["hidden"], got["vocab"]
    for step, tokens in zip(steps, [5, 1, 1, 1]):
        want = [("mark", "step"), ("all_reduce", (tokens, h))]  # the vocab-parallel embedding
        for i in range(got["layers"]):
            want += [("mark", f"layer {i} attention"), ("all_reduce", (tokens, h)),
                     ("mark", f"layer {i} mlp"), ("all_reduce", (tokens, h))]
        want += [("mark", "head"), ("all_gather", (1, v // 2), -1)]  # the sampled row's logits
        assert step == want
