"""attn_backend="flash": prefill rows through a varlen FlashAttention call over a gathered copy of their contexts.

On the CPU the varlen call is a plain-torch one written here from FlashAttention's documented semantics (causal
aligned to the bottom right, grouped K/V heads); the gather, the dequantization, the scales, the E4M3 output and
the mixed step's split around the decode kernel are the library's, checked against the float64 paged reference.
On a GPU (`-m gpu`) torch's own FlashAttention runs, against the same reference and end to end against the
Triton backend.
"""

import pytest
import torch
from kernel_cases import DEVICE, REL_ERROR, assert_top5_rule, paged_case, rel_error

triton = pytest.importorskip("triton")

import llmapi.layers.flash_prefill as fp  # noqa: E402
from llmapi._kernels.fp8_linear import quantize_fp8  # noqa: E402
from llmapi._kernels.paged_attention import paged_attention_ref  # noqa: E402
from llmapi.layers.attention import AttentionMetadata  # noqa: E402

interpreted = pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU torch's FlashAttention runs: pytest -m gpu")
FP8 = torch.float8_e4m3fn


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """FlashAttention's varlen forward, causal, in float64: sequence i's query j (of L) sees its keys
    0 .. C - L + j (of C); query head h reads K/V head h // (nh / nkv)."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        assert q1 - q0 <= max_q and k1 - k0 <= max_k
        qi = q[q0:q1].double().transpose(0, 1)  # [nh, L, hd]
        ki = k[k0:k1].double().repeat_interleave(group, 1).transpose(0, 1)  # [nh, C, hd]
        vi = v[k0:k1].double().repeat_interleave(group, 1).transpose(0, 1)
        s = qi @ ki.transpose(1, 2) * scale  # [nh, L, C]
        rows, cols = torch.arange(q1 - q0)[:, None], torch.arange(k1 - k0)[None, :]
        s = s.masked_fill(cols > rows + (k1 - k0) - (q1 - q0), float("-inf"))
        out[q0:q1] = (s.softmax(-1) @ vi).transpose(0, 1)
    return out.to(q.dtype)


def _metadata(query_lens, ctx_lens, tables, block, qsl, ctx):
    attn = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.int64), query_lens=qsl[1:] - qsl[:-1],
                             context_lens=ctx, query_start_loc=qsl, block_tables=tables,
                             max_query_len=max(query_lens), max_context_len=max(ctx_lens), tokens_per_block=block)
    attn.context_lens_cpu = ctx.cpu().numpy()
    return attn


def step_slots(query_lens, ctx_lens, tables, block):
    """[T] the cache slots of the step's own tokens: row r's positions C - L .. C - 1."""
    t = tables.cpu().tolist()
    return torch.tensor([t[r][p // block] * block + p % block for r, (n, c) in enumerate(zip(query_lens, ctx_lens))
                         for p in range(c - n, c)])


def check(query_lens, ctx_lens, nh, nkv, hd, block, dtype, seed, cache=None, quant_out=False, first=0):
    """flash_prefill on rows first.. of a paged case (a float cache, or `cache` FP8 / int8 codes) against the
    float64 reference: each row's earlier context as the cache holds it (dequantized to the model dtype), the
    step's own keys and values as the layer passes them (unquantized, in the model dtype)."""
    q, kc, vc, qsl, ctx, tables = paged_case(query_lens, ctx_lens, nh, nkv, hd, block, torch.float32, seed)
    slots = step_slots(query_lens, ctx_lens, tables, block).to(kc.device)
    fresh_k = kc.flatten(0, 1)[slots].to(dtype)  # [T, nkv, hd]
    fresh_v = vc.flatten(0, 1)[slots].to(dtype)
    kv_scale = None
    if cache is not None:
        top = 448.0 if cache == FP8 else 127.0
        kv_scale = torch.stack([kc.abs().max() / top, vc.abs().max() / top]).float()
        kc, vc = (kc / kv_scale[0]), (vc / kv_scale[1])
        kc, vc = (kc.to(FP8), vc.to(FP8)) if cache == FP8 else (kc.round().to(torch.int8), vc.round().to(torch.int8))
        # The copy holds the context dequantized in the model dtype: codes times scale, rounded to it.
        ref_k = (kc.double() * kv_scale[0].double()).to(dtype).double()
        ref_v = (vc.double() * kv_scale[1].double()).to(dtype).double()
    else:
        kc, vc = kc.to(dtype), vc.to(dtype)
        ref_k, ref_v = kc.double(), vc.double()
    ref_k.flatten(0, 1)[slots] = fresh_k.double()
    ref_v.flatten(0, 1)[slots] = fresh_v.double()
    q = q.to(dtype)
    attn = _metadata(query_lens, ctx_lens, tables, block, qsl, ctx)
    scale = hd**-0.5
    start = int(qsl[first])
    exact = paged_attention_ref(q.double().cpu(), ref_k.cpu(), ref_v.cpu(), qsl.cpu(), ctx.cpu(), tables.cpu(),
                                scale)[start:]
    quant_scale = (exact.abs().max() / 448).float().reshape(1).to(q.device) if quant_out else None
    out = torch.full((len(q) - start, nh, hd), float("nan"), dtype=q.dtype, device=q.device)
    if quant_out:
        out = torch.empty(out.shape, dtype=FP8, device=q.device)
    scales = None if kv_scale is None else tuple(kv_scale.tolist())
    got = fp.flash_prefill(q[start:], fresh_k[start:], fresh_v[start:], torch.stack([kc, vc]), attn, first, scale,
                           scales, quant_scale, out=out)
    assert got is out
    if quant_out:  # the E4M3 codes of the output: within one code step of the reference's codes, plus what
        # FlashAttention's P rounded to 16 bits before P.V costs (2^-8 of each head's largest output, so
        # near-zero outputs of a row of large ones may round to another code)
        ref_codes = quantize_fp8(exact, quant_scale.cpu().double()).float()
        row_top = ref_codes.abs().amax(-1, keepdim=True)
        assert (got.cpu().float() - ref_codes).abs().le(ref_codes.abs() / 8 + 2 ** -8 * row_top + 2 ** -6).all()
        return
    err = rel_error(got.cpu(), exact)
    assert err < REL_ERROR[dtype], f"relative error {err:.2e}"


