"""Batched LoRA kernels (Triton shrink / expand over tokens grouped by slot) against a float64 reference of the
published definition, y += (x @ A[slot]^T) @ B[slot]^T per token (slot -1: nothing); the plain-torch path too; the
slot grouping; a tiny Llama's LoRA layers through the kernels; and the decode-graph path with adapters."""

import numpy as np
import pytest
import torch
from kernel_cases import DEVICE, REL_ERROR, rel_error

from llmapi._kernels.lora import lora_ref, slot_order

triton = pytest.importorskip("triton")

from llmapi._kernels.lora_sgmv import lora, lora_expand, lora_shrink  # noqa: E402

interpreted = pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU the kernel runs compiled: pytest -m gpu")
CASES = [  # tokens, in features, out features, rank, slots, dtype
    (1, 64, 48, 16, 1, torch.float32),
    (37, 64, 192, 48, 3, torch.float32),  # a fused qkv's block-diagonal rank
    (9, 100, 70, 20, 2, torch.bfloat16),  # nothing a multiple of the tiles
    (24, 128, 64, 8, 4, torch.float16),
    (3, 1100, 40, 16, 2, torch.float32),  # a decode step: K split in 4 uneven parts
    (5, 4096, 64, 16, 3, torch.bfloat16),  # ... in 16
]


