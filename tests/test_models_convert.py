"""HF -> engine conversion: names, fusions, config fields, the registry, and the errors for what we refuse."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_gpt2, make_tiny_llama

from llmapi.errors import CorruptEngineError, UnsupportedModelError
from llmapi.models import (
    SUPPORTED_HF_ARCHITECTURES,
    GPTForCausalLM,
    config_from_hf,
    convert_hf,
    get_model_class,
    gpt2,
    llama,
)

ENGINE_FIELDS = {
    "architecture", "dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "intermediate_size", "norm_epsilon", "position_embedding_type",
    "max_position_embeddings", "rotary_base", "rotary_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "position_offset", "rotary_dim", "norm_type", "gated_mlp", "post_norm",
    "final_norm", "embedding_projection", "sliding_window",
}


def saved(factory, tmp_path, **overrides):
    """(config.json dict, state dict as read back from model.safetensors) of a tiny model saved to disk."""
    factory(tmp_path, **overrides)
    return json.loads((tmp_path / "config.json").read_text()), load_file(tmp_path / "model.safetensors")


def test_llama_names_fusions_and_config(tmp_path):
    hf_config, sd = saved(make_tiny_llama, tmp_path, eos_token_id=[2, 7])
    cfg, w = convert_hf(hf_config, sd, torch.bfloat16)
    assert set(cfg) == ENGINE_FIELDS
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["dtype"] == "bfloat16"
    assert cfg["eos_token_id"] == [2, 7] and cfg["bos_token_id"] == 1 and cfg["rotary_scaling"] is None
    assert (cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 16)
    qkv = w["transformer.layers.1.attention.qkv.weight"]
    assert qkv.shape == ((4 + 2 * 2) * 16, 64) and qkv.dtype == torch.bfloat16
    expected = torch.cat([sd[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]).to(torch.bfloat16)
    assert torch.equal(qkv, expected)
    gate_up = w["transformer.layers.0.mlp.gate_up.weight"]
    assert torch.equal(gate_up[:128], sd["model.layers.0.mlp.gate_proj.weight"].to(torch.bfloat16))
    assert "lm_head.weight" in w
    assert set(w) == set(GPTForCausalLM(cfg, "meta", torch.bfloat16).state_dict())


def test_llama_tied_head_is_not_stored(tmp_path):
    hf_config, sd = saved(make_tiny_llama, tmp_path, tie_word_embeddings=True)
    cfg, w = convert_hf(hf_config, {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}, torch.float32)
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in w


def test_transformers4_style_config_with_rope_scaling(tmp_path):
    hf_config, sd = saved(make_tiny_llama, tmp_path)
    del hf_config["rope_parameters"]
    hf_config.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0}, architectures=None,
                     model_type="llama")
    cfg, _ = convert_hf(hf_config, sd, torch.float32)
    assert cfg["rotary_base"] == 500000.0 and cfg["rotary_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_gpt2_conv1d_transposed_and_legacy_names(tmp_path):
    hf_config, sd = saved(make_tiny_gpt2, tmp_path)
    # Original GPT-2 checkpoints: no "transformer." prefix and the causal-mask buffers saved as tensors.
    legacy = {k.removeprefix("transformer."): v for k, v in sd.items()}
    legacy["h.0.attn.bias"] = torch.ones(1, 1, 256, 256)
    legacy["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    cfg, w = convert_hf(hf_config, legacy, torch.float32)
    assert set(cfg) == ENGINE_FIELDS
    assert cfg["position_embedding_type"] == "learned_absolute" and cfg["intermediate_size"] == 256
    assert cfg["hidden_act"] == "gelu_new" and cfg["tie_word_embeddings"] and "lm_head.weight" not in w
    assert torch.equal(w["transformer.layers.2.attention.qkv.weight"], sd["transformer.h.2.attn.c_attn.weight"].t())
    assert torch.equal(w["transformer.layers.2.mlp.fc.weight"], sd["transformer.h.2.mlp.c_fc.weight"].t())
    assert set(w) == set(GPTForCausalLM(cfg, "meta", torch.float32).state_dict())


def test_registry():
    assert SUPPORTED_HF_ARCHITECTURES["MistralForCausalLM"] is llama
    assert SUPPORTED_HF_ARCHITECTURES["GPT2LMHeadModel"] is gpt2
    for engine_architecture in ("GPTForCausalLM", "LlamaForCausalLM", "GPT2LMHeadModel", "MistralForCausalLM"):
        assert get_model_class(engine_architecture) is GPTForCausalLM
    with pytest.raises(UnsupportedModelError, match="FalconForCausalLM.*LlamaForCausalLM.*GPT2LMHeadModel"):
        get_model_class("FalconForCausalLM")
    with pytest.raises(UnsupportedModelError, match="BertModel"):
        config_from_hf({"architectures": ["BertModel"], "model_type": "bert"}, torch.float32)


def llama_dict(**fields):
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return {**base, **fields}


@pytest.mark.parametrize("fields,message", [
    (dict(hidden_size=66), "hidden_size 66 is not divisible by num_attention_heads 4"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (dict(hidden_size=0), "'hidden_size' must be a positive integer"),
    (dict(hidden_act="xielu"), "activation 'xielu'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic'"),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "rope type 'longrope'"),
    (dict(architectures=["MistralForCausalLM"], sliding_window=0), "'sliding_window' must be a positive integer"),
])
def test_bad_llama_configs_are_refused(fields, message):
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(llama_dict(**fields), torch.float32)


def test_mistral_without_active_window_converts():
    for window in (None, 256, 4096):
        cfg = config_from_hf(llama_dict(architectures=["MistralForCausalLM"], sliding_window=window), torch.float16)
        assert cfg["architecture"] == "LlamaForCausalLM" and cfg["dtype"] == "float16"
        assert cfg["sliding_window"] is None  # a window of at least max_position_embeddings is no window


def test_mistral_sliding_window_is_recorded_unless_turned_off():
    cfg = config_from_hf(llama_dict(architectures=["MistralForCausalLM"], sliding_window=128), torch.float16)
    assert cfg["sliding_window"] == 128
    off = llama_dict(architectures=["MistralForCausalLM"], sliding_window=128, use_sliding_window=False)
    assert config_from_hf(off, torch.float16)["sliding_window"] is None
    # transformers' Llama ignores the key: so does its conversion.
    assert config_from_hf(llama_dict(sliding_window=128), torch.float16)["sliding_window"] is None


def test_bad_gpt2_configs_are_refused():
    base = dict(architectures=["GPT2LMHeadModel"], vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    with pytest.raises(UnsupportedModelError, match="hidden_size 64 is not divisible by num_attention_heads 5"):
        config_from_hf({**base, "n_head": 5}, torch.float32)
    with pytest.raises(UnsupportedModelError, match="scaling"):
        config_from_hf({**base, "scale_attn_by_inverse_layer_idx": True}, torch.float32)


def test_bad_checkpoints_are_refused(tmp_path):
    hf_config, sd = saved(make_tiny_llama, tmp_path)
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(UnsupportedModelError, match="layers.1.mlp.up_proj.weight"):
        convert_hf(hf_config, missing, torch.float32)
    misshapen = {**sd, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(UnsupportedModelError, match=r"k_proj.weight.*\(64, 64\).*\(32, 64\)"):
        convert_hf(hf_config, misshapen, torch.float32)
    quantized = {**sd, "model.layers.0.self_attn.q_proj.qweight": torch.zeros(8, 8, dtype=torch.int32)}
    with pytest.raises(UnsupportedModelError, match="q_proj.qweight"):
        convert_hf(hf_config, quantized, torch.float32)
    with pytest.raises(UnsupportedModelError, match="float64"):
        convert_hf(hf_config, sd, torch.float64)


def test_load_weights_is_strict(tmp_path):
    hf_config, sd = saved(make_tiny_llama, tmp_path)
    cfg, w = convert_hf(hf_config, sd, torch.float32)
    model = GPTForCausalLM(cfg, "cpu", torch.float32)
    with pytest.raises(CorruptEngineError, match="missing.*lm_head.weight"):
        model.load_weights({k: v for k, v in w.items() if k != "lm_head.weight"})
    with pytest.raises(CorruptEngineError, match="unexpected.*extra.weight"):
        model.load_weights({**w, "extra.weight": torch.zeros(1)})
    with pytest.raises(CorruptEngineError, match="transformer.ln_f.weight"):
        model.load_weights({**w, "transformer.ln_f.weight": torch.zeros(3)})
    model.load_weights(w)
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])