@pytest.fixture
def reference_call(monkeypatch):
    if DEVICE != "cuda":
        monkeypatch.setattr(fp, "flash_varlen", varlen_reference)


@pytest.fixture(params=["torch", "triton"] if DEVICE != "cuda" else ["triton"])
def copy_path(request, monkeypatch):
    """Which ops build the copy and the E4M3 output: torch's (the CPU path) or the Triton kernels (CUDA tensors;
    here on the CPU under Triton's interpreter)."""
    import llmapi.layers.dispatch as dispatch

    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", request.param == "triton")
    return request.param


def test_context_plan():
    # Each row's earlier context (C - L positions) from the cache at block_tables[r][p // B] * B + p % B, then its
    # L fresh keys, request after request; whole prompts need no copy.
    query_lens, ctx_lens = [3, 1, 5], [10, 4, 5]
    q, kc, vc, qsl, ctx, tables = paged_case(query_lens, ctx_lens, 2, 1, 8, 4, torch.float32, 0)
    attn = _metadata(query_lens, ctx_lens, tables, 4, qsl, ctx)
    t = tables.cpu().tolist()
    for first in (0, 1):
        slots, prefix_dst, fresh_dst, cu_k, max_k, *_ = fp.context_plan(attn, first, sum(query_lens[first:]))
        rows = range(first, 3)
        assert slots.cpu().tolist() == [t[r][p // 4] * 4 + p % 4 for r in rows
                                        for p in range(ctx_lens[r] - query_lens[r])]
        starts = [sum(ctx_lens[first:r]) for r in rows]
        assert prefix_dst.cpu().tolist() == [s + p for r, s in zip(rows, starts)
                                             for p in range(ctx_lens[r] - query_lens[r])]
        assert fresh_dst.cpu().tolist() == [s + p for r, s in zip(rows, starts)
                                            for p in range(ctx_lens[r] - query_lens[r], ctx_lens[r])]
        assert cu_k.cpu().tolist() == [0, *torch.tensor(ctx_lens[first:]).cumsum(0).tolist()]
        assert max_k == max(ctx_lens[first:])
        assert fp.context_plan(attn, first, 0)[0] is slots  # once a step: the layers share it
    attn = _metadata([3, 5], [3, 5], tables[:2], 4, torch.tensor([0, 3, 8], dtype=torch.int32),
                     torch.tensor([3, 5], dtype=torch.int32))
    plan = fp.context_plan(attn, 0, 8)
    assert plan.prefix_slots.numel() == 0 and plan.fresh_dst is None and plan.cu_k.tolist() == [0, 3, 8] \
        and plan.max_k == 5


def test_which_steps_take_the_copy():
    # Prompt chunks (a few keys per query token) do; rows of a few tokens over long contexts (speculative
    # verification), steps past MAX_KEYS and steps of short prompts only keep the packed kernel; so does a step
    # without host lengths.
    def applies(query_lens, ctx_lens, first=0, host=True):
        qsl = torch.tensor([0, *query_lens]).cumsum(0).to(torch.int32)
        attn = _metadata(query_lens, ctx_lens, torch.zeros(len(ctx_lens), 1, dtype=torch.int32), 4, qsl,
                         torch.tensor(ctx_lens, dtype=torch.int32))
        attn.context_lens_cpu = attn.context_lens_cpu if host else None
        return fp.flash_applies(attn, first, sum(query_lens[first:]))

    assert applies([8192], [20000]) and applies([2048, 100], [2048, 100]) and applies([1, 1, 300], [5000, 9000, 300], 2)
    assert not applies([4, 4, 4], [4000, 5000, 300])  # 9,300 keys for 12 queries
    assert not applies([1, 1, 300], [5000, 9000, 300])  # the decodes are the decode kernel's: first=0 counts them
    assert not applies([8192] * 4, [70000] * 4)  # 280,000 keys > MAX_KEYS
    assert not applies([2048], [2048], host=False)
    assert not applies([255, 100], [255, 100]) and applies([256, 100], [256, 100])  # MIN_QUERY: long steps only
    from llmapi._kernels.prefill_attention import LONG_QUERY

    assert fp.MIN_QUERY == LONG_QUERY  # the packed kernel's long tiling starts where the copy does


@pytest.mark.usefixtures("reference_call", "copy_path")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16] + ([torch.float32] if DEVICE != "cuda" else []))
def test_flash_prefill_float_cache(dtype):
    # Whole prompts, a chunk after earlier context (ending mid-block), a one-token row; GQA group 2.
    check([7, 23, 1, 9], [7, 60, 30, 9], nh=4, nkv=2, hd=16, block=4, dtype=dtype, seed=1)


