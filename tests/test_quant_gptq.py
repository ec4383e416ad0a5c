"""GPTQ checkpoints: a tiny Llama packed by hand into the AutoGPTQ layout, loaded by LLM, checked against its floats."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import make_tiny_llama
from tiny_tokenizer import save_tiny_tokenizer

from llmapi._kernels.weight_only import dequantize_ref, quantize_weight_ref
from llmapi import LLM, QuantConfig, SamplingParams
from llmapi.errors import UnsupportedModelError
from llmapi.quantization.gptq import unpack_gptq
from llmapi.quantization.weight_only import quantize_weights

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED = {"attention.qkv": LINEARS[:3], "attention.dense": LINEARS[3:4], "mlp.gate_up": LINEARS[4:6],
         "mlp.proj": LINEARS[6:]}


def _to_int32(words: torch.Tensor) -> torch.Tensor:  # int64 holding 32-bit patterns -> int32 (two's complement)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The format's packing: 32 / bits consecutive codes along `dim` per int32, code i in bits i*bits.."""
    per = 32 // bits
    codes = codes.to(torch.int64)
    words = 0
    for i in range(per):
        part = codes[i::per, :] if dim == 0 else codes[:, i::per]
        words = words + (part << (bits * i))
    return _to_int32(words).contiguous()


