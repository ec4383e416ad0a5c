"""TP=2 and PP=2 against TP=1 on Llama-3.1-8B shapes with dummy weights: greedy agreement and 128/128 throughput.

On a host with two GPUs (nothing is downloaded: the config is written here, the weights are random):

    python examples/parallel_check.py                 # fp32 tokens, bf16 top-5 agreement, bf16 throughput
    python examples/parallel_check.py --config tests/some/config.json --device cpu --output-len 8   # a smoke run

fp32: TP=2 and PP=2 must give TP=1's greedy tokens exactly. bf16: summation order differs between splits, so
tokens may drift; the rule (vLLM's check_logprobs_close) is that two greedy runs with logprobs=5 may part only
at a position where each run's token is in the other's top 5, after which the sequences are not compared.
Throughput: num_prompts requests of input_len random tokens, output_len tokens each (ignore_eos), output
tokens per second over the whole batch.
"""

import argparse
import gc
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from llmapi import LLM, SamplingParams
from llmapi.bench import resolve_bench_model

SPLITS = {"TP=1": (1, 1), "TP=2": (2, 1), "PP=2": (1, 2)}


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run(model_dir, split, dtype, device, prompts, output_len, max_seq_len, logprobs=None):
    """(token ids per prompt, top-logprob token sets per prompt and position, output tokens/s) of one split."""
    tp, pp = SPLITS[split]
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True, logprobs=logprobs)
    with LLM(model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp, dtype=dtype, device=device,
             load_format="dummy", skip_tokenizer_init=True, max_seq_len=max_seq_len) as llm:
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    _free(device)
    tokens = [o.outputs[0].token_ids for o in outs]
    tops = [[set(d) for d in o.outputs[0].logprobs] if logprobs else None for o in outs]
    return tokens, tops, sum(map(len, tokens)) / seconds


def top5_check(ref, got) -> tuple[int, int, int]:
    """(identical, parted by the rule, parted against it) over the prompts; ref/got: (tokens, tops) of two runs."""
    same = rule = broken = 0
    for a, ta, b, tb in zip(ref[0], ref[1], got[0], got[1]):
        part = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if part is None:
            same += 1
        elif a[part] in tb[part] and b[part] in ta[part]:
            rule += 1
        else:
            broken += 1
    return same, rule, broken


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="an HF config.json to use instead of Llama-3.1-8B's")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--check-prompts", type=int, default=8, help="prompts of the token agreement checks")
    a = ap.parse_args()

    if a.config:
        model_dir = tempfile.mkdtemp(prefix="llmapi-parallel-check-")
        (Path(model_dir) / "config.json").write_text(Path(a.config).read_text())
    else:
        model_dir = resolve_bench_model("llama-3.1-8b")  # the config shipped with llmapi bench
    config = json.loads((Path(model_dir) / "config.json").read_text())
    rng = random.Random(0)
    prompts = [[rng.randrange(10, config["vocab_size"]) for _ in range(a.input_len)] for _ in range(a.num_prompts)]
    check = prompts[:a.check_prompts]
    max_seq_len = a.input_len + a.output_len + 8

    print("fp32 greedy tokens against TP=1:")
    ref, _, _ = run(model_dir, "TP=1", "float32", a.device, check, a.output_len, max_seq_len)
    for split in ("TP=2", "PP=2"):
        got, _, _ = run(model_dir, split, "float32", a.device, check, a.output_len, max_seq_len)
        same = sum(g == r for g, r in zip(got, ref))
        print(f"  {split}: {same}/{len(ref)} prompts token-identical" + ("" if same == len(ref) else "  <-- MISMATCH"))

    print("bf16 greedy with logprobs=5 against TP=1 (vLLM's top-5 rule):")
    ref = run(model_dir, "TP=1", "bfloat16", a.device, check, a.output_len, max_seq_len, logprobs=5)
    for split in ("TP=2", "PP=2"):
        got = run(model_dir, split, "bfloat16", a.device, check, a.output_len, max_seq_len, logprobs=5)
        same, rule, broken = top5_check(ref[:2], got[:2])
        print(f"  {split}: {same} identical, {rule} parted within the rule, {broken} against it"
              + ("" if broken == 0 else "  <-- MISMATCH"))

    print(f"bf16 {a.num_prompts} x {a.input_len}/{a.output_len} throughput:")
    for split in SPLITS:
        _, _, rate = run(model_dir, split, "bfloat16", a.device, prompts, a.output_len, max_seq_len)
        print(f"  {split}: {rate:9.1f} output tok/s")

if __name__ == "__main__":
    main()
