"""`llmapi eval perplexity` and `llmapi eval summarize`: arguments and printing; the work is in this package."""

from __future__ import annotations

import argparse
import json
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not an int >= 1")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub id, Hugging Face directory, GGUF file or engine directory")
    p.add_argument("--quant", default=None, help="quantization of our engine (a quant= string; default: none)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--revision", default=None, help="hub revision")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--compare", default=None, choices=["hf"],
                   help="also run transformers on the same weights (unquantized, in the engine's dtype)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True)
    p = sub.add_parser("perplexity", help="perplexity of a text file, over sliding windows")
    _add_model_args(p)
    p.add_argument("--text", default=None, help="text file (default: gensim's bundled lee.cor)")
    p.add_argument("--encoding", default=None, help="the text file's encoding (default: utf-8; latin-1 for lee.cor)")
    p.add_argument("--max-seq-len", type=_positive_int, default=1024, help="window length in tokens")
    p.add_argument("--stride", type=_positive_int, default=None,
                   help="new tokens scored per window after the first (default: half the window)")
    p.set_defaults(func=run_perplexity)

    s = sub.add_parser("summarize", help="ROUGE of greedy summaries of the aclsum test papers' abstracts")
    _add_model_args(s)
    s.add_argument("--max-samples", type=_positive_int, default=None, help="first N papers (default: all 100)")
    s.add_argument("--max-tokens", type=_positive_int, default=128, help="most tokens per summary")
    s.add_argument("--max-input-len", type=_positive_int, default=923, help="most abstract tokens in a prompt")
    s.add_argument("--check-accuracy", action="store_true", help="exit with status 1 when ROUGE-1 < threshold")
    s.add_argument("--rouge1-threshold", type=float, default=None,
                   help="ROUGE-1 in points that --check-accuracy needs (default 15)")
    s.set_defaults(func=run_summarize)


def _open_llm(a: argparse.Namespace, **kwargs):
    from ..llm import LLM

    return LLM(a.model, dtype=a.dtype, revision=a.revision, device=a.device, quant=a.quant, **kwargs)


def _reference(a: argparse.Namespace, llm):
    from .reference import load_hf_reference

    return load_hf_reference(a.model, llm.engine_info.config["dtype"], llm.device, revision=a.revision)


def run_perplexity(a: argparse.Namespace) -> int:
    from .perplexity import DEFAULT_TEXT_ENCODING, default_text_path, engine_perplexity, hf_perplexity, read_text

    path = a.text if a.text is not None else default_text_path()
    text = read_text(path, a.encoding or ("utf-8" if a.text is not None else DEFAULT_TEXT_ENCODING))
    stride = a.stride if a.stride is not None else max(1, a.max_seq_len // 2)
    with _open_llm(a) as llm:
        ids = llm.tokenizer.encode(text)
        results = {"engine": engine_perplexity(llm, ids, a.max_seq_len, stride)}
        if a.compare == "hf":
            results["transformers"] = hf_perplexity(_reference(a, llm), ids, a.max_seq_len, stride)
        dtype = llm.engine_info.config["dtype"]
    summary = {"model": a.model, "quant": a.quant, "dtype": dtype, "text": str(path), "num_text_tokens": len(ids),
               "max_seq_len": a.max_seq_len, "stride": stride}
    for name, r in results.items():
        summary[name] = {"perplexity": r.perplexity, "mean_nll": r.mean_nll, "num_scored_tokens": r.num_tokens,
                         "num_windows": r.num_windows, "seconds": r.seconds}
    if a.json:
        print(json.dumps(summary))
        return 0
    print(f"{a.model} ({dtype}, quant={a.quant}) on {path}: {len(ids)} tokens, windows of {a.max_seq_len} "
          f"with stride {stride}")
    for name, r in results.items():
        print(f"{name:<13} perplexity {r.perplexity:.4f}  (mean NLL {r.mean_nll:.5f} over {r.num_tokens} tokens, "
              f"{r.num_windows} windows, {r.seconds:.1f} s)")
    return 0


def run_summarize(a: argparse.Namespace) -> int:
    from .aclsum_data import load_aclsum
    from .rouge import ROUGE_TYPES, rouge_scores
    from .summarize import engine_summaries, hf_summaries, prompt_ids

    if a.rouge1_threshold is not None and not a.check_accuracy:
        raise ValueError("--rouge1-threshold is only used with --check-accuracy")
    threshold = 15.0 if a.rouge1_threshold is None else a.rouge1_threshold
    samples = load_aclsum("test", a.max_samples)
    references = [s.reference for s in samples]
    runs = {}
    with _open_llm(a) as llm:
        prompts = [prompt_ids(llm.tokenizer, s.abstract, a.max_input_len) for s in samples]
        runs["engine"] = engine_summaries(llm, prompts, a.max_tokens)
        if a.compare == "hf":
            runs["transformers"] = hf_summaries(_reference(a, llm), llm.tokenizer, prompts, a.max_tokens,
                                                llm.eos_token_ids)
        dtype = llm.engine_info.config["dtype"]
    scores = {name: rouge_scores(r.texts, references) for name, r in runs.items()}
    if a.json:
        print(json.dumps({"model": a.model, "quant": a.quant, "dtype": dtype, "num_samples": len(samples),
                          **{name: {**scores[name], "texts": r.texts, "num_output_tokens": r.num_output_tokens,
                                    "seconds": r.seconds} for name, r in runs.items()}}))
    else:
        print(f"{a.model} ({dtype}, quant={a.quant}): aclsum test, {len(samples)} papers, "
              f"greedy, at most {a.max_tokens} tokens")
        print(f"{'':<13}" + "".join(f"{t:>10}" for t in ROUGE_TYPES) + "    tokens   seconds")
        for name, r in runs.items():
            print(f"{name:<13}" + "".join(f"{scores[name][t]:>10.2f}" for t in ROUGE_TYPES)
                  + f"{r.num_output_tokens:>10}{r.seconds:>10.1f}")
    if a.check_accuracy:
        rouge1 = scores["engine"]["rouge1"]
        if rouge1 < threshold:
            print(f"accuracy check failed: engine ROUGE-1 {rouge1:.2f} < threshold {threshold}", file=sys.stderr)
            return 1
        print(f"accuracy check passed: engine ROUGE-1 {rouge1:.2f} >= threshold {threshold}", file=sys.stderr)
    return 0
