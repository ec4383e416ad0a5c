"""Calibration: the texts it reads, and activation statistics checked against hooks on the transformers model."""

import importlib.util

import pytest
import torch
from tiny_models import make_tiny_gpt2, make_tiny_llama
from tiny_tokenizer import SENTENCES, make_tiny_tokenizer

from llmapi.errors import MissingDependencyError
from llmapi.models import convert_hf
from llmapi.quantization.calibration import calibration_texts, collect_activation_stats

TEXTS = SENTENCES + [" ".join(SENTENCES[:3]), "the dog", "model model model cache"]


def test_default_texts_are_gensim_lee_background():
    spec = importlib.util.find_spec("gensim")
    path = f"{spec.submodule_search_locations[0]}/test/test_data/lee_background.cor"
    lines = [line.strip() for line in open(path, encoding="utf-8") if line.strip()]
    assert len(lines) == 300  # the Lee corpus background articles, one per line
    everything = calibration_texts(num_samples=1000)
    assert everything == lines
    texts = calibration_texts(num_samples=8, seed=3)
    assert len(texts) == 8 and len(set(texts)) == 8 and set(texts) <= set(lines)
    assert texts == calibration_texts(num_samples=8, seed=3)  # deterministic
    assert texts != calibration_texts(num_samples=8, seed=4)


def test_dataset_as_file_or_list(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("first sample\n\n  second sample  \nthird\n")
    assert calibration_texts(path) == ["first sample", "second sample", "third"]
    assert calibration_texts(str(path), num_samples=2, seed=0) in (
        ["first sample", "second sample"], ["first sample", "third"], ["second sample", "third"])
    assert calibration_texts(["a b", "", "c"]) == ["a b", "c"]


def test_dataset_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="dataset.*not a file"):
        calibration_texts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="no non-empty text"):
        calibration_texts(["", "  "])
    with pytest.raises(ValueError, match="dataset"):
        calibration_texts(42)
    with pytest.raises(ValueError, match="num_samples"):
        calibration_texts(["a"], num_samples=0)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gensim" else real_find_spec(name, *a))
    with pytest.raises(MissingDependencyError, match="gensim.*llmapi\\[quant\\]"):
        calibration_texts()
    assert calibration_texts(["still fine"]) == ["still fine"]  # a given dataset needs no gensim


def _hf_inputs(hf_model, module_names, texts, tokenizer):
    """Per module name: its inputs over all texts (one sequence each, in order), concatenated [sum L, K]."""
    seen = {name: [] for name in module_names}
    modules = dict(hf_model.named_modules())
    handles = [modules[name].register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0][0]))
               for name in module_names]
    with torch.no_grad():
        for text in texts:
            hf_model(torch.tensor([tokenizer(text)["input_ids"]]))
    for h in handles:
        h.remove()
    return {name: torch.cat(rows) for name, rows in seen.items()}


def _engine_stats(hf_model, tokenizer, hessians=True):
    hf_config = hf_model.config.to_dict()
    hf_config.setdefault("architectures", [type(hf_model).__name__])
    config, weights = convert_hf(hf_config, hf_model.state_dict(), torch.float32)
    return collect_activation_stats(config, weights, tokenizer, TEXTS, hessians=hessians)


def test_llama_stats_equal_transformers_hooks():
    hf = make_tiny_llama()
    tok = make_tiny_tokenizer(hf.config.vocab_size)
    stats = _engine_stats(hf, tok)
    names = {f"transformer.layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for i in range(3)
             for ours, theirs in (("attention.qkv", "self_attn.q_proj"), ("attention.dense", "self_attn.o_proj"),
                                  ("mlp.gate_up", "mlp.gate_proj"), ("mlp.proj", "mlp.down_proj"))}
    ref = _hf_inputs(hf, list(names.values()), TEXTS, tok)
    num_tokens = sum(len(tok(t)["input_ids"]) for t in TEXTS)
    assert stats.num_tokens == num_tokens and set(stats.input_amax) == set(names)
    for ours, theirs in names.items():
        amax = stats.input_amax[ours]
        assert amax.dtype == torch.float32 and amax.shape == (ref[theirs].shape[1],)
        torch.testing.assert_close(amax, ref[theirs].abs().amax(0), rtol=1e-5, atol=1e-6)

    # Layer 0's qkv input by hand: input_layernorm(embedding) = x / rms(x) * weight.
    emb = hf.model.embed_tokens.weight[torch.cat([torch.tensor(tok(t)["input_ids"]) for t in TEXTS])]  # [T, H]
    normed = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + 1e-5) * hf.model.layers[0].input_layernorm.weight
    torch.testing.assert_close(stats.input_amax["transformer.layers.0.attention.qkv"],
                               normed.abs().amax(0).detach(), rtol=1e-5, atol=1e-6)

    # AWQ's statistics: mean |x| and mean x^T x over every token.
    for ours in ("transformer.layers.1.attention.qkv", "transformer.layers.1.mlp.proj"):
        x = ref[names[ours]]  # [T, K]
        torch.testing.assert_close(stats.input_abs_mean[ours], x.abs().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.input_hessian[ours], x.T @ x / num_tokens, rtol=1e-4, atol=1e-5)

    # K after rotary and V of layer 2, from transformers' own rotary embedding.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    attn = hf.model.layers[2].self_attn
    k_max = v_max = 0.0
    for text in TEXTS:
        x = _hf_inputs(hf, ["model.layers.2.self_attn.k_proj"], [text], tok)["model.layers.2.self_attn.k_proj"]
        with torch.no_grad():
            k = attn.k_proj(x).view(1, len(x), 2, 16).transpose(1, 2)  # [1, nkv, L, hd]
            v = attn.v_proj(x)
            cos, sin = hf.model.rotary_emb(x[None], torch.arange(len(x))[None])
            k = apply_rotary_pos_emb(k, k, cos, sin)[1]
        k_max, v_max = max(k_max, float(k.abs().max())), max(v_max, float(v.abs().max()))
    assert stats.kv_amax[2] == pytest.approx((k_max, v_max), rel=1e-5)


def test_gpt2_stats_equal_transformers_hooks():
    hf = make_tiny_gpt2()
    tok = make_tiny_tokenizer(hf.config.vocab_size)
    stats = _engine_stats(hf, tok, hessians=False)
    ref = _hf_inputs(hf, ["transformer.h.1.mlp.c_fc", "transformer.h.0.attn.c_attn"], TEXTS, tok)
    torch.testing.assert_close(stats.input_amax["transformer.layers.1.mlp.fc"],
                               ref["transformer.h.1.mlp.c_fc"].abs().amax(0), rtol=1e-5, atol=1e-6)
    assert not stats.input_hessian and not stats.input_abs_mean  # only collected when asked
    assert set(stats.kv_amax) == {0, 1, 2}


def test_collect_errors():
    hf = make_tiny_llama()
    tok = make_tiny_tokenizer(hf.config.vocab_size)
    hf_config = hf.config.to_dict()
    config, weights = convert_hf(hf_config | {"architectures": ["LlamaForCausalLM"]}, hf.state_dict(), torch.float32)
    with pytest.raises(ValueError, match="max_seq_len"):
        collect_activation_stats(config, weights, tok, TEXTS, max_seq_len=0)
