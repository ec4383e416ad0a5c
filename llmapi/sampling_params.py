"""SamplingParams: how one request is decoded and when it stops, validated on construction and on every write."""

from __future__ import annotations

import inspect
import math
import struct
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

from .config import rejects_unknown_arguments
from .guided_decoding import GuidedDecodingParams

_SEED_MASK = (1 << 63) - 1
_INT32_MAX = (1 << 31) - 1  # the core holds counts, widths and token ids as int32
_GUIDED = ("guided_decoding", "structured_outputs")  # one setting under TensorRT-LLM's and vLLM's names


def _short_repr(value) -> str:
    try:
        text = repr(value)
    except Exception:  # a huge int past Python's digit limit, or a user object whose repr raises
        return f"<{type(value).__name__}>"
    return text if len(text) <= 80 else f"{text[:60]}...{text[-12:]}"


def field_error(name: str, value, must: str) -> ValueError:
    """The ValueError for SamplingParams.<name>=<value>, naming what it must be."""
    return ValueError(f"SamplingParams.{name}={_short_repr(value)} is invalid: {must}")


def _fail(name: str, value, must: str):
    raise field_error(name, value, must)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(name: str, v, low: int, must: str, optional: bool = False) -> None:
    """An int >= low that the core's int32 holds (or None when optional)."""
    if v is None and optional:
        return
    if not _is_int(v) or v < low:
        _fail(name, v, must)
    if v > _INT32_MAX:
        _fail(name, v, "must be < 2**31 (the core holds it as an int32)")


def _check_ids(name: str, value, ids) -> None:
    """Token ids: ints in [0, 2**31)."""
    for t in ids:
        if not _is_int(t) or t < 0:
            _fail(name, value, "token ids must be ints >= 0")
        if t > _INT32_MAX:
            _fail(name, value, f"token id {_short_repr(t)} is not < 2**31 (the core holds ids as int32)")


def _float32(name: str, v, must: str, ok: Callable[[float], bool], shown=None) -> None:
    """A finite number for which ok(v) holds and that float32 (the core's type) holds without becoming 0 or
    inf. `shown`: the value the message shows (default v), e.g. the dict v is a value of."""
    it = "it" if shown is None else _short_repr(v)
    shown = v if shown is None else shown
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(name, shown, must)
    try:
        x = float(v)
        narrowed = struct.unpack("<f", struct.pack("<f", x))[0]  # "<f" checks overflow; native "f" does not
    except OverflowError:  # an int past float64, or a float past float32
        _fail(name, shown, f"{must}; {it} rounds to inf in float32 (the core's type)")
    if not (math.isfinite(x) and ok(x)):
        _fail(name, shown, must)
    if narrowed == 0 and x != 0:
        _fail(name, shown, f"{must}; {it} rounds to 0 in float32 (the core's type)")


def _strings(value) -> List[str]:
    """`stop` / `bad` as a list (None: empty)."""
    return [value] if isinstance(value, str) else list(value or [])


