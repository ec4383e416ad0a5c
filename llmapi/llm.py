"""LLM: resolve and cache the engine, start the executor, and serve generate / generate_async."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import secrets
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from . import _core
from .config import validated_kwargs
from .core_request import check_multi_rank, check_params, core_request, generation_defaults, pickled_processor
from .encdec_prompts import encdec_settings, split_prompt, unwrap_prompt
from .errors import ExecutorDeadError, RequestError, WorkerDiedError
from .live_request import LiveRequest
from .llm_state import LLMState
from .lora.setup import adapter_settings, per_prompt, start_adapters
from .outputs import RequestOutput
from .runtime.gc_freeze import frozen_heap
from .sampling_params import SamplingParams, field_error
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int], Dict[str, Any]]


def _state_field(name: str) -> property:
    """An LLM attribute kept on its LLMState."""
    return property(lambda self: getattr(self._res, name), lambda self, value: setattr(self._res, name, value))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} is invalid: no CUDA device is available")
    return device


def _enqueue_waiting(executor, make, ids, adapters, vocab_size: int, slots) -> None:
    """Enqueue a request that waited for an adapter slot (AdapterManager.release calls it, on the response
    thread): its core Request is made now that its slots are known."""
    executor.enqueue(make(**adapters.core_fields(ids, slots, vocab_size)))


class LLM:
    """An LLM served from a cached engine. See `LlmArgs` for every argument.

    >>> llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
    """

    def __init__(self, model: str, tokenizer: Optional[str] = None, **kwargs: Any):
        self.args = validated_kwargs(dict(model=model, tokenizer=tokenizer, **kwargs))
        self._res = LLMState()  # everything to release; it holds no reference to this object
        # Runs once: from shutdown(), when nothing references this LLM any more, or at interpreter exit.
        self._finalizer = weakref.finalize(self, self._res.close)
        self._ids = itertools.count()
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    is_encoder_decoder = False
    """Whether the model is an encoder-decoder model (T5, BART, FSMT): prompts are then encoder inputs."""
    _encdec = None  # its llmapi.encdec_prompts.EncoderDecoderSettings

    # The state's fields under the names the methods below use.
    _executor = _state_field("executor")
    _runner = _state_field("runner")
    _local = _state_field("local")  # the in-process ModelRunner (world_size 1)
    _live = _state_field("live")
    _lock = _state_field("lock")
    _thread = _state_field("thread")
    _closed = _state_field("closed")
    _death = _state_field("death")
    device = _state_field("device")

    def _start(self) -> None:
        from .distributed import session as sessions
        from .distributed.mapping import Mapping
        from .errors import CorruptEngineError

        args = self.args
        mapping = Mapping(args.tensor_parallel_size, args.pipeline_parallel_size)
        self.world_size = mapping.world_size
        launched = sessions.current()
        remote = None
        # Requests and their logits processors cross to another process: rank 0 of a spawned job, or the
        # sampling rank of several.
        self._ranks_apart = mapping.world_size > 1 or (args.engine_process and launched is None)
        if self._ranks_apart and launched is None:
            from .distributed.remote import RemoteExecutor
            from .distributed.spawn import refuse_bare_mpirun

            refuse_bare_mpirun()

            # Started first: the ranks import torch while this process converts the engine.
            remote = self._executor = RemoteExecutor(mapping.world_size)
        elif launched is not None and mapping.world_size != launched.world_size:
            raise ValueError(f"tensor_parallel_size * pipeline_parallel_size = {mapping.world_size}, but this "
                             f"script was launched on {launched.world_size} MPI ranks")
        # The loader checks each rank file's checksum as it streams it: a cache entry that fails is rebuilt
        # and loaded once more; a saved engine raises CorruptEngineError.
        for attempt in range(2):
            info = self._build_engine(mapping)
            cfg = info.config
            self.eos_token_ids = list(cfg.get("eos_token_id") or [])
            self.vocab_size = cfg["vocab_size"]
            self._generation_defaults = generation_defaults(info.path)
            self.is_encoder_decoder = bool(cfg.get("is_encoder_decoder"))
            self._encdec = None
            if self.is_encoder_decoder:
                self._encdec = encdec_settings(info.path, cfg, args.max_encoder_input_len, args.max_num_tokens)
                self._generation_defaults = self._encdec.sampling_defaults  # transformers' generate settings
                if args.speculative_config is not None:
                    raise ValueError("speculative_config is not supported for encoder-decoder models")
            executor_kwargs = dict(
                max_batch_size=args.max_batch_size,
                max_num_tokens=args.max_num_tokens,
                max_seq_len=self.max_seq_len,
                tokens_per_block=args.tokens_per_block,
                enable_prefix_caching=args.kv_cache_config.enable_block_reuse,
                enable_chunked_prefill=args.enable_chunked_prefill,
                # A runtime setting (never part of the engine's cache key); on several ranks it reaches rank 0's
                # executor with the rest of these arguments.
                capacity_scheduler_policy=args.scheduler_config.capacity_scheduler_policy.core_value,
                # Pipeline stages overlap when the next step starts before the last stage ends this one; async
                # scheduling keeps two steps in flight itself (at every world size: the ranks fill placeholders).
                max_inflight_batches=1 if args.async_scheduling else mapping.pp_size,
                async_scheduling=args.async_scheduling,
                vocab_size=self.vocab_size,  # out-of-vocabulary ids fail their request, never the step
                # KV blocks behind a request's sliding window (engines saved before the key have none) go back.
                sliding_window=cfg.get("sliding_window") or 0,
            )
            if self.is_encoder_decoder:
                executor_kwargs["max_encoder_input_len"] = self._encdec.max_encoder_input_len
            load_format = info.build_config.get("load_format", "auto")
            cfg, adapters = adapter_settings(args, info)  # LoRA slots and prompt tables on the ranks, or None
            speculative = self._speculative_setup(cfg)
            if speculative is not None:
                executor_kwargs.update(speculative.executor_kwargs())
            try:
                if not self._ranks_apart:  # one rank, in this process
                    from .runtime.model_runner import ModelRunner

                    runner = self._local = ModelRunner(info.path, cfg, self.device, args.kv_cache_config,
                                                       args.tokens_per_block, load_format=load_format,
                                                       max_batch_size=args.max_batch_size, speculative=speculative,
                                                       adapters=adapters, attn_backend=args.attn_backend,
                                                       cuda_graph_batch_sizes=args.cuda_graph_batch_sizes,
                                                       max_num_tokens=args.max_num_tokens,
                                                       max_seq_len=self.max_seq_len,
                                                       max_encoder_input_len=self._encdec_input_len())
                else:
                    init = dict(engine_dir=str(info.path), engine_config=cfg, mapping=mapping.to_dict(),
                                device_type=self.device.type,
                                kv_cache_config=dataclasses.asdict(args.kv_cache_config),
                                tokens_per_block=args.tokens_per_block, load_format=load_format,
                                max_batch_size=args.max_batch_size,  # the decode graphs' largest batch
                                max_num_tokens=args.max_num_tokens,  # the profile step's (the cache's sizing)
                                max_seq_len=self.max_seq_len, max_encoder_input_len=self._encdec_input_len(),
                                adapters=adapters, attn_backend=args.attn_backend,
                                cuda_graph_batch_sizes=args.cuda_graph_batch_sizes,
                                speculative=None if speculative is None else speculative.to_dict())
                    if remote is not None:
                        remote.start(init, executor_kwargs)
                    else:
                        from .distributed.runner import DistributedRunner

                        runner = DistributedRunner(launched, init)
                break
            except CorruptEngineError as e:
                from .engine import discard_corrupt

                if attempt:
                    raise
                discard_corrupt(info.path, e, saved=info.source.kind == "engine",
                                lock_timeout=args.cache_lock_timeout)
                if remote is not None:  # its ranks stopped at the failed load: a new job loads the rebuilt engine
                    remote.shutdown()
                    remote = self._executor = RemoteExecutor(mapping.world_size)
        # Where the requests' logits processors and logits records go (see LLMState).
        held = runner if remote is None else remote
        if adapters:  # installs go to the in-process runner, rank 0's runner, or the spawned job's rank 0
            self._res.adapters = start_adapters(args, cfg, held.queue_adapter, self._res)
        if not self._ranks_apart:
            self._res.processors, self._res.records = runner.logits_processors, runner.records
        else:
            self._res.processors, self._res.records = held.processors, held.records
        if remote is not None:
            self.num_kv_blocks = remote.num_blocks
            self._start_responses()
            return
        if launched is not None:
            ref = weakref.ref(self)
            launched.shutdown_hooks.append(lambda: ref() is not None and ref().shutdown())
        self._runner = runner
        self.num_kv_blocks = runner.num_blocks
        self._executor = _core.Executor(_core.ExecutorConfig(num_blocks=runner.num_blocks, **executor_kwargs), runner)
        self._start_responses()

    def _build_engine(self, mapping):
        from .engine import build_engine
        from .quantization.apply import check_quant_device

        args = self.args
        self.device = _resolve_device(args.device)
        check_quant_device(args.quant, self.device)  # fail before a conversion the device could not run
        info = build_engine(args.model, dtype=args.dtype, load_format=args.load_format,
                            revision=args.revision, token=args.hf_token,
                            device_type=self.device.type, cache_dir=args.cache_dir,
                            full_check=args.full_engine_check, mapping=mapping.to_dict(),
                            embedding_sharding_dim=args.embedding_sharding_dim,
                            quantization=None if args.quant is None else args.quant.to_dict(),
                            cache_lock_timeout=args.cache_lock_timeout)
        self.engine_info = info
        self.engine_built = info.built
        max_pos = info.config["max_position_embeddings"]
        if args.max_seq_len is not None and args.max_seq_len > max_pos:
            raise ValueError(f"max_seq_len={args.max_seq_len} is invalid: the model supports at most "
                             f"{max_pos} positions (max_position_embeddings)")
        self.max_seq_len = args.max_seq_len or max_pos
        self.tokenizer = None
        if not args.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(args.tokenizer or info.path)
        return info

    def _encdec_input_len(self) -> int:
        """The longest encoder input (encoder-decoder models; 0 for others): the profile step's."""
        return 0 if self._encdec is None else self._encdec.max_encoder_input_len

    def _speculative_setup(self, target_config: dict):
        """The drafter's engine or EAGLE head for LlmArgs.speculative_config (None without it); the draft model's
        engine is built like the target's (same dtype and load format, one rank, unquantized)."""
        from .engine import build_engine
        from .speculative.setup import prepare

        args = self.args

        def build(model: str):
            return build_engine(model, dtype=args.dtype, load_format=args.load_format, token=args.hf_token,
                                device_type=self.device.type, cache_dir=args.cache_dir,
                                full_check=args.full_engine_check, cache_lock_timeout=args.cache_lock_timeout)

        return prepare(args, target_config, self.device, build, self.max_seq_len)

    def _start_responses(self) -> None:
        from .runtime.watchdog import StepWatchdog

        self._res.start_responses()
        # A step without progress for step_timeout ends in _on_stall; the watchdog holds this LLM by weakref.
        watched = self._runner if self._runner is not None else self._executor  # a spawned job: the RemoteExecutor
        self._watchdog = StepWatchdog(watched, self._on_stall, self.args.step_timeout)

    # ------------------------------------------------------------------ requests
    def _prompt_ids(self, prompt: Prompt, virtual_tokens: int = 0) -> tuple:
        """(text or None, token ids) of a prompt; with a prompt table (`virtual_tokens` per task) ids in
        [vocab_size, vocab_size + virtual_tokens) are its task's virtual tokens."""
        prompt = unwrap_prompt(prompt)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer (skip_tokenizer_init=True)")
            if prompt == "":
                raise RequestError("the prompt is empty")
            return prompt, list(self.tokenizer.encode(prompt))
        if not isinstance(prompt, Sequence):
            raise RequestError(f"a prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}")
        ids = list(prompt)
        if not ids:
            raise RequestError("the prompt is empty (no token ids)")
        # Plain ints (the usual case) are checked by C loops: set of types, min, max.
        plain = set(map(type, ids)) == {int}
        if (not plain and any(not isinstance(t, int) or isinstance(t, bool) for t in ids)) \
                or min(ids) < 0 or max(ids) >= self.vocab_size + virtual_tokens:
            if virtual_tokens and plain and min(ids) >= 0:
                from .errors import AdapterError

                raise AdapterError(f"prompt token id {max(ids)} is beyond the prompt table: ids from vocab_size="
                                   f"{self.vocab_size} stand for the task's {virtual_tokens} virtual tokens, so "
                                   f"they must be < {self.vocab_size + virtual_tokens}")
            raise RequestError(f"prompt token ids must be ints in [0, {self.vocab_size})"
                               + (" (a prompt table's virtual tokens need prompt_adapter_request=...)"
                                  if plain and min(ids) >= 0 else ""))
        return None, ids

    def _check_length(self, ids: List[int]) -> None:
        if len(ids) >= self.max_seq_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; max_seq_len is {self.max_seq_len}, "
                               f"so a prompt may have at most {self.max_seq_len - 1}")

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json settings (temperature, top_k, top_p,
        min_p, repetition_penalty, max_new_tokens), as vLLM; used when a call gets no params."""
        return SamplingParams(**self._generation_defaults)

    def _check_params(self, params: Optional[SamplingParams]) -> SamplingParams:
        params = check_params(self.get_default_sampling_params() if params is None else params,
                              vocab_size=self.vocab_size, max_logprobs=self.args.max_logprobs,
                              max_batch_size=self.args.max_batch_size,
                              max_num_tokens=self.args.max_num_tokens, tokenizer=self.tokenizer)
        if self._ranks_apart:
            check_multi_rank(params)
        if params.use_beam_search and self.args.speculative_config is not None:
            raise field_error("use_beam_search", True, "beam search cannot run with speculative decoding "
                              "(LLM(speculative_config=...)); sample or decode greedily instead")
        if params.guided_decoding is not None:
            self._guide(params, None)  # compiles the grammar (once per distinct one): an invalid one raises here
        return params

    _grammars_lock = threading.Lock()

    def _guide(self, params: SamplingParams, processor):
        """A request's GrammarGuide for the runner (its grammar compiled, or found in the compiled-grammar cache),
        with the request's own logits processor `processor`; GuidedDecodingError when the grammar is invalid."""
        from .guided_decoding import GrammarBackend, GrammarGuide

        if self.tokenizer is None:
            raise RequestError("guided decoding needs a tokenizer (skip_tokenizer_init=True)")
        end_ids = [params.end_id] if params.end_id is not None else self.eos_token_ids
        if not end_ids:
            raise RequestError("guided decoding ends a request at its grammar's end through EOS, and this model "
                               "has no eos_token_id: set SamplingParams.end_id")
        with self._grammars_lock:
            backend = getattr(self, "_grammars", None)
            if backend is None:
                backend = self._grammars = GrammarBackend(self.tokenizer, self.vocab_size)
        spec = params.guided_decoding.spec()
        return GrammarGuide(spec, end_ids, processor, compiled=backend.compile(spec),
                            tokenizer_source=str(self.args.tokenizer or self.engine_info.path),
                            vocab_size=self.vocab_size)

    def _prepare(self, prompt: Prompt, checked_params: SamplingParams, lora_request=None,
                 prompt_adapter_request=None):
        """(text, ids, params, adapters, encoder) of a prompt checked against this LLM; the params come checked
        (_check_params); adapters: the request's loaded LoRA adapter and prompt table (None: the base model);
        encoder: an encoder-decoder model's (encoder text, encoder ids), where text and ids are the decoder's."""
        adapters = None
        if lora_request is not None or prompt_adapter_request is not None:
            manager = self._res.adapters
            if manager is None:
                from .errors import AdapterError

                which = "lora_request" if lora_request is not None else "prompt_adapter_request"
                raise AdapterError(f"{which} needs an LLM started with adapters enabled: LLM(..., enable_lora=True) "
                                   "or LLM(..., lora_config=LoraConfig(...)) for LoRA, LLM(..., "
                                   "enable_prompt_adapter=True) for prompt tables")
            adapters = manager.prepare(lora_request, prompt_adapter_request)
        if self.is_encoder_decoder:
            text, ids, enc_text, enc_ids = split_prompt(prompt, self._encdec, self.tokenizer, self.vocab_size)
            self._check_length(ids)
            return text, ids, checked_params, adapters, (enc_text, enc_ids)
        if isinstance(prompt, dict) and ("encoder_prompt" in prompt or "decoder_prompt" in prompt):
            raise RequestError("'encoder_prompt' / 'decoder_prompt' are for encoder-decoder models; this model is "
                               "decoder-only: pass 'prompt' or 'prompt_token_ids'")
        prompt_table = adapters.prompt if adapters is not None else None
        text, ids = self._prompt_ids(prompt, prompt_table.num_tokens if prompt_table is not None else 0)
        if prompt_table is not None:
            vocab = self.vocab_size
            if max(ids) < vocab:  # no virtual token given: the task's go in front (as vLLM prepends them)
                count = prompt_adapter_request.prompt_adapter_num_virtual_tokens or prompt_table.num_tokens
                ids = list(range(vocab, vocab + count)) + ids
            if checked_params.prompt_logprobs is not None or checked_params.repetition_penalty != 1.0:
                from .errors import AdapterError

                raise AdapterError("prompt_logprobs and repetition_penalty read the prompt's token ids, which a "
                                   "prompt table's virtual tokens are not: unset them for prompt-tuned requests")
        self._check_length(ids)
        return text, ids, checked_params, adapters, None

    def _enqueue(self, prepared: Sequence[tuple], streaming: bool) -> List[RequestOutput]:
        """Enqueue checked (text, ids, params, adapters, encoder) in one executor call: the executor sees them together
        (its next step schedules from all of them) and takes all or, on an error, none. A request whose adapter
        finds no free device slot waits on the user's side until one frees (AdapterManager)."""
        self._check_alive()
        outs, requests = [], []
        manager = self._res.adapters
        slotted, waiting = [], []  # request ids that took adapter slots, and those waiting for one
        processors, records = self._res.processors, self._res.records
        made: Dict[int, Any] = {}  # id(params) -> a core Request made from them, whose settings the next reuse
        pickled: Dict[int, bytes] = {}  # id(params) -> their logits processor, pickled for the sampling rank
        with self._lock:
            try:
                encdec = self._encdec
                for text, ids, params, adapters, encoder in prepared:
                    beam = params.use_beam_search
                    # Sequences that may be dropped (best_of > n) or reordered (beams) are reported at the end.
                    stream = streaming and not beam and params.num_sequences == params.n
                    processor = params.combined_logits_processor()
                    if params.guided_decoding is not None:
                        processor = self._guide(params, processor)
                    rid = next(self._ids)
                    make = functools.partial(
                        core_request, rid, params=params, eos_token_ids=self.eos_token_ids,
                        max_seq_len=self.max_seq_len, seed=params.effective_seed(secrets.randbits(63)),
                        tokenizer=self.tokenizer, token_history=processor is not None)
                    if encoder is not None:
                        make = functools.partial(make, encoder_token_ids=encoder[1],
                                                 forced_bos_token_id=encdec.forced_bos_token_id,
                                                 forced_eos_token_id=encdec.forced_eos_token_id)
                    if adapters is None:
                        request = make(ids, like=made.get(id(params)))
                        made.setdefault(id(params), request)
                        requests.append(request)
                    out = RequestOutput(rid, text, ids, abort_fn=self._res.abort, streaming=stream,
                                        num_sequences=params.n if beam else params.num_sequences)
                    if encoder is not None:
                        out.encoder_prompt, out.encoder_prompt_token_ids = encoder
                    outs.append(out)
                    self._live[rid] = LiveRequest(out, params, self.tokenizer, len(out.outputs),
                                                  abort_seq=functools.partial(self._res.abort, rid),
                                                  speculative=self.args.speculative_config is not None)
                    if processor is not None:
                        if self._ranks_apart and id(params) not in pickled:
                            pickled[id(params)] = pickled_processor(processor)
                        processors[rid] = pickled[id(params)] if self._ranks_apart else processor
                    if (params.prompt_logprobs is not None or params.return_context_logits
                            or params.return_generation_logits):
                        records.open(rid)
                    if adapters is not None:  # after the registrations above: a waiting one may start at once
                        slots = manager.acquire(rid, adapters)
                        if slots is None:  # every slot serves running requests: enqueued when one frees
                            waiting.append((rid, adapters, functools.partial(
                                _enqueue_waiting, self._executor, make, ids, adapters, self.vocab_size)))
                        else:
                            slotted.append(rid)
                            requests.append(make(**adapters.core_fields(ids, slots, self.vocab_size)))
                if len(requests) == 1:
                    self._executor.enqueue(requests[0])
                elif requests:
                    self._executor.enqueue_many(requests)
            except BaseException:
                for out in outs:
                    self._live.pop(out.request_id, None)  # the response thread may have failed it already
                    processors.pop(out.request_id, None)
                    records.pop(out.request_id)
                for rid in slotted:
                    manager.release(rid)
                raise
        if waiting:  # once the others are in: a slot freed meanwhile serves them at once
            for rid, adapters, start in waiting:
                manager.wait(rid, adapters, start)
            manager.release(None)
        return outs

    def generate_async(self, prompt: Prompt, sampling_params: Optional[SamplingParams] = None,
                       streaming: bool = False, lora_request=None, prompt_adapter_request=None) -> RequestOutput:
        """Enqueue one request and return its RequestOutput at once (await, .result() or iterate it).
        lora_request: a LoRARequest (None: the base model); prompt_adapter_request: a PromptAdapterRequest."""
        return self._enqueue([self._prepare(prompt, self._check_params(sampling_params), lora_request,
                                            prompt_adapter_request)], streaming)[0]

    def _generate_async_batch(self, prompts: Sequence[Prompt],
                              sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                              lora_request=None, prompt_adapter_request=None) -> List[RequestOutput]:
        """generate_async for a list of prompts in one executor call; every prompt is checked before any
        is enqueued, so a bad one leaves nothing half-done."""
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        checked: Dict[int, SamplingParams] = {}  # id(params) -> checked params: one check per distinct object
        loras = per_prompt(lora_request, len(prompts), "lora_request")
        tables = per_prompt(prompt_adapter_request, len(prompts), "prompt_adapter_request")
        prepared = []
        for prompt, sp, lora, table in zip(prompts, params, loras, tables):
            if id(sp) not in checked:
                checked[id(sp)] = self._check_params(sp)
            prepared.append(self._prepare(prompt, checked[id(sp)], lora, table))
        return self._enqueue(prepared, streaming=False) if prepared else []

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True, lora_request=None, prompt_adapter_request=None
                 ) -> Union[RequestOutput, List[RequestOutput]]:
        """Generate for one prompt or a list of prompts (text, token-id lists or dicts); blocks.
        lora_request / prompt_adapter_request: one for every prompt, or a list with one per prompt (None in it:
        the base model)."""
        single = isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple)) and len(prompts) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts))
        if not single and not isinstance(prompts, Sequence):
            raise RequestError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
        with frozen_heap():
            return self._generate_wait([prompts] if single else list(prompts), sampling_params, single, use_tqdm,
                                       lora_request, prompt_adapter_request)

    def _generate_wait(self, prompts, sampling_params, single: bool, use_tqdm: bool, lora_request=None,
                       prompt_adapter_request=None):
        outputs = self._generate_async_batch(prompts, sampling_params, lora_request, prompt_adapter_request)
        bar = None
        try:
            if use_tqdm and len(outputs) > 1:
                from tqdm.auto import tqdm
                bar = tqdm(total=len(outputs), desc="Generating", unit="req")
            for out in outputs:
                out.result()
                if bar is not None:
                    bar.update(1)
        except KeyboardInterrupt:
            self._abort_all(outputs)  # Ctrl-C: nothing of this call keeps running
            raise
        finally:
            if bar is not None:
                bar.close()
        return outputs[0] if single else outputs

    def _abort_all(self, outputs: Sequence[RequestOutput], wait_s: float = 10.0) -> None:
        """Abort every unfinished request of `outputs` and wait (up to `wait_s`) until each has left the
        executor, so that the executor's stats no longer count them."""
        for out in outputs:
            out.abort()
        deadline = time.monotonic() + wait_s
        for out in outputs:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                out.result(timeout=left)
            except Exception:  # its error, or a timeout: what is left is the executor's to settle
                pass

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, lora_request=None,
             prompt_adapter_request=None, **template_kwargs):
        """Apply the tokenizer's chat template to one conversation or a list of them, then generate (with
        lora_request / prompt_adapter_request as generate takes them)."""
        if self.is_encoder_decoder:
            raise RequestError("chat() applies a chat template to a decoder-only model; this model is "
                               "encoder-decoder: call generate() with the text to encode")
        if self.tokenizer is None:
            raise RequestError("chat() needs a tokenizer (skip_tokenizer_init=True)")
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else list(messages)
        if not convs or any(not isinstance(c, (list, tuple)) or not c or
                            not all(isinstance(m, dict) for m in c) for c in convs):
            raise RequestError("messages must be a conversation (a non-empty list of message dicts) "
                               "or a list of conversations")
        prompts = [{"prompt_token_ids": self.chat_token_ids(c, add_generation_prompt, **template_kwargs)}
                   for c in convs]
        outs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request,
                             prompt_adapter_request=prompt_adapter_request)
        return outs[0] if single else outs

    def chat_token_ids(self, conversation, add_generation_prompt: bool = True, **template_kwargs) -> List[int]:
        """The prompt ids chat() sends: tokenizer.apply_chat_template(conversation, tokenize=True, ...)."""
        ids = self.tokenizer.apply_chat_template(list(conversation), add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, **template_kwargs)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # a BatchEncoding (transformers >= 5)
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def _fail_all(self, error: BaseException) -> None:
        self._res.fail_all(error)

    # ------------------------------------------------------------------ lifecycle
    def _check_alive(self) -> None:
        if self._death is not None:
            from .errors import StepTimeoutError

            dead = StepTimeoutError if isinstance(self._death, StepTimeoutError) else WorkerDiedError
            raise dead(f"this LLM was shut down: {self._death}")
        if self._closed or self._executor is None:
            raise ExecutorDeadError("this LLM has been shut down")

    # ------------------------------------------------------------------ adapters
    def _adapters(self):
        from .errors import AdapterError

        self._check_alive()
        if self._res.adapters is None or self.args.lora_config is None:
            raise AdapterError("this LLM serves no LoRA adapters: start it with LLM(..., enable_lora=True) or "
                               "LLM(..., lora_config=LoraConfig(...))")
        return self._res.adapters

    def add_lora(self, lora_request) -> bool:
        """Load a LoRA adapter (into host memory; onto the device with its first request) and remember its name;
        True if its id was new. Errors (a missing path, a rank above max_lora_rank, ...) raise AdapterError."""
        return self._adapters().add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        """Forget adapter `lora_id` (its requests in flight finish with it); False if it was unknown."""
        return self._adapters().remove_lora(lora_id)

    def list_loras(self) -> set:
        """The ids of the adapters added or requested so far (and not removed)."""
        return set(self._adapters().list_loras())

    def get_stats(self) -> dict:
        """Executor counters: free/used/cached KV blocks, running/waiting requests, cache hits, and the draft
        tokens verified and accepted (speculative decoding)."""
        self._check_alive()
        return dict(self._executor.stats())

    def save(self, engine_dir: str) -> None:
        """Copy this LLM's engine to `engine_dir`; `LLM(engine_dir)` loads it without converting."""
        from .engine import save_engine
        save_engine(self.engine_info.path, engine_dir)

    def shutdown(self) -> None:
        """Stop the executor; unfinished requests finish with "abort". Safe to call twice.

        An LLM that nothing references any more does this itself when it is collected."""
        watchdog = getattr(self, "_watchdog", None)
        if watchdog is None:
            self._finalizer()
        else:  # waits for the close, but not for a step the watchdog gave up on (a thread stuck in a C call)
            watchdog.close(self._finalizer)

    def _on_stall(self, error) -> None:
        """The step watchdog's call when a step made no progress for step_timeout seconds: every live request
        fails with `error` (StepTimeoutError), later calls raise it, the stuck step is interrupted (or the MPI
        job killed), and the LLM shuts down in the background."""
        self._death = error
        self._fail_all(error)
        session = getattr(self._runner, "session", None)
        if session is not None:  # llmapi-launch: the job's ranks cannot be told to exit in order any more
            session.broken = str(error)
        self._watchdog.abandon(self._finalizer)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
