"""GPTQ checkpoints (AutoGPTQ / transformers layout): detect, validate, unpack and fuse into engine int weights.

Per HF linear L (K inputs, N outputs, p = 32 / bits codes per int32 word, code i of a word in bits
i*bits .. i*bits + bits - 1), the checkpoint holds:
    L.qweight  int32 [K / p, N]   codes packed along K
    L.qzeros   int32 [G, N / p]   zero points packed the same way along N, stored minus one (zero = stored + 1)
    L.scales   fp16  [G, N]
    L.g_idx    int32 [K]          the group of each input row (optional); must be row // group_size
with G = K / group_size (1 for group_size -1), and w[n, k] = (q[k, n] - zero[g, n]) * scale[g, n], g = k // group.
Act-order checkpoints (desc_act, a permuted g_idx) are refused. The engine stores the codes shifted into the
signed range (q - 2^(bits-1)) as int8, int4 packed two per byte, `weights_scaling_factor` [N, G] and
`weights_zero_point` [N, G] (zero - 2^(bits-1), in the model dtype); see quantization.weight_only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from llmapi._kernels.weight_only import pack_int4
from llmapi.errors import UnsupportedModelError
from llmapi.quantization.config import QuantConfig

GPTQ_BITS = {4: "W4A16_GPTQ", 8: "W8A16_GPTQ"}
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def gptq_quant_config(hf_config: dict) -> QuantConfig | None:
    """The QuantConfig of an HF config's `quantization_config`: None without one; a typed error naming the field
    for a layout this library cannot load."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "gptq":
        raise UnsupportedModelError(
            f"quantization_config.quant_method={method!r} checkpoints are not supported (supported: 'gptq')")
    bits = qc.get("bits")
    if bits not in GPTQ_BITS:
        raise UnsupportedModelError(f"GPTQ quantization_config.bits={bits!r} is not supported (supported: 4, 8)")
    if qc.get("desc_act"):
        raise UnsupportedModelError("GPTQ quantization_config.desc_act=True (act-order) is not supported: "
                                    "quantize the model with desc_act=False")
    if qc.get("checkpoint_format", "gptq") != "gptq":
        raise UnsupportedModelError(f"GPTQ quantization_config.checkpoint_format={qc['checkpoint_format']!r} is "
                                    "not supported (supported: 'gptq', zero points stored minus one)")
    if qc.get("lm_head"):
        raise UnsupportedModelError("GPTQ quantization_config.lm_head=True (a quantized head) is not supported")
    group = qc.get("group_size", 128)
    if group == -1:
        group = None
    elif not isinstance(group, int) or isinstance(group, bool) or group <= 0:
        raise UnsupportedModelError(f"GPTQ quantization_config.group_size={group!r} is invalid: must be -1 or > 0")
    return QuantConfig(GPTQ_BITS[bits], group_size=group)


def unpack_gptq(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Codes (uint8) of int32 words packed along `dim`: [R, C] -> [R * p, C] (dim 0) or [R, C * p] (dim 1)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)  # [p]; code i sits in bits i*bits..
    mask = (1 << bits) - 1  # arithmetic shifts of negative words only smear the sign above the mask
    if dim == 0:
        codes = (packed[:, None, :] >> shifts[None, :, None]) & mask  # [R, p, C]
        return codes.reshape(-1, packed.shape[1]).to(torch.uint8)
    codes = (packed[:, :, None] >> shifts) & mask  # [R, C, p]
    return codes.reshape(packed.shape[0], -1).to(torch.uint8)


