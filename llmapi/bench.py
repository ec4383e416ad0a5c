"""`llmapi bench`: a fixed-length synthetic workload through LLM, or through a running OpenAI-compatible server
(--backend openai): output tok/s, TTFT/TPOT, decode vs bandwidth."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KNOWN_CONFIGS = Path(__file__).parent / "known_configs"


def known_config_names() -> list[str]:
    return sorted(p.stem for p in KNOWN_CONFIGS.glob("*.json"))


def resolve_bench_model(model: str) -> str:
    """A known config name (e.g. llama-3.1-8b) becomes a directory holding its config.json alone
    (for load_format="dummy": no hub access needed); anything else is passed on unchanged."""
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


def _drive(llm, prompts, params, concurrency: int) -> list[Timing]:
    """Keep up to `concurrency` requests in flight; stamp each one's first token and end by polling.

    Polling (every 1 ms, 10 ms with many requests in flight) keeps the measuring off the serving
    path: streaming every token of a thousand requests through asyncio would cost the engine time.
    The heap is frozen for the run, as in LLM.generate (llmapi.runtime.gc_freeze).
    """
    from .runtime.gc_freeze import frozen_heap

    with frozen_heap():
        return _drive_frozen(llm, prompts, params, concurrency)


def _drive_frozen(llm, prompts, params, concurrency: int) -> list[Timing]:
    limit = concurrency or len(prompts)
    waiting = list(reversed(prompts))
    live: dict = {}  # RequestOutput -> [start, first]
    done: list[Timing] = []
    if limit >= len(prompts):  # no cap: all in one call, so the first step schedules from all of them
        start = time.perf_counter()
        live = {out: [start, None] for out in llm._generate_async_batch(prompts, params)}
        waiting = []
    while waiting or live:
        while waiting and len(live) < limit:
            live[llm.generate_async(waiting.pop(), params)] = [time.perf_counter(), None]
        time.sleep(0.001 if len(live) <= 64 else 0.01)
        now = time.perf_counter()
        for out, stamps in list(live.items()):
            if stamps[1] is None and out.outputs[0].token_ids:
                stamps[1] = now
            if out.finished:
                out.result()  # raises the request's error, if any
                done.append(Timing(stamps[0], stamps[1] or now, now, len(out.outputs[0].token_ids)))
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
    prompts = workload.prompts(vocab_size)
    start = time.perf_counter()
    timings = _drive(llm, prompts, params, workload.concurrency)
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
    token row) plus each request's K/V, over the measured bandwidth."""
    embed = model.transformer.vocab_embedding.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - embed.numel() * embed.element_size()
    weights += batch * embed.shape[1] * embed.element_size()
    elem = embed.element_size()
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
    if a.speculative_model:
        return DraftTargetDecodingConfig(speculative_model=resolve_bench_model(a.speculative_model),
                                         max_draft_len=a.max_draft_len)
    if a.eagle_model:
        return EagleDecodingConfig(speculative_model=a.eagle_model, max_draft_len=a.max_draft_len)
    if a.ngram:
        return NGramDecodingConfig(max_draft_len=a.max_draft_len, max_matching_ngram_size=a.max_matching_ngram_size)
    return None


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


