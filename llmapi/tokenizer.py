"""Tokenizer loading, incremental detokenization of output tokens, and stop-string matching."""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Sequence, Tuple

from .errors import ModelNotFoundError, RequestError, UnsupportedModelError

_REPLACEMENT_CHAR = "\ufffd"  # what decode gives for bytes that are not (yet) a whole UTF-8 character


def load_tokenizer(path_or_name: str | os.PathLike, **kwargs: Any):
    """Load a Hugging Face tokenizer (local directory or hub id) with transformers.AutoTokenizer.

    kwargs go to AutoTokenizer.from_pretrained (revision, gguf_file, trust_remote_code, ...).
    Raises ModelNotFoundError when nothing can be found or read there, UnsupportedModelError when
    what is there cannot be made into a tokenizer; both name the path.
    """
    from transformers import AutoTokenizer  # lazy: importing transformers takes seconds

    try:
        return AutoTokenizer.from_pretrained(os.fspath(path_or_name), **kwargs)
    except OSError as e:  # missing directory or file, unknown hub id, no network
        raise ModelNotFoundError(f"cannot load a tokenizer from {os.fspath(path_or_name)!r}: {e}") from e
    except Exception as e:  # transformers raises ValueError, KeyError, ... for files it cannot use
        raise UnsupportedModelError(
            f"cannot load a tokenizer from {os.fspath(path_or_name)!r}: {type(e).__name__}: {e}"
        ) from e


class IncrementalDetokenizer:
    """Turns a request's growing list of output token ids into text deltas.

    The text is what `tokenizer.decode(output_ids, skip_special_tokens=...,
    spaces_between_special_tokens=..., clean_up_tokenization_spaces=False)` gives for the output ids
    alone, as TensorRT-LLM's LLM API returns it: the deltas of `add` concatenate to exactly that
    (with `final=True` on the last call). Clean-up is off because it rewrites text across token
    boundaries (" ." -> "."), so no streamed delta could be final.

    A byte-level token may hold part of a UTF-8 character: a delta is held back while the text
    ends in an incomplete character (decoded as U+FFFD) and comes out once it is complete.

    Method (vLLM's detokenize_incrementally, on decode rather than on token strings): decode a
    small window ids[prefix_offset:] and the already-emitted part of it ids[prefix_offset:read_offset];
    the delta is the difference. Decoding a window from a token boundary gives the same text as
    the same tokens inside the whole sequence, with one exception handled below: SentencePiece-style
    decoders drop the leading space of a window's first token, which is harmless only while the
    emitted part of the window holds a token that shows in the text. (Invalid UTF-8 from
    SentencePiece byte-fallback tokens is the one case left: that decoder turns a whole run of
    byte tokens into U+FFFDs once the run turns out invalid, after its valid start was emitted.)
    """

    def __init__(
        self,
        tokenizer,
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.token_ids: list[int] = []
        """Every output token id added so far."""
        self.text = ""
        """Every delta returned so far, joined."""
        self._prefix_offset = 0  # window start: a token boundary that is also a character boundary
        self._read_offset = 0  # tokens before this are emitted

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            token_ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def add(self, token_ids: Iterable[int], final: bool = False) -> str:
        """Append new output token ids; return the text they complete ("" while it is incomplete).

        final=True (the request finished) also returns what is held back: an incomplete character
        at the very end then shows as U+FFFD, as in tokenizer.decode of all the ids.
        """
        self.token_ids.extend(int(t) for t in token_ids)
        ids = self.token_ids
        emitted_text = self._decode(ids[self._prefix_offset:self._read_offset])
        window_text = self._decode(ids[self._prefix_offset:])
        grew = len(window_text) > len(emitted_text)
        if not final and (not grew or window_text.endswith(_REPLACEMENT_CHAR)):
            # Nothing new, only skipped special tokens, or half a character: wait for more tokens.
            # The window keeps its start, so the emitted part never holds only invisible tokens.
            return ""
        if window_text.startswith(emitted_text):
            delta = window_text[len(emitted_text):]
        else:  # a decoder that rewrites earlier text: fall back to decoding everything
            delta = self._decode(ids)[len(self.text):]
        if grew:
            self._prefix_offset = self._read_offset
            self._read_offset = len(ids)
        self.text += delta
        return delta


def find_stop_string(
    text: str, num_new_chars: int, stop_strings: Sequence[str], include_stop_str_in_output: bool = False
) -> Optional[Tuple[str, str]]:
    """Find the first stop string to complete in the last num_new_chars characters of text.

    Only occurrences that end inside the new characters count (the older ones were looked for
    before), and a stop string may start before them. Of those, the one that ends first wins
    (then the one that starts first): the same one a character-by-character stream would stop
    at, so the result does not depend on how the text was split into deltas.
    Returns (stop string, text cut before it, or after it with include_stop_str_in_output) or None.
    """
    best: Optional[Tuple[int, int, str]] = None  # (end, start, stop string)
    for stop in stop_strings:
        start = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
        if start >= 0:
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
    if best is None:
        return None
    end, start, stop = best
    return stop, text[: end if include_stop_str_in_output else start]


class StopStringMatcher:
    """Stop-string matching of one request's streamed text, holding back what may start a stop string.

    feed() takes each text delta and returns the part of the text that may be streamed now: text
    that could be the beginning of a stop string stays back until the next deltas show whether it
    matches, so a streamed delta never shows part of a stop string that then matches.
    """

    def __init__(self, stop_strings: Sequence[str], include_stop_str_in_output: bool = False):
        stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        bad = [s for s in stops if not isinstance(s, str) or s == ""]
        if bad:
            raise RequestError(f"stop strings must be non-empty strings, got {bad!r}")
        self.stop_strings = stops
        self.include_stop_str_in_output = include_stop_str_in_output
        self.matched: Optional[str] = None
        """The stop string that matched, once one has."""
        # Text not streamed yet. An occurrence of a stop string that ends in new text always starts
        # in here (its beginning was held back), so this short tail is all that is ever searched.
        self._unsent = ""

    def _held_back(self, text: str) -> int:
        """Length of the longest end of text that is a proper beginning of some stop string."""
        held = 0
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return held

    def feed(self, delta: str, final: bool = False) -> Tuple[str, Optional[str]]:
        """Take the next text delta; return (text to stream now, matched stop string or None).

        On a match the returned text is the last of the output (cut per include_stop_str_in_output)
        and the request should stop. final=True (the request ended for another reason) releases
        what is held back. After a match, later deltas are ignored.
        """
        if self.matched is not None:
            return "", None
        text = self._unsent + delta
        match = find_stop_string(text, len(delta), self.stop_strings, self.include_stop_str_in_output)
        if match is not None:
            self.matched, out = match
            self._unsent = ""
            return out, self.matched
        held = 0 if final else self._held_back(text)
        self._unsent = text[len(text) - held:] if held else ""
        return text[: len(text) - held], None
