"""Structured outputs through `llmapi serve` and the openai client: response_format (json_object, json_schema) in
chat completions, vLLM's guided_json / guided_regex / guided_choice / guided_grammar and structured_outputs in
the body; each answer equals the same LLM's in this process and follows its grammar; malformed ones get a 400
naming the field."""

import json
import re

import httpx
import jsonschema
import openai
import pytest
from guided_tiny import make_tiny_guided_llama
from serve_process import ServerProcess

from llmapi import LLM, GuidedDecodingParams, SamplingParams

MODEL = "tiny-guided"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")
MESSAGES = [{"role": "user", "content": "give me a JSON object"}]
SCHEMA = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 5},
                                           "n": {"type": "integer", "minimum": 1, "maximum": 50},
                                           "flag": {"type": "boolean"}},
          "required": ["word", "n", "flag"]}
C, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_guided_llama(tmp_path_factory.mktemp("serve-guided-llama"))


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(str(model_dir), tokens_per_block=8, kv_cache_config={"max_tokens": 4096}) as llm:
        yield llm


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-guided")
    (tmp / "template.jinja").write_text(TEMPLATE)
    proc = ServerProcess(model_dir, "--device", "cpu", "--tokens-per-block", 8, "--kv-cache-max-tokens", 4096,
                         "--served-model-name", MODEL, "--chat-template", tmp / "template.jinja",
                         log=tmp / "server.log")
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def _params(guided, **kw):
    return SamplingParams(**{"max_tokens": 96, "temperature": 1.0, "seed": 11, "guided_decoding": guided, **kw})


def test_chat_response_format_json_schema(client, llm):
    want = llm.chat(MESSAGES, _params(GuidedDecodingParams(json=SCHEMA)), use_tqdm=False, chat_template=TEMPLATE)
    response_format = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=96, temperature=1.0,
                                         seed=11, response_format=response_format)
    content = got.choices[0].message.content
    assert content == want.outputs[0].text and got.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(content), SCHEMA)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=96, temperature=1.0, seed=11,
        response_format=response_format, stream=True) if c.choices)
    assert streamed == content


def test_chat_response_format_json_object(client, llm):
    want = llm.chat(MESSAGES, _params(GuidedDecodingParams(json_object=True), seed=4), use_tqdm=False,
                    chat_template=TEMPLATE)
    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=96, temperature=1.0,
                                         seed=4, response_format={"type": "json_object"})
    content = got.choices[0].message.content
    assert content == want.outputs[0].text
    if got.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut by max_tokens: a prefix of a JSON object
        assert got.choices[0].finish_reason == "length" and content.startswith("{")


@pytest.mark.parametrize("extra, guided, check", [
    ({"guided_regex": r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)"},
     GuidedDecodingParams(regex=r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)"),
     lambda t: re.fullmatch(r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)", t)),
    ({"guided_choice": ["red", "green", "blue"]}, GuidedDecodingParams(choice=["red", "green", "blue"]),
     lambda t: t in ("red", "green", "blue")),
    ({"guided_grammar": 'root ::= "x=" [0-9] | "y=" [a-c] [a-c]'},
     GuidedDecodingParams(grammar='root ::= "x=" [0-9] | "y=" [a-c] [a-c]'),
     lambda t: re.fullmatch("x=[0-9]|y=[a-c]{2}", t)),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     GuidedDecodingParams(json=SCHEMA, disable_any_whitespace=True),
     lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
], ids=["guided_regex", "guided_choice", "guided_grammar", "structured_outputs"])
def test_completions_vllm_extras(client, llm, extra, guided, check):
    prompts = ["the quick brown fox", "once upon a time"]
    want = llm.generate(prompts, _params(guided, n=2), use_tqdm=False)
    got = client.completions.create(model=MODEL, prompt=prompts, max_tokens=96, temperature=1.0, seed=11, n=2,
                                    extra_body=extra)
    assert [c.text for c in got.choices] == [o.text for w in want for o in w.outputs]
    assert all(c.finish_reason == "stop" and check(c.text) for c in got.choices), [c.text for c in got.choices]


def test_guided_json_equals_engine(client, llm):
    want = llm.generate(["hello"], _params(GuidedDecodingParams(json=SCHEMA), seed=2), use_tqdm=False)[0]
    got = client.completions.create(model=MODEL, prompt="hello", max_tokens=96, temperature=1.0, seed=2,
                                    extra_body={"guided_json": json.dumps(SCHEMA)})
    assert got.choices[0].text == want.outputs[0].text
    if got.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(got.choices[0].text), SCHEMA)


OK = {"messages": MESSAGES}
MALFORMED = [
    (C, {"prompt": "x", "guided_json": 5}, "guided_json"),
    (C, {"prompt": "x", "guided_json": {"type": "strnig"}}, "guided_json"),
    (C, {"prompt": "x", "guided_json": '{"type": '}, "guided_json"),
    (C, {"prompt": ["x", "y"], "guided_regex": "[a-"}, "guided_regex"),
    (C, {"prompt": "x", "guided_grammar": "root ::= missing"}, "guided_grammar"),
    (C, {"prompt": "x", "guided_choice": []}, "guided_choice"),
    (C, {"prompt": "x", "guided_choice": "red"}, "guided_choice"),
    (C, {"prompt": "x", "guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    (C, {"prompt": "x", "guided_regex": "a+", "ignore_eos": True}, "guided_regex"),
    (C, {"prompt": "x", "structured_outputs": {"regexp": "a+"}}, "structured_outputs"),
    (CHAT, {**OK, "response_format": {"type": "xml"}}, "response_format.type"),
    (CHAT, {**OK, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (CHAT, {**OK, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    (CHAT, {**OK, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    (CHAT, {**OK, "response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
]


def test_malformed_guided_fields_get_400_naming_the_field(server, llm):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, param in MALFORMED:
            r = http.post(path, json=body)
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error", (body, error)
        assert http.get("/health").status_code == 200
        ok = http.post(C, json={"prompt": "x", "max_tokens": 8, "guided_choice": ["a", "b"]})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("a", "b")


def test_openai_client_raises_bad_request_for_a_bad_schema(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "z"}}})
    assert e.value.body["param"] == "response_format" and "invalid JSON schema" in e.value.body["message"]
