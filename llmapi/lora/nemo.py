"""NeMo LoRA checkpoints (.nemo files of NeMo's Megatron GPT PEFT, peft_scheme lora) as AdapterWeights.

The archive holds model_config.yaml, whose peft.lora_tuning gives adapter_dim (the rank) and alpha (scale alpha /
adapter_dim; alpha defaults to the rank), and model_weights.ckpt with, per layer, ParallelLinearAdapter pairs
linear_in [r, in] and linear_out [out, r] under NeMo's adapter names (the layout TensorRT-LLM's NeMo LoRA loader
reads):
- ...layers.N.self_attention.adapter_layer.lora_kqv_adapter: the fused query_key_value, whose linear_out rows are
  grouped per query group as NeMo lays query_key_value out ([q heads of the group, k, v] per group, head_dim rows
  each); they are regrouped into the engine's q heads, k heads, v heads;
- ...self_attention.adapter_layer.lora_dense_attention_adapter: dense (o_proj);
- ...mlp.adapter_layer.lora_hto4h_adapter: dense_h_to_4h (a fused GLU's gate rows, then its up rows);
- ...mlp.adapter_layer.lora_4htoh_adapter: dense_4h_to_h.
One weight file (no mp_rank_NN shards).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from ..errors import AdapterError
from .weights import AdapterWeights, check_adapter_path

_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)\.(linear_in|linear_out)\.weight$")
# NeMo adapter -> (engine linear, the HF module names it stands for: LoraConfig.lora_target_modules reads those)
_ADAPTERS = {
    "self_attention.adapter_layer.lora_kqv_adapter": ("attention.qkv", ("q_proj", "k_proj", "v_proj")),
    "self_attention.adapter_layer.lora_dense_attention_adapter": ("attention.dense", ("o_proj",)),
    "mlp.adapter_layer.lora_hto4h_adapter": ("mlp.first", ("gate_proj", "up_proj")),
    "mlp.adapter_layer.lora_4htoh_adapter": ("mlp.proj", ("down_proj",)),
}


def _read(path: Path, where: str) -> tuple[dict, dict]:
    from ..engine import nemo

    try:
        cfg = nemo.read_nemo_config(path)
    except Exception as e:  # not a tar, no model_config.yaml
        raise AdapterError(f"{where} is not a NeMo LoRA checkpoint ({e})") from None
    with tempfile.TemporaryDirectory() as tmp:
        names = nemo.extract(path, Path(tmp))
        if any(n.startswith("mp_rank_") for n in names):
            raise AdapterError(f"{where}: tensor-parallel LoRA shards (mp_rank_NN/) are not supported; save the "
                               "adapter with tensor_model_parallel_size 1")
        if nemo.WEIGHTS_FILE not in names:
            raise AdapterError(f"{where} has no {nemo.WEIGHTS_FILE}")
        try:
            weights = torch.load(Path(tmp) / nemo.WEIGHTS_FILE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterError(f"{where}: {nemo.WEIGHTS_FILE} cannot be read ({type(e).__name__}: {e})") from None
    if isinstance(weights, dict) and isinstance(weights.get("state_dict"), dict):
        weights = weights["state_dict"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise AdapterError(f"{where}: {nemo.WEIGHTS_FILE} is not a state dict of tensors")
    return cfg, weights


def _qkv_rows(b: torch.Tensor, cfg: dict) -> torch.Tensor:
    """linear_out [ng * (np/ng + 2) * hn, r] of NeMo's query_key_value layout -> [q heads, k heads, v heads] rows."""
    heads, groups, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    per = heads // groups
    grouped = b.reshape(groups, per + 2, hd, b.shape[1])
    return torch.cat([grouped[:, :per].reshape(-1, b.shape[1]), grouped[:, per].reshape(-1, b.shape[1]),
                      grouped[:, per + 1].reshape(-1, b.shape[1])])


