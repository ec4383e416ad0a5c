"""A tiny random-weight Llama with a byte-level BPE tokenizer trained locally: every string has a tokenization,
so grammars (JSON, regexes) can be followed, as with a real model's tokenizer."""

from pathlib import Path

TEXT = [
    '{"name": "Ann", "age": 31, "tags": ["a", "b"], "ok": true, "city": {"zip": 12345}}',
    "the quick brown fox jumps over the lazy dog 0123456789",
    "once upon a time there was a small language model that wrote JSON, regexes and grammars",
    "yes no maybe red green blue [a-z]+ (x|y) 42 3.14 -7 null false",
]
VOCAB_SIZE = 384  # the model's; the tokenizer has fewer ids (the rest are never allowed by a grammar)


def make_byte_level_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style) with <unk>=0, <s>=1, </s>=2 (eos), trained on TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_tiny_guided_llama(path: Path) -> Path:
    """The tiny Llama of tiny_models (3 layers, hidden 64) over VOCAB_SIZE ids, with the byte-level tokenizer."""
    from tiny_models import make_tiny_llama

    tokenizer = make_byte_level_tokenizer()
    assert len(tokenizer) <= VOCAB_SIZE
    make_tiny_llama(path, vocab_size=VOCAB_SIZE)
    tokenizer.save_pretrained(str(path))
    return path
