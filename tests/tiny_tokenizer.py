"""A tiny word-level tokenizer built locally (no hub), saved in Hugging Face format next to a tiny model."""

from pathlib import Path

SENTENCES = [
    "hello my name is tiny and i like to test engines",
    "the quick brown fox jumps over the lazy dog",
    "a cache must never convert the same model twice",
    "once upon a time there was a small language model",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2


def make_tiny_tokenizer(vocab_size: int = 128):
    """A PreTrainedTokenizerFast over whitespace-split words: <unk>=0, <s>=1 (bos), </s>=2 (eos), the words of
    SENTENCES, then filler words w<id> up to exactly `vocab_size`, so every id a tiny model emits decodes to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(w for s in SENTENCES for w in s.split()))
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + words)}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_tokenizer(path: Path, vocab_size: int = 128) -> None:
    """Write tokenizer.json / tokenizer_config.json (and special_tokens_map.json where transformers does) to `path`."""
    make_tiny_tokenizer(vocab_size).save_pretrained(str(path))
