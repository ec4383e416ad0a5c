"""The Triton GEMV for one-token steps (LLMAPI_ONE_TOKEN_GEMV=triton, the default on a GPU): a bf16 model's
one-token steps through it give the logits of cuBLAS's (F.linear's) steps; other steps keep F.linear; a model on the
CPU keeps nn.Linear; the setting's bad values are refused by name."""

import pytest
import torch
from kernel_cases import DEVICE, rel_error  # first: it picks Triton's interpreter before triton is imported

triton = pytest.importorskip("triton")

interpreted = pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU the kernel runs compiled: pytest -m gpu")


@interpreted
def test_tiny_llama_decode_steps_through_triton_gemv(monkeypatch):
    import llmapi._kernels.gemv as kernel
    import llmapi.layers.dispatch as dispatch
    from tiny_models import PagedDriver, make_tiny_llama, to_engine_model

    from llmapi.layers.linear import GemvLinear, use_triton_gemv

    model, cfg = to_engine_model(make_tiny_llama(), dtype=torch.bfloat16)
    model = model.to(torch.bfloat16).eval()
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    rows = []

    def counted(x, weight, bias=None, **tune):
        rows.append(x.shape[0])
        return gemv(x, weight, bias, **tune)

    gemv = kernel.gemv
    monkeypatch.setattr(kernel, "gemv", counted)
    drivers = [PagedDriver(model, cfg, dtype=torch.bfloat16) for _ in range(2)]
    steps = [{0: [5, 9, 11, 3, 8]}, {0: [21]}, {0: [7]}]  # a prompt, then two one-token decode steps
    plain = [drivers[0].step(s)[0] for s in steps]
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert use_triton_gemv(model) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert all(isinstance(m, GemvLinear) for m in model.modules() if isinstance(m, torch.nn.Linear))
    fast = [drivers[1].step(s)[0] for s in steps]
    # The prompt's step (5 rows) keeps F.linear; each decode step runs every linear through the GEMV.
    assert rows == [1] * 2 * linears
    assert torch.equal(fast[0], plain[0])
    for a, b in zip(plain[1:], fast[1:]):
        assert rel_error(b, a) < 2e-2


def test_setting_values(monkeypatch, tmp_path):
    from tiny_models import make_tiny_llama

    from llmapi import LLM
    from llmapi.errors import LLMAPIError
    from llmapi.layers.linear import GEMV_ENV, one_token_gemv

    monkeypatch.delenv(GEMV_ENV, raising=False)
    assert one_token_gemv() == "triton"
    monkeypatch.setenv(GEMV_ENV, "cublas")
    assert one_token_gemv() == "cublas"
    monkeypatch.setenv(GEMV_ENV, "triton")
    assert one_token_gemv() == "triton"
    monkeypatch.setenv(GEMV_ENV, "cutlass")
    with pytest.raises(ValueError, match="LLMAPI_ONE_TOKEN_GEMV='cutlass' is invalid: must be one of cublas, triton"):
        one_token_gemv()
    make_tiny_llama(tmp_path)
    with pytest.raises((ValueError, LLMAPIError), match="LLMAPI_ONE_TOKEN_GEMV='cutlass' is invalid"):
        LLM(str(tmp_path), skip_tokenizer_init=True)


def test_cpu_model_keeps_nn_linear(monkeypatch, tmp_path):
    """The default (triton) converts a model's linears on a GPU only: on the CPU they stay nn.Linear."""
    from tiny_models import make_tiny_llama

    from llmapi import LLM
    from llmapi.layers.linear import GEMV_ENV, GemvLinear

    monkeypatch.delenv(GEMV_ENV, raising=False)
    make_tiny_llama(tmp_path)
    with LLM(str(tmp_path), device="cpu", skip_tokenizer_init=True) as llm:
        modules = list(llm._runner.model.modules())
    assert any(type(m) is torch.nn.Linear for m in modules)
    assert not any(isinstance(m, GemvLinear) for m in modules)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_llm_triton_gemv_agrees_by_top5_rule(tmp_path, monkeypatch):
    """bf16, greedy, one request at a time (bs 1 decode steps, from the decode graphs), with
    LLMAPI_ONE_TOKEN_GEMV=cublas and at the default (the Triton GEMV): up to the first mismatch the tokens are
    equal, and there each side's token is in the other's top 5 (vLLM's rule)."""
    from kernel_cases import assert_top5_rule
    from tiny_models import make_tiny_llama

    from llmapi import LLM, SamplingParams
    from llmapi.layers.linear import GEMV_ENV, GemvLinear

    make_tiny_llama(tmp_path, hidden_size=256, num_attention_heads=8, num_key_value_heads=2, std=0.075)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (9, 40, 3)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=5, detokenize=False)
    outs = []
    for choice in ("cublas", None):  # None: the default, the Triton GEMV
        if choice is None:
            monkeypatch.delenv(GEMV_ENV, raising=False)
        else:
            monkeypatch.setenv(GEMV_ENV, choice)
        with LLM(str(tmp_path), dtype="bfloat16", skip_tokenizer_init=True) as llm:
            converted = sum(isinstance(m, GemvLinear) for m in llm._runner.model.modules())
            assert (converted > 0) == (choice is None)
            outs.append([llm.generate([p], params, use_tqdm=False)[0] for p in prompts])
    assert_top5_rule(*outs)
