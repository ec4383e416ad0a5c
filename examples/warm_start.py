"""Warm start: a saved engine's `LLM(engine_dir)` call to its first token, in a fresh process, second load.

    python examples/warm_start.py                     # Llama-3.1-8B shapes, bf16, random weights, on CUDA
    python examples/warm_start.py --model tests/some/dir --device cpu    # a smoke run on a small model
    python examples/warm_start.py --loads 4 --baseline /tmp/base   # alternate with another llmapi build

The engine is written once with real weight files (random values, drawn as `load_format="dummy"` would),
saved to a directory, then loaded twice, each time by a new Python process that times `LLM(engine_dir)`
up to the first generated token: the second load finds the files in the page cache. With `--baseline DIR`
(a directory from which another build of llmapi imports, e.g. `pip install --target DIR` of an older commit),
each load is followed by one of that build on the same engine, so that both are timed in the same run on
the same warm files.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_LOAD = """
import logging, sys, time
logging.basicConfig(level=logging.INFO)
started = time.perf_counter()
import llmapi
from llmapi import LLM, SamplingParams
print("IMPORTED", llmapi.__file__, file=sys.stderr)
called = time.perf_counter()
llm = LLM(sys.argv[1], device=sys.argv[2], skip_tokenizer_init=True)
llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False), use_tqdm=False)
print("FIRST_TOKEN_S", time.perf_counter() - called, time.perf_counter() - started)
llm.shutdown()
"""


def write_engine(model: str, dtype: str, device: str, dest: Path) -> None:
    """A saved engine of `model` whose rank0.safetensors holds the dummy weights (so loading reads them)."""
    import torch
    from safetensors.torch import save_file

    from llmapi.distributed.sharding import DummyWeights
    from llmapi.engine import build_engine
    from llmapi.engine import format as fmt
    from llmapi.engine.cache import save_engine

    info = build_engine(model, dtype=dtype, load_format="dummy", device_type=device.split(":")[0])
    save_engine(info.path, dest)
    weights = DummyWeights(info.config, getattr(torch, info.config["dtype"]), seed=0, device=device)
    save_file({name: weights[name].cpu() for name in weights}, str(dest / fmt.rank_file(0)),
              metadata={"format": "pt"})
    build = json.loads((dest / fmt.BUILD_CONFIG_FILE).read_text())
    build["load_format"] = "auto"
    fmt.write_json(dest / fmt.BUILD_CONFIG_FILE, build)
    fmt.write_manifest(dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b", help="a known config name, directory or hub id")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--loads", type=int, default=2)
    ap.add_argument("--baseline", help="a directory that another llmapi build imports from, timed alternately")
    a = ap.parse_args()

    from llmapi.bench import resolve_bench_model

    dest = Path(tempfile.mkdtemp(prefix="llmapi-warm-start-")) / "engine"
    started = time.perf_counter()
    write_engine(resolve_bench_model(a.model), a.dtype, a.device, dest)
    size = sum(p.stat().st_size for p in dest.iterdir()) / 1e9
    print(f"engine written in {time.perf_counter() - started:.1f} s ({size:.1f} GB): {dest}")
    builds = [("this build", None)] + ([("baseline", a.baseline)] if a.baseline else [])
    times = {name: [] for name, _ in builds}
    for i in range(a.loads):
        for name, path in builds:
            env = dict(os.environ)
            if path is not None:
                env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
            out = subprocess.run([sys.executable, "-c", _LOAD, str(dest), a.device], capture_output=True,
                                 text=True, env=env, cwd=tempfile.gettempdir())
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("FIRST_TOKEN_S")]
            if out.returncode or not line:
                sys.exit(f"load {i + 1} ({name}) failed:\n{out.stderr[-3000:]}")
            from_call, from_start = (float(v) for v in line[0].split()[1:])
            times[name].append(from_call)
            print(f"load {i + 1} ({name}): LLM(engine_dir) to first token {from_call:.2f} s "
                  f"({from_start:.2f} s with `import llmapi`)")
            for ln in out.stderr.splitlines():
                if "loaded in" in ln or "captured in" in ln or (i == 0 and ln.startswith("IMPORTED")):
                    print("   ", ln.strip())
    if a.loads > 2:  # the first load of each build compiles kernels or reads cold files: left out
        for name, values in times.items():
            print(f"{name}: median of loads 2..{a.loads}: {statistics.median(values[1:]):.2f} s")


if __name__ == "__main__":
    main()
