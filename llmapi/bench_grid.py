"""`llmapi bench --grid trtllm`: TensorRT-LLM's published Llama-3.1-8B throughput grid (ten ISL/OSL rows) through
one LLM, each row's output tok/s beside TensorRT-LLM's figure for the device, with the most requests in flight."""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .bench_profile import SampledProfile, format_row_profile

GRID_SOURCE = "TensorRT-LLM v1.0 performance overview, PyTorch backend, Llama-3.1-8B-Instruct-FP8, TP1"
STEADY_FACTOR = 3
"""A row is a steady state when its request count is at least this many times its most requests in flight."""
WARMUP_OUTPUT_TOKENS = 16
"""Output tokens of each warm-up request (at most the row's): 128/4096's or 20000/2000's whole outputs would take
tens of seconds of decode steps that compile nothing new."""


@dataclass(frozen=True)
class GridRow:
    """One workload of the grid: fixed lengths, and TensorRT-LLM's output tok/s for it on each device."""

    isl: int
    osl: int
    requests: int
    """Requests under MAX_UTILIZATION at --grid-requests-scale 1 and the default --max-batch-size (see
    TRTLLM_GRID); the most under GUARANTEED_NO_EVICT (see row_requests)."""
    h100: float
    h200: float

    @property
    def name(self) -> str:
        return f"{self.isl}/{self.osl}"

    def figure(self, device: Optional[str]) -> Optional[float]:
        """TensorRT-LLM's output tok/s on `device` ("H100", "H200"), None for any other."""
        return {"H100": self.h100, "H200": self.h200}.get(device)


# TensorRT-LLM's figures: the v1.0 performance overview, PyTorch backend, Llama-3.1-8B-Instruct-FP8, TP1, output
# tok/s (trtllm-bench, CUDA graphs up to 8,192 rows, kv_cache_free_gpu_mem_fraction 0.95 where it fits), on H100
# SXM 80GB and H200 SXM 141GB.
#
# Request counts under MAX_UTILIZATION: 3x the most requests its admission rule (first come first served while the
# step's token budget, the batch slots and the KV blocks last; preemption of the latest admitted when a running
# request lacks a block) holds at once for the row, at the bench's defaults (FP8 weights and KV cache,
# max_batch_size 2048, max_num_tokens 8192, 0.9 of free memory for the cache, as before e2e15bb: about 1.0M cached
# tokens on an H100, 1.9M on an H200; the grid's 0.95 after the profile step since held 3% more on an H200), the larger
# of the two devices, rounded up to a multiple of 128. That peak, from a step-by-step
# simulation of the rule: 2048 (max_batch_size: short prompts are all admitted before the cache fills) for 128/x and
# 500/2000; 1,698 for 1000/x (the H200's cache; 955 on an H100); 494 for 2048/128 (the token budget: four prompts a
# step against 128 steps a request); 884 for 2048/2048; 376 for 5000/500; 96 for 20000/2000. Under
# GUARANTEED_NO_EVICT (the grid's default policy, as TensorRT-LLM's) the peak is known before the run from the
# cache itself (row_requests). The run checks the count against the peak it measures, which neither need match.
TRTLLM_GRID = (
    GridRow(128, 128, 6144, 28312, 27911),
    GridRow(128, 2048, 6144, 22714, 26221),
    GridRow(128, 4096, 6144, 14325, 18027),
    GridRow(500, 2000, 6144, 17660, 20770),
    GridRow(1000, 1000, 5120, 15220, 17744),
    GridRow(1000, 2000, 5120, 13899, 16828),
    GridRow(2048, 128, 1536, 3450, 3538),
    GridRow(2048, 2048, 2688, 9305, 12194),
    GridRow(5000, 500, 1152, 3459, 3902),
    GridRow(20000, 2000, 384, 1351, 1804),
)
GRIDS = {"trtllm": TRTLLM_GRID}
HF_ROWS = ("128/128", "1000/1000")
"""--compare hf runs transformers for these rows only (the issue's bf16 comparison)."""
HF_GRID_BATCH = 64
"""transformers' batch with --grid and --compare hf, unless --hf-batch-size says otherwise."""


