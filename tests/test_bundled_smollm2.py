"""The bundled real model (SmolLM2-135M-Instruct from its GGUF) through our engine equals transformers
on the same weights, answers the README's question, and the quickstart notebook runs."""

from pathlib import Path

import pytest
import torch

from llmapi import LLM, SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Who wrote Hamlet?"]


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    with LLM(str(smollm2_gguf)) as llm:
        yield llm


def test_greedy_equals_transformers_on_the_same_weights(llm, smollm2_gguf):
    from transformers import AutoModelForCausalLM

    tok = llm.tokenizer
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
    prompts.append(tok.encode("The history of the printing press"))
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, min_tokens=32, temperature=0), use_tqdm=False)

    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                              dtype=torch.float32).eval()
    with torch.inference_mode():
        for p, out in zip(prompts, outs):
            ids = torch.tensor([p])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                              min_new_tokens=32, do_sample=False, pad_token_id=0)
            assert out.outputs[0].token_ids == ref[0, len(p):].tolist()


def test_capital_of_france(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=32, temperature=0))
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended by <|im_end|>, which the text omits
    assert "<|im_end|>" not in out.outputs[0].text


def test_quickstart_notebook_runs(llm):
    import nbformat
    from nbclient import NotebookClient

    path = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Paris" in printed
    assert "loaded from the engine cache" in printed  # the module's LLM built it; the notebook reused it


def test_chat_batch_sends_the_chat_template_ids(llm, smollm2_gguf):
    from transformers import AutoTokenizer

    # The reference tokenizer comes straight from the GGUF through transformers, not from our engine.
    ref = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    convs = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."}]]
    params = SamplingParams(max_tokens=6, temperature=0)
    outs = llm.chat(convs, params)
    for conv, out in zip(convs, outs):
        want = ref.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert out.prompt_token_ids == list(want)
        assert ref.decode(want).endswith("<|im_start|>assistant\n")
        alone = llm.generate(list(want), params, use_tqdm=False)
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
