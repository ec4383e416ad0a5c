"""The packed attention kernel's FP8 mode (fp8_attention: Q.K and P.V on E4M3 operands, TensorRT-LLM's FP8 context
FMHA) against a plain-torch emulation of the same arithmetic (tile by tile: the queries' per-row codes, the cache's
codes, the weights' codes of p * P_SCALE, float32 online softmax), and against float64 attention over the same
cache, whose error it must keep within FP8's."""

import math

import pytest
import torch
from kernel_cases import DEVICE, assert_top5_rule, paged_case, rel_error

triton = pytest.importorskip("triton")

from llmapi._kernels.paged_attention import paged_attention_ref  # noqa: E402
from llmapi._kernels.prefill_attention import LONG_TILING, P_SCALE, paged_packed_attention  # noqa: E402

interpreted = pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU these kernels run compiled: pytest -m gpu")
FP8 = torch.float8_e4m3fn


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to E4M3 (torch's cast: nearest even, saturating by the clamp)."""
    return x.clamp(-448.0, 448.0).to(FP8).float()


def fp8_case(query_lens, context_lens, nh, nkv, hd, block, dtype, seed):
    """paged_case with its cache as fp8 codes at per-tensor (K, V) scales (amax / 448)."""
    q, kc, vc, qsl, ctx, tables = paged_case(query_lens, context_lens, nh, nkv, hd, block, torch.float32, seed)
    kv_scale = torch.stack([kc.abs().max() / 448, vc.abs().max() / 448]).float()
    k8, v8 = (kc / kv_scale[0]).to(FP8), (vc / kv_scale[1]).to(FP8)
    return q.to(dtype), k8, v8, qsl, ctx, tables, kv_scale.to(q.device)


def emulate(q, k8, v8, qsl, ctx, tables, scale, kv_scale, block_n, window=None):
    """The FP8 mode's arithmetic in torch float32, keys in tiles of block_n from position 0 (a tile a row does not
    see leaves its state as it is, as the kernel's masked or skipped tiles do); with `window` W each query sees
    its last W positions."""
    q, k8, v8, qsl, ctx, tables, kv_scale = (t.cpu() for t in (q, k8, v8, qsl, ctx, tables, kv_scale))
    nh, hd = q.shape[1], q.shape[2]
    nkv, page = k8.shape[2], k8.shape[1]
    group = nh // nkv
    out = torch.zeros(q.shape, dtype=torch.float32)
    qf = q.float()
    amax = qf.abs().amax(-1, keepdim=True)
    q_scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    q8 = _e4m3(qf / q_scale)  # [T, nh, hd]
    log2e = 1.4426950408889634
    for r in range(len(ctx)):
        n, c = int(qsl[r + 1] - qsl[r]), int(ctx[r])
        t0 = int(qsl[r])
        ids = tables[r, : math.ceil(c / page)].long()
        keys = k8[ids].reshape(-1, nkv, hd)[:c].float()  # [c, nkv, hd] codes
        vals = v8[ids].reshape(-1, nkv, hd)[:c].float()
        pos = torch.arange(c - n, c)  # the queries' positions
        for h in range(nh):
            kvh = h // group
            qk_scale = (scale * log2e * kv_scale[0] * q_scale[t0:t0 + n, h]).float()  # [n, 1]
            m = torch.full((n,), float("-inf"))
            l = torch.zeros(n)
            acc = torch.zeros(n, hd)
            for start in range(0, c, block_n):
                kpos = torch.arange(start, min(start + block_n, c))
                s = (q8[t0:t0 + n, h] @ keys[kpos, kvh].T) * qk_scale
                seen = kpos[None, :] <= pos[:, None]
                if window is not None:
                    seen &= kpos[None, :] > pos[:, None] - window
                s = torch.where(seen, s, float("-inf"))
                m_new = torch.maximum(m, s.amax(1))
                shift = torch.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: weights 0, not NaN
                p = torch.exp2(s - shift[:, None])
                alpha = torch.exp2(m - shift)
                l = l * alpha + p.sum(1) * P_SCALE.value
                acc = acc * alpha[:, None] + _e4m3(p * P_SCALE.value) @ vals[kpos, kvh]
                m = m_new
            out[t0:t0 + n, h] = acc / l[:, None] * kv_scale[1]
    return out


def check_fp8(query_lens, context_lens, nh, nkv, hd, block, dtype, seed, window=None, **tiling):
    q, k8, v8, qsl, ctx, tables, kv_scale = fp8_case(query_lens, context_lens, nh, nkv, hd, block, dtype, seed)
    scale = hd**-0.5
    out = torch.full_like(q, float("nan"))
    paged_packed_attention(q, k8, v8, qsl, ctx, tables, scale, out=out, kv_scale=kv_scale, fp8_attention=True,
                           max_query_len=max(query_lens), sliding_window=window, **tiling)
    block_n = tiling.get("block_n") or (LONG_TILING[1] if max(query_lens) >= 256 else 32)
    # The same arithmetic. Interpreted, equal but for the output's rounding to the query dtype (within its eps;
    # the interpreter may truncate); emulated with other tiles than the kernel's, elements differ by orders of
    # magnitude more. On a GPU the tensor cores sum in their own order, which can flip a weight's rounding.
    emulated = emulate(q, k8, v8, qsl, ctx, tables, scale, kv_scale, block_n, window)
    if DEVICE == "cpu":
        eps = torch.finfo(q.dtype).eps
        assert ((out.float() - emulated).abs() <= eps * emulated.abs() + 1e-6).all()
    else:
        assert rel_error(out.cpu().float(), emulated) < 1e-2
    # Against exact attention over the same cache: FP8's error, several times bfloat16's and no more.
    exact = paged_attention_ref(q.double().cpu(), k8.cpu(), v8.cpu(), qsl.cpu(), ctx.cpu(), tables.cpu(), scale,
                                kv_scale.cpu().double(), window)
    err = rel_error(out.cpu(), exact)
    bf16 = torch.full_like(q, float("nan"))
    paged_packed_attention(q, k8, v8, qsl, ctx, tables, scale, out=bf16, kv_scale=kv_scale,
                           max_query_len=max(query_lens), sliding_window=window, **tiling)
    assert err < 0.05, f"relative error {err:.2e}"
    assert rel_error(bf16.cpu(), exact) < err  # the test sees FP8's rounding: the modes differ
    return err


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_attention_interpreted(dtype):
    # A whole prompt, a chunk after earlier context ending mid-block, decodes; GQA group 2.
    check_fp8([40, 23, 1, 1], [40, 60, 7, 90], nh=4, nkv=2, hd=32, block=16, dtype=dtype, seed=3,
              block_m=32, block_n=16)


@interpreted
def test_fp8_attention_interpreted_sliding_window():
    # Each query sees its last 20 positions: tiles before a block's window are skipped, rows start mid-tile.
    check_fp8([40, 23, 1], [40, 60, 90], nh=4, nkv=2, hd=32, block=16, dtype=torch.bfloat16, seed=6, window=20,
              block_m=32, block_n=16)


@interpreted
def test_fp8_attention_interpreted_long_tiling():
    # A 260-token query takes LONG_TILING (128 x 128 tiles) by default.
    check_fp8([260, 3], [300, 3], nh=2, nkv=1, hd=32, block=32, dtype=torch.bfloat16, seed=4)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
@pytest.mark.parametrize("tiling", [dict(block_m=64, block_n=32, num_warps=4, num_stages=1),
                                    dict(block_m=128, block_n=128, num_warps=8, num_stages=2)])
def test_fp8_attention_gpu(tiling):
    # Llama-3.1-8B's heads: E4M3 operands on the tensor cores.
    check_fp8([300, 77, 1, 1], [300, 500, 64, 1000], nh=32, nkv=8, hd=128, block=32, dtype=torch.bfloat16, seed=5,
              **tiling)


def test_fp8_attention_needs_an_fp8_cache_and_2_byte_queries():
    q, kc, vc, qsl, ctx, tables = paged_case([3], [3], 2, 1, 32, 16, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="fp8_attention needs an fp8 .* cache and bfloat16 / float16 queries"):
        paged_packed_attention(q, kc, vc, qsl, ctx, tables, 1.0, fp8_attention=True)
    q8, k8, v8, qsl, ctx, tables, kv_scale = fp8_case([3], [3], 2, 1, 32, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="got a torch.float8_e4m3fn cache and torch.float32 queries"):
        paged_packed_attention(q8, k8, v8, qsl, ctx, tables, 1.0, kv_scale=kv_scale, fp8_attention=True)


@interpreted
def test_tiny_llama_takes_fp8_context_fmha(monkeypatch):
    """KvCacheConfig.use_fp8_context_fmha reaches the packed kernel: a bf16 tiny Llama over an fp8 cache, its
    prefill through the FP8 dots against the same steps without them."""
    import llmapi.layers.dispatch as dispatch
    from tiny_models import PagedDriver, make_tiny_llama, to_engine_model

    from llmapi._kernels.kv_quant import kv_scales_from_amax
    from llmapi.distributed.mapping import Mapping
    from llmapi.distributed.sharding import build_rank_model
    from llmapi.layers.attention import Attention, enable_fp8_context_fmha
    from llmapi.quantization.config import QuantConfig
    from llmapi.quantization.kv_cache import SCALE_NAME

    float_model, cfg = to_engine_model(make_tiny_llama())
    cfg = {**cfg, "quantization": QuantConfig(None, kv_cache_quant_algo="FP8").to_dict()}
    weights = dict(float_model.state_dict())
    for i in range(cfg["num_hidden_layers"]):
        weights[SCALE_NAME.format(i)] = kv_scales_from_amax(4.0, 3.5, FP8)
    model = build_rank_model(cfg, Mapping(1, 1), "cpu", torch.bfloat16)
    model.load_weights(weights)
    model = model.to(torch.bfloat16).eval()
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    drivers = [PagedDriver(model, cfg, dtype=FP8) for _ in range(2)]
    chunks = {0: [5, 9, 11, 3, 8, 21, 7, 40, 41, 42], 1: [4, 17, 2, 60, 61]}  # two prompts, one packed step
    plain = drivers[0].step(chunks)
    assert enable_fp8_context_fmha(model, FP8, torch.device("cpu")) == cfg["num_hidden_layers"]
    assert all(m.fp8_context_fmha for m in model.modules() if isinstance(m, Attention))
    fp8 = drivers[1].step(chunks)
    for rid in chunks:
        err = rel_error(fp8[rid], plain[rid])
        assert 0 < err < 0.05, f"request {rid}: relative difference {err:.2e}"


def test_fp8_context_fmha_refusals(monkeypatch, tmp_path):
    import llmapi.layers.dispatch as dispatch
    from encdec_models import t5
    from tiny_models import make_tiny_llama, to_engine_model

    from llmapi.config import KvCacheConfig
    from llmapi.layers.attention import enable_fp8_context_fmha

    model, _ = to_engine_model(make_tiny_llama())
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    with pytest.raises(ValueError, match="use_fp8_context_fmha needs an fp8 KV cache .* this one is torch.bfloat16"):
        enable_fp8_context_fmha(model, torch.bfloat16, torch.device("cpu"))
    encdec, _ = to_engine_model(t5())
    with pytest.raises(ValueError, match="applies to decoder-only models' attention; EncoderDecoderModel has none"):
        enable_fp8_context_fmha(encdec, FP8, torch.device("cpu"))
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", False)
    with pytest.raises(ValueError, match="runs in the Triton kernels, on a GPU; the device is cpu"):
        enable_fp8_context_fmha(model, FP8, torch.device("cpu"))
    with pytest.raises(ValueError, match="use_fp8_context_fmha"):
        KvCacheConfig(use_fp8_context_fmha=1)
    assert KvCacheConfig().use_fp8_context_fmha is False
    # Through LLM(): the runner refuses it as it loads.
    from llmapi import LLM

    make_tiny_llama(tmp_path)
    with pytest.raises(ValueError, match="needs an fp8 KV cache"):
        LLM(str(tmp_path), skip_tokenizer_init=True, kv_cache_config={"use_fp8_context_fmha": True})


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_llm_fp8_context_fmha_agrees_by_top5_rule(tmp_path):
    """bf16 over an fp8 cache, greedy, with and without use_fp8_context_fmha: up to the first mismatch the tokens
    are equal, and there each side's token is in the other's top 5 (vLLM's rule); long prompts take the long
    tiling."""
    from tiny_models import make_tiny_llama
    from tiny_tokenizer import save_tiny_tokenizer

    from llmapi import LLM, QuantConfig, SamplingParams

    # head_dim 32: E4M3 dots take 32-deep tiles. Projections at std 0.075 (0.15 * sqrt(64 / 256)): at the default
    # 0.15 this width's attention logits are so large that the fp8 cache's own rounding already flips the argmax
    # at 127 of 300 prompt positions against float32 (logits 34% off), and any second rounding fails the rule.
    model = make_tiny_llama(tmp_path, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                            max_position_embeddings=1024, std=0.075)
    save_tiny_tokenizer(tmp_path, vocab_size=model.config.vocab_size)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (300, 40, 700, 5)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=5, detokenize=False)
    calibration = tmp_path / "calibration.txt"  # the cache's scales from these texts (not gensim's default)
    calibration.write_text("\n".join(f"sample {i}: the house is wonderful and the cat sat on the mat number {i}"
                                     for i in range(16)))
    quant = QuantConfig(kv_cache_quant_algo="FP8", calibration_dataset=str(calibration))
    outs = []
    for fmha in (False, True):
        with LLM(str(tmp_path), dtype="bfloat16", quant=quant, skip_tokenizer_init=True,
                 kv_cache_config={"use_fp8_context_fmha": fmha}) as llm:
            outs.append(llm.generate(prompts, params, use_tqdm=False))
    assert_top5_rule(*outs)
