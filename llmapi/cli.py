"""The `llmapi` command: `llmapi generate`, `llmapi build`, `llmapi bench`, `llmapi eval` and `llmapi serve`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="hub id, Hugging Face directory, GGUF file or engine directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--revision", default=None, help="hub revision")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quant", default=None,
                   help="int8_weight_only, int4_weight_only, int4_awq, fp8, fp8_per_token, smoothquant, "
                        "fp8_kv_cache or int8_kv_cache (default: none; a GPTQ checkpoint is detected)")


def _generate(a: argparse.Namespace) -> int:
    from . import LLM, SamplingParams

    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p, seed=a.seed, stop=a.stop or None,
                            ignore_eos=a.ignore_eos)
    with LLM(a.model, dtype=a.dtype, load_format=a.load_format, revision=a.revision,
             device=a.device, max_seq_len=a.max_seq_len, quant=a.quant) as llm:
        if a.chat:
            convs = [[{"role": "user", "content": p}] for p in a.prompt]
            outs = llm.chat(convs, params, use_tqdm=False)
        else:
            outs = llm.generate(a.prompt, params, use_tqdm=False)
        for prompt, out in zip(a.prompt, outs):
            o = out.outputs[0]
            if a.json:
                print(json.dumps({"prompt": prompt, "text": o.text, "token_ids": o.token_ids,
                                  "finish_reason": o.finish_reason}))
            else:
                print(f"### {prompt}\n{o.text}")
    return 0


def _build(a: argparse.Namespace) -> int:
    import torch

    from .engine import build_engine, save_engine
    from .quantization.config import resolve_quant

    device_type = "cuda" if a.device != "cpu" and torch.cuda.is_available() else "cpu"
    quant = resolve_quant(a.quant)
    info = build_engine(a.model, dtype=a.dtype, load_format=a.load_format, revision=a.revision,
                        token=None, device_type=device_type,
                        quantization=None if quant is None else quant.to_dict())
    print(f"engine {'built' if info.built else 'found in the cache'}: {info.path}")
    if a.output:
        save_engine(info.path, a.output)
        print(f"saved to {a.output}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="llmapi", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    _add_model_args(g)
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--max-seq-len", type=int, default=None)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.set_defaults(func=_generate)

    b = sub.add_parser("build", help="convert a model into a cached engine (what LLM() does)")
    _add_model_args(b)
    b.add_argument("--output", default=None, help="also save the engine to this directory")
    b.set_defaults(func=_build)

    from .bench import add_arguments as add_bench_arguments
    from .bench import main as bench_main

    c = sub.add_parser("bench", help="throughput and latency on a synthetic fixed-length workload")
    add_bench_arguments(c)
    c.set_defaults(func=bench_main)

    from .evaluate.cli import add_arguments as add_eval_arguments

    e = sub.add_parser("eval", help="quality: perplexity of a text, ROUGE of summaries (optionally vs transformers)")
    add_eval_arguments(e)

    from .serve.cli import add_arguments as add_serve_arguments
    from .serve.cli import main as serve_main

    s = sub.add_parser("serve", help="serve a model over OpenAI's HTTP API (pip install \"llmapi[serve]\")")
    add_serve_arguments(s)
    s.set_defaults(func=serve_main)

    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .errors import LLMAPIError
    try:
        return a.func(a)
    except (LLMAPIError, ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"llmapi: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
