"""Perplexity of a text: per-token log p(token | prefix) over sliding windows, from our engine or transformers."""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

from .windows import plan_windows


DEFAULT_TEXT_ENCODING = "latin-1"
"""lee.cor's encoding (it holds a few Latin-1 bytes such as the pound sign)."""


def default_text_path() -> Path:
    """gensim's bundled lee.cor (50 news articles): the scoring text, distinct from the calibration text
    (lee_background.cor beside it). Found without importing gensim, which pulls in scipy."""
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise ModuleNotFoundError("the default perplexity text is gensim's lee.cor: pip install gensim "
                                  "(or `pip install llmapi[eval]`), or pass --text FILE")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "lee.cor"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed gensim package")
    return path


def read_text(path, encoding: str = "utf-8") -> str:
    """A text file, refused when missing, empty or not in `encoding`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {str(path)!r} is not valid {encoding} ({e.reason} at byte {e.start}): "
                         "pass its encoding (--encoding)") from e
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty")
    return text


@dataclass
class PerplexityResult:
    """Log-probabilities of the scored tokens (positions 1 .. n-1, in order) and their perplexity."""

    token_logprobs: np.ndarray  # [n - 1] float64: log p(ids[p] | ids[window begin:p]) for p = 1 .. n-1
    num_windows: int
    seconds: float

    @property
    def num_tokens(self) -> int:
        return len(self.token_logprobs)

    @property
    def mean_nll(self) -> float:
        return float(-self.token_logprobs.mean())

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def _check_ids(ids: Sequence[int]) -> List[int]:
    ids = list(ids)
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s): perplexity needs at least 2")
    return ids


def engine_perplexity(llm, ids: Sequence[int], max_seq_len: int, stride: int) -> PerplexityResult:
    """Our engine's perplexity of `ids`: every window is one request asking for its prompt logprobs.

    Prompt logprobs are the engine's exact log_softmax of each prompt position's logits at the
    next prompt token; the one token each request must generate is ignored.
    """
    from ..sampling_params import SamplingParams

    ids = _check_ids(ids)
    if max_seq_len >= llm.max_seq_len:
        raise ValueError(f"max_seq_len={max_seq_len} is invalid: this LLM takes prompts of at most "
                         f"{llm.max_seq_len - 1} tokens")
    windows = plan_windows(len(ids), max_seq_len, stride)
    start = time.perf_counter()
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([ids[w.begin:w.end] for w in windows], params, use_tqdm=False)
    scored: List[float] = []
    for w, out in zip(windows, outs):
        entries = out.prompt_logprobs  # entry i: {token id: Logprob} of prompt token i (None for i = 0)
        assert entries is not None and len(entries) == w.end - w.begin
        for p in range(w.score_from, w.end):
            scored.append(entries[p - w.begin][ids[p]].logprob)
    return PerplexityResult(np.asarray(scored, dtype=np.float64), len(windows), time.perf_counter() - start)


def hf_perplexity(model, ids: Sequence[int], max_seq_len: int, stride: int) -> PerplexityResult:
    """The same windows through a transformers causal LM: log_softmax of its logits, in float32."""
    ids = _check_ids(ids)
    windows = plan_windows(len(ids), max_seq_len, stride)
    device = next(model.parameters()).device
    start = time.perf_counter()
    scored: List[np.ndarray] = []
    with torch.inference_mode():
        for w in windows:
            window = torch.tensor([ids[w.begin:w.end]], device=device)  # [1, L]
            logits = model(window).logits[0, w.score_from - w.begin - 1:w.end - w.begin - 1].float()  # [m, V]
            targets = window[0, w.score_from - w.begin:]  # [m]
            chosen = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]  # [m]
            scored.append(chosen.double().cpu().numpy())
    return PerplexityResult(np.concatenate(scored), len(windows), time.perf_counter() - start)