@pytest.mark.usefixtures("reference_call", "copy_path")
@pytest.mark.parametrize("cache", [FP8, torch.int8])
def test_flash_prefill_quantized_cache(cache):
    # The codes dequantized into the copy: K's scale in the softmax scale, V's on the output.
    check([7, 23, 1], [7, 60, 30], nh=4, nkv=2, hd=16, block=4, dtype=torch.bfloat16, seed=2, cache=cache)


@pytest.mark.usefixtures("reference_call", "copy_path")
def test_flash_prefill_rows_after_decodes_and_e4m3_output():
    # A mixed step's prefill rows (after two decodes) only, their output as the next FP8 linear's E4M3 input.
    check([1, 1, 12, 5], [9, 30, 12, 40], nh=4, nkv=1, hd=16, block=4, dtype=torch.bfloat16, seed=3, first=2)
    check([1, 1, 12, 5], [9, 30, 12, 40], nh=4, nkv=1, hd=16, block=4, dtype=torch.bfloat16, seed=3, first=2,
          quant_out=True, cache=FP8)


def check_gather(query_lens, ctx_lens, nh, nkv, hd, block, dtype, cache, seed):
    """The Triton copy (one kernel for K and V) against the torch one it replaces, bit for bit: each key of a
    chunk's earlier context read from its cache slot (codes times the scale, rounded once to the model dtype),
    the step's own keys at their places; K and V each."""
    from llmapi._kernels.kv_write import gather_kv

    q, kc, vc, qsl, ctx, tables = paged_case(query_lens, ctx_lens, nh, nkv, hd, block, torch.float32, seed)
    g = torch.Generator().manual_seed(seed + 1)
    k = torch.randn(sum(query_lens), nkv, hd, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(sum(query_lens), nkv, hd, generator=g).to(dtype).to(DEVICE)
    scales = None
    if cache is not None:
        scales = (0.013, 0.029)
        kc, vc = (kc / 0.013 * 8).clamp(-127, 127), (vc / 0.029 * 8).clamp(-127, 127)
        kc, vc = (kc.to(FP8), vc.to(FP8)) if cache == FP8 else (kc.round().to(torch.int8), vc.round().to(torch.int8))
    else:
        kc, vc = kc.to(dtype), vc.to(dtype)
    attn = _metadata(query_lens, ctx_lens, tables, block, qsl, ctx)
    plan = fp.context_plan(attn, 0, len(k))
    got_k, got_v = gather_kv(k, v, kc, vc, plan.src, scales)
    for got, fresh, c, i in ((got_k, k, kc, 0), (got_v, v, vc, 1)):
        want = fp._with_context(fresh, c, plan, None if scales is None else scales[i])
        assert got.dtype == dtype and torch.equal(got.cpu(), want.cpu())
    if cache is not None:
        with pytest.raises(ValueError, match="needs kv_scales"):
            gather_kv(k, v, kc, vc, plan.src)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cache", [None, FP8, torch.int8])
def test_gather_kv_is_the_torch_copy(dtype, cache):
    # Whole prompts, a chunk after earlier context (ending mid-block), a one-token row over context; GQA.
    check_gather([7, 23, 1, 9], [7, 60, 30, 9], nh=4, nkv=2, hd=16, block=4, dtype=dtype, cache=cache, seed=8)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cache", [None, FP8, torch.int8])
def test_gather_kv_gpu(dtype, cache):
    # Llama-3.1-8B's K/V heads, 32-token blocks, chunks after long contexts.
    check_gather([300, 1000, 1, 2048], [300, 3000, 64, 4096], nh=32, nkv=8, hd=128, block=32, dtype=dtype,
                 cache=cache, seed=10)


def test_quantize_fp8_rows_into_a_given_buffer():
    # The static one-pass quantization into rows of a larger buffer (a mixed step's prefill rows after its
    # decodes), equal to quantize_fp8's codes; the rows before stay as they were.
    from llmapi._kernels.fp8_quant import quantize_fp8_rows

    x = (torch.randn(6, 40, generator=torch.Generator().manual_seed(4)) * 3).to(DEVICE)
    scale = torch.tensor([0.02], device=DEVICE)
    buf = torch.zeros(9, 40, dtype=FP8, device=DEVICE)
    codes, s = quantize_fp8_rows(x, scale, out=buf[3:])
    assert codes.data_ptr() == buf[3:].data_ptr() and torch.equal(s, scale)
    want = quantize_fp8(x.cpu(), scale.cpu())
    assert torch.equal(buf[3:].cpu().view(torch.uint8), want.view(torch.uint8))
    assert not buf[:3].cpu().view(torch.uint8).any()


@interpreted
def test_tiny_llama_steps_through_flash_backend(monkeypatch):
    """attn_backend="flash" reaches the layers: a tiny Llama's packed steps (whole prompts, then a chunk after
    context beside decodes) give the logits of the Triton kernels' steps, the varlen call standing in for
    FlashAttention, and the mixed step's decodes still take the decode kernel."""
    import llmapi.layers.dispatch as dispatch
    from tiny_models import PagedDriver, make_tiny_llama, to_engine_model

    from llmapi.layers.attention import Attention, set_attn_backend

    model, cfg = to_engine_model(make_tiny_llama())
    model = model.eval()
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    calls = []

    def counted(*args):
        calls.append(len(args[3]) - 1)  # rows in the call
        return varlen_reference(*args)

    monkeypatch.setattr(fp, "flash_varlen", counted)
    monkeypatch.setattr(fp, "MIN_QUERY", 2)  # these steps' queries are short: let them take the copy
    drivers = [PagedDriver(model, cfg) for _ in range(2)]
    steps = [{0: [5, 9, 11, 3, 8, 21, 7], 1: [4, 17, 2]}, {0: [40], 1: [60, 61, 62, 63, 64]}]
    plain = [drivers[0].step(s) for s in steps]
    assert calls == []
    assert set_attn_backend(model, "flash", torch.float32, torch.device("cpu")) == cfg["num_hidden_layers"]
    assert all(m.flash_prefill for m in model.modules() if isinstance(m, Attention))
    flash = [drivers[1].step(s) for s in steps]
    assert calls == [2] * cfg["num_hidden_layers"] * 2  # PagedDriver puts no decodes first: every row in one call
    for a, b in zip(plain, flash):
        for rid in a:
            assert rel_error(b[rid], a[rid]) < 1e-5


@interpreted
def test_llm_flash_backend_matches_triton_in_float32(monkeypatch, tmp_path):
    """Through LLM(): the engine's own steps (prompts chunked at max_num_tokens, chunks after context beside
    running decodes) give the same float32 logprobs with attn_backend "flash" as with "triton"."""
    import llmapi.layers.dispatch as dispatch
    from tiny_models import make_tiny_llama

    from llmapi import LLM, SamplingParams

    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    calls = []

    def counted(*args):
        calls.append(int(args[4][-1]) - int(args[3][-1]))  # keys before the step's own: earlier context
        return varlen_reference(*args)

    monkeypatch.setattr(fp, "flash_varlen", counted)
    monkeypatch.setattr(fp, "MIN_QUERY", 2)
    make_tiny_llama(tmp_path)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (30, 4, 50, 2)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=5, detokenize=False)
    outs = []
    for backend in ("triton", "flash"):
        with LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_num_tokens=24,
                 attn_backend=backend) as llm:
            outs.append(llm.generate(prompts, params, use_tqdm=False))
        assert (len(calls) > 0) == (backend == "flash")
    assert max(calls) > 0  # some step's rows had earlier context: the gathered copy ran
    for one, other in zip(*outs, strict=True):
        a, b = one.outputs[0], other.outputs[0]
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.keys() == y.keys()
            assert max(abs(x[t].logprob - y[t].logprob) for t in x) < 1e-4


