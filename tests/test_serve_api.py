"""`llmapi serve` through the openai client: a real server process over the tiny Llama, answers compared with
the same LLM in this process (greedy text, n=2, logprobs, stop strings, usage), metrics, the API key, 400s."""

import asyncio
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_process import ServerProcess

from llmapi import LLM, SamplingParams

KEY = "test-key"
MODEL = "tiny"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}assistant{% endif %}")
PROMPTS = ["the quick brown fox", "once upon a time", "hello my name is"]
MESSAGES = [{"role": "system", "content": "you like to test engines"},
            {"role": "user", "content": "hello my name is tiny"}]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), tokens_per_block=8, kv_cache_config={"max_tokens": 4096}) as llm:
        yield llm


@pytest.fixture(scope="module")
def server(llm, tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-api")
    (tmp / "template.jinja").write_text(TEMPLATE)
    proc = ServerProcess(tiny_llama_dir, "--device", "cpu", "--tokens-per-block", 8, "--kv-cache-max-tokens", 4096,
                         "--served-model-name", MODEL, "--api-key", KEY, "--chat-template", tmp / "template.jinja",
                         log=tmp / "server.log")
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def aclient(server):
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def _http(server):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def _greedy(**kw):
    return SamplingParams(temperature=0, **kw)


def test_models_version_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_completions_greedy_equal_generate_streamed_or_not(client, llm):
    want = llm.generate(PROMPTS, _greedy(max_tokens=12), use_tqdm=False)
    got = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [w.outputs[0].text for w in want]
    assert [c.finish_reason for c in got.choices] == [w.outputs[0].finish_reason for w in want]
    assert got.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)
    assert got.usage.completion_tokens == sum(len(w.outputs[0].token_ids) for w in want)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.object == "text_completion" and got.model == MODEL and got.id.startswith("cmpl-")

    texts, finish, usage = {}, {}, None
    for chunk in client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    assert [texts[i] for i in range(3)] == [w.outputs[0].text for w in want]
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert usage == got.usage


def test_token_id_prompt_and_echo(client, llm):
    ids = llm.tokenizer.encode("the lazy dog")
    want = llm.generate([ids], _greedy(max_tokens=6), use_tqdm=False)[0]
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, echo=True)
    assert got.choices[0].text == llm.tokenizer.decode(ids) + want.outputs[0].text
    assert got.usage.prompt_tokens == len(ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=ids, max_tokens=6, temperature=0, echo=True, stream=True))
    assert streamed == got.choices[0].text


def test_chat_greedy_equals_llm_chat_streamed_or_not(client, aclient, llm):
    want = llm.chat(MESSAGES, _greedy(max_tokens=10), use_tqdm=False, chat_template=TEMPLATE)
    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10, temperature=0)
    (choice,) = got.choices
    assert choice.message.role == "assistant" and choice.message.content == want.outputs[0].text
    assert choice.finish_reason == want.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)

    async def stream():
        roles, text, finish, usage = [], "", None, None
        chunks = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10,
                                                       temperature=0, stream=True,
                                                       stream_options={"include_usage": True})
        async for chunk in chunks:
            usage = chunk.usage or usage
            for c in chunk.choices:
                if c.delta.role:
                    roles.append(c.delta.role)
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        return roles, text, finish, usage

    roles, text, finish, usage = asyncio.run(stream())
    assert roles == ["assistant"] and text == want.outputs[0].text and finish == "length"
    assert usage == got.usage


def test_n2_sampled_equals_engine(client, llm):
    params = SamplingParams(n=2, temperature=0.9, seed=11, max_tokens=8)
    want = llm.generate("once upon a time", params, use_tqdm=False)
    got = client.completions.create(model=MODEL, prompt="once upon a time", n=2, temperature=0.9, seed=11,
                                    max_tokens=8)
    assert [c.index for c in got.choices] == [0, 1]
    assert sorted(c.text for c in got.choices) == sorted(o.text for o in want.outputs)
    assert got.usage.completion_tokens == sum(len(o.token_ids) for o in want.outputs)
    streamed = {}
    for chunk in client.completions.create(model=MODEL, prompt="once upon a time", n=2, temperature=0.9, seed=11,
                                           max_tokens=8, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert sorted(streamed.values()) == sorted(o.text for o in want.outputs)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, temperature=0.9, seed=5,
                                          max_completion_tokens=5)
    assert [c.index for c in chat.choices] == [0, 1]


