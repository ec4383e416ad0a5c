"""LoRA under tensor parallelism 2 (two MPI ranks on the CPU): each rank holds its shard of every adapter (a
column-parallel linear's B rows, a row-parallel linear's A columns); a batch mixing three adapters and the base
model gives the tokens of transformers + PEFT, also when adapters wait for a slot; and under pipeline
parallelism 2, where each stage holds its layers' adapters."""

import pytest
from lora_adapters import generate, make_peft_adapter, peft_generate, prompts

from llmapi import LLM, LoRARequest

MAX_TOKENS = 10
TARGETS = {  # rank, modules
    "llama": [(4, ["q_proj", "v_proj"]), (8, ["k_proj", "o_proj", "gate_proj", "down_proj"]),
              (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])],
    "gpt2": [(4, ["c_attn"]), (8, ["c_fc", "c_proj"]), (16, ["c_attn", "c_proj", "c_fc"])],
}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def case(request, tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory):
    model_dir = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[request.param]
    root = tmp_path_factory.mktemp(f"lora-tp-{request.param}")
    ps = prompts(288, [5, 17, 9], seed=31)
    batch, loras, expected = [], [], []
    refs = {None: peft_generate(model_dir, None, ps, MAX_TOKENS)}
    adapters = {}
    for i, (r, targets) in enumerate(TARGETS[request.param]):
        path = make_peft_adapter(model_dir, root / f"a{i}", r, targets, seed=200 + i)
        adapters[i] = LoRARequest(f"a{i}", i + 1, str(path))
        refs[i] = peft_generate(model_dir, path, ps, MAX_TOKENS)
    for j, p in enumerate(ps):
        for key in (0, 1, 2, None):
            batch.append(p)
            loras.append(None if key is None else adapters[key])
            expected.append(refs[key][j])
    return model_dir, batch, loras, expected


@pytest.mark.parametrize("tp,pp,max_loras", [(2, 1, 3), (2, 1, 1), (1, 2, 2)])
def test_two_ranks_mixed_batch_equals_peft(case, tp, pp, max_loras):
    model_dir, batch, loras, expected = case
    with LLM(str(model_dir), tp=tp, pp=pp, enable_lora=True, max_loras=max_loras, max_lora_rank=16) as llm:
        assert generate(llm, batch, loras, MAX_TOKENS) == expected