def run_openai_workload(base_url: str, model: str, api_key, workload: Workload, vocab_size: int) -> dict:
    """The workload through a running server's streamed /v1/completions (token-id prompts, ignore_eos)."""
    prompts = workload.prompts(vocab_size)
    start = time.perf_counter()
    timings = asyncio.run(_drive_openai(base_url, model, api_key, prompts, workload.osl, workload.concurrency))
    return summarize(timings, time.perf_counter() - start)


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
    api_key = a.api_key or os.environ.get("LLMAPI_API_KEY") or os.environ.get("OPENAI_API_KEY")
    model = a.model or _served_model(a.base_url, api_key)
    workload = Workload(a.isl, a.osl, a.num_requests, a.concurrency, a.seed)
    results = {"backend": "openai", "base_url": a.base_url, "model": model, "isl": a.isl, "osl": a.osl,
               "num_requests": a.num_requests, "concurrency": a.concurrency, "vocab_size": a.vocab_size}
    if a.warmup:
        run_openai_workload(a.base_url, model, api_key, Workload(a.isl, a.osl, a.warmup, a.concurrency, a.seed + 1),
                            a.vocab_size)
    ours = results["openai"] = run_openai_workload(a.base_url, model, api_key, workload, a.vocab_size)
    print(format_report("openai", ours))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def main(a) -> int:
    if a.backend == "openai":
        return main_openai(a)
    if a.model is None:
        raise ValueError("llmapi bench needs --model (or --backend openai --base-url URL)")
    import torch

    from . import LLM

    model = resolve_bench_model(a.model)
    workload = Workload(a.isl, a.osl, a.num_requests, a.concurrency, a.seed)
    quant = bench_quant(a.quant, a.kv_cache_dtype)
    speculative = bench_speculative(a)
    kv = {"free_gpu_memory_fraction": a.kv_cache_free_gpu_memory_fraction}
    started = time.perf_counter()
    llm = LLM(model, dtype=a.dtype, load_format=a.load_format, device=a.device, skip_tokenizer_init=True,
              max_batch_size=a.max_batch_size, max_num_tokens=a.max_num_tokens, kv_cache_config=kv,
              max_seq_len=a.isl + a.osl + 1, tensor_parallel_size=a.tensor_parallel_size,
              pipeline_parallel_size=a.pipeline_parallel_size, quant=quant,
              async_scheduling=not a.no_async_scheduling, speculative_config=speculative)
    from .sampling_params import SamplingParams
    llm.generate([[1] * 4], SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False), use_tqdm=False)
    results = {"startup_s": time.perf_counter() - started, "model": a.model, "dtype": llm.engine_info.config["dtype"],
               "quant": a.quant, "kv_cache_dtype": a.kv_cache_dtype, "isl": a.isl, "osl": a.osl, "num_requests": a.num_requests, "concurrency": a.concurrency,
               "tensor_parallel_size": a.tensor_parallel_size, "pipeline_parallel_size": a.pipeline_parallel_size,
               "async_scheduling": not a.no_async_scheduling,
               "speculative_config": None if speculative is None else
               {"decoding_type": speculative.decoding_type, **dataclasses.asdict(speculative)}}
    vocab = llm.vocab_size
    if a.warmup:
        run_workload(llm, Workload(a.isl, a.osl, a.warmup, a.concurrency, seed=a.seed + 1), vocab)
    runner = llm._runner  # the in-process runner; None with several ranks (theirs run in the MPI job)
    if runner is not None:
        runner.stats = type(runner.stats)()
    counters = llm.get_stats()
    ours = run_workload(llm, workload, vocab)
    results["llmapi"] = ours
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
    print(format_report("llmapi", ours))
    if speculative is not None:
        sp = ours["speculative"]
        print(f"speculative ({speculative.decoding_type}, max_draft_len {speculative.max_draft_len}): "
              f"{sp['accepted_draft_tokens']} of {sp['draft_tokens']} drafts accepted "
              f"({100 * sp['acceptance_rate']:.1f}%), {sp['output_tokens_per_step']:.2f} output tokens per step")
    if runner is not None:
        st = results["runner_steps"]
        print(f"runner: {st['steps']} steps ({st['graph_steps']} from CUDA graphs), {st['tokens']} tokens; "
              f"host time in submit {st['submit_s']:.2f} s, waiting for the GPU {st['wait_s']:.2f} s, "
              f"wall {ours['wall_s']:.2f} s; allocator retries {results.get('allocator_retries', 0)}")
    device = llm.device
    batch = min(a.concurrency or a.num_requests, a.num_requests, a.max_batch_size)
    floor_bytes = None if rank_model is None else decode_floor_s(rank_model, llm.engine_info.config, batch,
                                                                  a.isl + a.osl / 2, 1.0)
    llm.shutdown()
    del llm, runner, rank_model  # the KV cache and graphs go before the bandwidth probe and transformers' model
    if device.type == "cuda" and floor_bytes is not None:  # one rank: its model's bytes are the whole model's
        torch.cuda.empty_cache()
        bandwidth = measure_bandwidth(device)
        floor = floor_bytes / bandwidth
        ours["bandwidth_GBps"] = bandwidth / 1e9
        ours["decode_floor_ms"] = 1e3 * floor
        ours["decode_bandwidth_fraction"] = 1e3 * floor / ours["tpot_ms_p50"]
        print(f"decode: TPOT p50 {ours['tpot_ms_p50']:.2f} ms vs bandwidth floor {1e3 * floor:.2f} ms at batch {batch} "
              f"({bandwidth / 1e12:.2f} TB/s measured): {100 * ours['decode_bandwidth_fraction']:.0f}% of the bound")
    if a.compare == "hf":
        from .bench_hf import run_hf

        hf_batch = a.hf_batch_size or min(a.concurrency or a.num_requests, a.num_requests)
        hf = run_hf(model, a.load_format, results["dtype"], a.device, workload, hf_batch, compile=not a.hf_no_compile)
        results["hf"] = hf
        print(format_report(f"hf bs={hf_batch}", hf))
        results["speedup_vs_hf"] = ours["output_tok_s"] / hf["output_tok_s"]
        print(f"llmapi / transformers output tok/s: {results['speedup_vs_hf']:.2f}x")
    if torch.cuda.is_available():
        results["device"] = torch.cuda.get_device_name()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="hub id, directory, or a known config name: "
                   + ", ".join(known_config_names()) + " (with --load-format dummy); with --backend openai the "
                   "served model's name (default: the first of /v1/models)")
    p.add_argument("--backend", choices=["llmapi", "openai"], default="llmapi",
                   help="llmapi: an LLM in this process; openai: a running server's streamed /v1/completions")
    p.add_argument("--base-url", default=None, help="--backend openai: the server, e.g. http://127.0.0.1:8000")
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
    p.add_argument("--isl", type=int, default=128, help="input tokens per request")
    p.add_argument("--osl", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--num-requests", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=0, help="requests in flight; 0: all at once")
    p.add_argument("--warmup", type=int, default=0, help="requests run (and not timed) before the workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "--pp", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=2048)
    p.add_argument("--max-num-tokens", type=int, default=8192)
    p.add_argument("--kv-cache-free-gpu-memory-fraction", type=float, default=0.9)
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="schedule each step only after the last one is collected (LLM(async_scheduling=False))")
    p.add_argument("--speculative-model", default=None,
                   help="speculative decoding with this draft model (hub id, directory, or a known config name: "
                   + ", ".join(known_config_names()) + ", with --load-format dummy as the target)")
    p.add_argument("--eagle-model", default=None, help="speculative decoding with this EAGLE-1 head (directory or "
                   "hub id)")
    p.add_argument("--ngram", action="store_true", help="speculative decoding with n-gram (prompt lookup) drafts")
    p.add_argument("--max-draft-len", type=int, default=4, help="draft tokens per step (speculative decoding)")
    p.add_argument("--max-matching-ngram-size", type=int, default=4, help="--ngram: the longest suffix matched")
    p.add_argument("--compare", choices=["hf"], default=None,
                   help="hf: also run the workload through transformers (static cache + torch.compile)")
    p.add_argument("--hf-batch-size", type=int, default=0, help="transformers' batch (default: the concurrency)")
    p.add_argument("--hf-no-compile", action="store_true", help="transformers without torch.compile")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