def test_attn_backend_refusals(monkeypatch, tmp_path):
    import llmapi.layers.dispatch as dispatch
    from encdec_models import t5
    from tiny_models import make_tiny_llama, to_engine_model

    from llmapi import LLM
    from llmapi.config import LlmArgs
    from llmapi.errors import LLMAPIError
    from llmapi.layers.attention import set_attn_backend

    model, _ = to_engine_model(make_tiny_llama())
    with pytest.raises(ValueError, match="attn_backend='flashinfer' is invalid: must be one of triton, flash"):
        set_attn_backend(model, "flashinfer", torch.bfloat16, torch.device("cpu"))
    assert set_attn_backend(model, "triton", torch.bfloat16, torch.device("cpu")) == 0
    with pytest.raises(ValueError, match="attn_backend='flash' runs torch's FlashAttention on a GPU; the device is cpu"):
        set_attn_backend(model, "flash", torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    with pytest.raises(ValueError, match="exclude each other"):
        set_attn_backend(model, "flash", torch.bfloat16, torch.device("cpu"), fp8_context_fmha=True)
    encdec, _ = to_engine_model(t5())
    with pytest.raises(ValueError, match="applies to decoder-only models' attention; .* has none"):
        set_attn_backend(encdec, "flash", torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match="attn_backend"):
        LlmArgs(model="x", attn_backend="flashinfer")
    # Through LLM(): the runner refuses it as it loads, with the reason.
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", False)
    make_tiny_llama(tmp_path)
    with pytest.raises((ValueError, LLMAPIError), match="on a GPU; the device is cpu"):
        LLM(str(tmp_path), skip_tokenizer_init=True, attn_backend="flash")


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_prefill_gpu(dtype):
    # Llama-3.1-8B's heads: whole prompts, long chunks after context (the bottom-right causal alignment), a
    # 1-token row, at float and fp8 caches; the fp8 cache's E4M3 output.
    query_lens, ctx_lens = [300, 1000, 1, 77, 2048], [300, 3000, 64, 500, 2048]
    check(query_lens, ctx_lens, nh=32, nkv=8, hd=128, block=32, dtype=dtype, seed=5)
    check(query_lens, ctx_lens, nh=32, nkv=8, hd=128, block=32, dtype=dtype, seed=6, cache=FP8)
    check([1, 1] + query_lens, [900, 20] + ctx_lens, nh=32, nkv=8, hd=128, block=32, dtype=dtype, seed=7, first=2,
          cache=FP8, quant_out=True)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_llm_flash_backend_agrees_by_top5_rule(tmp_path):
    """bf16 over an fp8 and a bf16 cache, greedy, attn_backend "flash" against "triton": up to the first
    mismatch the tokens are equal, and there each side's token is in the other's top 5 (vLLM's rule); long
    prompts are chunked (max_num_tokens 512), so chunks after context take the gathered copy."""
    from tiny_models import make_tiny_llama
    from tiny_tokenizer import save_tiny_tokenizer

    from llmapi import LLM, QuantConfig, SamplingParams

    model = make_tiny_llama(tmp_path, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                            max_position_embeddings=2048, std=0.075)
    save_tiny_tokenizer(tmp_path, vocab_size=model.config.vocab_size)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(f"sample {i}: the cat sat on the mat number {i}" for i in range(16)))
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (300, 40, 1300, 5, 700)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=5, detokenize=False)
    for quant in (None, QuantConfig(kv_cache_quant_algo="FP8", calibration_dataset=str(calibration))):
        outs = []
        for backend in ("triton", "flash"):
            with LLM(str(tmp_path), dtype="bfloat16", quant=quant, skip_tokenizer_init=True, max_num_tokens=512,
                     attn_backend=backend) as llm:
                outs.append(llm.generate(prompts, params, use_tqdm=False))
        assert_top5_rule(*outs, label=f"{'bf16' if quant is None else 'fp8'} cache, ")


def test_cli_options_reach_llm():
    import argparse

    from llmapi.bench import add_arguments as bench_arguments
    from llmapi.bench import offline_llm_kwargs
    from llmapi.serve.cli import add_arguments as serve_arguments
    from llmapi.serve.cli import llm_kwargs

    p = argparse.ArgumentParser()
    serve_arguments(p)
    assert llm_kwargs(p.parse_args(["m", "--attn-backend", "flash"]))["attn_backend"] == "flash"
    assert "attn_backend" not in llm_kwargs(p.parse_args(["m"]))  # LLM's default
    p = argparse.ArgumentParser()
    bench_arguments(p)
    assert offline_llm_kwargs(p.parse_args(["--model", "m", "--attn-backend", "flash"]), 64)["attn_backend"] == "flash"
    assert offline_llm_kwargs(p.parse_args(["--model", "m"]), 64)["attn_backend"] == "triton"
