"""From SamplingParams to the C++ core's Request: the model's defaults and limits, and the field mapping."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import types
from pathlib import Path
from typing import List, Optional

from . import _core
from .errors import RequestError
from .sampling_params import SamplingParams, field_error

# generation_config.json fields that become default sampling settings (as vLLM reads them).
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
_EARLY_STOPPING = {False: 0, True: 1, "never": 2}


def generation_defaults(engine_dir: Path) -> dict:
    """SamplingParams fields from the engine's generation_config.json (those it sets)."""
    path = Path(engine_dir) / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return {ours: config[theirs] for theirs, ours in _GENERATION_DEFAULTS.items() if config.get(theirs) is not None}


def _token_ids(params: SamplingParams):
    """(field, its value, the token ids it names) for every id-valued field."""
    yield "end_id", params.end_id, [] if params.end_id is None else [params.end_id]
    yield "stop_token_ids", params.stop_token_ids, params.stop_token_ids or []
    yield "bad_token_ids", params.bad_token_ids, [t for w in params.bad_word_ids for t in w]
    yield "logit_bias", params.logit_bias, list(params.logit_bias or {})


def check_params(params: SamplingParams, *, vocab_size: int, max_logprobs: int, max_batch_size: int,
                 max_num_tokens: int, tokenizer) -> SamplingParams:
    """What the params ask of this model and LLM: ValueError naming the field when it cannot be had.
    Returns a checked snapshot: writes to `params` after this call do not reach the requests made now."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    params = dataclasses.replace(params)  # validates again: lists and dicts may have changed in place
    for name in ("logprobs", "prompt_logprobs"):
        v = getattr(params, name)
        if v is not None and v > max_logprobs:
            raise field_error(name, v, f"must be <= max_logprobs={max_logprobs} (LLM(max_logprobs=...))")
    width = "best_of" if params.best_of is not None else "n"  # the field that set num_sequences
    if params.num_sequences > max_batch_size:
        raise field_error(width, params.num_sequences,
                          f"a request's sequences must fit max_batch_size={max_batch_size}")
    if params.use_beam_search and params.num_sequences > max_num_tokens:
        raise field_error(width, params.num_sequences,
                          f"the beams step together, so the beam width must fit max_num_tokens={max_num_tokens}")
    for name, value, ids in _token_ids(params):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise field_error(name, value, f"token id {bad[0]} is not < vocab_size={vocab_size} (this model's "
                                           "vocabulary)")
    if tokenizer is None:
        if params.bad_strings:
            raise RequestError("bad strings need a tokenizer (skip_tokenizer_init=True)")
        if params.stop_strings:
            raise RequestError("stop strings need a tokenizer (skip_tokenizer_init=True)")
        if params.detokenize:
            params.detokenize = False
    return params


_PROCESSOR_RULE = ("with tensor_parallel_size * pipeline_parallel_size > 1 a logits processor runs on the rank that "
                   "samples, another process: it must be importable there, a module-level function or an "
                   "instance of a module-level class (pickled by reference), not a lambda, a closure or "
                   "something defined in __main__")


class _ByReference(pickle.Pickler):
    """A pickler that refuses functions and classes another process could not import by name."""

    def reducer_override(self, obj):
        if isinstance(obj, (types.FunctionType, type)):
            module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
            if module in (None, "__main__") or "<" in name:  # <lambda>, <locals>
                raise pickle.PicklingError(f"{module}.{name} is not importable by name")
        return NotImplemented


def pickled_processor(processor) -> bytes:
    """A request's logits processor (SamplingParams.combined_logits_processor) pickled by reference for the
    sampling rank; ValueError naming the rule when it cannot be."""
    buffer = io.BytesIO()
    try:
        _ByReference(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(processor)
    except Exception as e:
        raise ValueError(f"SamplingParams logits_processor: {_PROCESSOR_RULE} ({type(e).__name__}: {e})") from None
    return buffer.getvalue()


def check_multi_rank(params: SamplingParams) -> None:
    """What tensor / pipeline parallel runs ask beyond one rank: every decoding setting works as on one rank,
    and a logits processor must pickle by reference (ValueError naming the rule)."""
    processor = params.combined_logits_processor()
    if processor is not None:
        pickled_processor(processor)


def _bad_words(params: SamplingParams, tokenizer) -> List[List[int]]:
    words = [list(w) for w in params.bad_word_ids]
    words += [list(tokenizer.encode(s, add_special_tokens=False)) for s in params.bad_strings]
    return [w for w in words if w]


def core_request(request_id: int, prompt_ids: List[int], params: SamplingParams, *, eos_token_ids: List[int],
                 max_seq_len: int, seed: int, tokenizer, token_history: bool,
                 like: "_core.Request | None" = None, adapter_slot: int = -1, cache_salt: int = 0,
                 prompt_table_size: int = 0, encoder_token_ids: Optional[List[int]] = None,
                 forced_eos_token_id: int = -1, forced_bos_token_id: int = -1) -> "_core.Request":
    """The core's Request for a checked prompt and params (max_tokens capped by max_seq_len). `like`: a
    Request this function made from the same params and keyword arguments (encoder_token_ids aside); its
    converted settings are copied (Request.with_prompt) rather than converted again from Python, the larger
    part of the cost. adapter_slot, cache_salt, prompt_table_size: the request's adapters
    (llmapi.lora.manager.Prepared). Encoder-decoder models: `encoder_token_ids` is the encoder's input
    (None or empty: a decoder-only request; prompt_ids is then the decoder prompt); forced_eos_token_id (-1:
    none) is the only id its last allowed token may be, forced_bos_token_id (-1: none) the only id the token after
    a one-token prompt (the decoder start) may be (the model's generation config)."""
    adapters = dict(adapter_slot=adapter_slot, cache_salt=cache_salt, prompt_table_size=prompt_table_size)
    encoder = list(encoder_token_ids or [])
    room = max_seq_len - len(prompt_ids)
    max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
    min_tokens = min(params.min_tokens, max_tokens)
    if like is not None:
        return like.with_prompt(request_id, prompt_ids, max_tokens, min_tokens, seed, **adapters,
                                encoder_token_ids=encoder)
    optional = (lambda v: -1 if v is None else v)
    return _core.Request(
        request_id=request_id, prompt_token_ids=prompt_ids, max_tokens=max_tokens,
        min_tokens=min_tokens,
        eos_token_ids=[params.end_id] if params.end_id is not None else eos_token_ids,
        stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos,
        temperature=float(params.temperature), top_k=max(params.top_k, 0), top_p=float(params.top_p),
        seed=seed, min_p=float(params.min_p), repetition_penalty=float(params.repetition_penalty),
        presence_penalty=float(params.presence_penalty), frequency_penalty=float(params.frequency_penalty),
        bad_words=_bad_words(params, tokenizer),
        logit_bias={int(k): float(v) for k, v in (params.logit_bias or {}).items()},
        num_sequences=params.num_sequences, beam_search=params.use_beam_search,
        length_penalty=float(params.length_penalty), early_stopping=_EARLY_STOPPING[params.early_stopping],
        num_returned=params.n, logprobs=optional(params.logprobs),
        prompt_logprobs=optional(params.prompt_logprobs), context_logits=params.return_context_logits,
        generation_logits=params.return_generation_logits, token_history=token_history,
        encoder_token_ids=encoder, no_repeat_ngram_size=params.no_repeat_ngram_size,
        forced_eos_token_id=forced_eos_token_id, forced_bos_token_id=forced_bos_token_id, **adapters)


__all__ = ["generation_defaults", "check_params", "check_multi_rank", "pickled_processor", "core_request"]