def _quantize_linear(w: torch.Tensor, bits: int, group: int | None):
    """Asymmetric round-to-nearest of w [N, K] onto a GPTQ grid: (float weight on the grid, GPTQ tensors)."""
    n, k = w.shape
    g, maxq = group or k, 2**bits - 1
    blocks = w.reshape(n, k // g, g)  # [N, G, g]
    lo, hi = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
    scale = ((hi - lo) / maxq).half()  # [N, G], stored fp16
    zero = torch.round(-lo / scale.float()).clamp(1, maxq).to(torch.int64)  # >= 1: stored minus one stays >= 0
    q = torch.clamp(torch.round(blocks / scale.float()[..., None]) + zero[..., None], 0, maxq).to(torch.int64)
    dequant = ((q - zero[..., None]).float() * scale.float()[..., None]).reshape(n, k)  # exact in float32
    tensors = {"qweight": _pack(q.reshape(n, k).T, bits, dim=0),  # [K/p, N]
               "qzeros": _pack((zero - 1).T, bits, dim=1),  # [G, N/p]
               "scales": scale.T.contiguous(),  # [G, N]
               "g_idx": torch.arange(k, dtype=torch.int32) // g}
    return dequant, tensors


def write_gptq_checkpoint(path, bits=4, group=32, seed=0, edit=None, qc=None):
    """Save a tiny Llama as a GPTQ checkpoint in `path`; returns the transformers model holding the grid floats.

    edit(tensors) may alter the GPTQ state dict, qc the quantization_config, before they are written."""
    model = make_tiny_llama(seed=seed)
    tensors = {}
    with torch.no_grad():
        for name, p in model.state_dict().items():
            base = name.removesuffix(".weight")
            if base.split(".", 3)[-1] in LINEARS:
                dequant, parts = _quantize_linear(p, bits, group)
                p.copy_(dequant)  # the reference model runs the very floats the checkpoint encodes
                tensors.update({f"{base}.{k}": v for k, v in parts.items()})
            else:
                tensors[name] = p.detach().clone()
    if edit is not None:
        edit(tensors)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group or -1,
                                     "desc_act": False, "sym": False, "checkpoint_format": "gptq", **(qc or {})}
    (path / "config.json").write_text(json.dumps(config))
    save_tiny_tokenizer(path, vocab_size=model.config.vocab_size)
    return model


def test_unpack_matches_the_published_bit_order():
    # Rows 0..7 of a column are nibbles 0..7 of its word: 0x76543210 -> 0, 1, ..., 7.
    words = torch.tensor([[0x76543210, _to_int32(torch.tensor(0xFEDCBA98)).item()]], dtype=torch.int32)
    codes = unpack_gptq(words, 4, dim=0)
    assert codes[:, 0].tolist() == list(range(8)) and codes[:, 1].tolist() == list(range(8, 16))
    assert unpack_gptq(words, 4, dim=1)[0].tolist() == list(range(16))
    assert unpack_gptq(torch.tensor([[0x04030201]], dtype=torch.int32), 8, dim=1)[0].tolist() == [1, 2, 3, 4]
    codes = torch.randint(0, 16, (64, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_gptq(_pack(codes, 4, 0), 4, 0).long(), codes)


def _reference_greedy(model, prompts, max_tokens):
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


@pytest.mark.parametrize("bits,group", [(4, 32), (4, None), (8, 64)])
def test_gptq_checkpoint_loads_exactly(tmp_path, bits, group):
    hf = write_gptq_checkpoint(tmp_path / "gptq", bits, group)
    with LLM(str(tmp_path / "gptq"), device="cpu") as llm:  # no quant=: detected from config.json
        assert llm.engine_info.config["quantization"] == {
            "quant_algo": f"W{bits}A16_GPTQ", "kv_cache_quant_algo": None, "group_size": group}
        with safe_open(str(llm.engine_info.path / "rank0.safetensors"), "pt") as f:
            for i in range(hf.config.num_hidden_layers):
                for engine_name, parts in FUSED.items():
                    t = {k: f.get_tensor(f"transformer.layers.{i}.{engine_name}.{k}")
                         for k in ("weight", "weights_scaling_factor", "weights_zero_point")}
                    got = dequantize_ref(t["weight"], t["weights_scaling_factor"], bits, group,
                                         zero_point=t["weights_zero_point"])
                    floats = torch.cat([hf.get_parameter(f"model.layers.{i}.{p}.weight") for p in parts])
                    assert t["weight"].dtype == torch.int8
                    assert torch.equal(got, floats), (i, engine_name)
        prompts = [[5, 9, 17, 33, 4], [3, 60, 61, 100, 7, 250, 12]]
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == _reference_greedy(hf, prompts, 12)
    with LLM(str(tmp_path / "gptq"), device="cpu") as again:  # the detected quantization is in the cache key
        assert not again.engine_built and again.engine_info.path == llm.engine_info.path


def test_dummy_gptq_weights_are_symmetric_rtn():
    """A dummy-weight GPTQ engine (benchmarks) rounds the float weights symmetrically, with zero points 0."""
    w = {"transformer.layers.0.mlp.proj.weight": torch.randn(48, 128, generator=torch.Generator().manual_seed(0))}
    out = quantize_weights(w, QuantConfig("W4A16_GPTQ", group_size=32), None, {"transformer.layers.0.mlp.proj"})
    q, scale = quantize_weight_ref(w["transformer.layers.0.mlp.proj.weight"], 4, 32)
    assert torch.equal(out["transformer.layers.0.mlp.proj.weight"], q)
    assert torch.equal(out["transformer.layers.0.mlp.proj.weights_scaling_factor"], scale)
    assert torch.equal(out["transformer.layers.0.mlp.proj.weights_zero_point"], torch.zeros(48, 4))


def _break(key_suffix, fn):
    def edit(tensors):
        name = f"model.layers.1.{key_suffix}"
        if fn is None:
            del tensors[name]
        else:
            tensors[name] = fn(tensors[name])
    return edit


@pytest.mark.parametrize("case,kwargs,match", [
    ("desc_act", dict(desc_act=True), "desc_act"),
    ("bits3", dict(bits=3), "bits=3"),
    ("method", dict(quant_method="awq"), "quant_method='awq'"),
    ("format", dict(checkpoint_format="gptq_v2"), "checkpoint_format"),
    ("group", dict(group_size=0), "group_size"),
])
def test_unsupported_quantization_config(tmp_path, case, kwargs, match):
    write_gptq_checkpoint(tmp_path / case, qc=kwargs)
    with pytest.raises(UnsupportedModelError, match=match):
        LLM(str(tmp_path / case), device="cpu")


@pytest.mark.parametrize("case,edit,match", [
    ("act_order", _break("mlp.up_proj.g_idx", lambda g: g.flip(0)), "g_idx.*desc_act"),
    ("missing", _break("self_attn.k_proj.qzeros", None), "k_proj.qzeros"),
    ("shape", _break("mlp.down_proj.qweight", lambda q: q[:-1]), "down_proj.qweight.*\\(15, 64\\)"),
    ("dtype", _break("self_attn.o_proj.qweight", lambda q: q.to(torch.int64)), "o_proj.qweight.*int64"),
])
def test_unsupported_tensors(tmp_path, case, edit, match):
    write_gptq_checkpoint(tmp_path / case, edit=edit)
    with pytest.raises(UnsupportedModelError, match=match):
        LLM(str(tmp_path / case), device="cpu")


def test_group_size_must_divide_features(tmp_path):
    # The tiny Llama's qkv and gate_up have 64 inputs: a group of 48 cannot tile them.
    path = tmp_path / "g"
    write_gptq_checkpoint(path, group=32)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["group_size"] = 48
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="group_size=48"):
        LLM(str(path), device="cpu")


def test_quant_mismatch_errors(tmp_path, tiny_llama_dir):
    write_gptq_checkpoint(tmp_path / "gptq")
    with pytest.raises(ValueError, match="GPTQ checkpoint"):
        LLM(str(tmp_path / "gptq"), device="cpu", quant="int8_weight_only")
    with pytest.raises(ValueError, match="needs a GPTQ checkpoint"):
        LLM(str(tiny_llama_dir), device="cpu", quant=QuantConfig("W4A16_GPTQ", group_size=32))
    with pytest.raises(ValueError, match="detected from the checkpoint"):
        LLM(str(tiny_llama_dir), device="cpu", quant="gptq")
    shutil.rmtree(tmp_path / "gptq")


def test_gptq_gpt2_is_refused(tmp_path, tiny_gpt2_dir):
    path = tmp_path / "gpt2"
    shutil.copytree(tiny_gpt2_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPTQ checkpoints of GPT2LMHeadModel"):
        LLM(str(path), device="cpu")
