"""Structured outputs (guided decoding) with xgrammar: the request's grammar, its compilation, and the
per-sequence token mask that the decoding step applies.

A request's GuidedDecodingParams (a JSON schema, any JSON object, a regex, an EBNF grammar or a list of
choices) is compiled once per distinct grammar by the LLM's GrammarBackend (an xgrammar GrammarCompiler over
the LLM's tokenizer; compiled grammars are cached by content), before the request is queued: an invalid one
raises GuidedDecodingError there. The request then runs with a GrammarGuide in the runner's logits-processor
table (sent, like a logits processor, to the sampling rank when there are several ranks). Each step,
`apply_grammar_masks` brings every guided sequence's GrammarMatcher up to the sequence's tokens (the runner's
token history: a guided request is never scheduled ahead of its last token), fills their token bitmasks on the
host and masks the rows' logits on their device in one batched operation.

The grammar's end is the request's EOS: once the grammar is complete the mask allows EOS (and whatever the
grammar still allows after it), and a grammar that can only end leaves EOS alone, so the request finishes
there as on EOS (finish_reason "stop", stop_reason the EOS id). A matcher that fails (a token it rejects, an
xgrammar error) fails its request alone with GuidedDecodingError.
"""

from __future__ import annotations

import collections
import json as _json
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import GuidedDecodingError, MissingDependencyError

_KINDS = ("json", "json_object", "regex", "grammar", "choice")
# Compiled grammars a backend keeps (least recently used first out): at most this many, and this many bytes.
_CACHE_ENTRIES = 512
_CACHE_BYTES = 512 << 20


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}...{text[-12:]}"


def _is_model_class(value: Any) -> bool:
    """A pydantic model class (its JSON schema is the schema), as TensorRT-LLM's json field takes it."""
    return isinstance(value, type) and hasattr(value, "model_json_schema")


@dataclass(repr=False)
class GuidedDecodingParams:
    """The grammar a request's output must follow: exactly one field is set (TensorRT-LLM's names; vLLM's
    StructuredOutputsParams is the same class)."""

    json: Optional[Union[str, Dict[str, Any], type]] = None
    """A JSON schema (a dict, its JSON text, or a pydantic model class): the output is a JSON value valid
    against it."""
    json_object: bool = False
    """True: the output is any JSON object."""
    regex: Optional[str] = None
    """A regular expression the whole output matches."""
    grammar: Optional[str] = None
    """An EBNF grammar (xgrammar's dialect of GBNF, rule `root` first): the output is a sentence of it."""
    choice: Optional[List[str]] = None
    """The output is exactly one of these strings."""
    disable_any_whitespace: bool = False
    """json / json_object: no free whitespace between JSON tokens (compact JSON, ", " and ": " separators;
    vLLM's option). By default any whitespace is allowed there, which small models may repeat endlessly."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ValueError naming the field when the fields do not set exactly one grammar of the right type."""
        given = [k for k in _KINDS if (getattr(self, k) is not None and k != "json_object")
                 or (k == "json_object" and self.json_object is not False)]
        if len(given) != 1:
            raise ValueError("GuidedDecodingParams needs exactly one of json, json_object, regex, grammar, choice; "
                             f"got {', '.join(given) if given else 'none'}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(f"GuidedDecodingParams.disable_any_whitespace={_short(self.disable_any_whitespace)} is "
                             "invalid: must be True or False")
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json":
            if isinstance(value, str):
                if not value.strip():
                    raise ValueError("GuidedDecodingParams.json='' is invalid: must be a JSON schema")
            elif isinstance(value, dict):
                try:
                    _json.dumps(value)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"GuidedDecodingParams.json={_short(value)} is invalid: the schema must be "
                                     f"JSON-serialisable ({e})") from None
            elif not _is_model_class(value):
                raise ValueError(f"GuidedDecodingParams.json={_short(value)} is invalid: must be a JSON schema (a "
                                 "dict or its JSON text) or a pydantic model class")
        elif kind == "json_object":
            if value is not True:
                raise ValueError(f"GuidedDecodingParams.json_object={_short(value)} is invalid: must be True or False")
        elif kind in ("regex", "grammar"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"GuidedDecodingParams.{kind}={_short(value)} is invalid: must be a non-empty string")
        elif (not isinstance(value, (list, tuple)) or not value
              or any(not isinstance(c, str) or not c for c in value)):
            raise ValueError(f"GuidedDecodingParams.choice={_short(value)} is invalid: must be a non-empty list of "
                             "non-empty strings")

    def __repr__(self) -> str:  # the fields that are set
        shown = [f"{k}={getattr(self, k)!r}" for k in _KINDS if getattr(self, k) not in (None, False)]
        if self.disable_any_whitespace is not False:
            shown.append(f"disable_any_whitespace={self.disable_any_whitespace!r}")
        return f"GuidedDecodingParams({', '.join(shown)})"

    @property
    def kind(self) -> str:
        """The field that is set: json, json_object, regex, grammar or choice."""
        return next(k for k in _KINDS if (getattr(self, k) is not None and k != "json_object")
                    or (k == "json_object" and self.json_object))

    def spec(self) -> Tuple[str, str, bool]:
        """(kind, text, any_whitespace): the grammar as the compiler takes it (kind json, regex or grammar), and
        the key of the compiled-grammar cache."""
        kind = self.kind
        value = getattr(self, kind)
        any_whitespace = not self.disable_any_whitespace
        if kind == "json":
            if _is_model_class(value):
                value = value.model_json_schema()
            # The schema's key order stays: it is the order of the output's properties.
            return kind, value if isinstance(value, str) else _json.dumps(value), any_whitespace
        if kind == "json_object":
            return "json", '{"type": "object"}', any_whitespace
        if kind == "choice":
            # One EBNF alternative per choice; a JSON string literal is an EBNF string literal.
            return "grammar", "root ::= " + " | ".join(_json.dumps(c, ensure_ascii=False) for c in value), True
        return kind, value, True

    @classmethod
    def coerce(cls, value) -> Optional["GuidedDecodingParams"]:
        """None, a GuidedDecodingParams, or one made from a dict of its fields; ValueError saying why not."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError("must be a GuidedDecodingParams, a dict of its fields, or None")
        if any(not isinstance(k, str) for k in value):
            raise ValueError("a dict of GuidedDecodingParams fields must have field names (strings) as keys")
        from .config import from_kwargs

        return from_kwargs(cls, value, "GuidedDecodingParams()")


StructuredOutputsParams = GuidedDecodingParams  # vLLM's name


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # a dependency of the package: only a broken install lacks it
        raise MissingDependencyError(f"guided decoding needs xgrammar: pip install xgrammar ({e})") from None
    return xgrammar


_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: (Check failed: .*? is false: )?")


def _xgrammar_message(error: BaseException) -> str:
    """xgrammar's message without its C++ log prefix ("[12:00:00] /path/file.cc:94: ")."""
    return _XGRAMMAR_PREFIX.sub("", str(error).strip()).strip()