def select_rows(grid: str, names: Optional[str]) -> list[GridRow]:
    """The rows named in `names` ("ISL/OSL" separated by commas), in the grid's order; all without names.
    ValueError naming what is not a row, or a row named twice."""
    rows = GRIDS[grid]
    if names is None:
        return list(rows)
    wanted = [n.strip() for n in names.split(",")]
    known = {r.name for r in rows}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown)
        raise ValueError(f"--grid-rows: {shown} {'is not a row' if len(unknown) == 1 else 'are not rows'} of the "
                         f"{grid} grid (its rows: {', '.join(r.name for r in rows)})")
    twice = sorted({n for n in wanted if wanted.count(n) > 1})
    if twice:
        raise ValueError(f"--grid-rows names {', '.join(twice)} more than once")
    return [r for r in rows if r.name in wanted]


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"--grid-requests-scale={scale!r} is invalid: must be a finite number > 0")
    return float(scale)


def row_requests(row: GridRow, max_batch_size: int, scale: float, cache_blocks: Optional[int] = None,
                 tokens_per_block: Optional[int] = None) -> int:
    """The row's request count: its own, or 3x --max-batch-size when that is fewer (no more requests can be in
    flight then), times `scale`, rounded up; at least 1. With `cache_blocks` (GUARANTEED_NO_EVICT's run), also no
    more than 3x the requests whose whole lengths (prompt + output, in blocks of `tokens_per_block`) the cache
    holds at once: that policy admits no more (the prompts are random, so no prefix blocks are shared)."""
    most = min(row.requests, STEADY_FACTOR * max_batch_size)
    if cache_blocks is not None:
        completion = -(-(row.isl + row.osl) // tokens_per_block)
        most = min(most, STEADY_FACTOR * max(1, cache_blocks // completion))
    return max(1, math.ceil(scale * most))


def reference_device(name: Optional[str]) -> Optional[str]:
    """"H100" or "H200" for the SXM parts TensorRT-LLM measured, from torch.cuda.get_device_name(); None for any
    other device (GH200, the PCIe and NVL parts, CPU)."""
    if not name or re.search(r"pcie|nvl", name, re.IGNORECASE):
        return None
    for device in ("H100", "H200"):
        if re.search(rf"\b{device}\b", name):
            return device
    return None


class InFlightSampler:
    """The most requests running at once while the block runs: a thread reading get_stats()'s num_running (the
    admitted requests, partly prefilled ones included; published after every executor step) every few ms."""

    def __init__(self, llm, interval_s: float = 0.005):
        self.llm, self.interval_s, self.most = llm, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmapi-bench-in-flight", daemon=True)

    def _sample(self) -> None:
        self.most = max(self.most, int(self.llm.get_stats()["num_running"]))

    def _run(self) -> None:
        from .errors import LLMAPIError

        try:
            while not self._stop.wait(self.interval_s):
                self._sample()
        except LLMAPIError:  # the LLM died: the run itself reports why
            pass

    def __enter__(self) -> "InFlightSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def format_row_host(st: dict, wall_s: float) -> str:
    """A row's runner stats: its steps, the host's time in submit and waiting for the device, against the wall."""
    return (f"    host: {st['steps']:,} steps ({st['graph_steps']:,} from CUDA graphs); in submit "
            f"{st['submit_s']:.2f} s (eager steps {st['eager_submit_s']:.2f} s, the longest "
            f"{1e3 * st['max_submit_s']:.0f} ms), waiting for the device {st['wait_s']:.2f} s, of a "
            f"{wall_s:.1f} s wall")


def row_workload(row: GridRow, requests: int, seed: int, warmup: bool):
    """Random token ids of the row's lengths. The seed covers the row and the warm-up, so no two rows or warm-ups
    share prompts (or cached prefix blocks)."""
    import numpy as np

    from .bench import Workload

    row_seed = int(np.random.SeedSequence([seed, row.isl, row.osl, int(warmup)]).generate_state(1)[0])
    return Workload(row.isl, row.osl, requests, 0, seed=row_seed)


def run_row(llm, row: GridRow, requests: int, seed: int, warmup: int, profile: Optional[tuple] = None) -> dict:
    """One row: `warmup` untimed requests, then `requests` all at once (as fast as the engine takes them), timed
    by the wall clock while the most requests in flight are sampled; with `profile` (steps, every), the row's
    kernels in sampled windows (SampledProfile). The in-process runner's stats of the timed requests go with it
    ("runner_steps")."""
    from .bench import _drive, summarize
    from .sampling_params import SamplingParams

    params = SamplingParams(max_tokens=row.osl, temperature=0.0, ignore_eos=True, detokenize=False)
    if warmup:  # the row's prompt shapes and a few decode steps compile what the row runs; its long tail would not
        warm = SamplingParams(max_tokens=min(row.osl, WARMUP_OUTPUT_TOKENS), temperature=0.0, ignore_eos=True,
                              detokenize=False)
        _drive(llm, row_workload(row, warmup, seed, True).prompts(llm.vocab_size), warm, 0)
    prompts = row_workload(row, requests, seed, False).prompts(llm.vocab_size)
    lengths = [len(p) for p in prompts]
    runner = llm._runner  # the in-process runner; None with several ranks (theirs run in the MPI job)
    if runner is not None:
        runner.stats = type(runner.stats)()
    before = llm.get_stats()
    sampled = SampledProfile(llm, *profile) if profile else contextlib.nullcontext()
    with InFlightSampler(llm) as sampler, sampled:
        start = time.perf_counter()
        timings = _drive(llm, prompts, params, 0)
        wall = time.perf_counter() - start
    after = llm.get_stats()
    result = {"row": row.name, "isl": row.isl, "osl": row.osl, **summarize(timings, wall),
              "max_in_flight": sampler.most, "steady_state": requests >= STEADY_FACTOR * sampler.most,
              "prompt_tokens": [min(lengths), max(lengths)],
              "output_tokens_per_request": [min(t.num_tokens for t in timings), max(t.num_tokens for t in timings)],
              "steps": after["num_steps"] - before["num_steps"],
              "preemptions": after["num_preemptions"] - before["num_preemptions"], "profiled": bool(profile)}
    if runner is not None:
        result["runner_steps"] = runner.stats.as_dict()
    if profile:
        result["profile"] = sampled.summary()
    return result


def device_name(llm) -> Optional[str]:
    """torch.cuda.get_device_name() of the LLM's device; None on CPU."""
    if llm.device.type != "cuda":
        return None
    import torch

    return torch.cuda.get_device_name(llm.device)


def format_table(rows: list[dict], reference: Optional[str]) -> str:
    head = f"TensorRT-LLM {reference}" if reference else "TensorRT-LLM"
    lines = [f"{'ISL/OSL':>11} {'requests':>9} {'max in flight':>14} {'output tok/s':>13} {head:>18} {'ratio':>7}"]
    for r in rows:
        figure = "-" if r["trtllm_output_tok_s"] is None else f"{r['trtllm_output_tok_s']:,.0f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        note = "" if r["steady_state"] else \
            f"  warning: fewer than {STEADY_FACTOR}x the requests in flight, not a steady state"
        lines.append(f"{r['row']:>11} {r['requests']:>9,} {r['max_in_flight']:>14,} {r['output_tok_s']:>13,.1f} "
                     f"{figure:>18} {ratio:>7}{note}")
    return "\n".join(lines)


def fp8_like_reference(a) -> bool:
    """Whether the run quantizes as TensorRT-LLM's figures do: FP8 weights (W8A8) and an FP8 KV cache."""
    from .bench import bench_quant
    from .quantization.config import FP8_ALGOS, resolve_quant

    config = resolve_quant(bench_quant(a.quant, a.kv_cache_dtype))
    return config is not None and config.quant_algo in FP8_ALGOS and config.kv_cache_quant_algo == "FP8"


DEFAULT_PROFILE_STEPS, DEFAULT_PROFILE_EVERY = 16, 128
"""--grid --profile: windows of 16 steps, one every 128 (an eighth of each row's steps under the profiler)."""


def check_grid_args(a) -> None:
    """ValueError for flags that --grid does not take (it sets the lengths, counts and concurrency itself), and
    for --profile-steps / --profile-every without --grid --profile or out of range."""
    windows = [f for f, on in (("--profile-steps", a.profile_steps is not None),
                               ("--profile-every", a.profile_every is not None)) if on]
    if windows and (a.grid is None or not a.profile):
        raise ValueError(f"{' and '.join(windows)} {'needs' if len(windows) == 1 else 'need'} --grid trtllm --profile")
    if a.grid is None:
        used = [f for f, on in (("--grid-rows", a.grid_rows is not None),
                                ("--grid-requests-scale", a.grid_requests_scale is not None)) if on]
        if used:
            raise ValueError(f"{' and '.join(used)} {'needs' if len(used) == 1 else 'need'} --grid trtllm")
        return
    check_scale(a.grid_requests_scale if a.grid_requests_scale is not None else 1.0)
    a.profile_steps = DEFAULT_PROFILE_STEPS if a.profile_steps is None else a.profile_steps
    a.profile_every = DEFAULT_PROFILE_EVERY if a.profile_every is None else a.profile_every
    if not 1 <= a.profile_steps <= a.profile_every:
        raise ValueError(f"--profile-steps={a.profile_steps} with --profile-every={a.profile_every} is invalid: "
                         "a window is 1 to --profile-every steps")
    if a.profile and (a.tensor_parallel_size * a.pipeline_parallel_size > 1 or a.engine_process):
        raise ValueError("--grid --profile records the kernels of this process's rank: it needs one rank "
                         "(--tp 1 --pp 1) in this process (no --engine-process)")
    if a.warmup < 0:
        raise ValueError(f"--warmup={a.warmup} is invalid: must be >= 0")
    fixed = [f for f, on in (("--backend openai", a.backend == "openai"), ("--isl", a.isl is not None),
                             ("--osl", a.osl is not None), ("--num-requests", a.num_requests is not None),
                             ("--concurrency", a.concurrency != 0), ("--workload", a.workload != "random"),
                             ("--num-loras", a.num_loras != 0), ("--guided-json", a.guided_json is not None),
                             ("--speculative-model / --eagle-model / --ngram",
                              bool(a.speculative_model or a.eagle_model or a.ngram)),
                             ("--lora-compare-base", a.lora_compare_base),
                             ("--guided-compare-unguided", a.guided_compare_unguided),
                             ("--speculative-compare-plain", a.speculative_compare_plain)) if on]
    if fixed:
        raise ValueError(f"--grid {a.grid} sets each row's lengths, request count and concurrency itself and runs "
                         f"the random-token workload: drop {', '.join(fixed)}")


def run_grid(a) -> int:
    """--grid: every selected row through one LLM built for the longest of them; the table; --json after each
    row (a run cut short keeps the rows done)."""
    from .bench import (_is_encoder_decoder, _start_llm, kv_blocks, kv_cache_fraction, offline_llm_kwargs,
                        resolve_bench_model)

    rows = select_rows(a.grid, a.grid_rows)
    scale = check_scale(a.grid_requests_scale if a.grid_requests_scale is not None else 1.0)
    model = resolve_bench_model(a.model)
    if _is_encoder_decoder(model):
        raise ValueError(f"--grid {a.grid} runs decoder-only models (the grid is Llama-3.1-8B's); {a.model} is an "
                         "encoder-decoder model")
    seq_len = max(r.isl + r.osl + 1 for r in rows)
    llm, startup = _start_llm(model, offline_llm_kwargs(a, seq_len))
    name = device_name(llm)
    reference = reference_device(name)
    results = {"grid": a.grid, "source": GRID_SOURCE, "device": name or str(llm.device),
               "reference_device": reference, "model": a.model, "dtype": llm.engine_info.config["dtype"],
               "quant": a.quant, "kv_cache_dtype": a.kv_cache_dtype, "max_seq_len": seq_len,
               "max_batch_size": a.max_batch_size, "max_num_tokens": a.max_num_tokens,
               "kv_cache_free_gpu_memory_fraction": kv_cache_fraction(a),
               "use_fp8_context_fmha": a.use_fp8_context_fmha, "attn_backend": a.attn_backend,
               "cuda_graph_batch_sizes": a.cuda_graph_batch_sizes,
               "tensor_parallel_size": a.tensor_parallel_size, "pipeline_parallel_size": a.pipeline_parallel_size,
               "async_scheduling": not a.no_async_scheduling, "capacity_scheduler_policy": a.capacity_scheduler_policy,
               "engine_process": a.engine_process,
               "requests_scale": scale, "warmup": a.warmup,
               "fp8_like_reference": fp8_like_reference(a), "startup_s": startup, "kv_blocks": kv_blocks(llm),
               "rows": []}
    print(f"grid {a.grid}: {GRID_SOURCE}; device {results['device']}, TensorRT-LLM's figures for "
          f"{reference or 'it: none (H100 and H200 SXM only)'}; max_seq_len {seq_len}, {results['kv_blocks']} KV "
          f"blocks (fraction {results['kv_cache_free_gpu_memory_fraction']}), attention {a.attn_backend}"
          f"{' + FP8 context FMHA' if a.use_fp8_context_fmha else ''}, "
          f"{a.capacity_scheduler_policy}, startup {startup:.1f} s", flush=True)
    no_evict = a.capacity_scheduler_policy == "guaranteed_no_evict"
    for i, row in enumerate(rows):
        requests = row_requests(row, a.max_batch_size, scale, results["kv_blocks"] if no_evict else None,
                                llm.args.tokens_per_block)
        print(f"[{i + 1}/{len(rows)}] {row.name}: {requests:,} requests", flush=True)
        r = run_row(llm, row, requests, a.seed, a.warmup, (a.profile_steps, a.profile_every) if a.profile else None)
        figure = row.figure(reference)
        r.update(requests=requests, trtllm_output_tok_s=figure,
                 ratio=None if figure is None else r["output_tok_s"] / figure)
        results["rows"].append(r)
        print(f"[{i + 1}/{len(rows)}] {row.name}: {r['output_tok_s']:,.1f} output tok/s, max in flight "
              f"{r['max_in_flight']:,}, {r['preemptions']:,} preemptions, wall {r['wall_s']:.1f} s", flush=True)
        if "runner_steps" in r:
            print(format_row_host(r["runner_steps"], r["wall_s"]), flush=True)
        if a.profile:
            print(format_row_profile(r["profile"], llm.device.type == "cuda"), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    device = llm.device
    llm.shutdown()
    del llm
    print(format_table(results["rows"], reference))
    if a.profile:
        print(f"note: every row ran under --profile ({a.profile_steps} of every {a.profile_every} steps profiled): "
              "its output tok/s includes the profiler's cost")
    if reference and not results["fp8_like_reference"]:
        print("note: TensorRT-LLM's figures are for FP8 weights and KV cache (--quant fp8 --kv-cache-dtype fp8); "
              f"this run: --quant {a.quant}, --kv-cache-dtype {a.kv_cache_dtype}, dtype {results['dtype']}")
    if a.compare == "hf":
        compare_hf(a, model, device, results)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def compare_hf(a, model: str, device, results: dict) -> None:
    """--compare hf: transformers (static cache, torch.compile unless --hf-no-compile) on the rows of HF_ROWS
    that ran, after the LLM is gone; each row's result gets "hf" and "speedup_vs_hf"."""
    from .bench import _release
    from .bench_hf import run_hf_best

    batches = a.hf_batch_size or [HF_GRID_BATCH]
    for r in results["rows"]:
        if r["row"] not in HF_ROWS:
            continue
        _release(device)
        row = next(g for g in GRIDS[a.grid] if g.name == r["row"])
        hf = r["hf"] = run_hf_best(model, a.load_format, results["dtype"], a.device,
                                   row_workload(row, r["requests"], a.seed, False), batches,
                                   compile=not a.hf_no_compile)
        r["speedup_vs_hf"] = r["output_tok_s"] / hf["output_tok_s"]
        tried = f" (the best of bs {', '.join(str(b) for b in batches)})" if len(batches) > 1 else ""
        print(f"{r['row']}: transformers bs={hf['batch_size']}{tried} {hf['output_tok_s']:,.1f} output tok/s; "
              f"llmapi / transformers {r['speedup_vs_hf']:.2f}x")
