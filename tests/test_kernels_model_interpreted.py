"""A tiny Llama run through every Triton kernel (Triton's interpreter on CPU) matches transformers' logits."""

import pytest
import torch
from kernel_cases import DEVICE

pytest.importorskip("triton")


@pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU the kernels run compiled: tests/test_kernels_end_to_end.py")
def test_tiny_llama_through_kernels_matches_transformers(monkeypatch):
    import llmapi.layers.dispatch as dispatch
    from tiny_models import PagedDriver, make_tiny_llama, to_engine_model

    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    hf = make_tiny_llama()
    model, cfg = to_engine_model(hf)
    driver = PagedDriver(model, cfg)
    a, b = [5, 9, 11, 3, 8, 21, 7], [4, 17, 2]
    with torch.no_grad():
        ref_a, ref_b = hf(torch.tensor([a])).logits[0], hf(torch.tensor([b])).logits[0]  # [L, V]
    # A packed prefill of both (plus a chunk split), then decodes: the packed kernel, then the decode kernel.
    first = driver.step({0: a[:5], 1: b})
    torch.testing.assert_close(first[0], ref_a[:5], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first[1], ref_b, rtol=1e-4, atol=1e-4)
    second = driver.step({0: a[5:]})
    torch.testing.assert_close(second[0], ref_a[5:], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        ref_a2 = hf(torch.tensor([a + [30]])).logits[0, -1]
        ref_b2 = hf(torch.tensor([b + [31]])).logits[0, -1]
    third = driver.step({0: [30], 1: [31]})
    torch.testing.assert_close(third[0][0], ref_a2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(third[1][0], ref_b2, rtol=1e-4, atol=1e-4)
