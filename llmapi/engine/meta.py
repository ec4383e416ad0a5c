"""Read Meta's original Llama checkpoints (params.json, consolidated.NN.pth, tokenizer.model) as an HF Llama
config, an HF-named state dict merged from the model-parallel shards, and HF tokenizer files."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from llmapi.errors import MissingDependencyError, ModelNotFoundError, UnsupportedModelError

logger = logging.getLogger(__name__)

PARAMS_FILE = "params.json"
TOKENIZER_MODEL = "tokenizer.model"
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
# Meta's generation code runs Llama 1/2 with the SentencePiece ids <unk>=0, <s>=1, </s>=2.
_DEFAULT_BOS, _DEFAULT_EOS = 1, 2
# params.json keys of checkpoints this reader does not convert: Meta's int4/fp8 releases, LoRA adapters,
# the vision and mixture-of-experts models.
_REFUSED_PARAMS = ("quantization_args", "lora_args", "vision_chunk_size", "vision_model", "moe_args",
                   "vision_num_cross_attention_layers")

# How Meta's model.py (fairscale model-parallel layers) splits each tensor over the shards: "col" is a
# ColumnParallelLinear (output rows, dim 0), "row" a RowParallelLinear (input columns, dim 1), "rep" is
# replicated (the norms). tok_embeddings is a ParallelEmbedding (Llama 1/2: the embedding dim, dim 1) or a
# VocabParallelEmbedding (Llama 3: the vocabulary, dim 0); _embedding_split_dim tells them apart by shape.
# Meta name (layers.{i}. prefix for per-layer tensors) -> (HF name, split).
_GLOBAL_TENSORS = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "embed"),
    "norm.weight": ("model.norm.weight", "rep"),
    "output.weight": ("lm_head.weight", "col"),
}
_LAYER_TENSORS = {
    "attention.wq.weight": ("self_attn.q_proj.weight", "col"),
    "attention.wk.weight": ("self_attn.k_proj.weight", "col"),
    "attention.wv.weight": ("self_attn.v_proj.weight", "col"),
    "attention.wo.weight": ("self_attn.o_proj.weight", "row"),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", "col"),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", "row"),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", "col"),
    "attention_norm.weight": ("input_layernorm.weight", "rep"),
    "ffn_norm.weight": ("post_attention_layernorm.weight", "rep"),
}
_IGNORED_TENSORS = ("rope.freqs",)  # Llama 1 saved its rotary frequencies; they are recomputed from rope_theta
_SPLIT_DIMS = {"col": 0, "row": 1}


def is_meta_dir(path: Path) -> bool:
    """True when `path` holds params.json and at least one consolidated.NN.pth (Meta's checkpoint layout)."""
    return (path / PARAMS_FILE).is_file() and any(_SHARD.fullmatch(p.name) for p in path.glob("consolidated.*.pth"))


def shard_files(path: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.{N-1}.pth in model-parallel rank order; ModelNotFoundError names a gap."""
    found: dict[int, list[Path]] = {}
    for p in path.glob("consolidated.*.pth"):
        m = _SHARD.fullmatch(p.name)
        if m:
            found.setdefault(int(m.group(1)), []).append(p)
    names = ", ".join(sorted(p.name for ps in found.values() for p in ps))
    if not found:
        raise ModelNotFoundError(f"Meta checkpoint {path} has {PARAMS_FILE} but no consolidated.NN.pth weights")
    twice = [ps for ps in found.values() if len(ps) > 1]
    if twice:
        raise ModelNotFoundError(f"Meta checkpoint {path}: {' and '.join(p.name for p in twice[0])} both claim "
                                 f"model-parallel rank {int(_SHARD.fullmatch(twice[0][0].name).group(1))}")
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(found) + 1) if i not in found]
    if missing:
        raise ModelNotFoundError(
            f"Meta checkpoint {path}: the model-parallel shards must be consolidated.00.pth .. consolidated."
            f"{max(found):02d}.pth without a gap, but {', '.join(missing)} is missing (found: {names})")
    return [found[i][0] for i in range(len(found))]


def read_params(path: Path) -> dict:
    """params.json with Meta's ModelArgs defaults filled in and checked; UnsupportedModelError names a bad field."""
    try:
        raw = json.loads((path / PARAMS_FILE).read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"Meta checkpoint {path} has no {PARAMS_FILE}") from None
    except ValueError as e:
        raise UnsupportedModelError(f"{path / PARAMS_FILE} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise UnsupportedModelError(f"{path / PARAMS_FILE} is not a JSON object")
    raw = raw.get("model", raw)  # some releases nest the model arguments
    refused = [k for k in _REFUSED_PARAMS if raw.get(k) not in (None, -1)]
    if refused:
        raise UnsupportedModelError(f"{path / PARAMS_FILE} has {', '.join(refused)}: quantized, adapter, vision and "
                                    "mixture-of-experts Meta checkpoints are not supported")
    params = {
        "dim": raw.get("dim"), "n_layers": raw.get("n_layers"), "n_heads": raw.get("n_heads"),
        "n_kv_heads": raw.get("n_kv_heads") or raw.get("n_heads"),
        "vocab_size": raw.get("vocab_size", -1),
        "multiple_of": raw.get("multiple_of", 256),
        "ffn_dim_multiplier": raw.get("ffn_dim_multiplier"),
        "norm_eps": raw.get("norm_eps", 1e-5),
        "rope_theta": raw.get("rope_theta", 10000.0),
        "use_scaled_rope": bool(raw.get("use_scaled_rope", False)),
        "rope_scaling_factor": raw.get("rope_scaling_factor") or 8.0,
        "rope_high_freq_factor": raw.get("rope_high_freq_factor") or 4.0,
        "max_seq_len": raw.get("max_seq_len"),
    }
    where = path / PARAMS_FILE
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"):
        value = params[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UnsupportedModelError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    if not isinstance(params["vocab_size"], int) or params["vocab_size"] == 0 or params["vocab_size"] < -1:
        raise UnsupportedModelError(f"{where}: 'vocab_size' must be a positive integer or -1, "
                                    f"got {params['vocab_size']!r}")
    for key in ("norm_eps", "rope_theta", "rope_scaling_factor", "rope_high_freq_factor"):
        if not isinstance(params[key], (int, float)) or isinstance(params[key], bool) or params[key] <= 0:
            raise UnsupportedModelError(f"{where}: {key!r} must be a positive number, got {params[key]!r}")
    mult = params["ffn_dim_multiplier"]
    if mult is not None and (not isinstance(mult, (int, float)) or isinstance(mult, bool) or mult <= 0):
        raise UnsupportedModelError(f"{where}: 'ffn_dim_multiplier' must be a positive number, got {mult!r}")
    if params["max_seq_len"] is not None and (not isinstance(params["max_seq_len"], int) or params["max_seq_len"] <= 0):
        raise UnsupportedModelError(f"{where}: 'max_seq_len' must be a positive integer, got {params['max_seq_len']!r}")
    if params["dim"] % params["n_heads"]:
        raise UnsupportedModelError(f"{where}: dim {params['dim']} is not divisible by n_heads {params['n_heads']}")
    if params["n_heads"] % params["n_kv_heads"]:
        raise UnsupportedModelError(
            f"{where}: n_heads {params['n_heads']} is not a multiple of n_kv_heads {params['n_kv_heads']}")
    return params


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU hidden size as Meta's FeedForward computes it from dim, multiple_of and ffn_dim_multiplier."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def _max_positions(params: dict, vocab_size: int) -> int:
    """params.json's max_seq_len, else the context each Llama release was trained for (as transformers'
    conversion script sets it): 3.1+ (use_scaled_rope) 131072, 3 (128K vocabulary) 8192, CodeLlama
    (rope_theta above 10000) 16384, else 4096 (Llama 2; Llama 1 was trained at 2048)."""
    if params["max_seq_len"]:
        return params["max_seq_len"]
    if params["use_scaled_rope"]:
        return 131072
    if vocab_size >= 128000:
        return 8192
    return 16384 if params["rope_theta"] > 10000.0 else 4096


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    from llmapi.engine.convert import _load_bin  # weights_only (no code from a pickle), mmap where possible

    try:
        shard = _load_bin(path)
    except Exception as e:  # a truncated or foreign file: torch raises RuntimeError, pickle errors, ...
        raise UnsupportedModelError(f"cannot read Meta checkpoint shard {path}: {type(e).__name__}: {e}") from e
    if not isinstance(shard, dict) or not all(isinstance(t, torch.Tensor) for t in shard.values()):
        raise UnsupportedModelError(f"Meta checkpoint shard {path} is not a dict of tensors")
    return shard


class MetaCheckpoint(Mapping):
    """A Meta checkpoint as an HF-named state dict: each tensor merged from the model-parallel shards (and wq / wk
    turned from Meta's interleaved rotary layout into HF's half-split one) on first access.

    The shards are memory-mapped, so shapes are checked against params.json up front without reading weights,
    and convert_hf pulls one merged tensor at a time.
    """

    def __init__(self, path: Path, params: dict | None = None):
        self.path = Path(path)
        self.params = read_params(self.path) if params is None else params
        self.files = shard_files(self.path)
        self._shards = [_load_shard(p) for p in self.files]
        self._plan: dict[str, tuple[str, str]] = {}  # HF name -> (Meta name, split)
        self._check_names()
        self.embedding_split = self._embedding_split()
        self.vocab_size = self._full_shape("tok_embeddings.weight", self.embedding_split)[0]
        self._check_shapes()

    # --- layout checks (shapes only: nothing is read from disk yet) ---

    def _check_names(self) -> None:
        n_layers = self.params["n_layers"]
        expected = {meta: plan for meta, plan in _GLOBAL_TENSORS.items()}
        for i in range(n_layers):
            expected.update({f"layers.{i}.{meta}": (f"model.layers.{i}.{hf}", split)
                             for meta, (hf, split) in _LAYER_TENSORS.items()})
        for file, shard in zip(self.files, self._shards):
            names = set(shard) - set(_IGNORED_TENSORS)
            missing = sorted(set(expected) - names, key=_natural)
            unknown = sorted(names - set(expected), key=_natural)
            if missing:
                raise UnsupportedModelError(
                    f"Meta checkpoint shard {file} lacks {len(missing)} tensors of a {n_layers}-layer Llama "
                    f"(params.json n_layers): {_shown(missing)}")
            if unknown:
                raise UnsupportedModelError(
                    f"Meta checkpoint shard {file} has {len(unknown)} tensors a {n_layers}-layer Llama does not "
                    f"have: {_shown(unknown)}")
        self._plan = {hf: (meta, split) for meta, (hf, split) in expected.items()}

    def _embedding_split(self) -> str:
        """"col" (vocabulary rows, Llama 3's VocabParallelEmbedding) or "row" (embedding dim, ParallelEmbedding)."""
        n, dim = len(self._shards), self.params["dim"]
        shape = tuple(self._shards[0]["tok_embeddings.weight"].shape)
        if len(shape) != 2:
            raise UnsupportedModelError(
                f"Meta checkpoint shard {self.files[0].name}: tok_embeddings.weight is {list(shape)}, expected a matrix")
        rows, cols = shape
        if n == 1 or cols == dim:
            return "col"
        if cols * n == dim:
            return "row"
        raise UnsupportedModelError(
            f"Meta checkpoint shard {self.files[0].name}: tok_embeddings.weight is [{rows}, {cols}], neither the "
            f"whole embedding dim {dim} (split on the vocabulary) nor 1/{n} of it (split on the embedding dim)")

    def _full_shape(self, meta_name: str, split: str) -> tuple[int, ...]:
        """The merged shape of `meta_name`; UnsupportedModelError names a shard whose piece does not fit."""
        shapes = [tuple(s[meta_name].shape) for s in self._shards]
        dim = _SPLIT_DIMS.get(split)
        for file, shape in zip(self.files, shapes):
            if len(shape) != (1 if split == "rep" else 2):
                raise UnsupportedModelError(f"Meta checkpoint shard {file.name}: {meta_name} is {list(shape)}, "
                                            f"expected a {'vector' if split == 'rep' else 'matrix'}")
            other = [d for i, d in enumerate(shape) if i != dim]
            ref = [d for i, d in enumerate(shapes[0]) if i != dim]
            if len(shape) != len(shapes[0]) or other != ref or (dim is not None and shape[dim] != shapes[0][dim]):
                how = "replicated" if dim is None else f"split on dim {dim}"
                raise UnsupportedModelError(
                    f"Meta checkpoint: {meta_name} is {list(shapes[0])} in {self.files[0].name} but {list(shape)} "
                    f"in {file.name}; as a {how} tensor every shard must hold the same shape")
        if dim is None:
            return shapes[0]
        full = list(shapes[0])
        full[dim] *= len(shapes)
        return tuple(full)

    def _check_shapes(self) -> None:
        p, n = self.params, len(self._shards)
        dim, heads, kv_heads = p["dim"], p["n_heads"], p["n_kv_heads"]
        head_dim = dim // heads
        if heads % n or kv_heads % n:
            raise UnsupportedModelError(
                f"Meta checkpoint {self.path}: {n} model-parallel shards ({', '.join(f.name for f in self.files)}) "
                f"cannot each hold whole heads of n_heads={heads}, n_kv_heads={kv_heads} (params.json)")
        if p["vocab_size"] > 0 and p["vocab_size"] != self.vocab_size:
            raise UnsupportedModelError(
                f"{self.path / PARAMS_FILE} says vocab_size {p['vocab_size']}, but tok_embeddings.weight holds "
                f"{self.vocab_size} rows")
        hidden = ffn_hidden_size(dim, p["multiple_of"], p["ffn_dim_multiplier"])
        want = {"tok_embeddings.weight": (self.vocab_size, dim), "norm.weight": (dim,),
                "output.weight": (self.vocab_size, dim)}
        for i in range(p["n_layers"]):
            want.update({
                f"layers.{i}.attention.wq.weight": (heads * head_dim, dim),
                f"layers.{i}.attention.wk.weight": (kv_heads * head_dim, dim),
                f"layers.{i}.attention.wv.weight": (kv_heads * head_dim, dim),
                f"layers.{i}.attention.wo.weight": (dim, heads * head_dim),
                f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
                f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
                f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
                f"layers.{i}.attention_norm.weight": (dim,),
                f"layers.{i}.ffn_norm.weight": (dim,),
            })
        for hf, (meta, split) in self._plan.items():
            split = self.embedding_split if split == "embed" else split
            got = self._full_shape(meta, split)
            if got != want[meta]:
                why = ""
                if "feed_forward" in meta:
                    why = (f" (params.json dim={dim}, multiple_of={p['multiple_of']}, ffn_dim_multiplier="
                           f"{p['ffn_dim_multiplier']} give the FFN size {hidden})")
                raise UnsupportedModelError(
                    f"Meta checkpoint {self.path}: {meta} merged from {n} shard(s) is {list(got)}, params.json "
                    f"implies {list(want[meta])}{why}")
        self.intermediate_size = hidden

    # --- Mapping: HF name -> merged tensor ---

    def __getitem__(self, name: str) -> torch.Tensor:
        meta, split = self._plan[name]
        split = self.embedding_split if split == "embed" else split
        pieces = [s[meta] for s in self._shards]
        tensor = pieces[0] if split == "rep" or len(pieces) == 1 else torch.cat(pieces, dim=_SPLIT_DIMS[split])
        if meta.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = self.params["n_heads"] if meta.endswith("wq.weight") else self.params["n_kv_heads"]
            tensor = interleaved_to_half_rotary(tensor, heads)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)

    def close(self) -> None:
        self._shards.clear()

    def dtype(self) -> torch.dtype:
        return self._shards[0]["tok_embeddings.weight"].dtype


def interleaved_to_half_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection [heads * head_dim, in] from Meta's rotary layout, which rotates adjacent pairs
    (x0, x1), (x2, x3), ..., to HF's, which rotates (x_i, x_{i + head_dim/2}): per head, even rows then odd rows."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(params: dict, vocab_size: int, intermediate_size: int, dtype: torch.dtype | None = None,
              bos_token_id: int = _DEFAULT_BOS, eos_token_id: int | list[int] = _DEFAULT_EOS) -> dict:
    """The HF LlamaConfig dict (as save_pretrained writes it) of a Meta checkpoint's params."""
    from transformers import LlamaConfig

    rope_scaling = None
    if params["use_scaled_rope"]:  # Llama 3.1's apply_scaling, as transformers' "llama3" rope type
        rope_scaling = {"rope_type": "llama3", "factor": float(params["rope_scaling_factor"]),
                        "low_freq_factor": 1.0, "high_freq_factor": float(params["rope_high_freq_factor"]),
                        "original_max_position_embeddings": 8192}
    fields = dict(
        hidden_size=params["dim"], intermediate_size=intermediate_size, num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"], num_key_value_heads=params["n_kv_heads"], vocab_size=vocab_size,
        rms_norm_eps=float(params["norm_eps"]), rope_theta=float(params["rope_theta"]), rope_scaling=rope_scaling,
        max_position_embeddings=_max_positions(params, vocab_size), hidden_act="silu",
        tie_word_embeddings=False, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )
    config = LlamaConfig(architectures=["LlamaForCausalLM"], **fields)
    if dtype is not None:
        config.dtype = dtype
    return config.to_dict()


def load_meta(path: Path) -> tuple[dict, MetaCheckpoint]:
    """(HF config dict, HF-named lazy state dict) of a Meta checkpoint; close() the state dict when done."""
    checkpoint = MetaCheckpoint(path)
    return hf_config(checkpoint.params, checkpoint.vocab_size, checkpoint.intermediate_size,
                     checkpoint.dtype()), checkpoint


def checkpoint_dtype(path: Path) -> str | None:
    """The dtype name of a Meta checkpoint's tensors (bfloat16 for Meta's releases), read from the mmapped shard."""
    files = shard_files(path)
    dtype = _load_shard(files[0]).get("tok_embeddings.weight")
    return None if dtype is None else str(dtype.dtype).removeprefix("torch.")


def _is_tiktoken(path: Path) -> bool:
    # Llama 3's tokenizer.model is tiktoken's text format ("<base64 token> <rank>" lines), not a SentencePiece proto.
    with open(path, "rb") as f:
        head = f.read(256).split(b"\n")[0].split(b" ")
    return len(head) == 2 and head[1].isdigit()


def save_meta_tokenizer(path: Path, out_dir: Path) -> dict:
    """Put HF tokenizer files for the checkpoint into `out_dir`; returns {"bos_token_id", "eos_token_id"}.

    HF tokenizer files beside the checkpoint (tokenizer.json) are copied as they are. Otherwise the SentencePiece
    tokenizer.model is converted with transformers (LlamaTokenizerFast, which adds BOS as Meta's generation does).
    A tiktoken tokenizer.model (Llama 3) or none at all leaves the engine without a tokenizer, with a warning:
    pass LLM(tokenizer=...) or token-id prompts.
    """
    from llmapi.engine import format as fmt

    if (path / "tokenizer.json").is_file():
        fmt.copy_tokenizer_files(path, out_dir)
        return _special_ids(out_dir)
    model = path / TOKENIZER_MODEL
    if not model.is_file() or _is_tiktoken(model):
        what = "has no tokenizer.model" if not model.is_file() else "has a tiktoken tokenizer.model (Llama 3)"
        logger.warning("Meta checkpoint %s %s, which llmapi does not convert: the engine has no tokenizer; put the "
                       "model's HF tokenizer files (tokenizer.json, tokenizer_config.json) beside it, or pass "
                       "LLM(tokenizer=...) or token-id prompts", path, what)
        return {"bos_token_id": _DEFAULT_BOS, "eos_token_id": _DEFAULT_EOS}
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is None or importlib.util.find_spec("google.protobuf") is None:
        raise MissingDependencyError(f"reading the SentencePiece {model} of a Meta checkpoint needs the sentencepiece "
                                     "and protobuf packages: pip install sentencepiece protobuf")
    from transformers import LlamaTokenizerFast

    fmt.copy_tokenizer_files(path, out_dir)  # tokenizer.model (and any tokenizer_config.json beside it)
    try:
        tokenizer = LlamaTokenizerFast.from_pretrained(str(out_dir), add_bos_token=True)
    except Exception as e:  # transformers raises ValueError, RuntimeError, ... for a file it cannot convert
        raise UnsupportedModelError(f"cannot convert {model} into an HF tokenizer: {type(e).__name__}: {e}") from e
    tokenizer.save_pretrained(str(out_dir))
    return _special_ids(out_dir)


def _special_ids(tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos_token_id": _DEFAULT_BOS if bos is None else bos, "eos_token_id": _DEFAULT_EOS if eos is None else eos}


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _shown(names: list[str]) -> str:
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
