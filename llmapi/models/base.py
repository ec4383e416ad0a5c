"""What every model family shares: strict weight loading, logits, dummy weights, HF-checkpoint reading."""

import re
import zlib
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llmapi.errors import CorruptEngineError, UnsupportedModelError
from llmapi.layers.attention import Attention

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    """The engine config's name of a weight dtype."""
    if dtype not in DTYPE_NAMES:
        raise UnsupportedModelError(f"dtype {dtype} is not supported (supported: {sorted(DTYPE_NAMES.values())})")
    return DTYPE_NAMES[dtype]


def token_id_list(value) -> list[int]:
    """An HF eos_token_id (int, list or None) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def require_positive(cfg: dict, *keys: str) -> None:
    """Each cfg[key] must be a positive int; the message names the field."""
    for key in keys:
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UnsupportedModelError(f"config field {key!r} must be a positive integer, got {value!r}")


def attention_shape(hf_config: dict) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) of an HF config that names them as Llama does (KV heads
    default to the heads, head_dim to hidden_size / heads); UnsupportedModelError names a shape that cannot be."""
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    head_dim = hf_config.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise UnsupportedModelError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    if heads % kv_heads:
        raise UnsupportedModelError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return heads, kv_heads, head_dim


def sliding_window(hf_config: dict, max_positions: int) -> int | None:
    """The config's `sliding_window` in positions, or None when there is none or it never binds (at least
    max_positions, or `use_sliding_window` false); UnsupportedModelError names a value that is not a window."""
    window = hf_config.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise UnsupportedModelError(f"config field 'sliding_window' must be a positive integer or null, got {window!r}")
    if hf_config.get("use_sliding_window", True) is False or (window is not None and window >= max_positions):
        return None  # every query sees its whole context
    return window


HEAD_ALIGNMENT = 64
"""CausalLM.align_head pads the head's rows to a multiple of this."""


class HFTensors:
    """Reads an HF state dict once, by name, with shape checks; reports missing and unknown names."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype, ignore: Iterable[str]):
        # Checkpoints saved from the bare model lack the "model."/"transformer." prefix: accept both.
        self._names = {(k[len(prefix):] if k.startswith(prefix) else k): k for k in state_dict.keys()}
        self._state_dict = state_dict
        self._dtype = dtype
        self._ignore = [re.compile(p) for p in ignore]
        self._used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._names

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor `name` (prefix stripped) cast to the engine dtype; UnsupportedModelError if absent or misshapen."""
        if name not in self._names:
            raise UnsupportedModelError(f"checkpoint lacks tensor {name!r}")
        tensor = self._state_dict[self._names[name]]
        if tuple(tensor.shape) != tuple(shape):
            raise UnsupportedModelError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(shape)}"
            )
        self._used.add(name)
        return tensor.to(self._dtype).contiguous()

    def skip(self, name: str) -> None:
        """Mark `name` as read on purpose without using it (e.g. the duplicate of a tied head)."""
        self._used.add(name)

    def take_head(self, weights: dict, tied: bool, shape: tuple[int, int], name: str = "lm_head.weight") -> None:
        """An untied head's matrix into weights["lm_head.weight"]; a tied head is the input embedding, and a copy
        of it saved under the head's name too is read on purpose and dropped."""
        if not tied:
            weights["lm_head.weight"] = self.take(name, shape)
        elif self.has(name):
            self.skip(name)

    def check_all_used(self) -> None:
        """Unknown tensors mean a layout we do not understand (quantized, another variant): refuse it."""
        unknown = [n for n in self._names if n not in self._used and not any(p.search(n) for p in self._ignore)]
        if unknown:
            shown = ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else "")
            raise UnsupportedModelError(f"checkpoint has {len(unknown)} tensors this converter does not know: {shown}")


