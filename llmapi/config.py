"""Public configuration objects: the KV-cache settings and the LLM's constructor arguments."""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass
from typing import Any, List, Optional, Union

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LOAD_FORMATS = ("auto", "dummy")
_GUIDED_DECODING_BACKENDS = ("xgrammar",)


def _check(ok: bool, name: str, value: Any, must: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {must}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class UnknownArgumentError(ValueError, TypeError):
    """Unknown argument names, each named with the known ones. A ValueError as every bad argument is here; also
    the TypeError Python raises for an unexpected keyword, so code that caught that keeps working."""


def unknown_arguments_error(what: str, unknown, known) -> UnknownArgumentError:
    return UnknownArgumentError(f"{what} got unknown argument(s): {', '.join(sorted(unknown))}; "
                                f"known arguments are: {', '.join(sorted(known))}")


def from_kwargs(cls, kwargs: dict, what: str):
    """Build dataclass `cls` from kwargs, naming every unknown keyword in the ValueError."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(kwargs) - names
    if unknown:
        raise unknown_arguments_error(what, unknown, names)
    return cls(**kwargs)


def rejects_unknown_arguments(what: str):
    """Class decorator over @dataclass: an unknown keyword raises from_kwargs' ValueError instead of the
    generated __init__'s TypeError; positional and keyword use (and dataclasses.replace) are unchanged."""
    def wrap(cls):
        init = cls.__init__
        names = frozenset(f.name for f in dataclasses.fields(cls) if f.init)

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            if not names.issuperset(kwargs):
                raise unknown_arguments_error(what, set(kwargs) - names, names)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls
    return wrap


def _coerce_settings(cls, value, argument: str):
    """An LLM argument holding settings of class `cls`: an instance, a dict of its fields, or None (the defaults);
    anything else a ValueError naming `argument`."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return from_kwargs(cls, value, f"{cls.__name__}()")
    raise ValueError(f"{argument}={value!r} is invalid: must be a {cls.__name__} or a dict")


@rejects_unknown_arguments("KvCacheConfig()")
@dataclass
class KvCacheConfig:
    """How much memory the paged KV cache gets, and whether its blocks are reused across requests."""

    free_gpu_memory_fraction: float = 0.9
    """On GPU: the fraction that the KV cache takes of the memory free once the weights are loaded and a profile
    step has run, as TensorRT-LLM sizes it: the largest step the scheduler can form (max_num_tokens tokens over up
    to max_batch_size requests, each row's logits and a top-k / top-p draw) runs first, and its peak stays free for
    the steps. The rest (1 - the fraction) holds the decode CUDA graphs and the allocator's slack: TensorRT-LLM's
    benchmarks run 0.95."""
    max_tokens: Optional[int] = None
    """Cap on the KV cache size in tokens. On CPU it sizes the cache (default 32768 tokens,
    at most a quarter of the available RAM)."""
    max_bytes: Optional[int] = None
    """Cap on the KV cache size in bytes (CPU or GPU)."""
    enable_block_reuse: bool = True
    """Prefix caching: full KV blocks are kept by content hash and reused by later requests."""
    use_fp8_context_fmha: bool = False
    """With an fp8 KV cache (kv_cache_dtype fp8) and the Triton kernels (a GPU): the packed (prefill) attention's
    Q.K and P.V on E4M3 operands, TensorRT-LLM's FP8 context FMHA (its benchmarks' setting for FP8 models): twice
    bfloat16's tensor-core rate on Hopper, at FP8's precision for the queries and the softmax weights. Decoder-only
    models."""

    def __post_init__(self):
        f = self.free_gpu_memory_fraction
        _check(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1, "free_gpu_memory_fraction", f,
               "must be a number in (0, 1]")
        for name in ("max_tokens", "max_bytes"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and v > 0), name, v, "must be a positive int or None")
        for name in ("enable_block_reuse", "use_fp8_context_fmha"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be a bool")

    @classmethod
    def coerce(cls, value: Union["KvCacheConfig", dict, None]) -> "KvCacheConfig":
        return _coerce_settings(cls, value, "kv_cache_config")


class CapacitySchedulerPolicy(str, enum.Enum):
    """How the scheduler admits waiting requests against the KV cache (TensorRT-LLM's CapacitySchedulerPolicy)."""

    MAX_UTILIZATION = "MAX_UTILIZATION"
    """Admit a request as soon as the blocks of its next step fit; a running request that later lacks a block
    preempts the most recently admitted one, which recomputes its tokens when it is admitted again (vLLM's
    behaviour). Our default."""
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    """Admit a request only if the free blocks hold it to completion (prompt + max_tokens for every sequence it runs,
    less the prefix-cache blocks it reuses) besides what the running requests still need to reach theirs, so
    running requests are not preempted. A request whose completion exceeds the whole cache is admitted under
    MAX_UTILIZATION's rule instead. TensorRT-LLM's default."""

    @classmethod
    def coerce(cls, value: Union["CapacitySchedulerPolicy", str]) -> "CapacitySchedulerPolicy":
        """The policy `value` names: a member, or its name in any case ("guaranteed_no_evict")."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        allowed = ", ".join(m.name for m in cls)
        raise ValueError(f"capacity_scheduler_policy={value!r} is invalid: must be one of {allowed} "
                         f"(a CapacitySchedulerPolicy or its name, in any case)")

    @property
    def core_value(self) -> int:
        """The executor core's number for it (ExecutorConfig.capacity_scheduler_policy)."""
        return {CapacitySchedulerPolicy.MAX_UTILIZATION: 0, CapacitySchedulerPolicy.GUARANTEED_NO_EVICT: 1}[self]


@rejects_unknown_arguments("SchedulerConfig()")
@dataclass
class SchedulerConfig:
    """How requests are admitted (TensorRT-LLM's SchedulerConfig). A runtime setting: the engine is the same."""

    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.MAX_UTILIZATION
    """MAX_UTILIZATION (our default) or GUARANTEED_NO_EVICT (TensorRT-LLM's default), or either name as a string in
    any case; see CapacitySchedulerPolicy."""

    def __post_init__(self):
        self.capacity_scheduler_policy = CapacitySchedulerPolicy.coerce(self.capacity_scheduler_policy)

    @classmethod
    def coerce(cls, value: Union["SchedulerConfig", dict, None]) -> "SchedulerConfig":
        return _coerce_settings(cls, value, "scheduler_config")


@dataclass
class LlmArgs:
    """Every argument of `LLM(...)`; each is validated on construction."""

    model: str
    """A Hugging Face hub id, a local Hugging Face directory, a GGUF file, or a saved engine directory."""
    tokenizer: Optional[str] = None
    """Tokenizer to use instead of the one stored with the engine (hub id or directory)."""
    skip_tokenizer_init: bool = False
    """Run without a tokenizer: prompts must be token ids and outputs carry no text."""
    dtype: str = "auto"
    """Weight and activation dtype: auto (the checkpoint's on GPU, float32 on CPU), float32, bfloat16, float16."""
    tensor_parallel_size: int = 1
    """Number of tensor-parallel ranks (per pipeline stage); `LLM(..., tp=N)` for short."""
    pipeline_parallel_size: int = 1
    """Number of pipeline-parallel stages (`pp=N` for short). With tp x pp > 1 the ranks run as an MPI job (see
    README)."""
    engine_process: bool = False
    """Run the engine (executor and model runner) in a process of its own at one rank too, as the one rank of an
    MPI job this process spawns (with tp x pp > 1 the ranks always run so): this process keeps the requests'
    Python side only, so what else it runs (a server's HTTP work) never waits for the engine's host work on the
    interpreter lock, nor the engine for it. Needs mpiexec, as several ranks do (see README); under llmapi-launch
    the ranks are the launcher's job, and this changes nothing."""
    embedding_sharding_dim: int = 0
    """With tensor parallelism, split the embedding along the vocabulary (0) or the hidden size (1)."""
    max_batch_size: int = 2048
    """Most requests in one step."""
    max_num_tokens: int = 8192
    """Most tokens (prefill chunks plus decodes) in one step."""
    max_seq_len: Optional[int] = None
    """Longest prompt plus output, in tokens; default: the model's max_position_embeddings."""
    max_encoder_input_len: Optional[int] = None
    """Encoder-decoder models: the longest encoder input, in tokens (never more than max_num_tokens - 1: the encoder
    runs in one step); default: the model's position limit where it has one (BART, FSMT), else 1024 (T5)."""
    tokens_per_block: int = 32
    """Tokens per paged KV block."""
    kv_cache_config: Optional[KvCacheConfig] = None
    """KV cache size and block reuse, see KvCacheConfig."""
    enable_chunked_prefill: bool = True
    """Split long prompts over several steps so decodes keep running."""
    scheduler_config: Optional[SchedulerConfig] = None
    """Admission policy (SchedulerConfig(capacity_scheduler_policy=...)); default MAX_UTILIZATION."""
    load_format: str = "auto"
    """auto: read the checkpoint; dummy: random weights from the config (for speed work)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit)."""
    hf_token: Optional[str] = None
    """Hub token for gated or private models (default: huggingface_hub's own login)."""
    device: str = "auto"
    """cuda, cpu, or auto (cuda when available)."""
    cache_dir: Optional[str] = None
    """Engine cache root (default $LLMAPI_CACHE_DIR, $XDG_CACHE_HOME/llmapi or ~/.cache/llmapi)."""
    full_engine_check: bool = False
    """Verify every engine file's checksum on load, not only sizes and headers."""
    attn_backend: str = "triton"
    """Attention kernels (TensorRT-LLM's name for the switch): "triton" runs every step in the Triton kernels;
    "flash" runs the prefill rows through torch's FlashAttention over a gathered copy of their contexts (a GPU,
    bfloat16 / float16; decodes and sliding-window layers stay on the Triton kernels; llmapi.layers.flash_prefill)."""
    cuda_graph_batch_sizes: Optional[List[int]] = None
    """The decode batch sizes captured as CUDA graphs (TensorRT-LLM's `cuda_graph_config.batch_sizes`), up to
    max_batch_size: a decode step of R requests replays the smallest one >= R (padded), a larger one runs eagerly.
    Default: 1 to 2,048, finer past 256 (steps of 64 to 384, of 128 to 1,024, then of 256; GRAPH_BATCH_SIZES in
    llmapi.runtime.cuda_graph)."""
    async_scheduling: bool = True
    """Schedule and stage step N+1 on the host while the device runs step N (at every world size): the
    next token of a plain request is scheduled before the last one is known."""
    max_logprobs: int = 20
    """Most top logprobs a request may ask for (SamplingParams.logprobs / prompt_logprobs), as vLLM."""
    enable_lora: Optional[bool] = None
    """Serve LoRA adapters per request (vLLM's switch; `lora_config=LoraConfig(...)` is TensorRT-LLM's): generate
    takes lora_request=LoRARequest(...)."""
    max_loras: Optional[int] = None
    """With enable_lora: adapters held on the device at once (vLLM's default 1); see LoraConfig.max_loras."""
    max_lora_rank: Optional[int] = None
    """With enable_lora: the largest adapter rank (vLLM's default 16); see LoraConfig.max_lora_rank."""
    max_cpu_loras: Optional[int] = None
    """With enable_lora: adapters kept loaded in host memory (default max_loras); see LoraConfig.max_cpu_loras."""
    lora_config: Any = None
    """LoRA settings as a llmapi.LoraConfig (or its dict); the same settings as enable_lora / max_loras /
    max_lora_rank / max_cpu_loras, which may be given too when they agree."""
    enable_prompt_adapter: bool = False
    """Serve prompt-tuning tables per request (prompt_adapter_request=PromptAdapterRequest(...))."""
    max_prompt_adapters: Optional[int] = None
    """With enable_prompt_adapter: prompt tables held on the device at once (default 1)."""
    max_prompt_adapter_token: Optional[int] = None
    """With enable_prompt_adapter: rows one table may have, all its tasks' virtual tokens together (default 512)."""
    step_timeout: float = 600.0
    """Seconds a step may run without finishing before the LLM gives up on it: every pending request
    fails with StepTimeoutError naming the stalled rank (or the request whose logits processor was
    running) and the LLM is dead. Long enough for a cold kernel compile."""
    cache_lock_timeout: float = 3600.0
    """Seconds to wait for another process that is building the same engine before EngineLockTimeoutError
    names it; the holder's pid is in the lock file."""
    guided_decoding_backend: str = "xgrammar"
    """The library that compiles SamplingParams.guided_decoding grammars and masks the logits with them:
    xgrammar (the only one)."""
    speculative_config: Any = None
    """Speculative decoding: a DraftTargetDecodingConfig (a draft model), NGramDecodingConfig (prompt lookup) or
    EagleDecodingConfig (an EAGLE head), or a dict with TensorRT-LLM's decoding_type; None: off (see
    llmapi.speculative and the README). EAGLE on one rank only; beam search is refused with it."""
    quant: Any = None
    """Quantization: None, a short string ("int8_weight_only", "int4_weight_only", "int4_awq", "fp8",
    "fp8_per_token", "smoothquant", "fp8_kv_cache", "int8_kv_cache") or a QuantConfig (see llmapi.quantization;
    its kv_cache_quant_algo sets the KV-cache dtype); a GPTQ checkpoint is detected and loaded as such with None."""

    def __post_init__(self):
        _check(isinstance(self.model, str) and self.model != "", "model", self.model,
               "must be a non-empty string (hub id or path)")
        _check(self.dtype in _DTYPES, "dtype", self.dtype, f"must be one of {_DTYPES}")
        _check(self.load_format in _LOAD_FORMATS, "load_format", self.load_format,
               f"must be one of {_LOAD_FORMATS}")
        _check(self.guided_decoding_backend in _GUIDED_DECODING_BACKENDS, "guided_decoding_backend",
               self.guided_decoding_backend, f"must be one of {_GUIDED_DECODING_BACKENDS}")
        for name in ("async_scheduling", "engine_process"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be True or False")
        _check(self.attn_backend in ("triton", "flash"), "attn_backend", self.attn_backend,
               "must be one of ('triton', 'flash')")
        sizes = self.cuda_graph_batch_sizes
        _check(sizes is None or (isinstance(sizes, (list, tuple)) and len(sizes) > 0
                                 and all(_is_int(v) and v >= 1 for v in sizes)),
               "cuda_graph_batch_sizes", sizes, "must be a non-empty list of ints >= 1, or None")
        _check(_is_int(self.max_logprobs) and self.max_logprobs >= 0, "max_logprobs", self.max_logprobs,
               "must be an int >= 0")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "max_batch_size",
                     "max_num_tokens", "tokens_per_block"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, name, v, "must be an int >= 1")
        _check(self.max_seq_len is None or (_is_int(self.max_seq_len) and self.max_seq_len >= 2),
               "max_seq_len", self.max_seq_len, "must be an int >= 2 or None")
        _check(self.max_encoder_input_len is None or (_is_int(self.max_encoder_input_len)
                                                      and self.max_encoder_input_len >= 1),
               "max_encoder_input_len", self.max_encoder_input_len, "must be an int >= 1 or None")
        _check(self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:"),
               "device", self.device, "must be auto, cpu, cuda or cuda:N")
        _check(self.embedding_sharding_dim in (0, 1) and _is_int(self.embedding_sharding_dim),
               "embedding_sharding_dim", self.embedding_sharding_dim, "must be 0 (vocabulary) or 1 (hidden size)")
        for name in ("step_timeout", "cache_lock_timeout"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"), name, v,
                   "must be a finite number of seconds > 0")
        self.kv_cache_config = KvCacheConfig.coerce(self.kv_cache_config)
        self.scheduler_config = SchedulerConfig.coerce(self.scheduler_config)
        from .speculative.config import EagleDecodingConfig, resolve_speculative_config

        self.speculative_config = resolve_speculative_config(self.speculative_config)
        if isinstance(self.speculative_config, EagleDecodingConfig) and (self.world_size > 1 or self.engine_process):
            where = (f"tensor_parallel_size * pipeline_parallel_size = {self.world_size}" if self.world_size > 1
                     else "engine_process=True")
            raise ValueError(f"speculative_config=EagleDecodingConfig(...) is invalid with {where}: an EAGLE head "
                             "runs on one rank only, in this process (n-gram and draft-model speculative decoding run "
                             "at every world size)")
        from .quantization.config import SMOOTHQUANT_ALGOS, resolve_quant

        self.quant = resolve_quant(self.quant)  # None or a QuantConfig; bad values raise ValueError naming quant
        from .lora.config import resolve_lora_config, resolve_prompt_adapter_config

        # One LoraConfig (or None) from either spelling; the prompt-adapter settings as a PromptAdapterConfig.
        self.lora_config = resolve_lora_config(self.lora_config, self.enable_lora, self.max_loras,
                                               self.max_lora_rank, self.max_cpu_loras)
        self.prompt_adapter_config = resolve_prompt_adapter_config(
            self.enable_prompt_adapter, self.max_prompt_adapters, self.max_prompt_adapter_token)
        if self.lora_config is not None and self.quant is not None and self.quant.quant_algo in SMOOTHQUANT_ALGOS:
            raise ValueError(f"LoRA adapters (enable_lora / lora_config) and quant={self.quant.quant_algo!r} cannot "
                             "be combined: SmoothQuant folds its smoothing into the norms, so a linear's input is not "
                             "the activation an adapter was trained on")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


# Short spellings LLM(...) accepts for LlmArgs fields.
ALIASES = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size"}


def validated_kwargs(kwargs: dict) -> LlmArgs:
    """LlmArgs from LLM(...) keyword arguments (`tp` / `pp` standing for tensor_parallel_size /
    pipeline_parallel_size); unknown names, and both spellings with different values, raise a ValueError
    naming them."""
    kwargs = dict(kwargs)
    for short, name in ALIASES.items():
        if short in kwargs:
            value = kwargs.pop(short)
            if name in kwargs and kwargs[name] != value:
                raise ValueError(f"LLM(): {short}={value!r} and {name}={kwargs[name]!r} disagree ({short} is "
                                 f"another spelling of {name}); pass one of them")
            kwargs[name] = value
    return from_kwargs(LlmArgs, kwargs, "LLM()")


__all__ = ["KvCacheConfig", "LlmArgs", "validated_kwargs", "from_kwargs", "rejects_unknown_arguments",
           "UnknownArgumentError"]