def load_nemo_lora(path: str, engine_config: dict, max_lora_rank: int, dtype: torch.dtype,
                   target_modules=()) -> AdapterWeights:
    """A NeMo LoRA .nemo as AdapterWeights for this engine; AdapterError names what does not fit."""
    from .runtime import _full_shapes

    p = check_adapter_path(path)
    where = f"NeMo LoRA adapter {path}"
    if engine_config.get("is_encoder_decoder"):
        raise AdapterError(f"{where}: NeMo LoRA checkpoints adapt decoder-only GPT models; this model is "
                           "encoder-decoder (use a Hugging Face PEFT adapter, lora_ckpt_source='hf')")
    if p.is_dir():
        raise AdapterError(f"{where} is a directory; a .nemo file is expected (or lora_ckpt_source='hf' for PEFT)")
    cfg, weights = _read(p, where)
    peft = cfg.get("peft") or {}
    scheme = peft.get("peft_scheme", "lora")
    tuning = peft.get("lora_tuning")
    if scheme != "lora" or not isinstance(tuning, dict):
        raise AdapterError(f"{where}: model_config.yaml has no peft.lora_tuning (peft_scheme={scheme!r}): not a "
                           "LoRA checkpoint")
    rank = tuning.get("adapter_dim")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{where}: peft.lora_tuning.adapter_dim={rank!r} is not a positive int")
    if rank > max_lora_rank:
        raise AdapterError(f"{where} has rank {rank} (adapter_dim), above max_lora_rank={max_lora_rank} "
                           "(LLM(max_lora_rank=...) or LoraConfig(max_lora_rank=...))")
    alpha = tuning.get("alpha") or rank
    scale = float(alpha) / rank
    mlp_first = "mlp.gate_up" if engine_config["gated_mlp"] else "mlp.fc"
    shapes = _full_shapes(engine_config)
    layers = engine_config["num_hidden_layers"]
    pairs: dict[tuple[int, str], dict] = {}
    for key, tensor in weights.items():
        m = _KEY.match(key)
        if m is None or m[2] not in _ADAPTERS:
            raise AdapterError(f"{where}: {key!r} is not a LoRA adapter this reader knows (supported: "
                               f"{', '.join(_ADAPTERS)})")
        pairs.setdefault((int(m[1]), m[2]), {})[m[3]] = tensor
    linears, targets = {}, set()
    for (layer, adapter), pair in sorted(pairs.items()):
        if set(pair) != {"linear_in", "linear_out"}:
            raise AdapterError(f"{where}: layer {layer}'s {adapter} lacks linear_in or linear_out")
        if layer >= layers:
            raise AdapterError(f"{where}: adapts layer {layer}, but the base model has {layers} layers: an adapter "
                               "for another base model?")
        linear, leaves = _ADAPTERS[adapter]
        if target_modules and not set(leaves) & set(target_modules):
            raise AdapterError(f"{where}: adapts {adapter} ({'/'.join(leaves)}), which "
                               f"LoraConfig.lora_target_modules={list(target_modules)} leaves out")
        linear = mlp_first if linear == "mlp.first" else linear
        a, b = pair["linear_in"].float(), pair["linear_out"].float()
        in_f, out_f = shapes[linear]
        if linear == "mlp.gate_up" and b.shape[0] == out_f // 2:  # a separate GLU: only its gate input is adapted
            b = torch.cat([b, torch.zeros_like(b)])
        if a.shape != (rank, in_f) or b.shape != (out_f, rank):
            raise AdapterError(f"{where}: layer {layer}'s {adapter} has linear_in {tuple(a.shape)} and linear_out "
                               f"{tuple(b.shape)}; rank {rank} on the base model's {linear} needs {(rank, in_f)} and "
                               f"{(out_f, rank)}: an adapter for another base model?")
        if linear == "attention.qkv":
            b = _qkv_rows(b, engine_config)
        linears[f"transformer.layers.{layer}.{linear}"] = (a.to(dtype).contiguous(), (b * scale).to(dtype).contiguous())
        targets.update(leaves)
    if not linears:
        raise AdapterError(f"{where} holds no LoRA weights")
    return AdapterWeights(linears, rank, sorted(targets))


__all__ = ["load_nemo_lora"]
