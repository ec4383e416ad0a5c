"""LoRA on a GPU: the Triton shrink / expand kernels in eager prefill steps and inside the captured decode graphs
(the rows' adapter slots a static input); float32 greedy tokens of a batch mixing adapters and the base model
equal transformers + PEFT."""

import pytest
from lora_adapters import generate, make_peft_adapter, peft_generate, prompts

from llmapi import LLM, LoRARequest


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_adapters_on_gpu_with_decode_graphs(family, tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    model_dir = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[family]
    targets = {"llama": [["q_proj", "v_proj"], ["o_proj", "gate_proj", "down_proj"]],
               "gpt2": [["c_attn"], ["c_fc", "c_proj"]]}[family]
    ps = prompts(288, [5, 40, 13], seed=9)
    paths = [make_peft_adapter(model_dir, tmp_path / f"a{i}", r, t, seed=i)
             for i, (r, t) in enumerate(zip((8, 16), targets))]
    refs = [peft_generate(model_dir, p, ps, 16) for p in paths] + [peft_generate(model_dir, None, ps, 16)]
    requests = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(paths)] + [None]
    with LLM(str(model_dir), device="cuda", dtype="float32", enable_lora=True, max_loras=2,
             max_lora_rank=16) as llm:
        got = generate(llm, ps * 3, [r for r in requests for _ in ps], 16)
        assert llm._local.stats.graph_steps > 0
    assert got == [t for ref in refs for t in ref]
