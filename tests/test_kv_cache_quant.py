"""Quantized KV cache end to end: the setting, engine scales, cache capacity, logits, beam search and prefix reuse."""

import random

import pytest
import torch
from safetensors import safe_open
from tiny_models import PagedDriver

from llmapi import LLM, KvCacheConfig, QuantConfig, SamplingParams
from llmapi.distributed.mapping import Mapping
from llmapi.distributed.sharding import build_rank_model, load_rank_model
from llmapi.engine import cache, read_engine
from llmapi.quantization import kv_cache, resolve_quant
from llmapi.runtime.kv_cache import num_kv_blocks

SCALE = "transformer.layers.{}.attention.attn.kv_cache_scaling_factor"
# Calibration text for the tiny Llama's word-level vocabulary: its sentences, then every filler word w<id> in a
# shuffled order, 40 a line (English news would be <unk> to it and calibrate nothing).
_WORDS = [f"w{i}" for i in random.Random(0).sample(range(32, 320), 288)]
TEXTS = ["the quick brown fox jumps over the lazy dog", "once upon a time there was a small language model"] + [
    " ".join(_WORDS[i:i + 40]) for i in range(0, len(_WORDS), 40)]
# Relative logits error (|quantized - float| / |float| over every position) of the tiny Llama through a quantized
# KV cache, measured: fp8 0.041, int8 0.017 (0.039 when calibrated on text that misses most of its vocabulary, as
# clipped values cost more than rounding). Its K/V have std ~1.2 and amax ~4: int8's step amax / 127 gives an rms
# error ~0.8% of std, E4M3's 3 mantissa bits ~2.4% of each value; this model turns 0.8% weight noise into 2%
# logits error (test_quant_weight_only), the same ~2x seen here.
LOGITS_BOUND = {"FP8": 0.06, "INT8": 0.03}


@pytest.fixture
def recorded_calibration(monkeypatch):
    """Conversion calibrates over TEXTS (the tiny tokenizer's words); records the kv amax calibration gave it."""
    from llmapi.quantization import apply

    seen = []
    monkeypatch.setattr(apply, "calibration_texts", lambda *args, **kwargs: list(TEXTS))
    collect = apply.collect_activation_stats

    def recording(*args, **kwargs):
        stats = collect(*args, **kwargs)
        seen.append(stats.kv_amax)
        return stats

    monkeypatch.setattr(apply, "collect_activation_stats", recording)
    return seen


