"""LoRA adapters in the engine's terms, and the Hugging Face PEFT reader.

An adapter becomes, per fused engine linear it touches (transformer.layers.{i}.attention.qkv, ...; an
encoder-decoder model's encoder.layers.{i}.* and decoder.layers.{i}.*, cross-attention included), one pair
A [r, in] and B [out, r] with its scale folded into B, so that the linear's output gains (x @ A^T) @ B^T. A fused
linear stacks several HF linears (q/k/v into qkv, gate/up into gate_up): their pairs are stacked into one of rank
r_q + r_k + r_v whose B is block diagonal (each HF linear's rows read its own rank columns), so every engine
linear takes one pair whatever the adapter targets. Which HF linears stack into which engine linear comes from the
family's `fused_linears` declaration (llmapi/models/llama.py shows it), the converter's own naming.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from ..errors import AdapterError, AdapterNotFoundError

ADAPTER_CONFIG = "adapter_config.json"
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.weight$")
# adapter_config.json options whose non-empty values change the forward in ways these adapters do not carry.
_REFUSED_OPTIONS = ("use_dora", "lora_bias", "modules_to_save", "layer_replication", "alora_invocation_tokens",
                    "trainable_token_indices", "target_parameters", "use_qalora", "arrow_config", "use_bdlora")


@dataclass
class AdapterWeights:
    """One adapter, engine-shaped and unsharded: engine linear name -> (A [r, in], B [out, r], scale folded in B)."""

    linears: dict[str, tuple[torch.Tensor, torch.Tensor]]
    max_part_rank: int = 0
    """The largest rank of the HF modules it adapts (what max_lora_rank bounds)."""
    targets: list[str] = field(default_factory=list)
    """The HF module names it adapts (leaf names, e.g. ["q_proj", "v_proj"])."""

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.linears.values())


@dataclass(frozen=True)
class LinearPart:
    """One HF linear inside a fused engine linear."""

    engine: str  # transformer.layers.{i}.attention.qkv
    row_offset: int  # where its rows start in the engine linear's output
    rows: int
    in_features: int
    total_rows: int  # the engine linear's output features
    parts: int  # how many HF linears the engine linear stacks (its rank capacity is this many times max_lora_rank)


def family_of(engine_config: dict) -> ModuleType:
    """The model family module that converted an engine (config.json's hf_architecture; engines saved before that
    key are told by their architecture when it names one family)."""
    from ..models import SUPPORTED_HF_ARCHITECTURES, llama, gpt2

    arch = engine_config.get("hf_architecture")
    if arch in SUPPORTED_HF_ARCHITECTURES:
        return SUPPORTED_HF_ARCHITECTURES[arch]
    legacy = {"LlamaForCausalLM": llama, "GPT2LMHeadModel": gpt2}
    if engine_config.get("architecture") in legacy:
        return legacy[engine_config["architecture"]]
    raise AdapterError("this engine's config.json does not record the Hugging Face architecture it was converted "
                       "from (hf_architecture), which adapters are mapped by: rebuild it from the checkpoint")


def linear_parts(engine_config: dict) -> dict[str, LinearPart]:
    """HF linear name (without the model's prefix, e.g. "layers.0.self_attn.q_proj") -> where it sits in the
    engine, from the family's fused_linears declaration."""
    family = family_of(engine_config)
    declare = getattr(family, "fused_linears", None)
    if declare is None:
        raise AdapterError(f"LoRA adapters are not supported for {family.HF_ARCHITECTURES[0]} (its family declares "
                           "no fused_linears)")
    out = {}
    for engine, (parts, in_features) in declare(engine_config).items():
        total, offset = sum(rows for _, rows in parts), 0
        for name, rows in parts:
            out[name] = LinearPart(engine, offset, rows, in_features, total, len(parts))
            offset += rows
    return out


def rank_capacity(engine_config: dict, max_lora_rank: int) -> dict[str, int]:
    """Engine linear's name suffix ("attention.qkv") -> the rank its device slots hold: max_lora_rank per HF linear
    it stacks."""
    out = {}
    for part in linear_parts(engine_config).values():
        out[part.engine.split(".", 3)[3]] = part.parts * max_lora_rank
    return out


def _layer_count(engine_config: dict) -> str:
    decoder = engine_config["num_hidden_layers"]
    if engine_config.get("is_encoder_decoder"):
        return f"{engine_config['encoder']['num_layers']} encoder and {decoder} decoder layers"
    return f"{decoder} layers"


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def assemble(engine_config: dict, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]], where: str,
             max_lora_rank: int, dtype: torch.dtype, target_modules=()) -> AdapterWeights:
    """AdapterWeights from per-HF-module (A [r, in], B [out, r], scale), keyed by module path as the adapter names
    it (any prefix before the family's HF name is allowed). AdapterError names a module the family does not have,
    a rank above max_lora_rank, and shapes another base model would have."""
    parts = linear_parts(engine_config)
    family = family_of(engine_config)
    leaves = sorted({_leaf(n) for n in parts})
    by_engine: dict[str, list] = {}
    max_rank, targets = 0, set()
    for path, (a, b, scale) in modules.items():
        pieces = path.split(".")
        hf = next((".".join(pieces[k:]) for k in range(len(pieces)) if ".".join(pieces[k:]) in parts), None)
        leaf = pieces[-1]
        if hf is None:
            if leaf in leaves:
                raise AdapterError(f"{where}: adapts {path!r}, a module the base model does not have (it has "
                                   f"{_layer_count(engine_config)}): an adapter for another base model?")
            raise AdapterError(f"{where}: adapts {path!r}, but {family.HF_ARCHITECTURES[0]} has no linear {leaf!r} "
                               f"that takes LoRA (its modules: {', '.join(leaves)})")
        if target_modules and leaf not in target_modules:
            raise AdapterError(f"{where}: adapts {leaf!r}, which LoraConfig.lora_target_modules={list(target_modules)} "
                               "leaves out")
        part = parts[hf]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
            raise AdapterError(f"{where}: {path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not "
                               "make a rank-r pair (A [r, in], B [out, r])")
        if r > max_lora_rank:
            raise AdapterError(f"{where}: {path} has rank {r}, above max_lora_rank={max_lora_rank} "
                               "(LLM(max_lora_rank=...) or LoraConfig(max_lora_rank=...))")
        if a.shape[1] != part.in_features or b.shape[0] != part.rows:
            raise AdapterError(f"{where}: {path} maps {a.shape[1]} -> {b.shape[0]} features, but the base model's "
                               f"{leaf} maps {part.in_features} -> {part.rows}: an adapter for another base model?")
        max_rank, targets = max(max_rank, r), targets | {leaf}
        by_engine.setdefault(part.engine, []).append((part, a, b, scale))
    order = getattr(family, "order_rows", None)
    linears = {}
    for engine, items in by_engine.items():
        items.sort(key=lambda item: item[0].row_offset)
        total_rank = sum(a.shape[0] for _, a, _, _ in items)
        first = items[0][0]
        big_a = torch.cat([a.float() for _, a, _, _ in items])  # [R, in]
        big_b = torch.zeros(first.total_rows, total_rank)  # [out, R], block diagonal
        col = 0
        for part, a, b, scale in items:
            r = a.shape[0]
            big_b[part.row_offset:part.row_offset + part.rows, col:col + r] = b.float() * scale
            col += r
        if order is not None:
            big_b = order(engine_config, engine, big_b)
        linears[engine] = (big_a.to(dtype).contiguous(), big_b.to(dtype).contiguous())
    if not linears:
        raise AdapterError(f"{where}: the adapter holds no LoRA weights")
    return AdapterWeights(linears, max_rank, sorted(targets))


