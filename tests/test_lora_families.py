"""LoRA on the other families' fused_linears declarations: a PEFT adapter over every linear of a tiny StarCoder2, OPT,
GPTBigCode (multi-query, and multi-head, whose c_attn rows the converter regroups per head) and Nemotron gives the
greedy tokens of transformers + PEFT."""

import pytest
from lora_adapters import generate, make_peft_adapter, peft_generate, prompts
from tiny_models import make_tiny_gpt_bigcode, make_tiny_nemotron, make_tiny_opt, make_tiny_starcoder2

from llmapi import LLM, LoRARequest

FAMILIES = {  # name -> (maker, its options, the HF linears an adapter targets)
    "starcoder2": (make_tiny_starcoder2, {}, ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"]),
    "opt": (make_tiny_opt, {}, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    "gpt_bigcode_mqa": (make_tiny_gpt_bigcode, {}, ["c_attn", "c_proj", "c_fc"]),
    "gpt_bigcode_mha": (make_tiny_gpt_bigcode, {"multi_query": False}, ["c_attn", "c_proj", "c_fc"]),
    "nemotron": (make_tiny_nemotron, {}, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_adapter_equals_peft(name, tmp_path):
    make, options, targets = FAMILIES[name]
    model_dir = tmp_path / "model"
    make(model_dir, **options)
    adapter = make_peft_adapter(model_dir, tmp_path / "adapter", 8, targets, seed=5)
    ps = prompts(288, [6, 13], seed=2)
    want = peft_generate(model_dir, adapter, ps, 10)
    base = peft_generate(model_dir, None, ps, 10)
    with LLM(str(model_dir), skip_tokenizer_init=True, enable_lora=True, max_lora_rank=8) as llm:
        got = generate(llm, ps + ps, [LoRARequest("a", 1, str(adapter))] * len(ps) + [None] * len(ps), 10)
    assert got == want + base
    assert want != base
