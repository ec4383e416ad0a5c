"""LoRA over a quantized base: the adapter runs in the activation dtype beside the quantized linear. An int8
weight-only Llama with an adapter gives the logits of transformers + PEFT on the dequantized weights, within the
mode's logits bound; int4 weight-only and FP8 bases with an adapter stay within their modes' bounds of the float
base + PEFT."""

import pytest
import torch
from lora_adapters import make_peft_adapter
from safetensors.torch import load_file
from tiny_models import QUANT_MODE_BOUNDS, quant_mode_config, write_word_calibration

from llmapi import LLM, LoRARequest, SamplingParams
from llmapi._kernels.weight_only import dequantize_ref

PROMPTS = [[5, 9, 17, 33, 4, 100, 7, 250, 11, 12], [3, 60, 61, 62, 80]]
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _hf_logits(model_dir, adapter, weights=None):
    """Prompt logits [sum L, V] of transformers + PEFT; `weights`: HF tensors replacing the model's first."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if weights is not None:
        model.load_state_dict(weights, strict=False)
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.inference_mode():
        return torch.cat([model(torch.tensor([p])).logits[0] for p in PROMPTS])


def _dequantized_hf(engine_dir, cfg) -> dict:
    """The engine's int8 linears dequantized, under the HF Llama names (qkv and gate_up split back)."""
    w = load_file(str(engine_dir / "rank0.safetensors"))
    q, kv, inter = (cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"],
                    cfg["intermediate_size"])
    out = {}
    for i in range(cfg["num_hidden_layers"]):
        def deq(name):
            return dequantize_ref(w[f"transformer.layers.{i}.{name}.weight"],
                                  w[f"transformer.layers.{i}.{name}.weights_scaling_factor"], 8, None, torch.float32)
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"], out[p + "self_attn.v_proj.weight"] = \
            deq("attention.qkv").split([q, kv, kv])
        out[p + "self_attn.o_proj.weight"] = deq("attention.dense")
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = deq("mlp.gate_up").split([inter, inter])
        out[p + "mlp.down_proj.weight"] = deq("mlp.proj")
    return out


def _llm_logits(llm, request) -> torch.Tensor:
    params = SamplingParams(max_tokens=1, temperature=0, return_context_logits=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False, lora_request=request)
    return torch.cat([o.context_logits for o in outs])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("lora-quant") / "a", 8, TARGETS, seed=3)


def test_int8_weight_only_base_with_adapter_equals_dequantized_peft(tiny_llama_dir, adapter):
    with LLM(str(tiny_llama_dir), quant="int8_weight_only", enable_lora=True, max_lora_rank=8) as llm:
        got = _llm_logits(llm, LoRARequest("a", 1, str(adapter)))
        base = _llm_logits(llm, None)
        reference = _hf_logits(tiny_llama_dir, adapter, _dequantized_hf(llm.engine_info.path, llm.engine_info.config))
    assert _rel(got, reference) < QUANT_MODE_BOUNDS["int8_weight_only"]
    assert _rel(got, reference) < 1e-4  # the same weights: float rounding only
    assert _rel(base, reference) > 10 * _rel(got, reference)  # the adapter is in


@pytest.mark.parametrize("mode", ["int4_weight_only", "fp8"])
def test_other_quantized_bases_with_adapter(tiny_llama_dir, adapter, mode, tmp_path):
    quant = quant_mode_config(mode, write_word_calibration(tmp_path, 320))
    reference = _hf_logits(tiny_llama_dir, adapter)
    with LLM(str(tiny_llama_dir), quant=quant, enable_lora=True, max_lora_rank=8) as llm:
        got = _llm_logits(llm, LoRARequest("a", 1, str(adapter)))
    assert _rel(got, reference) < QUANT_MODE_BOUNDS[mode], mode
