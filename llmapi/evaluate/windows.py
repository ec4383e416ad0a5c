"""Sliding windows over a long token sequence so that every token but the first is scored exactly once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List


@dataclass(frozen=True)
class Window:
    """The model sees tokens [begin, end) and scores the tokens at positions [score_from, end)."""

    begin: int
    score_from: int
    end: int


def plan_windows(num_tokens: int, max_seq_len: int, stride: int) -> List[Window]:
    """Windows of at most `max_seq_len` tokens; each after the first scores the next `stride` tokens.

    The first window scores positions 1 .. max_seq_len-1 (position 0 has no context). Each later
    window ends `stride` tokens further and reaches back max_seq_len tokens, so every token it
    scores has at least max_seq_len - stride tokens of context (the last window is full length
    too, unlike windows that start at multiples of the stride). stride < max_seq_len keeps at least
    one context token, so no token goes unscored.
    """
    for name, value, low in (("num_tokens", num_tokens, 2), ("max_seq_len", max_seq_len, 2), ("stride", stride, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r} is invalid: must be an int >= {low}")
    if stride >= max_seq_len:
        raise ValueError(f"stride={stride} is invalid: must be < max_seq_len={max_seq_len} "
                         "(each window needs a token of context before the tokens it scores)")
    end = min(max_seq_len, num_tokens)
    windows = [Window(0, 1, end)]
    while end < num_tokens:
        start, end = end, min(end + stride, num_tokens)
        windows.append(Window(max(0, end - max_seq_len), start, end))
    return windows