def _read_json(path: Path, where: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{where}: {path.name} cannot be read as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{where}: {path.name} is not a JSON object")
    return data


def _load_tensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterError(f"{where}: {path.name} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise AdapterError(f"{where}: {path.name} is not a state dict of tensors")
    return tensors


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first pattern that
    matches the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def check_adapter_path(path: str) -> Path:
    """The adapter path as a Path; AdapterNotFoundError when nothing is there."""
    p = Path(path).expanduser()
    if not p.exists():
        raise AdapterNotFoundError(f"LoRA adapter path {path!r} does not exist")
    return p


def load_peft(path: str, engine_config: dict, max_lora_rank: int, dtype: torch.dtype,
              target_modules=()) -> AdapterWeights:
    """A Hugging Face PEFT LoRA directory as AdapterWeights for this engine; AdapterError names what does not fit."""
    root = check_adapter_path(path)
    where = f"LoRA adapter {path}"
    if not root.is_dir() or not (root / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{where} is not a PEFT adapter directory (no {ADAPTER_CONFIG}"
                           f"{'' if root.is_dir() else '; it is a file'})")
    cfg = _read_json(root / ADAPTER_CONFIG, where)
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type={cfg.get('peft_type')!r}; only LORA adapters are supported")
    refused = [k for k in _REFUSED_OPTIONS if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        refused.append(f"bias={cfg['bias']!r}")
    if refused:
        raise AdapterError(f"{where}: adapter_config.json sets {', '.join(refused)}, which is not supported")
    weights = next((root / f for f in _WEIGHT_FILES if (root / f).is_file()), None)
    if weights is None:
        raise AdapterError(f"{where} has no {' or '.join(_WEIGHT_FILES)}")
    tensors = _load_tensors(weights, where)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            what = "embedding LoRA (lora_embedding_A/B)" if "lora_embedding" in key else "a tensor other than lora_A/B"
            raise AdapterError(f"{where}: {key!r} is {what}, which is not supported")
        module = m["module"].removeprefix("base_model.model.")
        pairs.setdefault(module, {})[m["ab"]] = tensor
    alpha, use_rslora = cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora", False))
    modules = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: {module} has lora_{''.join(ab)} without its lora_{'B' if 'A' in ab else 'A'}")
        r = ab["A"].shape[0]
        a_module = _pattern_value(cfg.get("alpha_pattern"), module, alpha)
        if not isinstance(a_module, (int, float)) or isinstance(a_module, bool):
            raise AdapterError(f"{where}: lora_alpha={a_module!r} is not a number")
        scale = a_module / math.sqrt(r) if use_rslora else a_module / r
        modules[module] = (ab["A"], ab["B"], scale)
    return assemble(engine_config, modules, where, max_lora_rank, dtype, target_modules)


__all__ = ["AdapterWeights", "LinearPart", "assemble", "family_of", "linear_parts", "load_peft", "rank_capacity"]
