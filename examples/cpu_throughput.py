"""Output tokens/s of the main job's model on this machine: llmapi next to transformers, same weights.

    python examples/cpu_throughput.py [--batch 8] [--max-tokens 64]
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmapi import LLM, SamplingParams
from quickstart import bundled_smollm2

QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Write a haiku about the sea.", "What is 12 times 12?",
             "Who wrote Hamlet?", "Explain gravity in one sentence.",
             "List two uses of copper.", "What does a CPU do?"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    gguf = bundled_smollm2()
    folder, name = gguf.rsplit("/", 1)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    questions = (QUESTIONS * ((a.batch + len(QUESTIONS) - 1) // len(QUESTIONS)))[:a.batch]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}],
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]) for q in questions]
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True)

    with LLM(gguf) as llm:
        for bs in sorted({1, a.batch}):
            llm.generate(prompts[:bs], params, use_tqdm=False)  # warm-up
            t = time.perf_counter()
            outs = llm.generate(prompts[:bs], params, use_tqdm=False)
            dt = time.perf_counter() - t
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            print(f"llmapi        bs={bs:<3} {n / dt:8.1f} output tok/s ({n} tokens, {dt:.2f} s)")

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok.padding_side = "left"
    for bs in sorted({1, a.batch}):
        batch = tok.pad({"input_ids": prompts[:bs]}, return_tensors="pt")
        kw = dict(max_new_tokens=a.max_tokens, min_new_tokens=a.max_tokens, do_sample=False,
                  pad_token_id=tok.pad_token_id or 0)
        with torch.inference_mode():
            model.generate(**batch, **kw)  # warm-up
            t = time.perf_counter()
            out = model.generate(**batch, **kw)
            dt = time.perf_counter() - t
        n = (out.shape[1] - batch["input_ids"].shape[1]) * bs
        print(f"transformers  bs={bs:<3} {n / dt:8.1f} output tok/s ({n} tokens, {dt:.2f} s)")


if __name__ == "__main__":
    main()
