"""Logits processors the ranks of a multi-rank LLM import by name (tests/test_multi_rank_decoding.py): the
tests directory is on the user's sys.path, which the ranks extend theirs with."""

import torch


def ban_even_tokens(output_ids, logits):
    """Two-argument form: even token ids never come."""
    logits[::2] = float("-inf")
    return logits


class FavourRecent:
    """Three-argument form, an instance with state: the last prompt token and the outputs so far get a bonus."""

    def __init__(self, bonus: float):
        self.bonus = bonus

    def __call__(self, prompt_ids, output_ids, logits):
        seen = torch.tensor([prompt_ids[-1], *output_ids], dtype=torch.long)
        logits[seen] += self.bonus
        return logits


def fails_on_third_token(output_ids, logits):
    if len(output_ids) >= 2:
        raise RuntimeError("this processor fails on purpose")
    return logits
