"""OPT family (OPTForCausalLM) against transformers: greedy tokens with chunked prefill and prefix reuse, TP=2 and
PP=2 equal to one rank, every quantization mode, the converter's variants (post-norm, OPT-350m's projections, no
affine norms, no biases, no final norm, untied head) and its errors, and the opt-6.7b bench config."""

import json

import pytest
import torch
from family_parity import check_multi_rank, check_parity, vocab_size
from safetensors import safe_open
from tiny_models import (QUANT_MODE_BOUNDS, PagedDriver, check_quant_mode, make_tiny_opt, quant_mode_config,
                         to_engine_model, write_word_calibration)
from tiny_tokenizer import save_tiny_tokenizer

from llmapi import UnsupportedModelError
from llmapi.engine import build_engine
from llmapi.models import convert_hf

VARIANTS = {
    "pre_norm": {},  # OPT-125m, 1.3b ... 66b: a norm before each block and after the last layer
    # OPT-350m: norms after the residual adds, no final norm, 32-wide embeddings with project_in / project_out
    # around the 64-wide layers
    "post_norm_350m": dict(do_layer_norm_before=False, word_embed_proj_dim=32),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Variant -> a tiny random-weight OPT saved as an HF directory with the tiny word-level tokenizer."""
    dirs = {}
    for name, overrides in VARIANTS.items():
        path = tmp_path_factory.mktemp(f"tiny-opt-{name}")
        model = make_tiny_opt(path, **overrides)
        save_tiny_tokenizer(path, vocab_size=model.config.vocab_size)
        dirs[name] = path
    return dirs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_parity_with_chunked_prefill_and_prefix_reuse(variant, model_dirs):
    stats = check_parity(model_dirs[variant], vocab=vocab_size(model_dirs[variant]))
    assert max(stats["chunks"]) >= 4 and stats["prefix_hit_tokens"] > 0  # the 60-token prompt: 4 chunks of 16


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_equal_one_rank(variant, model_dirs):
    check_multi_rank(model_dirs[variant], vocab=vocab_size(model_dirs[variant]))


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return write_word_calibration(tmp_path_factory.mktemp("opt-calibration"), vocab_size=288)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", list(QUANT_MODE_BOUNDS))
def test_quantization_modes(variant, mode, model_dirs, calibration):
    """Every mode converts and runs; its logits (through the engine's cache) stay within the Llama tests' bound.

    Measured (pre-norm / post-norm OPT-350m shape): int8_weight_only 0.017 / 0.019, int4_weight_only (per channel)
    0.27 / 0.38, int4_awq 0.19 / 0.17, fp8 0.079 / 0.091, fp8_per_token 0.079 / 0.091, smoothquant 0.021 / 0.027,
    int8 KV cache 0.014 / 0.015, fp8 KV cache 0.035 / 0.034.
    """
    rel = check_quant_mode(model_dirs[variant], mode, calibration)
    assert 0 < rel < QUANT_MODE_BOUNDS[mode], (mode, rel)
    if mode == "smoothquant":
        # A pre-norm model folds qkv's and fc's smoothing into the norms before them; a post-norm model's qkv and
        # fc read the residual stream, which no norm ends, so they keep a multiply of their input.
        quant = quant_mode_config(mode, calibration).to_dict()
        engine = build_engine(str(model_dirs[variant]), device_type="cpu", quantization=quant).path  # cached
        with safe_open(str(engine / "rank0.safetensors"), "pt") as f:
            names = set(f.keys())
        for i in range(3):
            for linear in ("attention.qkv", "mlp.fc"):
                assert (f"transformer.layers.{i}.{linear}.prequant_scaling_factor" in names) == (
                    variant == "post_norm_350m"), (i, linear)
            assert f"transformer.layers.{i}.mlp.proj.prequant_scaling_factor" in names


# The converter's variants, each against transformers' logits of the same prompt (one prefill step, then a decode
# step reading the paged cache).
CONVERTER_VARIANTS = {
    "no_affine_no_bias": dict(layer_norm_elementwise_affine=False, enable_bias=False),
    "no_final_norm": dict(_remove_final_layer_norm=True),
    "untied_head": dict(tie_word_embeddings=False),
    "post_norm_projected_untied": dict(do_layer_norm_before=False, word_embed_proj_dim=48, tie_word_embeddings=False),
    "gelu": dict(activation_function="gelu"),
}


@pytest.mark.parametrize("name", list(CONVERTER_VARIANTS))
def test_converter_variants_match_transformers(name):
    hf = make_tiny_opt(seed=3, **CONVERTER_VARIANTS[name])
    model, cfg = to_engine_model(hf)
    prompt, next_token = [5, 9, 17, 33, 4, 100, 7, 250, 11, 3], 42
    driver = PagedDriver(model, cfg)
    got = torch.cat([driver.step({0: prompt})[0], driver.step({0: [next_token]})[0]])
    with torch.no_grad():
        want = hf(torch.tensor([prompt + [next_token]])).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    if name == "no_affine_no_bias":
        assert not cfg["attention_bias"] and not cfg["mlp_bias"]
    assert cfg["final_norm"] == (name not in ("no_final_norm", "post_norm_projected_untied"))


def _hf_config(**overrides):
    hf = make_tiny_opt(num_hidden_layers=1)
    return {**hf.config.to_dict(), "architectures": ["OPTForCausalLM"], **overrides}, hf.state_dict()


@pytest.mark.parametrize("overrides,match", [
    (dict(num_attention_heads=5), "hidden_size 64 is not divisible by num_attention_heads 5"),
    (dict(ffn_dim=0), "'ffn_dim' must be a positive integer"),
    (dict(do_layer_norm_before="yes"), "'do_layer_norm_before' must be true or false"),
    (dict(activation_function="swishy"), "activation 'swishy' is not supported"),
    (dict(word_embed_proj_dim=-3), "'word_embed_proj_dim' must be a positive integer"),
])
def test_bad_configs_are_refused(overrides, match):
    hf_config, sd = _hf_config(**overrides)
    with pytest.raises(UnsupportedModelError, match=match):
        convert_hf(hf_config, sd, torch.float32)


def test_bad_checkpoints_are_refused():
    hf_config, sd = _hf_config()
    missing = {k: v for k, v in sd.items() if "fc2.bias" not in k}
    with pytest.raises(UnsupportedModelError, match="lacks tensor 'decoder.layers.0.fc2.bias'"):
        convert_hf(hf_config, missing, torch.float32)
    with pytest.raises(UnsupportedModelError, match="1 tensors this converter does not know: decoder.extra"):
        convert_hf(hf_config, {**sd, "model.decoder.extra": torch.zeros(2)}, torch.float32)
    narrow = {**sd, "model.decoder.embed_positions.weight": sd["model.decoder.embed_positions.weight"][2:]}
    with pytest.raises(UnsupportedModelError, match=r"embed_positions.weight' has shape \(256, 64\), the config "
                                                    r"implies \(258, 64\)"):
        convert_hf(hf_config, narrow, torch.float32)  # a table without OPT's 2 offset rows
    # A checkpoint saved from OPTModel (no "model." prefix) converts the same.
    bare = {k.removeprefix("model."): v for k, v in sd.items()}
    _, w_bare = convert_hf(hf_config, bare, torch.float32)
    _, w = convert_hf(hf_config, sd, torch.float32)
    assert w.keys() == w_bare.keys() and all(torch.equal(w[k], w_bare[k]) for k in w)


# opt-6.7b's config.json (facebook/opt-6.7b) as `llmapi bench` knows it.
OPT_6_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384, vocab_size=50272,
                max_position_embeddings=2048, activation_function="relu", do_layer_norm_before=True,
                word_embed_proj_dim=4096)


def test_bench_known_config_opt_6_7b(tmp_path):
    from llmapi.bench import known_config_names, resolve_bench_model
    from llmapi.cli import main
    from llmapi.models import config_from_hf

    assert "opt-6.7b" in known_config_names()
    path = resolve_bench_model("opt-6.7b")
    hf = json.loads(open(f"{path}/config.json").read())
    assert {k: hf[k] for k in OPT_6_7B} == OPT_6_7B and hf["architectures"] == ["OPTForCausalLM"]
    cfg = config_from_hf(hf, torch.bfloat16)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["head_dim"],
            cfg["intermediate_size"], cfg["vocab_size"], cfg["position_offset"], cfg["post_norm"],
            cfg["final_norm"], cfg["embedding_projection"]) == (4096, 32, 32, 128, 16384, 50272, 2, False, True, None)
    # The same config at a tiny scale runs through `llmapi bench --load-format dummy` on the CPU.
    tiny = tmp_path / "opt-6.7b-tiny"
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps({**hf, "hidden_size": 64, "num_hidden_layers": 2,
                                                  "num_attention_heads": 4, "ffn_dim": 256,
                                                  "word_embed_proj_dim": 64, "vocab_size": 512}))
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny), "--load-format", "dummy", "--device", "cpu", "--isl", "6",
                 "--osl", "4", "--num-requests", "4", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["llmapi"]["output_tokens"] == 16
