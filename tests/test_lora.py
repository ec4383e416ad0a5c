"""LoRA adapters per request on the tiny Llama and GPT-2: PEFT adapters written by peft (ranks 4, 8, 16, different
target modules, nonzero A and B) give the greedy tokens of transformers + PEFT, alone and mixed in one batch with
each other and the base model; adapters wait for a device slot when there are more than max_loras; the API under
vLLM's and TensorRT-LLM's names; typed errors for adapters that do not fit."""

import json

import pytest
from lora_adapters import generate, make_peft_adapter, peft_generate, prompts

from llmapi import LLM, AdapterError, AdapterNotFoundError, LoraConfig, LoRARequest, SamplingParams

MAX_TOKENS = 12
# name -> (rank, target modules, PEFT options): every family's adapters cover ranks 4, 8 and 16, and differ in
# the modules they adapt (fused q/k/v and gate/up rows each, the output projections, GPT-2's Conv1D c_attn rows).
LLAMA_ADAPTERS = {
    "qv": (4, ["q_proj", "v_proj"], {}),
    "k_o_mlp": (8, ["k_proj", "o_proj", "up_proj", "down_proj"], {"use_rslora": True}),
    "all": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            {"rank_pattern": {"down_proj": 4}, "alpha_pattern": {"gate_proj": 8}}),
}
GPT2_ADAPTERS = {
    "attn": (4, ["c_attn"], {}),
    "mlp": (8, ["c_fc", "c_proj"], {}),
    "all": (16, ["c_attn", "c_proj", "c_fc"], {"use_rslora": True}),
}


def _vocab(model_dir):
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request, tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory):
    """(model dir, {name: (LoRARequest, reference tokens)}, prompts, base tokens) of one family."""
    model_dir = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[request.param]
    table = {"llama": LLAMA_ADAPTERS, "gpt2": GPT2_ADAPTERS}[request.param]
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    ps = prompts(_vocab(model_dir), [7, 19, 3], seed=11)
    adapters = {}
    for i, (name, (r, targets, options)) in enumerate(table.items()):
        path = make_peft_adapter(model_dir, root / name, r, targets, seed=100 + i, **options)
        adapters[name] = (LoRARequest(name, i + 1, str(path)), peft_generate(model_dir, path, ps, MAX_TOKENS))
    return model_dir, adapters, ps, peft_generate(model_dir, None, ps, MAX_TOKENS)


@pytest.fixture(scope="module")
def llm(family):
    model_dir = family[0]
    with LLM(str(model_dir), enable_lora=True, max_loras=3, max_lora_rank=16) as llm:
        yield llm


def test_each_adapter_equals_transformers_peft(family, llm):
    _, adapters, ps, base = family
    for name, (request, reference) in adapters.items():
        got = generate(llm, ps, request, MAX_TOKENS)
        assert got == reference, name
        assert got != base, f"adapter {name} changed no token: the test would not see a missing adapter"
    assert generate(llm, ps, None, MAX_TOKENS) == base
    # id -1 is the base model, as no adapter is
    assert generate(llm, ps, LoRARequest("base", -1), MAX_TOKENS) == base


def test_mixed_batch_gives_each_request_its_own_tokens(family, llm):
    _, adapters, ps, base = family
    names = list(adapters)
    batch, requests, expected = [], [], []
    for i, p in enumerate(ps):  # every prompt under every adapter and the base, interleaved in one batch
        for name in names + [None]:
            batch.append(p)
            requests.append(None if name is None else adapters[name][0])
            expected.append(base[i] if name is None else adapters[name][1][i])
    stats = llm.get_stats()
    got = generate(llm, batch, requests, MAX_TOKENS)
    assert got == expected
    assert llm.get_stats()["num_steps"] - stats["num_steps"] < len(batch) * MAX_TOKENS // 2  # they ran together


def test_more_adapters_than_slots_wait_for_one(family, tmp_path):
    """max_loras=1: a batch of three adapters runs one adapter at a time; every request gets its own tokens,
    chat and generate_async take lora_request too."""
    model_dir, adapters, ps, base = family
    with LLM(str(model_dir), lora_config=LoraConfig(max_loras=1, max_lora_rank=16, max_cpu_loras=2)) as llm:
        names = list(adapters)
        got = generate(llm, ps * 4, [adapters[n][0] for n in names for _ in ps] + [None] * len(ps), MAX_TOKENS)
        assert got == [t for n in names for t in adapters[n][1]] + base
        manager = llm._res.adapters
        assert manager.num_waiting() == 0 and manager.counts["waited"] >= 2 * len(ps)
        assert manager.counts["installs"] == 3
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
        outs = [llm.generate_async(p, params, lora_request=adapters[names[0]][0]) for p in ps]
        assert [o.result().outputs[0].token_ids for o in outs] == adapters[names[0]][1]


def test_add_remove_and_list(family, tmp_path):
    model_dir, adapters, ps, base = family
    name = list(adapters)[0]
    request, reference = adapters[name]
    with LLM(str(model_dir), enable_lora=True, max_lora_rank=16, max_cpu_loras=2) as llm:
        assert llm.add_lora(request) is True and llm.add_lora(request) is False
        assert llm.list_loras() == {request.lora_int_id}
        assert generate(llm, ps, request, MAX_TOKENS) == reference
        assert llm.remove_lora(request.lora_int_id) is True and llm.list_loras() == set()
        assert llm.remove_lora(request.lora_int_id) is False
        # the same id may now name another adapter
        other_name = list(adapters)[1]
        other = LoRARequest("other", request.lora_int_id, adapters[other_name][0].lora_path)
        assert generate(llm, ps, other, MAX_TOKENS) == adapters[other_name][1]