def test_logprobs_equal_engine(client, llm):
    want = llm.generate("the quick brown fox", _greedy(max_tokens=6, logprobs=3), use_tqdm=False).outputs[0]
    got = client.completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=6, temperature=0,
                                    logprobs=3).choices[0].logprobs
    assert got.token_logprobs == [e[t].logprob for t, e in zip(want.token_ids, want.logprobs)]
    assert got.tokens == [llm.tokenizer.decode([t]) for t in want.token_ids]
    for top, entry in zip(got.top_logprobs, want.logprobs):
        assert top == {e.decoded_token: e.logprob for e in entry.values()}
    assert got.text_offset[0] == 0

    chat_want = llm.chat(MESSAGES, _greedy(max_tokens=5, logprobs=2), use_tqdm=False,
                         chat_template=TEMPLATE).outputs[0]
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert [c.logprob for c in chat] == [e[t].logprob for t, e in zip(chat_want.token_ids, chat_want.logprobs)]
    for c, entry in zip(chat, chat_want.logprobs):
        top = sorted((e for e in entry.values() if e.rank <= 2), key=lambda e: e.rank)
        assert [(x.token, x.logprob) for x in c.top_logprobs] == [(e.decoded_token, e.logprob) for e in top]
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5,
                                                temperature=0, logprobs=True, top_logprobs=2, stream=True):
        for c in chunk.choices:
            if c.logprobs is not None:
                streamed += [x.logprob for x in c.logprobs.content]
    assert streamed == [c.logprob for c in chat]


def test_stop_strings_as_engine(client, llm):
    full = llm.generate("the quick brown fox", _greedy(max_tokens=16), use_tqdm=False).outputs[0].text
    stop = full.split()[3]
    want = llm.generate("the quick brown fox", _greedy(max_tokens=16, stop=[stop]), use_tqdm=False).outputs[0]
    assert want.finish_reason == "stop" and stop not in want.text
    got = client.completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=16, temperature=0,
                                    stop=[stop]).choices[0]
    assert (got.text, got.finish_reason) == (want.text, "stop")
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="the quick brown fox", max_tokens=16, temperature=0, stop=stop, stream=True,
        extra_body={"include_stop_str_in_output": True}))
    assert text == want.text + stop


