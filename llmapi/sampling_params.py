"""SamplingParams: how one request is decoded and when it stops, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

_SEED_MASK = (1 << 63) - 1


def _fail(name: str, value, must: str):
    raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {must}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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

    _stop_list: List[str] = field(default_factory=list, init=False, repr=False, compare=False)

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

    @property
    def stop_strings(self) -> List[str]:
        """`stop` as a list."""
        return self._stop_list

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def effective_seed(self, fallback: int) -> int:
        """The seed the sampler uses: the user's, else a fresh one drawn for this request."""
        return (self.seed if self.seed is not None else fallback) & _SEED_MASK