def _callables(value) -> List[Callable]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _takes_prompt(fn: Callable) -> bool:
    """Whether a logits processor takes (prompt_ids, output_ids, logits) rather than (output_ids, logits)."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # builtins without a signature: the two-argument form
        return False
    return len(params) >= 3


class ProcessorChain:
    """Logits processors called in turn as one fn(prompt_ids, output_ids, logits). A module-level class, so
    that it pickles (with its processors, by reference) to the rank that samples."""

    def __init__(self, fns: List[tuple]):
        self.fns = fns  # (processor, whether it takes the prompt ids)

    def __call__(self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits):
        for f, takes_prompt in self.fns:
            logits = f(prompt_ids, output_ids, logits) if takes_prompt else f(output_ids, logits)
        return logits


@rejects_unknown_arguments("SamplingParams()")
@dataclass
class SamplingParams:
    """Decoding settings of one request (the names follow vLLM and TensorRT-LLM's LLM API).

    Every field is checked on construction and again on every attribute write: a bad value raises a
    ValueError naming the field (a write leaves the old value), and a good write takes effect for the
    next request made with these params."""

    max_tokens: Optional[int] = 32
    """Most tokens to generate; None: up to max_seq_len."""
    min_tokens: int = 0
    """EOS and stop tokens are masked until this many tokens are generated."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 (or -1) keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability adds up to top_p."""
    seed: Optional[int] = None
    """Seed of this request's random stream: the same seed gives the same tokens in any batch. Any
    64-bit int (negative included); the sampler uses its low 63 bits."""
    stop: Optional[Union[str, List[str]]] = None
    """Strings that end generation; matched on the detokenized text."""
    stop_token_ids: Optional[List[int]] = None
    """Token ids that end generation (besides EOS)."""
    ignore_eos: bool = False
    """Keep generating past EOS (until max_tokens)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    detokenize: bool = True
    """Produce text; False returns token ids only."""
    skip_special_tokens: bool = True
    """Drop special tokens from the text."""
    spaces_between_special_tokens: bool = True
    """Put spaces between special tokens in the text (as transformers' decode)."""
    end_id: Optional[int] = None
    """Override of the model's EOS token id (TensorRT-LLM's name)."""
    n: int = 1
    """Sequences returned for the prompt, ordered by cumulative logprob (best first)."""
    best_of: Optional[int] = None
    """Sequences generated, of which the n with the highest cumulative logprob are returned
    (default n). With use_beam_search it is the beam width (default n)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI's presence penalty)."""
    frequency_penalty: float = 0.0
    """Times the number of times a token was generated, subtracted from its logit (OpenAI)."""
    repetition_penalty: float = 1.0
    """Logits of tokens in the prompt or output are divided by this when positive, multiplied
    when negative (transformers' / vLLM's repetition penalty); 1 is off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one (after top-k and top-p)."""
    bad: Optional[Union[str, List[str]]] = None
    """Strings never generated: each is tokenized (without special tokens) and its last token is
    masked whenever the text so far ends with its other tokens."""
    bad_token_ids: Optional[List[Union[int, List[int]]]] = None
    """Token ids never generated; a list of ids is a sequence masked as `bad` words are."""
    logit_bias: Optional[Dict[int, float]] = None
    """Token id -> value added to its logit before sampling (OpenAI's logit_bias)."""
    logits_processor: Optional[Union[Callable, List[Callable]]] = None
    """Called on each step's logits of this request: fn(output_ids, logits) or
    fn(prompt_ids, output_ids, logits) -> logits, logits a [vocab] float32 tensor (a list: in turn)."""
    logprobs: Optional[int] = None
    """Return each generated token's logprob and rank, plus the k most likely tokens (raw
    log-softmax of the model's logits); at most LLM(max_logprobs=...). True means 1, False None."""
    prompt_logprobs: Optional[int] = None
    """The same for each prompt token (the first has none); disables prefix reuse for the request.
    True means 1, False None."""
    return_context_logits: bool = False
    """Return the logits of every prompt position (RequestOutput.context_logits, [prompt, vocab])."""
    return_generation_logits: bool = False
    """Return the raw logits each token was sampled from (CompletionOutput.generation_logits)."""
    use_beam_search: bool = False
    """Beam search; returns the n best hypotheses. The beam width is best_of, else n: without either
    it is 1, which is greedy search (as transformers' num_beams=1). Deterministic: temperature,
    top_k, top_p, min_p and seed do not apply."""
    length_penalty: float = 1.0
    """Beam search: a finished hypothesis scores sum_logprobs / length**length_penalty."""
    early_stopping: Union[bool, str] = False
    """Beam search: True stops once beam-width hypotheses are finished; False stops when no running
    beam can still win (transformers' heuristic); "never" only when none can at max length."""
    guided_decoding: Optional[GuidedDecodingParams] = None
    """Structured outputs: the output follows this grammar (a GuidedDecodingParams, or a dict of its fields:
    a JSON schema, any JSON object, a regex, an EBNF grammar or a list of choices). The request ends where
    the grammar ends, as on EOS (finish_reason "stop"); min_tokens keeps EOS masked, so the output goes on
    inside the grammar and the request fails (GuidedDecodingError) if the grammar can only end before
    min_tokens; a stop string still ends the text where it matches. Not with use_beam_search or ignore_eos."""
    structured_outputs: Optional[GuidedDecodingParams] = None
    """vLLM's name for guided_decoding: either one sets both."""
    no_repeat_ngram_size: int = 0
    """If > 0, every n-gram of this many tokens may occur only once: a token that would complete an n-gram
    already in the request's tokens (prompt and output; for an encoder-decoder model the decoder's) is masked
    (transformers' / TensorRT-LLM's no_repeat_ngram_size, NoRepeatNGramLogitsProcessor); with beam search each
    beam's own tokens count. 0 is off."""

    _checked = False  # not a field: set once __post_init__ has validated, so writes re-validate

    def __post_init__(self):
        self.validate()
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, name: str, value) -> None:
        if not self._checked:  # the generated __init__ assigning the fields
            object.__setattr__(self, name, value)
            return
        if name not in self.__dataclass_fields__:  # a misspelt field would otherwise be ignored silently
            raise AttributeError(f"SamplingParams has no field {name!r}; its fields are: "
                                 f"{', '.join(sorted(self.__dataclass_fields__))}")
        names = _GUIDED if name in _GUIDED else (name,)  # a write to either guided name sets both
        old = {n: self.__dict__[n] for n in names}
        for n in names:
            object.__setattr__(self, n, value)
        try:
            self.validate()
        except BaseException:
            for n, v in old.items():
                object.__setattr__(self, n, v)
            raise

    def validate(self) -> None:
        """Check every field (ValueError naming the first bad one) and normalise a few (logprobs=True to 1,
        stop_token_ids to a list). Construction and attribute writes call it; call it yourself after
        changing a list or dict field in place."""
        normalised = {}
        for name in ("logprobs", "prompt_logprobs"):  # True / False as TensorRT-LLM takes them
            v = getattr(self, name)
            if isinstance(v, bool):
                normalised[name] = 1 if v else None
        ids = self.stop_token_ids
        if ids is not None and not isinstance(ids, (list, tuple)):
            _fail("stop_token_ids", ids, "must be a list of token ids")
        normalised["stop_token_ids"] = list(ids or [])
        self._check_stopping()
        self._check_sequences()
        self._check_knobs()
        self._check_outputs(normalised)
        self._check_guided(normalised)
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def _check_stopping(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1, "must be an int >= 1 or None", optional=True)
        _check_int("min_tokens", self.min_tokens, 0, "must be an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", self.min_tokens, f"must not exceed max_tokens={self.max_tokens}")
        _float32("temperature", self.temperature, "must be a finite number >= 0", lambda t: t >= 0)
        _check_int("top_k", self.top_k, -1, "must be an int >= 0 (0 or -1 disables it)")
        _float32("top_p", self.top_p, "must be a number in (0, 1]", lambda p: 0 < p <= 1)
        if self.seed is not None and not (_is_int(self.seed) and -(1 << 63) <= self.seed < (1 << 64)):
            _fail("seed", self.seed, "must be an int in [-2**63, 2**64) or None")
        for name in ("stop", "bad"):
            v = getattr(self, name)
            if not (v is None or isinstance(v, (str, list, tuple))) or any(
                    not isinstance(s, str) or s == "" for s in _strings(v)):
                _fail(name, v, "must be a non-empty string or a list of non-empty strings")
        _check_ids("stop_token_ids", self.stop_token_ids, self.stop_token_ids or [])
        _check_int("end_id", self.end_id, 0, "must be a token id >= 0 or None", optional=True)
        for name in ("ignore_eos", "include_stop_str_in_output", "detokenize", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be a bool")
        if self.stop and not self.detokenize:
            _fail("stop", self.stop, "stop strings need detokenize=True")

    def _check_sequences(self) -> None:
        _check_int("n", self.n, 1, "must be an int >= 1")
        _check_int("best_of", self.best_of, 1, "must be an int >= 1 or None", optional=True)
        if not isinstance(self.use_beam_search, bool):
            _fail("use_beam_search", self.use_beam_search, "must be a bool")
        if self.use_beam_search and self.best_of is not None and self.n > self.best_of:
            _fail("n", self.n, f"must not exceed the beam width best_of={self.best_of}")
        if self.best_of is not None and self.best_of < self.n:
            _fail("best_of", self.best_of, f"must be >= n={self.n}")
        _float32("length_penalty", self.length_penalty, "must be a finite number", lambda v: True)
        if not (isinstance(self.early_stopping, bool) or
                (isinstance(self.early_stopping, str) and self.early_stopping == "never")):
            _fail("early_stopping", self.early_stopping, 'must be True, False or "never"')
        if self.use_beam_search and self.return_generation_logits is True:
            _fail("return_generation_logits", True, "is not supported with use_beam_search")

    def _check_knobs(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            _float32(name, getattr(self, name), "must be a number in [-2, 2]", lambda v: -2 <= v <= 2)
        _float32("repetition_penalty", self.repetition_penalty, "must be a finite number > 0", lambda v: v > 0)
        _float32("min_p", self.min_p, "must be a number in [0, 1]", lambda v: 0 <= v <= 1)
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, "must be an int >= 0 (0 is off)")
        words = self.bad_token_ids
        if words is not None and not isinstance(words, (list, tuple)):
            _fail("bad_token_ids", words, "must be a list of token ids or of non-empty lists of them")
        for item in words or []:
            word = [item] if _is_int(item) else item
            if not (isinstance(word, (list, tuple)) and word):
                _fail("bad_token_ids", words, "must be a list of token ids or of non-empty lists of them")
            _check_ids("bad_token_ids", words, word)
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, dict):
                _fail("logit_bias", bias, "must map token ids >= 0 to finite numbers")
            _check_ids("logit_bias", bias, bias.keys())
            for v in bias.values():
                _float32("logit_bias", v, "must map token ids >= 0 to finite numbers", lambda x: True, bias)
        if any(not callable(f) for f in _callables(self.logits_processor)):
            _fail("logits_processor", self.logits_processor, "must be a callable or a list of callables")

    def _check_outputs(self, normalised: dict) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            _check_int(name, normalised.get(name, getattr(self, name)), 0,
                       "must be an int >= 0, True (1), False or None", optional=True)
        for name in ("return_context_logits", "return_generation_logits"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be a bool")

    def _check_guided(self, normalised: dict) -> None:
        values = []
        for name in _GUIDED:
            try:
                values.append(GuidedDecodingParams.coerce(getattr(self, name)))
            except ValueError as e:
                _fail(name, getattr(self, name), str(e))
        if None not in values and values[0] != values[1]:
            raise ValueError(f"SamplingParams.guided_decoding={_short_repr(values[0])} and structured_outputs="
                             f"{_short_repr(values[1])} disagree (structured_outputs is vLLM's name for "
                             "guided_decoding); pass one of them")
        guided = values[0] if values[0] is not None else values[1]
        if guided is None:
            return
        try:
            guided.validate()  # its fields may have changed in place
        except ValueError as e:
            _fail("guided_decoding", guided, str(e))
        if self.use_beam_search:
            _fail("guided_decoding", guided, "beam search with guided decoding is not supported "
                                             "(use_beam_search=True)")
        if self.ignore_eos:
            _fail("guided_decoding", guided, "a guided request ends at its grammar's end through EOS, so it "
                                             "cannot have ignore_eos=True")
        normalised.update(dict.fromkeys(_GUIDED, guided))

    @property
    def stop_strings(self) -> List[str]:
        """`stop` as a list."""
        return _strings(self.stop)

    @property
    def num_sequences(self) -> int:
        """Sequences generated: best_of (the beam width with beam search), else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def bad_strings(self) -> List[str]:
        """`bad` as a list."""
        return _strings(self.bad)

    @property
    def bad_word_ids(self) -> List[List[int]]:
        """`bad_token_ids` as token sequences (a single id is a sequence of one)."""
        return [[item] if _is_int(item) else list(item) for item in self.bad_token_ids or []]

    def combined_logits_processor(self) -> Optional[Callable]:
        """The logits_processor(s) as one fn(prompt_ids, output_ids, logits), or None."""
        fns = [(f, _takes_prompt(f)) for f in _callables(self.logits_processor)]
        return ProcessorChain(fns) if fns else None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def effective_seed(self, fallback: int) -> int:
        """The seed the sampler uses: the user's, else a fresh one drawn for this request."""
        return (self.seed if self.seed is not None else fallback) & _SEED_MASK
