"""Speculative decoding settings, as TensorRT-LLM's LLM API names them: draft-target, n-gram and EAGLE."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from ..config import from_kwargs, rejects_unknown_arguments

MAX_DRAFT_LEN_LIMIT = 64
"""The most draft tokens one step may carry (each is a row of the verify forward)."""


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} is invalid: must be an int in [{low}, {high}]")


def _check_model(value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or value == "":
        raise ValueError(f"speculative_model={value!r} is invalid: must be a non-empty string (a hub id or a "
                         "directory)")
    return value


@rejects_unknown_arguments("DraftTargetDecodingConfig()")
@dataclass
class DraftTargetDecodingConfig:
    """A second, smaller model with the target's vocabulary drafts `max_draft_len` tokens autoregressively
    before each verify step; its KV cache lies in the target's blocks (one block table per request)."""

    speculative_model: str
    """The draft model: a hub id, a local Hugging Face directory or a saved engine (any family llmapi runs)."""
    max_draft_len: int = 4
    """Draft tokens per step (k): a step verifies them in one target forward and keeps 1 to k + 1 tokens."""
    accept_all_drafts: bool = False
    """A benchmark aid, off by default: every draft is accepted without being checked against the target, so each
    verify step keeps all k drafts and the target's token after them. The output is then the draft model's tokens
    (with every (k + 1)-th token the target's), not the target's: it only times the verify path at 100% acceptance
    (`llmapi bench --speculative-model M --accept-all-drafts`). One rank only; `llmapi serve` has no way to set it."""

    decoding_type: ClassVar[str] = "DraftTarget"
    mode: ClassVar[int] = 2  # the core's SpeculativeMode::kDraftModel

    def __post_init__(self):
        self.speculative_model = _check_model(self.speculative_model)
        _check_int("max_draft_len", self.max_draft_len, 1, MAX_DRAFT_LEN_LIMIT)
        if not isinstance(self.accept_all_drafts, bool):
            raise ValueError(f"accept_all_drafts={self.accept_all_drafts!r} is invalid: must be True or False")


@rejects_unknown_arguments("NGramDecodingConfig()")
@dataclass
class NGramDecodingConfig:
    """Prompt lookup: the drafts are the tokens that followed the most recent earlier occurrence of the request's
    last `max_matching_ngram_size` (down to 1) tokens in its own prompt and output; no draft model."""

    max_draft_len: int = 4
    """Most draft tokens per step (fewer when the match is near the end, none without a match)."""
    max_matching_ngram_size: int = 4
    """Longest suffix looked for; shorter ones are tried down to one token."""

    decoding_type: ClassVar[str] = "NGram"
    mode: ClassVar[int] = 1  # SpeculativeMode::kNgram
    speculative_model: ClassVar[None] = None

    def __post_init__(self):
        _check_int("max_draft_len", self.max_draft_len, 1, MAX_DRAFT_LEN_LIMIT)
        _check_int("max_matching_ngram_size", self.max_matching_ngram_size, 1, 1024)


@rejects_unknown_arguments("EagleDecodingConfig()")
@dataclass
class EagleDecodingConfig:
    """An EAGLE head (EAGLE-1 checkpoint layout: config.json and pytorch_model.bin / model.safetensors holding
    fc.weight [H, 2H] (+ fc.bias) and Llama decoder layers `layers.N.*`) drafts from the target's last hidden
    state and the embedding of the token after it, with the target's embeddings and LM head."""

    speculative_model: str
    """The EAGLE head: a directory or a hub id."""
    max_draft_len: int = 4
    """Draft tokens per step (a chain: the head runs k times)."""

    decoding_type: ClassVar[str] = "Eagle"
    mode: ClassVar[int] = 3  # SpeculativeMode::kEagle

    def __post_init__(self):
        self.speculative_model = _check_model(self.speculative_model)
        _check_int("max_draft_len", self.max_draft_len, 1, MAX_DRAFT_LEN_LIMIT)


SpeculativeConfig = Union[DraftTargetDecodingConfig, NGramDecodingConfig, EagleDecodingConfig]
_BY_TYPE = {cls.decoding_type: cls for cls in (DraftTargetDecodingConfig, NGramDecodingConfig, EagleDecodingConfig)}


def resolve_speculative_config(value: Any) -> SpeculativeConfig | None:
    """LlmArgs.speculative_config: None, one of the config objects, or a dict with TensorRT-LLM's `decoding_type`
    ("DraftTarget", "NGram", "Eagle") and that config's fields; anything else raises a ValueError naming it."""
    if value is None or isinstance(value, tuple(_BY_TYPE.values())):
        return value
    if isinstance(value, dict):
        fields = dict(value)
        kind = fields.pop("decoding_type", None)
        if kind not in _BY_TYPE:
            raise ValueError(f"speculative_config={value!r} is invalid: a dict needs decoding_type, one of "
                             f"{sorted(_BY_TYPE)}")
        return from_kwargs(_BY_TYPE[kind], fields, f"{_BY_TYPE[kind].__name__}()")
    raise ValueError(f"speculative_config={value!r} is invalid: must be None, a DraftTargetDecodingConfig, an "
                     "NGramDecodingConfig, an EagleDecodingConfig or a dict with decoding_type")


__all__ = ["DraftTargetDecodingConfig", "NGramDecodingConfig", "EagleDecodingConfig", "SpeculativeConfig",
           "resolve_speculative_config", "MAX_DRAFT_LEN_LIMIT"]
