"""StarCoder2 through the general decoder: transformers' greedy tokens with a sliding window smaller than the
prompts (chunked prefill, prefix reuse), TP=2 / PP=2 against one rank, every quantization mode, the conversion's
options, and the bench's StarCoder2-7B shapes."""

import json

import pytest
import torch
from family_parity import check_multi_rank, check_parity
from tiny_models import (QUANT_MODE_BOUNDS, PagedDriver, check_quant_mode, make_tiny_starcoder2, to_engine_model,
                         write_word_calibration)
from tiny_tokenizer import save_tiny_tokenizer

from llmapi.bench import known_config_names, resolve_bench_model
from llmapi.errors import UnsupportedModelError
from llmapi.models import config_from_hf, starcoder2

WINDOW = 16
"""The tiny model's sliding window: the harness's prompts (up to 60 tokens) and shared prefix run past it."""
VOCAB = 320


@pytest.fixture(scope="module")
def starcoder2_dir(tmp_path_factory):
    """A tiny random-weight StarCoder2 (window 16, tied head, biases) with a word-level tokenizer."""
    path = tmp_path_factory.mktemp("tiny-starcoder2")
    make_tiny_starcoder2(path, sliding_window=WINDOW)
    save_tiny_tokenizer(path, vocab_size=VOCAB)
    return path


@pytest.mark.parametrize("overrides", [
    dict(sliding_window=None),
    dict(sliding_window=WINDOW),
    dict(sliding_window=WINDOW, use_bias=False, tie_word_embeddings=False, num_key_value_heads=1),
], ids=["no-window", "window", "no-bias-untied-mqa"])
def test_converted_logits_equal_transformers(overrides):
    """Logits of a 48-token prompt fed in three chunks over the paged cache equal transformers' full forward."""
    hf = make_tiny_starcoder2(**overrides)
    model, cfg = to_engine_model(hf)
    assert cfg["sliding_window"] == overrides["sliding_window"]
    assert cfg["attention_bias"] == cfg["mlp_bias"] == overrides.get("use_bias", True)
    assert cfg["tie_word_embeddings"] == overrides.get("tie_word_embeddings", True)
    ids = torch.randint(3, VOCAB, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]  # [48, V]
    driver = PagedDriver(model, cfg)
    got = torch.cat([driver.step({0: ids[a:b]})[0] for a, b in ((0, 7), (7, 30), (30, 48))])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_greedy_parity_with_sliding_window(starcoder2_dir):
    """10 mixed prompts (two longer than twice the window) with chunked prefill, and prefix reuse past the window."""
    stats = check_parity(starcoder2_dir, vocab=VOCAB, window=WINDOW)
    assert max(stats["chunks"]) >= 3 and stats["prefix_hit_tokens"] > 0


def test_tp2_and_pp2_equal_one_rank(starcoder2_dir):
    check_multi_rank(starcoder2_dir, vocab=VOCAB, window=WINDOW)


@pytest.mark.parametrize("mode", list(QUANT_MODE_BOUNDS))
def test_quant_modes(starcoder2_dir, mode, tmp_path_factory):
    calibration = write_word_calibration(tmp_path_factory.mktemp("calibration"), VOCAB)
    rel = check_quant_mode(starcoder2_dir, mode, calibration)
    assert rel < QUANT_MODE_BOUNDS[mode], (mode, rel)


def test_config_options_and_errors():
    base = make_tiny_starcoder2().config.to_dict()
    # A window at least as long as any sequence is no window.
    assert config_from_hf({**base, "sliding_window": 256}, torch.float32)["sliding_window"] is None
    assert config_from_hf({**base, "sliding_window": 300}, torch.float32)["sliding_window"] is None
    # transformers 4.x writes rope_theta at the top level.
    old = {k: v for k, v in base.items() if k != "rope_parameters"}
    assert config_from_hf({**old, "rope_theta": 1e6}, torch.float32)["rotary_base"] == 1e6
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        starcoder2.config_from_hf({**base, "sliding_window": 0}, torch.float32)
    with pytest.raises(UnsupportedModelError, match="activation 'gelu_magic'"):
        starcoder2.config_from_hf({**base, "hidden_act": "gelu_magic"}, torch.float32)
    with pytest.raises(UnsupportedModelError, match="num_key_value_heads 3"):
        starcoder2.config_from_hf({**base, "num_key_value_heads": 3}, torch.float32)
    hf = make_tiny_starcoder2()
    state = dict(hf.state_dict())
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    with pytest.raises(UnsupportedModelError, match="mlp.extra.weight"):
        starcoder2.convert_hf(base, state, torch.float32)


def test_bench_known_config_is_starcoder2_7b():
    """llmapi bench's starcoder2-7b: the published StarCoder2-7B shapes, read as transformers reads them."""
    from transformers import Starcoder2Config

    assert "starcoder2-7b" in known_config_names()
    path = resolve_bench_model("starcoder2-7b")
    hf = json.loads(open(f"{path}/config.json").read())
    ref = Starcoder2Config.from_pretrained(path)
    cfg = config_from_hf(hf, torch.bfloat16)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"], cfg["max_position_embeddings"]) == (
        ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads,
        ref.intermediate_size, ref.vocab_size, ref.max_position_embeddings) == (
        4608, 32, 36, 4, 18432, 49152, 16384)
    assert cfg["head_dim"] == 128 and cfg["rotary_dim"] == 128
    assert cfg["rotary_base"] == ref.rope_parameters["rope_theta"] == 1e6
    assert cfg["sliding_window"] == ref.sliding_window == 4096
    assert cfg["attention_bias"] and cfg["mlp_bias"] and cfg["tie_word_embeddings"]
    assert (cfg["norm_type"], cfg["norm_epsilon"], cfg["hidden_act"]) == ("layernorm", 1e-5, "gelu_pytorch_tanh")
