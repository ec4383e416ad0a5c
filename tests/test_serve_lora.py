"""`llmapi serve --lora-modules NAME=PATH ...`: the adapters load at start, /v1/models lists them beside the base
model, and a request whose `model` names one runs with it (completions and chat), as vLLM serves them; answers
compared with the same LLM and adapters in this process."""

import openai
import pytest
from lora_adapters import make_peft_adapter
from serve_process import ServerProcess

from llmapi import LLM, LoRARequest, SamplingParams

MODEL = "tiny"
TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}assistant"
PROMPT = [5, 9, 17, 33, 4, 100, 7]


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-lora")
    return {"sql": make_peft_adapter(tiny_llama_dir, root / "sql", 8, ["q_proj", "v_proj"], seed=1),
            "chatty": make_peft_adapter(tiny_llama_dir, root / "chatty", 4, ["o_proj", "down_proj"], seed=2)}


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-lora-run")
    (tmp / "template.jinja").write_text(TEMPLATE)
    proc = ServerProcess(tiny_llama_dir, "--device", "cpu", "--served-model-name", MODEL, "--max-lora-rank", 8,
                         "--max-loras", 2, "--chat-template", tmp / "template.jinja", "--lora-modules",
                         *(f"{name}={path}" for name, path in adapters.items()), log=tmp / "server.log")
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_adapters(client, adapters):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {MODEL, "sql", "chatty"}
    assert models["sql"].root == str(adapters["sql"]) and models["sql"].parent == MODEL


def test_model_name_picks_the_adapter(client, tiny_llama_dir, adapters):
    with LLM(str(tiny_llama_dir), enable_lora=True, max_lora_rank=8, max_loras=2) as llm:
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        want = {name: llm.generate(PROMPT, params, use_tqdm=False,
                                   lora_request=None if name == MODEL else LoRARequest(name, i, str(adapters[name])))
                .outputs[0].text for i, name in enumerate([MODEL, "sql", "chatty"])}
        messages = [{"role": "user", "content": "hello my name is tiny"}]
        chat_want = llm.chat(messages, params, use_tqdm=False, chat_template=TEMPLATE,
                             lora_request=LoRARequest("chatty", 9, str(adapters["chatty"]))).outputs[0].text
    assert len(set(want.values())) == 3  # each adapter changes the text
    for name, text in want.items():
        out = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == text and out.model == name, name
    chat = client.chat.completions.create(model="chatty", messages=messages, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == chat_want
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