def _is_length(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bounded_strings_as_patterns(node):
    """The schema with every string bounded by minLength / maxLength (and no pattern, format, enum or const)
    bounded by the equal pattern ^.{min,max}$ instead. xgrammar lowers a length bound to a repetition of any
    character but quote, backslash, CR and LF, which lets raw control characters into the string (invalid
    JSON, its issue #800); its pattern path keeps JSON strings valid."""
    if isinstance(node, list):
        return [_bounded_strings_as_patterns(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _bounded_strings_as_patterns(v) for k, v in node.items()}
    low, high = node.get("minLength", 0), node.get("maxLength")
    if (node.get("type") == "string" and ("minLength" in node or "maxLength" in node)
            and not {"pattern", "format", "enum", "const"} & node.keys()
            and _is_length(low) and (high is None or (_is_length(high) and low <= high))):
        node.pop("minLength", None)
        node.pop("maxLength", None)
        node["pattern"] = f"^.{{{low},{'' if high is None else high}}}$"
    return node


def _json_schema_text(text: str) -> str:
    """The schema's JSON text as the compiler gets it (see _bounded_strings_as_patterns); text that is not
    JSON goes as it is, for xgrammar to name the problem."""
    try:
        schema = _json.loads(text)
    except ValueError:
        return text
    return _json.dumps(_bounded_strings_as_patterns(schema))


class GrammarBackend:
    """An xgrammar GrammarCompiler over one tokenizer and vocabulary size, with its compiled grammars cached by
    content (least recently used out past _CACHE_ENTRIES grammars or _CACHE_BYTES): a grammar is compiled once
    however many requests use it. Thread-safe."""

    def __init__(self, tokenizer, vocab_size: int):
        xgr = _xgrammar()
        self.vocab_size = vocab_size
        try:  # each request's matcher names its own end tokens (the request's EOS ids)
            self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        except Exception as e:
            raise GuidedDecodingError(f"guided decoding cannot use this tokenizer ({type(tokenizer).__name__}): "
                                      f"{_xgrammar_message(e)}") from None
        # This class's cache, bounded, is the only one: xgrammar's own would keep every grammar ever compiled.
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=min(8, os.cpu_count() or 1),
                                            cache_enabled=False)
        self._bytes = 0
        self._cache: "collections.OrderedDict[Tuple[str, str, bool], Any]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self.compilations = 0
        """Grammars compiled so far (cache misses)."""

    def compile(self, spec: Tuple[str, str, bool]):
        """The xgrammar CompiledGrammar of GuidedDecodingParams.spec(); GuidedDecodingError naming the problem
        when the schema, regex or grammar is invalid."""
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                return compiled
        kind, text, any_whitespace = spec
        try:
            if kind == "json":
                compiled = self.compiler.compile_json_schema(_json_schema_text(text), any_whitespace=any_whitespace)
            elif kind == "regex":
                compiled = self.compiler.compile_regex(text)
            else:
                compiled = self.compiler.compile_grammar(text)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError / its InvalidJSONError
            what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(kind, kind)
            raise GuidedDecodingError(f"guided_decoding: invalid {what} {_short(text)}: "
                                      f"{_xgrammar_message(e)}") from None
        with self._lock:
            self.compilations += 1
            if spec not in self._cache:  # another thread may have compiled it meanwhile
                self._cache[spec] = compiled
                self._bytes += compiled.memory_size_bytes
            while len(self._cache) > 1 and (len(self._cache) > _CACHE_ENTRIES or self._bytes > _CACHE_BYTES):
                _, dropped = self._cache.popitem(last=False)
                self._bytes -= dropped.memory_size_bytes
        return compiled


# Backends of the sampling rank of a multi-rank LLM, by (tokenizer source, vocabulary size).
_RANK_BACKENDS: Dict[Tuple[str, int], GrammarBackend] = {}
_RANK_LOCK = threading.Lock()


def _rank_backend(tokenizer_source: str, vocab_size: int) -> GrammarBackend:
    with _RANK_LOCK:
        backend = _RANK_BACKENDS.get((tokenizer_source, vocab_size))
        if backend is None:
            from .tokenizer import load_tokenizer

            backend = GrammarBackend(load_tokenizer(tokenizer_source), vocab_size)
            _RANK_BACKENDS[(tokenizer_source, vocab_size)] = backend
        return backend


class GrammarGuide:
    """One request's guided decoding in the runner: its compiled grammar, its end tokens, and a GrammarMatcher
    per sequence (per state slot), kept in step with the sequence's tokens. The request's own logits
    processor, if any, rides along (`processor`) and runs before the mask.

    It pickles without its compiled grammar and matchers (by reference, as a logits processor must): the
    sampling rank of a multi-rank LLM compiles the grammar itself, once, from `tokenizer_source`.
    """

    def __init__(self, spec: Tuple[str, str, bool], end_ids: Sequence[int], processor: Optional[Callable] = None,
                 compiled=None, tokenizer_source: Optional[str] = None, vocab_size: int = 0):
        self.spec = spec
        self.end_ids = [int(t) for t in end_ids]
        self.processor = processor
        self.tokenizer_source, self.vocab_size = tokenizer_source, vocab_size
        self.compiled = compiled
        self.matchers: Dict[int, Tuple[Any, int, int]] = {}  # slot -> (matcher, tokens taken, the last one)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["compiled"], state["matchers"] = None, {}
        return state

    def _compiled(self):
        if self.compiled is None:
            if self.tokenizer_source is None:
                raise GuidedDecodingError("the grammar was not compiled and no tokenizer is known to compile it")
            self.compiled = _rank_backend(self.tokenizer_source, self.vocab_size).compile(self.spec)
        return self.compiled

    def matcher(self, slot: int, history: Sequence[int], start: int, fresh: bool):
        """The matcher of the sequence in `slot` after taking its output tokens history[start:]. `fresh`: the
        slot's state was reset or copied this step, so the matcher starts over. Raises GuidedDecodingError
        when the grammar rejects a token."""
        entry = None if fresh else self.matchers.get(slot)
        length = len(history) - start
        if entry is not None:
            matcher, taken, last = entry
            if taken > length or (taken and history[start + taken - 1] != last):
                entry = None  # the slot's history was rebuilt (a preempted sequence recomputed)
        if entry is None:
            matcher, taken = _xgrammar().GrammarMatcher(self._compiled(), override_stop_tokens=self.end_ids), 0
        for i in range(taken, length):
            if not matcher.accept_token(int(history[start + i])):
                self.matchers.pop(slot, None)
                raise GuidedDecodingError(f"the grammar rejects output token {int(history[start + i])} at "
                                          f"position {i}")
        self.matchers[slot] = (matcher, length, int(history[-1]) if length else -1)
        return matcher


def _allowed_ids(bitmask_row: np.ndarray, vocab: int) -> np.ndarray:
    """Token ids a packed bitmask row [W] int32 allows (bit j of word w: token 32w + j)."""
    return np.flatnonzero(np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab])