def _quantized_cache_logits(engine_dir, prompts, steps=3):
    """Logits of each prompt fed in `steps` chunks (so later chunks read earlier ones from the cache)."""
    cfg, _ = read_engine(engine_dir)
    model = build_rank_model(cfg, Mapping(1, 1), "cpu", torch.float32)
    load_rank_model(model, engine_dir, 0, False, cfg, torch.float32, "cpu")
    driver = PagedDriver(model.eval(), cfg, dtype=kv_cache.kv_cache_dtype(cfg, torch.float32))
    outs = {i: [] for i in range(len(prompts))}
    for s in range(steps):
        chunk = {i: p[s * len(p) // steps:(s + 1) * len(p) // steps] for i, p in enumerate(prompts)}
        for i, logits in driver.step(chunk).items():
            outs[i].append(logits)
    return torch.cat([torch.cat(outs[i]) for i in range(len(prompts))])  # [sum L, V]


def test_kv_cache_setting_and_errors():
    assert resolve_quant("fp8_kv_cache") == QuantConfig(quant_algo=None, kv_cache_quant_algo="FP8")
    # The scales come from calibration, so its settings are part of the section (and the cache key).
    assert resolve_quant("int8_kv_cache").to_dict() == {
        "quant_algo": None, "kv_cache_quant_algo": "INT8", "group_size": None, "calibration_dataset": None,
        "calibration_samples": 64, "calibration_max_seq_len": 512, "calibration_dataset_sha256": None}
    assert resolve_quant("fp8_kv_cache").to_dict() == {
        "quant_algo": None, "kv_cache_quant_algo": "FP8", "group_size": None, "calibration_dataset": None,
        "calibration_samples": 64, "calibration_max_seq_len": 512, "calibration_dataset_sha256": None}
    both = QuantConfig("W8A16", kv_cache_quant_algo="INT8")  # a weight mode and a KV-cache dtype together
    assert QuantConfig.from_dict(both.to_dict()) == both
    with pytest.raises(ValueError, match="kv_cache_quant_algo='FP16' is invalid"):
        QuantConfig(kv_cache_quant_algo="FP16")
    with pytest.raises(ValueError, match="quantizes nothing"):
        QuantConfig(quant_algo=None)
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig(quant_algo=None, kv_cache_quant_algo="FP8", group_size=64)
    with pytest.raises(ValueError, match="unknown.*fp8_kv_cache.*int8_kv_cache"):
        LLM("unused", quant="int4_kv_cache")


def test_fp8_kv_cache_needs_sm89(monkeypatch):
    from llmapi.errors import UnsupportedDeviceError

    fp8 = {"quantization": QuantConfig(None, kv_cache_quant_algo="FP8").to_dict()}
    int8 = {"quantization": QuantConfig(None, kv_cache_quant_algo="INT8").to_dict()}
    kv_cache.check_kv_cache_device(fp8, "cpu")  # emulated: fine
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    with pytest.raises(UnsupportedDeviceError, match=r"compute capability >= 8\.9.*has compute capability 8\.0"):
        kv_cache.check_kv_cache_device(fp8, "cuda")
    kv_cache.check_kv_cache_device(int8, "cuda")  # int8 runs anywhere
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    kv_cache.check_kv_cache_device(fp8, "cuda")


def test_kv_cache_capacity_grows_with_smaller_elements(tiny_llama_dir):
    cfg = {"num_key_value_heads": 2, "head_dim": 16}
    budget = KvCacheConfig(max_bytes=3 * 2**20)  # the same bytes for every cache dtype
    blocks = {d: num_kv_blocks(cfg, budget, torch.device("cpu"), d, 32, 3)
              for d in (torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn)}
    # 2 (K, V) x 3 layers x 2 heads x 16 x 32 tokens = 6144 elements a block: 3 MiB holds 128 float32 blocks.
    assert blocks == {torch.float32: 128, torch.bfloat16: 256, torch.int8: 512, torch.float8_e4m3fn: 512}
    with LLM(str(tiny_llama_dir), device="cpu", kv_cache_config=budget) as ref, \
            LLM(str(tiny_llama_dir), device="cpu", kv_cache_config=budget, quant="fp8_kv_cache") as llm:
        assert llm.num_kv_blocks == 4 * ref.num_kv_blocks  # the engine runs float32 on CPU
        assert {c.dtype for c in llm._local.kv_caches} == {torch.float8_e4m3fn}
        assert llm._local.kv_caches[0].untyped_storage().nbytes() == ref._local.kv_caches[0].untyped_storage().nbytes()


@pytest.mark.parametrize("algo", ["FP8", "INT8"])
def test_quantized_kv_cache_end_to_end(tiny_llama_dir, recorded_calibration, algo, tmp_path):
    quant = f"{algo.lower()}_kv_cache"
    ref = LLM(str(tiny_llama_dir), device="cpu")
    builds = cache.stats.builds
    llm = LLM(str(tiny_llama_dir), device="cpu", quant=quant, cache_dir=str(tmp_path))  # a fresh cache: it converts
    assert llm.engine_built and cache.stats.builds == builds + 1 and llm.engine_info.path != ref.engine_info.path
    section = llm.engine_info.config["quantization"]
    assert section == QuantConfig(quant_algo=None, kv_cache_quant_algo=algo).to_dict()
    assert section["quant_algo"] is None and section["kv_cache_quant_algo"] == algo
    assert "calibration_samples" in section  # the scales depend on the calibration
    with safe_open(str(llm.engine_info.path / "rank0.safetensors"), "pt") as f:
        scales = {i: f.get_tensor(SCALE.format(i)) for i in range(3)}
        assert f.get_tensor("transformer.layers.0.attention.qkv.weight").dtype == torch.float32  # weights stay float
    (amax,) = recorded_calibration
    largest = {"FP8": 448, "INT8": 127}[algo]  # the largest code: amax / it, of what calibration saw, K then V
    for i, s in scales.items():
        assert s.dtype == torch.float32 and s.tolist() == pytest.approx([a / largest for a in amax[i]], rel=1e-7)
    params = SamplingParams(max_tokens=6, temperature=0)
    out = llm.generate([[5, 9, 17, 33, 4]], params)[0].outputs[0]
    assert len(out.token_ids) == 6
    again = LLM(str(tiny_llama_dir), device="cpu", quant=quant, cache_dir=str(tmp_path))  # a hit: nothing converted
    assert not again.engine_built and cache.stats.builds == builds + 1
    assert again.generate([[5, 9, 17, 33, 4]], params)[0].outputs[0].token_ids == out.token_ids
    for x in (ref, llm, again):
        x.shutdown()

    prompts = [[5, 9, 17, 33, 4, 100, 7, 250, 11, 12, 13, 14], [3, 60, 61, 62, 80, 90]]
    fp = _quantized_cache_logits(ref.engine_info.path, prompts)  # a float engine: a float32 cache
    qz = _quantized_cache_logits(llm.engine_info.path, prompts)
    rel = float((qz - fp).norm() / fp.norm())
    assert rel < LOGITS_BOUND[algo], rel


def _teacher_forced_logprob(engine_dir, prompt, tokens) -> float:
    """Sum of log p(token | everything before) over `tokens`, one prefill through the quantized cache."""
    logits = _quantized_cache_logits(engine_dir, [prompt + tokens], steps=1)  # [L, V]
    logprobs = logits.log_softmax(-1)[len(prompt) - 1:-1]  # rows predicting each of `tokens`
    return float(logprobs.gather(1, torch.tensor(tokens)[:, None]).sum())


@pytest.mark.parametrize("quant", ["fp8_kv_cache", "int8_kv_cache"])
def test_beam_search_and_prefix_reuse_over_quantized_cache(tiny_llama_dir, recorded_calibration, quant):
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 320) for _ in range(n)] for n in (5, 13)]  # partly filled blocks: forks copy
    with LLM(str(tiny_llama_dir), device="cpu", quant=quant, tokens_per_block=4) as llm:
        engine = llm.engine_info.path
        beams = llm.generate(prompts, SamplingParams(max_tokens=8, use_beam_search=True, best_of=3, n=3),
                             use_tqdm=False)
        # Each hypothesis' score is what the model gives its tokens without any fork or copied block.
        for p, out in zip(prompts, beams):
            assert len(out.outputs) == 3
            for o in out.outputs:
                assert o.cumulative_logprob == pytest.approx(_teacher_forced_logprob(engine, p, o.token_ids),
                                                             abs=2e-3)
        assert llm.get_stats()["num_used_blocks"] == 0
        greedy = SamplingParams(max_tokens=6, temperature=0, logprobs=0)
        long_prompt = [rng.randrange(3, 320) for _ in range(17)]
        first = llm.generate([long_prompt], greedy, use_tqdm=False)[0].outputs[0]
        hits = llm.get_stats()["num_prefix_hit_tokens"]
        second = llm.generate([long_prompt], greedy, use_tqdm=False)[0].outputs[0]
        assert llm.get_stats()["num_prefix_hit_tokens"] >= hits + 16  # four full blocks of codes reused
        assert second.token_ids == first.token_ids
        assert second.cumulative_logprob == pytest.approx(first.cumulative_logprob, abs=1e-4)
        assert first.cumulative_logprob == pytest.approx(
            _teacher_forced_logprob(engine, long_prompt, first.token_ids), abs=2e-3)
