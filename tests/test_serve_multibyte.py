"""Multi-byte text (emoji, CJK) streamed by the server over the bundled SmolLM2, whose byte-level tokens split
characters: every chunk holds whole characters and the chunks join to the non-streamed text and LLM.chat's."""

import httpx
import openai
import pytest

from llmapi import LLM, SamplingParams
from llmapi.serve import ServeConfig, create_app
from llmapi.serve.server import ServerThread

# Greedy answers of SmolLM2-135M-Instruct with 4-byte emoji and CJK characters, each split over two tokens.
QUESTIONS = ["Reply with three emoji.", "Write the Chinese word for hello:"]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    with LLM(str(smollm2_gguf), device="cpu", kv_cache_config={"max_tokens": 4096}) as llm:
        yield llm


@pytest.fixture(scope="module")
def url(smollm2):
    with ServerThread(create_app(smollm2, ServeConfig(served_model_name="smollm2"))) as url:
        yield url


@pytest.mark.parametrize("question", QUESTIONS)
def test_multibyte_text_streams_whole_characters(smollm2, url, question):
    messages = [{"role": "user", "content": question}]
    want = smollm2.chat(messages, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False).outputs[0]
    tok = smollm2.tokenizer
    assert any(ord(ch) > 0x2000 for ch in want.text), want.text  # the answer has multi-byte characters
    assert any("\ufffd" in tok.decode([t]) for t in want.token_ids)  # ... that tokens split
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    got = client.chat.completions.create(model="smollm2", messages=messages, max_completion_tokens=16,
                                         temperature=0)
    assert got.choices[0].message.content == want.text
    pieces = []
    for chunk in client.chat.completions.create(model="smollm2", messages=messages, max_completion_tokens=16,
                                                temperature=0, stream=True):
        pieces += [c.delta.content for c in chunk.choices if c.delta.content]
    assert "".join(pieces) == want.text and len(pieces) > 1
    cut = want.text.rstrip("\ufffd")  # a character the last token left unfinished is flushed as U+FFFD
    assert all("\ufffd" not in p for p in pieces[:-1]) and "\ufffd" not in "".join(pieces)[:len(cut)]
    # The raw event stream is valid UTF-8.
    body = {"model": "smollm2", "messages": messages, "max_tokens": 16, "temperature": 0, "stream": True}
    raw = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).content
    raw.decode("utf-8")