def embedding(num: int, dim: int) -> nn.Embedding:
    """An nn.Embedding built under the meta device without its random init: on meta, normal_ goes through
    torch's reference ops, whose first use imports seconds of modules (the weights are loaded anyway)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class CausalLM(nn.Module):
    """Base of the model classes: parameters named as the engine's tensors, so loading is a strict copy."""

    def materialize(self, device, dtype: torch.dtype) -> None:
        """Give the parameters (built on the meta device) uninitialized storage in `dtype` on `device`.

        Random init of a large model would cost seconds and a float32 copy; load_weights fills every tensor.
        Called again after a parallel transform swapped modules (on "meta" the first time), so a family's
        computed buffers are (re)built here by `init_buffers`.
        """
        self.to(dtype=dtype)  # still meta: free
        self.to_empty(device=device)
        if torch.device(device).type != "meta":  # computing on meta imports torch._dynamo: seconds
            self.init_buffers(device)

    def init_buffers(self, device) -> None:
        """Build the buffers computed from the config (not loaded), e.g. rotary frequencies."""

    def kv_cache_attentions(self) -> list[nn.Module]:
        """The attentions over the paged KV cache, each of which holds its own kv_cache_scaling_factor when the
        cache is quantized: every Attention of a decoder-only model (an encoder-decoder model says its own)."""
        return [module for module in self.modules() if isinstance(module, Attention)]

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy engine tensors into the parameters; missing, unexpected or misshapen names raise CorruptEngineError."""
        params = self.state_dict()
        missing = sorted(set(params) - set(weights))
        unexpected = sorted(set(weights) - set(params))
        if missing or unexpected:
            raise CorruptEngineError(f"engine weights do not fit the model: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name, param in params.items():
                if tuple(weights[name].shape) != tuple(param.shape):
                    raise CorruptEngineError(
                        f"engine tensor {name!r} has shape {tuple(weights[name].shape)}, expected {tuple(param.shape)}"
                    )
                param.copy_(weights[name])

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:  # [N, H] -> [N, V]
        """Logits of the rows to sample: the head runs in the model dtype (as transformers), the result is float32
        (or left in the model dtype: `float32=False`).

        A tied head is the input embedding itself; a tensor-parallel transform swaps `lm_head` for a
        vocab-parallel head that gathers the full rows.
        """
        logits = self.head(hidden)
        return (logits.float() if float32 else logits).contiguous()  # one copy at most (an aligned head's view)

    def input_embedding(self) -> nn.Module:
        """The token embedding (a tied head's weight)."""
        return self.transformer.vocab_embedding

    def head(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V] in the model dtype
        """hidden times the head: through align_head's padded copy when there is one (a view of its vocabulary
        columns, rows strided), else the head itself."""
        if self._aligned_head is not None:
            return F.linear(hidden, self._aligned_head)[:, :self.config["vocab_size"]]
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.input_embedding().weight)

    _aligned_head: torch.Tensor | None = None

    def align_head(self) -> bool:
        """When the vocabulary is not a multiple of HEAD_ALIGNMENT: a copy of the head's weight in rows padded to
        one (zeros past the vocabulary), which head() multiplies by. cuBLAS takes its fast kernels only for
        aligned shapes: in a bart-large profile on an H100 an sm75 `align1` kernel, by its call count the
        50,265-row head, took 264 us of each 256-row decode step. A plain nn.Linear head or a tied one only (a vocab-parallel or biased head stays as it
        is); the copy costs the head's memory once more, taken before the KV cache is sized. Whether it padded."""
        vocab = self.config["vocab_size"]
        if vocab % HEAD_ALIGNMENT == 0:
            return False
        if self.lm_head is not None:
            if type(self.lm_head) is not nn.Linear or self.lm_head.bias is not None:
                return False
            weight = self.lm_head.weight
        else:
            weight = self.input_embedding().weight
        padded = weight.new_zeros(-(-vocab // HEAD_ALIGNMENT) * HEAD_ALIGNMENT, weight.shape[1])
        with torch.no_grad():
            padded[:vocab] = weight
        self._aligned_head = padded
        return True

    @classmethod
    def dummy_weights(cls, engine_config: dict, dtype: torch.dtype, seed: int = 0, device="cpu") -> dict:
        """Random engine weights (std 0.02; norm scales 1, biases 0) for benchmarks and tests."""
        shapes = {name: p.shape for name, p in cls(engine_config, "meta", dtype).state_dict().items()}
        return {name: dummy_tensor(name, shape, dtype, seed, device) for name, shape in shapes.items()}


def dummy_tensor(name: str, shape, dtype: torch.dtype, seed: int = 0, device="cpu") -> torch.Tensor:
    """The dummy value of engine tensor `name`: drawn from its own seed, so every rank that holds a shard of
    it cuts the same full tensor, whatever the mapping (dummy TP=2 equals dummy TP=1)."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if "layernorm" in name or "ln_f" in name:
        return tensor.fill_(1.0 if name.endswith("weight") else 0.0)
    if name.endswith("bias"):
        return tensor.zero_()
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return tensor.normal_(0.0, 0.02, generator=generator)