def test_lora_dir_loads_adapters_at_start(family):
    model_dir, adapters, ps, base = family
    paths = [r.lora_path for r, _ in adapters.values()]
    with LLM(str(model_dir), lora_config=LoraConfig(lora_dir=paths, max_lora_rank=16)) as llm:
        assert llm.list_loras() == {1, 2, 3}
        assert llm._res.adapters.by_name(list(adapters)[1]).lora_int_id == 2


# ---------------------------------------------------------------------- errors


def test_lora_request_without_enable_lora(tiny_llama_dir, tmp_path):
    with LLM(str(tiny_llama_dir)) as llm:
        with pytest.raises(AdapterError, match="enable_lora=True"):
            llm.generate([[5, 6, 7]], lora_request=LoRARequest("x", 1, str(tmp_path)))
        with pytest.raises(AdapterError, match="enable_lora=True"):
            llm.add_lora(LoRARequest("x", 1, str(tmp_path)))


def test_conflicting_spellings_are_named():
    with pytest.raises(ValueError, match="max_loras=2 and lora_config.max_loras=4"):
        LLM("unused", max_loras=2, lora_config=LoraConfig(max_loras=4))
    with pytest.raises(ValueError, match="max_lora_rank=8 needs enable_lora=True"):
        LLM("unused", max_lora_rank=8)
    with pytest.raises(ValueError, match="enable_lora=False and lora_config"):
        LLM("unused", enable_lora=False, lora_config=LoraConfig())
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, "/p")
    with pytest.raises(ValueError, match="max_cpu_loras"):
        LoraConfig(max_loras=4, max_cpu_loras=2)


@pytest.fixture(scope="module")
def llama_llm(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), enable_lora=True, max_lora_rank=8) as llm:
        yield llm


def test_missing_path_and_non_peft_files(llama_llm, tmp_path):
    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        generate(llama_llm, [[5, 6]], LoRARequest("x", 1, str(tmp_path / "nowhere")))
    (tmp_path / "weights.bin").write_bytes(b"not an adapter")
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        generate(llama_llm, [[5, 6]], LoRARequest("x", 2, str(tmp_path / "weights.bin")))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(AdapterError, match="peft_type='PREFIX_TUNING'"):
        generate(llama_llm, [[5, 6]], LoRARequest("x", 3, str(bad)))
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        generate(llama_llm, [[5, 6]], LoRARequest("x", 4, str(bad)))
    assert generate(llama_llm, [[5, 6]], None, 2)  # the LLM is still usable


def test_rank_above_max_lora_rank(llama_llm, tiny_llama_dir, tmp_path):
    path = make_peft_adapter(tiny_llama_dir, tmp_path / "r16", 16, ["q_proj"], seed=1)
    with pytest.raises(AdapterError, match="rank 16, above max_lora_rank=8"):
        llama_llm.add_lora(LoRARequest("big", 7, str(path)))


def test_target_module_the_family_lacks(llama_llm, tiny_llama_dir, tmp_path):
    path = make_peft_adapter(tiny_llama_dir, tmp_path / "head", 4, ["q_proj", "lm_head"], seed=1)
    with pytest.raises(AdapterError, match="has no linear 'lm_head' that takes LoRA"):
        llama_llm.add_lora(LoRARequest("head", 8, str(path)))
    dora = make_peft_adapter(tiny_llama_dir, tmp_path / "dora", 4, ["q_proj"], seed=1, use_dora=True)
    with pytest.raises(AdapterError, match="use_dora"):
        llama_llm.add_lora(LoRARequest("dora", 9, str(dora)))


def test_adapter_for_another_base_shape(llama_llm, tmp_path):
    from tiny_models import make_tiny_llama

    wider = tmp_path / "wider"
    make_tiny_llama(wider, hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    path = make_peft_adapter(wider, tmp_path / "wide-adapter", 4, ["q_proj"], seed=1)
    with pytest.raises(AdapterError, match="maps 96 -> 96 features, but the base model's q_proj maps 64 -> 64"):
        llama_llm.add_lora(LoRARequest("wide", 10, str(path)))
    deeper = tmp_path / "deeper"
    make_tiny_llama(deeper, num_hidden_layers=4)
    path = make_peft_adapter(deeper, tmp_path / "deep-adapter", 4, ["v_proj"], seed=1)
    with pytest.raises(AdapterError, match="a module the base model does not have"):
        llama_llm.add_lora(LoRARequest("deep", 11, str(path)))


def test_same_id_for_another_path_is_refused(llama_llm, tiny_llama_dir, tmp_path):
    a = make_peft_adapter(tiny_llama_dir, tmp_path / "a", 4, ["q_proj"], seed=1)
    b = make_peft_adapter(tiny_llama_dir, tmp_path / "b", 4, ["q_proj"], seed=2)
    llama_llm.add_lora(LoRARequest("a", 12, str(a)))
    with pytest.raises(AdapterError, match="lora_int_id 12 is adapter 'a'"):
        generate(llama_llm, [[5, 6]], LoRARequest("b", 12, str(b)))


def test_one_request_per_prompt_list_must_match(llama_llm):
    with pytest.raises(ValueError, match="got 2 lora_requests for 3 prompts"):
        llama_llm.generate([[5], [6], [7]], lora_request=[None, None])


def test_smoothquant_is_refused_with_lora():
    with pytest.raises(ValueError, match="SmoothQuant folds its smoothing into the norms"):
        LLM("unused", enable_lora=True, quant="smoothquant")


def test_unknown_lora_config_field():
    with pytest.raises(ValueError, match="unknown argument"):
        LoraConfig(max_lora=3)
