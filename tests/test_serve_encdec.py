"""`llmapi serve` with an encoder-decoder model (ByT5, its byte tokenizer): /v1/completions' prompt is the encoder
input and its text equals LLM.generate's, streamed or not; chat is refused with a clear error."""

import openai
import pytest

import encdec_models as em
from llmapi import LLM, SamplingParams
from serve_process import ServerProcess

MODEL = "byt5-tiny"
PROMPTS = ["translate English to German: The house is wonderful.", "summarize: bytes in, bytes out"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import ByT5Tokenizer

    path = tmp_path_factory.mktemp("byt5-serve")
    em.t5("byt5", seed=3).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-encdec")
    proc = ServerProcess(model_dir, "--device", "cpu", "--dtype", "float32", "--served-model-name", MODEL,
                         log=tmp / "server.log")
    yield proc
    assert proc.stop() == 0, proc.output()


def test_completions_equal_generate(model_dir, server):
    with LLM(str(model_dir), dtype="float32", device="cpu") as llm:
        want = [o.outputs[0].text for o in llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0),
                                                         use_tqdm=False)]
    assert any(want)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    for prompt, text in zip(PROMPTS, want):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == text
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
        assert streamed == text
    with pytest.raises(openai.BadRequestError, match="encoder-decoder"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