def _case(t, k, n, r, s, dtype, seed, none_share=0.25):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).to(dtype)
    a = (torch.randn(s, r, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(s, n, r, generator=g).to(dtype)
    slots = torch.randint(0, s, (t,), generator=g, dtype=torch.int32)
    slots[torch.rand(t, generator=g) < none_share] = -1
    if none_share < 1 and (slots < 0).all():  # a few tokens may all fall to "none": one keeps an adapter
        slots[0] = 0
    return x, a, b, slots


def _reference(x, a, b, slots, y0):  # float64, token by token
    y = y0.double().clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            y[i] += (x[i].double() @ a[s].double().t()) @ b[s].double().t()
    return y


def check(t, k, n, r, s, dtype, seed=0):
    x, a, b, slots = _case(t, k, n, r, s, dtype, seed)
    ref = _reference(x, a, b, slots, torch.zeros(t, n))
    dev = (lambda v: v.to(DEVICE))
    out = lora(torch.zeros(t, n, dtype=dtype, device=DEVICE), dev(x), dev(a), dev(b), slot_order(dev(slots), s))
    assert out.dtype == dtype
    assert rel_error(out.cpu(), ref) < REL_ERROR[dtype]
    assert rel_error(lora_ref(torch.zeros(t, n, dtype=dtype), x, a, b, slots), ref) < REL_ERROR[dtype]
    # rows without an adapter are left exactly as they were; the others gain the delta
    y0 = torch.randn(t, n, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    out = lora(y0.clone().to(DEVICE), dev(x), dev(a), dev(b), slot_order(dev(slots), s)).cpu()
    none = slots < 0
    assert torch.equal(out[none], y0[none])
    assert rel_error(out, _reference(x, a, b, slots, y0)) < REL_ERROR[dtype]


def test_slot_order_groups_tokens_by_slot():
    slots = torch.tensor([2, -1, 0, 2, 2, -1, 1, 0], dtype=torch.int32)
    order = slot_order(slots, 4)
    assert order.counts.tolist() == [2, 1, 3, 0]
    assert order.starts.tolist() == [2, 4, 5, 8]  # after the two tokens without a slot
    assert order.order.tolist() == [1, 5, 2, 7, 6, 0, 3, 4]
    for s in range(4):
        rows = order.order[order.starts[s]:order.starts[s] + order.counts[s]]
        assert (slots[rows.long()] == s).all()


@interpreted
@pytest.mark.parametrize("case", CASES)
def test_lora_kernels_interpreted(case):
    check(*case)


def test_all_tokens_without_adapter_change_nothing():
    x, a, b, _ = _case(5, 64, 32, 16, 2, torch.float32, 3)
    slots = torch.full((5,), -1, dtype=torch.int32)
    y0 = torch.randn(5, 32)
    assert torch.equal(lora_ref(y0.clone(), x, a, b, slots), y0)
    if DEVICE == "cpu":
        assert torch.equal(lora(y0.clone(), x, a, b, slot_order(slots, 2)), y0)


@interpreted
@pytest.mark.parametrize("t, k, splits", [(11, 64, 1), (11, 1100, 4), (65, 1100, 1)])
def test_shrink_and_expand_separately(t, k, splits):
    """The shrink's planes (K split for few tokens) sum to x @ A^T; the expand adds their sum's product."""
    x, a, b, slots = _case(t, k, 40, 16, 2, torch.float32, 5, none_share=0.0)
    order = slot_order(slots, 2)
    s = lora_shrink(x, a, order)
    assert s.shape == (splits, t, 16)
    ref_s = torch.stack([x[i].double() @ a[slots[i]].double().t() for i in range(t)])
    assert rel_error(s.sum(0), ref_s) < 1e-5
    if splits > 1:  # every plane holds a part: none is the whole sum
        assert all(rel_error(plane, ref_s) > 1e-3 for plane in s)
    y = lora_expand(torch.zeros(t, 40), s, b, order)
    assert rel_error(y, torch.stack([ref_s[i] @ b[slots[i]].double().t() for i in range(t)])) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES + [(2048, 4096, 6144, 48, 4, torch.bfloat16),
                                          (1, 14336, 4096, 16, 8, torch.bfloat16),  # bs 1 decode: K split
                                          (8, 4096, 28672, 16, 8, torch.bfloat16),
                                          (256, 14336, 4096, 16, 8, torch.bfloat16),
                                          (64, 4096, 28672, 32, 2, torch.float16)])
def test_lora_kernels_gpu(case):
    for seed in range(2):
        check(*case, seed=seed)


@pytest.mark.gpu
def test_lora_kernels_replay_in_a_cuda_graph():
    """The slot grouping and both kernels captured once replay for other slot assignments (as the decode graphs
    replay them): the grid depends on the token and slot counts only."""
    t, k, n, r, s = 32, 256, 128, 16, 4
    x, a, b, _ = _case(t, k, n, r, s, torch.bfloat16, 7)
    x, a, b = x.cuda(), a.cuda(), b.cuda()
    static_slots = torch.full((t,), -1, dtype=torch.int32, device="cuda")
    y = torch.zeros(t, n, dtype=torch.bfloat16, device="cuda")
    lora(y, x, a, b, slot_order(static_slots, s))  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.zero_()
        lora(y, x, a, b, slot_order(static_slots, s))
    for seed in range(3):
        slots = torch.randint(-1, s, (t,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
        static_slots.copy_(slots.cuda())
        graph.replay()
        ref = _reference(x.cpu(), a.cpu(), b.cpu(), slots, torch.zeros(t, n))
        assert rel_error(y.cpu(), ref) < REL_ERROR[torch.bfloat16]


# ---------------------------------------------------------------------- through the model


@pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU the kernels run compiled: tests/test_lora_gpu.py")
def test_tiny_llama_lora_layers_through_kernels_match_torch_path(tiny_llama_dir, tmp_path, monkeypatch):
    """Three adapters and rows without one in one packed step, then a decode step: the interpreted kernels give
    the plain-torch path's logits."""
    import llmapi.layers.dispatch as dispatch
    from lora_adapters import make_peft_adapter
    from tiny_models import PagedDriver, to_engine_model
    from transformers import AutoModelForCausalLM

    from llmapi.lora.runtime import AdapterInstall, RunnerAdapters
    from llmapi.lora.weights import load_peft

    model, cfg = to_engine_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    cfg = dict(cfg, hf_architecture="LlamaForCausalLM")
    adapters = RunnerAdapters(model, cfg, {"max_loras": 3, "max_lora_rank": 16}, "cpu", torch.float32)
    for slot, (r, targets) in enumerate([(4, ["q_proj", "v_proj"]), (8, ["o_proj", "up_proj"]),
                                         (16, ["k_proj", "gate_proj", "down_proj"])]):
        path = make_peft_adapter(tiny_llama_dir, tmp_path / f"a{slot}", r, targets, seed=slot)
        weights = load_peft(str(path), cfg, 16, torch.float32)
        adapters.install(AdapterInstall("lora", slot, linears=weights.linears))
    chunks = {0: [5, 9, 11, 3, 8], 1: [4, 17, 2], 2: [30, 31, 32, 33], 3: [7, 7, 8]}
    request_slots = {0: 0, 1: 1, 2: -1, 3: 2}

    def run(kernels: bool):
        monkeypatch.setattr(dispatch, "TRITON_ON_CPU", kernels)
        driver = PagedDriver(model, cfg)
        outs = []
        for step in (chunks, {rid: [40 + rid] for rid in chunks}):
            slots = np.concatenate([[request_slots[rid]] * len(ids) for rid, ids in step.items()]).astype(np.int32)
            adapters.begin(torch.from_numpy(slots), slots)
            outs.append(torch.cat(list(driver.step(step).values())))
        return torch.cat(outs)

    reference = run(False)
    adapters.begin(None)
    base = torch.cat([torch.cat(list(PagedDriver(model, cfg).step(chunks).values()))])
    assert (reference[:base.shape[0]] - base).abs().max() > 1e-2  # the adapters change the logits
    got = run(True)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


def test_decode_graph_path_with_adapters_equals_peft(tiny_llama_dir, tmp_path, monkeypatch):
    """The decode-graph path (its eager CPU stand-in): each row's adapter slot is a static input, grouped by slot
    inside the step; a batch of two adapters and the base equals transformers + PEFT."""
    from lora_adapters import generate, make_peft_adapter, peft_generate, prompts

    from llmapi import LLM, LoRARequest

    monkeypatch.setenv("LLMAPI_DECODE_GRAPHS_ON_CPU", "1")
    ps = prompts(320, [6, 11], seed=3)
    a = make_peft_adapter(tiny_llama_dir, tmp_path / "a", 8, ["q_proj", "v_proj", "down_proj"], seed=1)
    b = make_peft_adapter(tiny_llama_dir, tmp_path / "b", 4, ["o_proj", "gate_proj"], seed=2)
    refs = [peft_generate(tiny_llama_dir, path, ps, 8) for path in (a, b, None)]
    requests = [LoRARequest("a", 1, str(a)), LoRARequest("b", 2, str(b)), None]
    with LLM(str(tiny_llama_dir), enable_lora=True, max_loras=2, max_lora_rank=8, max_batch_size=8) as llm:
        got = generate(llm, ps * 3, [r for r in requests for _ in ps], 8)
        assert llm._local.stats.graph_steps > 0
    assert got == [t for ref in refs for t in ref]
