"""Tests of tokenizer loading and incremental detokenization on locally trained tokenizers."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmapi.errors import LLMAPIError, ModelNotFoundError
from llmapi.tokenizer import IncrementalDetokenizer, load_tokenizer

CORPUS = [
    "Hello world! Café naïve résumé façade.",
    "日本語のテキスト、中文字符和한국어",
    "emoji 🎉🚀👍🏽 family 👨‍👩‍👧 ok",
    "Ünïcödé ß ø å — “quotes”",
    "The quick brown fox jumps over the lazy dog.",
] * 3

# Texts the detokenizer must stream; several hold characters no merge covers, so their UTF-8
# bytes are split over two to four byte-level tokens.
TEXTS = [
    "Hello 🎉 world",
    "naïve café 日本語 and 中文!",
    "👨‍👩‍👧 family 👍🏽🙂 new emoji 🦀",
    "한국어 Ünïcödé ß",
    "<|tool|>call<|eos|> after<plain>x",
    "  spaces   and\nnewlines\t",
]


@pytest.fixture(scope="module")
def byte_bpe():
    """Byte-level BPE (GPT-2 / Llama-3 style) with special and added tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    fast.add_tokens(["<plain>"])  # an added token that is not special: never skipped
    return fast


@pytest.fixture(scope="module")
def metaspace_bpe():
    """SentencePiece-style BPE (Llama-2 / Mistral): '▁' for spaces, byte fallback, first space stripped."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def reference(tokenizer, ids, skip_special_tokens=True, spaces_between_special_tokens=True):
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                            spaces_between_special_tokens=spaces_between_special_tokens,
                            clean_up_tokenization_spaces=False)


def stream(tokenizer, ids, chunk_sizes=None, **kwargs):
    """Feed ids in chunks (default one by one); return the deltas, the last call with final=True."""
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    deltas, i = [], 0
    sizes = iter(chunk_sizes or [])
    while i < len(ids):
        n = next(sizes, 1)
        deltas.append(detok.add(ids[i:i + n], final=i + n >= len(ids)))
        i += n
    assert detok.text == "".join(deltas)
    assert detok.token_ids == list(ids)
    return deltas


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_decode_without_partial_characters(byte_bpe, text, skip):
    ids = byte_bpe.encode(text)
    deltas = stream(byte_bpe, ids, skip_special_tokens=skip)
    assert "".join(deltas) == reference(byte_bpe, ids, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_character_comes_out_once_complete(byte_bpe):
    ids = byte_bpe.encode("🎉")
    assert len(ids) == 3  # 4 UTF-8 bytes over 3 tokens
    assert stream(byte_bpe, ids) == ["", "", "🎉"]


def test_random_chunking(byte_bpe):
    rng = random.Random(0)
    for _ in range(100):
        ids = byte_bpe.encode(" ".join(rng.sample(TEXTS, 3)))
        sizes = [rng.randint(1, 4) for _ in ids]
        for skip in (True, False):
            deltas = stream(byte_bpe, ids, sizes, skip_special_tokens=skip)
            assert "".join(deltas) == reference(byte_bpe, ids, skip_special_tokens=skip)
            assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("spaces", [True, False])
@pytest.mark.parametrize("skip", [True, False])
def test_any_token_sequence(byte_bpe, skip, spaces):
    # Random ids (special tokens and lone UTF-8 continuation bytes included): the deltas still add
    # up to decode's text, U+FFFD for bytes that never form a character included.
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(len(byte_bpe)) for _ in range(rng.randint(1, 15))]
        deltas = stream(byte_bpe, ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
        assert "".join(deltas) == reference(byte_bpe, ids, skip, spaces)


def test_special_tokens(byte_bpe):
    ids = byte_bpe.encode("a<|tool|>b<plain>c<|eos|>")
    assert "".join(stream(byte_bpe, ids, skip_special_tokens=True)) == "ab<plain>c"
    assert "".join(stream(byte_bpe, ids, skip_special_tokens=False)) == "a<|tool|>b<plain>c<|eos|>"
    # Special tokens between the halves of a character, skipped: the character still completes.
    split = byte_bpe.encode("🎉")
    ids = split[:1] + [byte_bpe.eos_token_id] + split[1:]
    assert stream(byte_bpe, ids, skip_special_tokens=True) == ["", "", "", "🎉"]


def test_final_releases_an_incomplete_character(byte_bpe):
    ids = byte_bpe.encode("ok🎉")[:-1]  # the emoji's last byte never comes
    detok = IncrementalDetokenizer(byte_bpe)
    assert "".join(detok.add([t]) for t in ids) == "ok"
    assert detok.add([], final=True) == "\ufffd"
    assert detok.text == reference(byte_bpe, ids)


def test_sentencepiece_spaces_across_skipped_special_tokens(metaspace_bpe):
    # The decoder drops the space of the first token it sees; a window that began at a skipped
    # special token would drop the space of a word inside the text.
    tok = metaspace_bpe
    rng = random.Random(2)
    texts = ["Hello world 🎉 naïve 日本語 ok", " leading space", "🚀🚀 fox  dog", "x y z"]
    for _ in range(200):
        ids = []
        for _ in range(rng.randint(1, 3)):
            ids += tok.encode(rng.choice(texts))
            if rng.random() < 0.7:
                ids.insert(rng.randint(0, len(ids)), rng.choice([tok.bos_token_id, tok.eos_token_id]))
        sizes = [rng.randint(1, 3) for _ in ids]
        for skip in (True, False):
            deltas = stream(tok, ids, sizes, skip_special_tokens=skip)
            assert "".join(deltas) == reference(tok, ids, skip_special_tokens=skip)
            assert not any("\ufffd" in d for d in deltas)


def test_load_tokenizer_round_trip(byte_bpe, tmp_path):
    byte_bpe.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(TEXTS[1]) == byte_bpe.encode(TEXTS[1])


def test_load_tokenizer_errors_name_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LLMAPIError, match="empty"):
        load_tokenizer(empty)
