"""SamplingParams: how one request is decoded and when it stops, validated on construction."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

_SEED_MASK = (1 << 63) - 1


def _fail(name: str, value, must: str):
    raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {must}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _takes_prompt(fn: Callable) -> bool:
    """Whether a logits processor takes (prompt_ids, output_ids, logits) rather than (output_ids, logits)."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # builtins without a signature: the two-argument form
        return False
    return len(params) >= 3


@dataclass
class SamplingParams:
    """Decoding settings of one request (the names follow vLLM and TensorRT-LLM's LLM API)."""

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
    """Seed of this request's random stream: the same seed gives the same tokens in any batch."""
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
    (default n); with use_beam_search, the beam width."""
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
    log-softmax of the model's logits); at most LLM(max_logprobs=...)."""
    prompt_logprobs: Optional[int] = None
    """The same for each prompt token (the first has none); disables prefix reuse for the request."""
    return_context_logits: bool = False
    """Return the logits of every prompt position (RequestOutput.context_logits, [prompt, vocab])."""
    return_generation_logits: bool = False
    """Return the raw logits each token was sampled from (CompletionOutput.generation_logits)."""
    use_beam_search: bool = False
    """Beam search with best_of (or n) beams; returns the n best hypotheses. Deterministic:
    temperature, top_k, top_p, min_p and seed do not apply."""
    length_penalty: float = 1.0
    """Beam search: a finished hypothesis scores sum_logprobs / length**length_penalty."""
    early_stopping: Union[bool, str] = False
    """Beam search: True stops once beam-width hypotheses are finished; False stops when no running
    beam can still win (transformers' heuristic); "never" only when none can at max length."""

    _stop_list: List[str] = field(default_factory=list, init=False, repr=False, compare=False)
    _bad_list: List[str] = field(default_factory=list, init=False, repr=False, compare=False)
    _bad_words: List[List[int]] = field(default_factory=list, init=False, repr=False, compare=False)
    _processors: List[Callable] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.max_tokens is not None and not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            _fail("max_tokens", self.max_tokens, "must be an int >= 1 or None")
        if not (_is_int(self.min_tokens) and self.min_tokens >= 0):
            _fail("min_tokens", self.min_tokens, "must be an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", self.min_tokens, f"must not exceed max_tokens={self.max_tokens}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 <= t < float("inf")):
            _fail("temperature", t, "must be a finite number >= 0")
        if not _is_int(self.top_k) or self.top_k < -1:
            _fail("top_k", self.top_k, "must be an int >= 0 (0 or -1 disables it)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            _fail("top_p", p, "must be a number in (0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            _fail("seed", self.seed, "must be an int or None")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or s == "" for s in stops):
            _fail("stop", self.stop, "must be a non-empty string or a list of non-empty strings")
        self._stop_list = stops
        ids = self.stop_token_ids or []
        if not isinstance(ids, (list, tuple)) or any(not _is_int(i) or i < 0 for i in ids):
            _fail("stop_token_ids", self.stop_token_ids, "must be a list of token ids >= 0")
        self.stop_token_ids = list(ids)
        if self.end_id is not None and not (_is_int(self.end_id) and self.end_id >= 0):
            _fail("end_id", self.end_id, "must be a token id >= 0 or None")
        for name in ("ignore_eos", "include_stop_str_in_output", "detokenize", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be a bool")
        if stops and not self.detokenize:
            _fail("stop", self.stop, "stop strings need detokenize=True")
        self._check_sequences()
        self._check_knobs()
        self._check_outputs()

    def _check_sequences(self) -> None:
        if not (_is_int(self.n) and self.n >= 1):
            _fail("n", self.n, "must be an int >= 1")
        if self.best_of is not None and not (_is_int(self.best_of) and self.best_of >= 1):
            _fail("best_of", self.best_of, "must be an int >= 1 or None")
        if not isinstance(self.use_beam_search, bool):
            _fail("use_beam_search", self.use_beam_search, "must be a bool")
        if self.use_beam_search and self.best_of is not None and self.n > self.best_of:
            _fail("n", self.n, f"must not exceed the beam width best_of={self.best_of}")
        if self.best_of is not None and self.best_of < self.n:
            _fail("best_of", self.best_of, f"must be >= n={self.n}")
        if not _is_number(self.length_penalty):
            _fail("length_penalty", self.length_penalty, "must be a finite number")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            _fail("early_stopping", self.early_stopping, 'must be True, False or "never"')
        if self.use_beam_search and self.return_generation_logits:
            _fail("return_generation_logits", True, "is not supported with use_beam_search")

    def _check_knobs(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (_is_number(v) and -2 <= v <= 2):
                _fail(name, v, "must be a number in [-2, 2]")
        if not (_is_number(self.repetition_penalty) and self.repetition_penalty > 0):
            _fail("repetition_penalty", self.repetition_penalty, "must be a finite number > 0")
        if not (_is_number(self.min_p) and 0 <= self.min_p <= 1):
            _fail("min_p", self.min_p, "must be a number in [0, 1]")
        bad = [self.bad] if isinstance(self.bad, str) else list(self.bad or [])
        if any(not isinstance(b, str) or b == "" for b in bad):
            _fail("bad", self.bad, "must be a non-empty string or a list of non-empty strings")
        self._bad_list = bad
        words = []
        for item in self.bad_token_ids or []:
            word = [item] if _is_int(item) else item
            if not (isinstance(word, (list, tuple)) and word and all(_is_int(t) and t >= 0 for t in word)):
                _fail("bad_token_ids", self.bad_token_ids,
                      "must be a list of token ids >= 0 or of non-empty lists of them")
            words.append(list(word))
        self._bad_words = words
        bias = self.logit_bias or {}
        if not isinstance(bias, dict) or any(
                not (_is_int(k) and k >= 0 and _is_number(v)) for k, v in bias.items()):
            _fail("logit_bias", self.logit_bias, "must map token ids >= 0 to finite numbers")
        fns = self.logits_processor
        fns = [] if fns is None else list(fns) if isinstance(fns, (list, tuple)) else [fns]
        if any(not callable(f) for f in fns):
            _fail("logits_processor", self.logits_processor, "must be a callable or a list of callables")
        self._processors = fns

    def _check_outputs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v >= 0):
                _fail(name, v, "must be an int >= 0 or None")
        for name in ("return_context_logits", "return_generation_logits"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be a bool")

    @property
    def stop_strings(self) -> List[str]:
        """`stop` as a list."""
        return self._stop_list

    @property
    def num_sequences(self) -> int:
        """Sequences generated: best_of (the beam width with beam search), else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def bad_strings(self) -> List[str]:
        """`bad` as a list."""
        return self._bad_list

    @property
    def bad_word_ids(self) -> List[List[int]]:
        """`bad_token_ids` as token sequences (a single id is a sequence of one)."""
        return self._bad_words

    def combined_logits_processor(self) -> Optional[Callable]:
        """The logits_processor(s) as one fn(prompt_ids, output_ids, logits), or None."""
        if not self._processors:
            return None
        fns = [(f, _takes_prompt(f)) for f in self._processors]

        def run(prompt_ids: Sequence[int], output_ids: Sequence[int], logits):
            for f, takes_prompt in fns:
                logits = f(prompt_ids, output_ids, logits) if takes_prompt else f(output_ids, logits)
            return logits

        return run

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def effective_seed(self, fallback: int) -> int:
        """The seed the sampler uses: the user's, else a fresh one drawn for this request."""
        return (self.seed if self.seed is not None else fallback) & _SEED_MASK
