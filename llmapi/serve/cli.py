"""`llmapi serve MODEL`: start one LLM and serve it over OpenAI's HTTP API until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path
from typing import Any, Dict, Optional

from ..bench import batch_sizes

logger = logging.getLogger("llmapi.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, Hugging Face directory, GGUF file or engine directory")
    p.add_argument("--model", dest="model_option", default=None, help="the model, as an option")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize "
                        "(default: $LLMAPI_API_KEY; /health, /version and /metrics stay open)")
    s.add_argument("--served-model-name", default=None, help="the model id clients use (default: MODEL)")
    s.add_argument("--chat-template", default=None,
                   help="a Jinja chat template (a file, or the template itself) instead of the tokenizer's")
    s.add_argument("--max-pending", type=int, default=4096,
                   help="most requests in flight; beyond it 503 with Retry-After")
    s.add_argument("--stream-interval", type=float, default=0.0,
                   help="seconds a stream waits after each chunk, so that the next carries the tokens made "
                        "meanwhile (default 0: a chunk per engine update)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM: seconds the requests in flight get to finish before they are aborted")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--no-access-log", action="store_true", help="do not log each HTTP request")
    m = p.add_argument_group("model (LLM() arguments)")
    m.add_argument("--tokenizer", default=None)
    m.add_argument("--skip-tokenizer-init", action="store_true",
                   help="no tokenizer: token-id prompts only, outputs as token ids (usage, logprobs) without text")
    m.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    m.add_argument("--load-format", default=None, choices=["auto", "dummy"])
    m.add_argument("--revision", default=None, help="hub revision")
    m.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    m.add_argument("--quant", default=None, help="a quant= mode, e.g. fp8, int8_weight_only, int4_awq")
    m.add_argument("--tensor-parallel-size", "--tp", type=int, default=None)
    m.add_argument("--pipeline-parallel-size", "--pp", type=int, default=None)
    m.add_argument("--max-seq-len", "--max-model-len", type=int, default=None)
    m.add_argument("--max-num-tokens", type=int, default=None)
    m.add_argument("--max-batch-size", type=int, default=None)
    m.add_argument("--tokens-per-block", type=int, default=None)
    m.add_argument("--max-logprobs", type=int, default=None)
    m.add_argument("--kv-cache-max-tokens", type=int, default=None, help="KvCacheConfig(max_tokens=...)")
    m.add_argument("--kv-cache-free-gpu-memory-fraction", type=float, default=None)
    m.add_argument("--no-enable-prefix-caching", action="store_true", help="KvCacheConfig(enable_block_reuse=False)")
    m.add_argument("--no-async-scheduling", action="store_true")
    m.add_argument("--engine-process", action="store_true",
                   help="run the engine in a process of its own at one rank too (LLM(engine_process=True)): the "
                   "HTTP side and the engine's host work never wait for each other's interpreter lock")
    m.add_argument("--attn-backend", choices=("triton", "flash"), default=None,
                   help="flash: prefill rows through torch's FlashAttention (LLM(attn_backend='flash'))")
    m.add_argument("--cuda-graph-batch-sizes", type=batch_sizes, default=None, metavar="B[,B...]",
                   help="the decode batch sizes captured as CUDA graphs (LLM(cuda_graph_batch_sizes=[...]))")
    m.add_argument("--step-timeout", type=float, default=None)
    m.add_argument("--cache-dir", default=None, help="the engine cache (default $LLMAPI_CACHE_DIR)")
    lora = p.add_argument_group("LoRA adapters")
    lora.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                      help="LoRA adapters (PEFT directories or NeMo .nemo files) loaded at start, listed in /v1/models "
                           "and used by requests whose `model` names them (turns on --enable-lora)")
    lora.add_argument("--enable-lora", action="store_true", help="LLM(enable_lora=True)")
    lora.add_argument("--max-loras", type=int, default=None, help="adapters on the device at once")
    lora.add_argument("--max-lora-rank", type=int, default=None, help="the largest adapter rank")
    lora.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept in host memory")


_LLM_OPTIONS = ("tokenizer", "dtype", "load_format", "revision", "device", "quant", "tensor_parallel_size",
                "pipeline_parallel_size", "max_seq_len", "max_num_tokens", "max_batch_size", "tokens_per_block",
                "max_logprobs", "step_timeout", "cache_dir", "max_loras", "max_lora_rank", "max_cpu_loras",
                "attn_backend", "cuda_graph_batch_sizes")


def llm_kwargs(a: argparse.Namespace) -> Dict[str, Any]:
    """LLM() keyword arguments of the options given (the others keep LLM's defaults)."""
    kw = {name: getattr(a, name) for name in _LLM_OPTIONS if getattr(a, name) is not None}
    kv: Dict[str, Any] = {}
    if a.kv_cache_max_tokens is not None:
        kv["max_tokens"] = a.kv_cache_max_tokens
    if a.kv_cache_free_gpu_memory_fraction is not None:
        kv["free_gpu_memory_fraction"] = a.kv_cache_free_gpu_memory_fraction
    if a.no_enable_prefix_caching:
        kv["enable_block_reuse"] = False
    if kv:
        kw["kv_cache_config"] = kv
    if a.no_async_scheduling:
        kw["async_scheduling"] = False
    if a.skip_tokenizer_init:
        kw["skip_tokenizer_init"] = True
    if a.engine_process:
        kw["engine_process"] = True
    if a.enable_lora or a.lora_modules:
        kw["enable_lora"] = True
        if a.lora_modules and a.max_cpu_loras is None:  # every served adapter stays loaded: no disk read in a request
            kw["max_cpu_loras"] = max(len(a.lora_modules), a.max_loras or 1)
    return kw


def lora_modules(values) -> Dict[str, Any]:
    """--lora-modules NAME=PATH ...: name -> LoRARequest (ids 1, 2, ... in order)."""
    from ..lora import LoRARequest

    out: Dict[str, Any] = {}
    for i, value in enumerate(values or []):
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules {value!r} is invalid: must be NAME=PATH")
        if name in out:
            raise ValueError(f"--lora-modules names {name!r} twice")
        out[name] = LoRARequest(name, i + 1, path)
    return out


def read_chat_template(value: Optional[str]) -> Optional[str]:
    """--chat-template: a file's text, or the argument itself when it names no file (as vLLM)."""
    if value is None:
        return None
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text()
    except OSError:  # a template longer than a path may be
        pass
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def _interrupt(sig, frame):
    raise KeyboardInterrupt  # while the model loads: unwind, so that the LLM's ranks are stopped


def main(a: argparse.Namespace) -> int:
    model = a.model or a.model_option
    if model is None:
        raise ValueError("llmapi serve needs a MODEL (hub id, directory, GGUF file or engine directory)")
    try:
        from .app import ServeConfig, create_app
        from .server import DrainingServer
    except ImportError as e:
        from ..errors import MissingDependencyError

        raise MissingDependencyError(f"llmapi serve needs FastAPI and uvicorn: pip install \"llmapi[serve]\" "
                                     f"({e})") from e
    from .. import LLM

    config = ServeConfig(served_model_name=a.served_model_name or model,
                         api_key=a.api_key or os.environ.get("LLMAPI_API_KEY") or None,
                         chat_template=read_chat_template(a.chat_template), max_pending=a.max_pending,
                         stream_interval=a.stream_interval, lora_modules=lora_modules(a.lora_modules))
    if config.served_model_name in config.lora_modules:
        raise ValueError(f"--lora-modules names {config.served_model_name!r}, the served model's own name")
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        llm = LLM(model, **llm_kwargs(a))
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    try:
        for lora in config.lora_modules.values():  # loaded now: a bad adapter stops the server before it serves
            llm.add_lora(lora)
        server = DrainingServer(create_app(llm, config), drain_timeout=a.drain_timeout, host=a.host, port=a.port,
                                log_level=a.log_level, access_log=not a.no_access_log)
        server.run()
    finally:
        llm.shutdown()
    logger.info("stopped")
    return 0