_THREAD = threading.local()  # .batch_matcher: xgrammar's pool that fills a batch's bitmasks, one per loop thread


def apply_grammar_masks(logits: torch.Tensor, batch, rows: np.ndarray, processors: Dict[int, Any],
                        histories: Dict[int, List[int]]) -> Dict[int, str]:
    """Mask (in place, -inf) every token the grammar of a guided row in `rows` does not allow next.

    logits [R, V]; rows: sampling rows whose request has an entry in `processors` (request id -> GrammarGuide
    or logits processor); histories: state slot -> prompt + output ids. Returns {row: "GuidedDecodingError:
    ..."} for the rows whose matcher failed, or whose grammar allows only tokens the row suppresses (its end,
    EOS, while under min_tokens): those requests fail alone; their logits are zeroed (the token is dropped).
    """
    request_ids = np.asarray(batch.request_ids)
    guided = []
    for r in rows:
        guide = processors.get(int(request_ids[r]))
        if isinstance(guide, GrammarGuide):
            guided.append((int(r), guide))
    if not guided:
        return {}
    xgr = _xgrammar()
    vocab = logits.shape[1]
    slots, prompt_lens = np.asarray(batch.slots), np.asarray(batch.prompt_lens)
    copy_from, reset = np.asarray(batch.slot_copy_from), np.asarray(batch.slot_reset)
    errors: Dict[int, str] = {}
    matchers, good = [], []
    for r, guide in guided:
        slot = int(slots[r])
        try:
            matcher = guide.matcher(slot, histories.get(slot, []), int(prompt_lens[r]),
                                    fresh=bool(reset[r]) or int(copy_from[r]) >= 0)
            if matcher.is_terminated():
                raise GuidedDecodingError("the grammar has ended (its end token was taken) and the sequence goes on")
        except Exception as e:
            errors[r] = _row_error(int(request_ids[r]), e)
            continue
        matchers.append(matcher)
        good.append(r)
    bitmask = xgr.allocate_token_bitmask(max(len(good), 1), vocab)  # [G, ceil(V / 32)] int32, all allowed
    one_by_one = matchers
    if len(matchers) > 1:
        try:
            pool = getattr(_THREAD, "batch_matcher", None)
            if pool is None:
                pool = _THREAD.batch_matcher = xgr.BatchGrammarMatcher(max_threads=min(8, os.cpu_count() or 1))
            pool.batch_fill_next_token_bitmask(matchers, bitmask)
            one_by_one = []
        except Exception:  # one matcher's failure: fill them one by one to find it
            bitmask.fill_(-1)
    for i, matcher in enumerate(one_by_one):
        try:
            matcher.fill_next_token_bitmask(bitmask, i)
        except Exception as e:
            errors[good[i]] = _row_error(int(request_ids[good[i]]), e)
    host = bitmask.numpy()
    allows_any = host[:len(good)].any(axis=1)  # [G]: one pass over the batch, not a call per row
    offsets, suppressed = np.asarray(batch.suppress_offsets), np.asarray(batch.suppress_ids)
    for i, r in enumerate(good):
        if r not in errors and not allows_any[i]:
            errors[r] = _row_error(int(request_ids[r]), GuidedDecodingError(
                "the grammar allows no token of this model's vocabulary here"))
        banned = suppressed[offsets[r]:offsets[r + 1]]
        if r not in errors and len(banned) and np.isin(_allowed_ids(host[i], vocab), banned).all():
            errors[r] = _row_error(int(request_ids[r]), GuidedDecodingError(
                "the grammar allows only tokens this step suppresses (its end, EOS, is masked until min_tokens): "
                "min_tokens asks for more tokens than the grammar's output has"))
    keep = [i for i, r in enumerate(good) if r not in errors]
    dev = logits.device
    if keep:
        idx = torch.tensor([good[i] for i in keep], dtype=torch.long, device=dev)
        # Unpacked a byte at a time (little-endian words: byte k of word w holds tokens 32w + 8k ...):
        # the [G, V] temporary is one byte per token.
        packed = bitmask[keep].view(torch.uint8).to(dev)  # [G, 4W]
        shifts = torch.arange(8, dtype=torch.uint8, device=dev)
        allowed = ((packed.unsqueeze(-1) >> shifts) & 1).bool().reshape(len(keep), -1)[:, :vocab]  # [G, V]
        logits[idx] = logits[idx].masked_fill_(~allowed, float("-inf"))
    if errors:
        logits[torch.tensor(sorted(errors), dtype=torch.long, device=dev)] = 0.0
    return errors


def _row_error(request_id: int, error: BaseException) -> str:
    why = (str(error) if isinstance(error, GuidedDecodingError)
           else f"{type(error).__name__}: {_xgrammar_message(error)}")
    return f"{GuidedDecodingError.__name__}: guided decoding of request {request_id} failed: {why}"


__all__ = ["GuidedDecodingParams", "StructuredOutputsParams", "GrammarBackend", "GrammarGuide",
           "apply_grammar_masks"]
