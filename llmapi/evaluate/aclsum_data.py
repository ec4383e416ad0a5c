"""The summarization samples: the `aclsum` package's papers (its data ships inside the wheel; no network)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

ASPECTS = ("challenge", "approach", "outcome")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SummarySample:
    """One paper: its abstract (the input) and the reference summary."""

    id: str
    abstract: str
    reference: str
    """The three aspect summaries (challenge, approach, outcome), one per line (rougeLsum's sentences)."""


def load_aclsum(split: str = "test", max_samples: Optional[int] = None) -> List[SummarySample]:
    """The first `max_samples` papers of an ACLSum split (all when None)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: must be one of {SPLITS}")
    if max_samples is not None and (not isinstance(max_samples, int) or isinstance(max_samples, bool)
                                    or max_samples < 1):
        raise ValueError(f"max_samples={max_samples!r} is invalid: must be an int >= 1 or None")
    try:
        from aclsum import ACLSum
    except ImportError as e:
        raise ModuleNotFoundError(f"`llmapi eval summarize` reads the aclsum package's data: pip install aclsum "
                                  f"(or `pip install llmapi[eval]`): {e}") from e
    docs = list(ACLSum(split))[:max_samples]
    # The abstracts are stored as whitespace-tokenized sentences ("MT ) systems ."): joined as given.
    return [SummarySample(d.id, " ".join(d.sentences["abstract"]),
                          "\n".join(d.summaries[a] for a in ASPECTS)) for d in docs]