class _Checkpoint:
    """A GPTQ state dict's tensors by name with or without the "model." prefix."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        self.state_dict = state_dict
        self.keys = {k.removeprefix("model."): k for k in state_dict.keys()}

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None) -> torch.Tensor:
        """Tensor `name` of this shape and dtype (None: any float dtype); a typed error naming it otherwise."""
        if name not in self.keys:
            raise UnsupportedModelError(f"GPTQ checkpoint lacks tensor {name!r}")
        t = self.state_dict[self.keys[name]]
        if tuple(t.shape) != shape or (t.dtype != dtype if dtype is not None else not t.is_floating_point()):
            raise UnsupportedModelError(f"GPTQ tensor {name!r} is {t.dtype} {tuple(t.shape)}; the config implies "
                                        f"{dtype or 'a float dtype'} {shape}")
        return t


def read_linear(ckpt: _Checkpoint, name: str, n: int, k: int, quant: QuantConfig):
    """One HF linear's (codes uint8 [N, K], scale float32 [N, G], zero int16 [N, G]), checked against the config."""
    bits, per = quant.bits, 32 // quant.bits
    group = quant.group_size or k
    if k % group:
        raise UnsupportedModelError(f"GPTQ quantization_config.group_size={group} does not divide the {k} "
                                    f"input features of {name}")
    if k % per or n % per:
        raise UnsupportedModelError(f"GPTQ linear {name} is [{n}, {k}]: both sizes must be multiples of {per}")
    g = k // group
    qweight = ckpt.tensor(f"{name}.qweight", (k // per, n), torch.int32)
    qzeros = ckpt.tensor(f"{name}.qzeros", (g, n // per), torch.int32)
    scales = ckpt.tensor(f"{name}.scales", (g, n), None)
    if f"{name}.g_idx" in ckpt.keys:
        g_idx = ckpt.tensor(f"{name}.g_idx", (k,), torch.int32)
        if not torch.equal(g_idx, torch.arange(k, dtype=torch.int32) // group):
            raise UnsupportedModelError(f"GPTQ tensor '{name}.g_idx' is not row // group_size: act-order "
                                        "(desc_act) checkpoints are not supported")
    codes = unpack_gptq(qweight, bits, dim=0).T  # [N, K]
    zero = unpack_gptq(qzeros, bits, dim=1).to(torch.int16).T + 1  # [N, G]; stored minus one
    return codes, scales.float().T, zero


def dequantize_gptq(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:  # -> [N, K] fp32
    n, k = codes.shape
    groups = codes.float().reshape(n, scale.shape[1], -1) - zero.float()[..., None]  # [N, G, g]
    return (groups * scale[..., None]).reshape(n, k)


class _FloatView(Mapping):
    """The checkpoint as the float converter reads it: each GPTQ linear's tensors stand as one float `weight`."""

    def __init__(self, ckpt: _Checkpoint, linears: dict[str, tuple]):
        self._ckpt, self._linears = ckpt, linears
        hidden = {ckpt.keys[f"{name}.{part}"] for name in linears for part in _PARTS if f"{name}.{part}" in ckpt.keys}
        self._names = [k for k in ckpt.state_dict.keys() if k not in hidden] + [f"{n}.weight" for n in linears]

    def __getitem__(self, key: str) -> torch.Tensor:
        name = key.removeprefix("model.").removesuffix(".weight")
        if key.endswith(".weight") and name in self._linears:
            return dequantize_gptq(*self._linears[name])
        return self._ckpt.state_dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def convert_gptq(hf_config: dict, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 quant: QuantConfig) -> tuple[dict, dict]:
    """(engine config, engine weights) of a GPTQ checkpoint: the float conversion for everything else, and each
    fused linear's codes, scales and zero points stacked as the float path stacks q/k/v and gate/up."""
    from llmapi.models import convert_hf, family, hf_architecture

    converter = family(hf_config)
    if not getattr(converter, "GPTQ_CHECKPOINTS", False):
        raise UnsupportedModelError(f"GPTQ checkpoints of {hf_architecture(hf_config)} are not supported "
                                    "(supported: the Llama family)")
    table = converter.fused_linears(converter.config_from_hf(hf_config, dtype))
    ckpt = _Checkpoint(state_dict)
    stray = sorted(k.removesuffix(".qweight") for k in ckpt.keys if k.endswith(".qweight")
                   and k.removesuffix(".qweight") not in {name for parts, _ in table.values() for name, _ in parts})
    if stray:
        raise UnsupportedModelError(f"GPTQ checkpoint quantizes linears this engine keeps in float: {stray[:4]}")
    linears = {name: read_linear(ckpt, name, rows, k, quant)
               for parts, k in table.values() for name, rows in parts}
    cfg, weights = convert_hf(hf_config, _FloatView(ckpt, linears), dtype)
    half = 1 << (quant.bits - 1)  # shifts unsigned codes 0..2^bits-1 into the engine's signed int8 range
    for engine_name, (parts, _) in table.items():
        codes = torch.cat([linears[name][0] for name, _ in parts])  # [N, K] uint8
        signed = (codes.to(torch.int16) - half).to(torch.int8)
        weights[engine_name + ".weight"] = pack_int4(signed) if quant.bits == 4 else signed
        weights[engine_name + ".weights_scaling_factor"] = torch.cat([linears[n][1] for n, _ in parts]).to(dtype)
        zero = torch.cat([linears[n][2] for n, _ in parts]) - half  # [N, G]
        weights[engine_name + ".weights_zero_point"] = zero.to(dtype)
        if quant.group_size is None:  # per channel: one scale and zero per row, as the symmetric path stores it
            for suffix in (".weights_scaling_factor", ".weights_zero_point"):
                weights[engine_name + suffix] = weights[engine_name + suffix][:, 0]
    return cfg, weights