def test_metrics_parse_and_move(client, server, llm):
    def read():
        text = httpx.get(f"{server.url}/metrics").text  # open without the key
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))
                samples[key] = s.value
        return samples

    before = read()
    got = client.completions.create(model=MODEL, prompt="hello my name is", max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    after = read()
    ok = ("llmapi:request_success_total", (("finished_reason", "length"),))
    assert after[ok] == before.get(ok, 0) + 1
    gen = ("llmapi:generation_tokens_total", ())
    assert after[gen] == before.get(gen, 0) + 7 == before.get(gen, 0) + got.usage.completion_tokens
    prompt = ("llmapi:prompt_tokens_total", ())
    assert after[prompt] == before.get(prompt, 0) + got.usage.prompt_tokens
    for name in ("llmapi:time_to_first_token_seconds_count", "llmapi:e2e_request_latency_seconds_count",
                 "llmapi:time_per_output_token_seconds_count"):
        assert after[(name, ())] == before.get((name, ()), 0) + 1
    assert after[("llmapi:kv_cache_used_blocks", ())] == 0 and after[("llmapi:num_requests_running", ())] == 0
    assert after[("llmapi:num_requests_pending", ())] == 0
    assert 0 < after[("llmapi:kv_cache_free_blocks", ())]
    assert ("llmapi:prefix_cache_hits_total", ()) in after and ("llmapi:prefix_cache_hit_rate", ()) in after


def test_api_key_required_on_the_api_only(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("POST", "/tokenize"), ("POST", "/detokenize")]:
        r = httpx.request(method, f"{server.url}{path}", json={"prompt": "x"})
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path


C, CHAT = "/v1/completions", "/v1/chat/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]
MALFORMED = [
    (C, b"{not json", None), (C, [1, 2], None), (C, {}, "prompt"), (C, {"prompt": ""}, "prompt"),
    (C, {"prompt": []}, "prompt"), (C, {"prompt": [100000]}, "prompt"), (C, {"prompt": ["a", 1]}, "prompt"),
    (C, {"prompt": "the " * 300}, "prompt"),
    (C, {"prompt": "x", "max_tokens": 0}, "max_tokens"), (C, {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    (C, {"prompt": "x", "temperature": -1}, "temperature"), (C, {"prompt": "x", "temperature": "hot"}, "temperature"),
    (C, {"prompt": "x", "top_p": 1.5}, "top_p"), (C, {"prompt": "x", "top_k": 1.5}, "top_k"),
    (C, {"prompt": "x", "n": 0}, "n"), (C, {"prompt": "x", "n": 2, "best_of": 1}, "best_of"),
    (C, {"prompt": "x", "logprobs": 50}, "logprobs"), (C, {"prompt": "x", "stop": 5}, "stop"),
    (C, {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"5": 500}}, "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
    (C, {"prompt": "x", "stop_token_ids": [99999]}, "stop_token_ids"),
    (C, {"prompt": "x", "stream": "yes"}, "stream"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    (C, {"prompt": "x", "seed": "s"}, "seed"), (C, {"prompt": "x", "presence_penalty": "a"}, "presence_penalty"),
    (C, {"prompt": "x", "suffix": "end"}, "suffix"),
    (CHAT, {}, "messages"), (CHAT, {"messages": []}, "messages"), (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                      {"type": "image_url", "image_url": {"url": "u"}}]}]},
     "messages[0].content[1].type"),
    (CHAT, {"messages": OK_MESSAGES, "max_completion_tokens": -1}, "max_completion_tokens"),
    (CHAT, {"messages": OK_MESSAGES, "max_tokens": 0}, "max_tokens"),
    (CHAT, {"messages": OK_MESSAGES, "top_logprobs": 3}, "top_logprobs"),
    (CHAT, {"messages": OK_MESSAGES, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    (CHAT, {"messages": OK_MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHAT, {"messages": OK_MESSAGES, "response_format": {"type": "xml"}}, "response_format.type"),
    ("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": 5}, "prompt"),
    ("/detokenize", {"tokens": [99999]}, "tokens"), ("/detokenize", {"tokens": "abc"}, "tokens"),
]


def test_malformed_bodies_get_400_naming_the_field(server):
    with _http(server) as http:
        for path, body, param in MALFORMED:
            if isinstance(body, bytes):
                r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                r = http.post(path, json=body)
            assert r.status_code == 400, (path, body, r.text)
            error = r.json()["error"]
            assert error["param"] == param, (path, body, error)
            assert error["type"] == "invalid_request_error" and error["message"], (path, body, error)
        r = http.post(C, json={"model": "other", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert http.get("/health").status_code == 200  # none of it hurt the server


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"


def test_tokenize_round_trips(server, llm):
    with _http(server) as http:
        text = "the quick brown fox jumps over the lazy dog"
        r = http.post("/tokenize", json={"prompt": text}).json()
        assert r["tokens"] == llm.tokenizer.encode(text) and r["count"] == len(r["tokens"])
        assert r["max_model_len"] == llm.max_seq_len
        ids = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
        assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == text
        chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
        assert chat["tokens"] == llm.chat_token_ids(MESSAGES, chat_template=TEMPLATE)


def test_unknown_fields_are_ignored(server, llm):
    with _http(server) as http:
        r = http.post(C, json={"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 4, "temperature": 0,
                               "some_future_field": {"x": 1}})
    assert r.status_code == 200
    want = llm.generate("the quick brown fox", _greedy(max_tokens=4), use_tqdm=False).outputs[0].text
    assert r.json()["choices"][0]["text"] == want


def test_sse_wire_format(server):
    with _http(server) as http:
        with http.stream("POST", CHAT, json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3,
                                             "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
