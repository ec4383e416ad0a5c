"""Logits processors the guided-decoding tests combine with a grammar (module-level: the sampling rank of a
multi-rank LLM imports them by name)."""


def ban_letter_a(output_ids, logits):
    """Bans every token of the byte-level test tokenizer whose text has an 'a' (looked up once)."""
    from guided_tiny import make_byte_level_tokenizer

    global _A_IDS
    if _A_IDS is None:
        tok = make_byte_level_tokenizer()
        _A_IDS = [i for i in range(len(tok)) if "a" in tok.decode([i])]
    logits[_A_IDS] = float("-inf")
    return logits


_A_IDS = None


def always_fails(output_ids, logits):
    raise RuntimeError("this processor fails on purpose")
