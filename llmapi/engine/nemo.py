"""Read NeMo GPT checkpoints (.nemo files: GPT-Next, Nemotron-3 and other Megatron GPT models) as an HF Nemotron
config, an HF-named state dict merged from the tensor-parallel shards, and HF tokenizer files.

A .nemo file is a tar (plain or gzip) of model_config.yaml (the model's hyperparameters), the weights as one torch
state dict, model_weights.ckpt, or one per tensor-parallel rank, mp_rank_NN/model_weights.ckpt, and the tokenizer
files the config names as "nemo:<file>". The weights follow NeMo's Megatron GPT model (the layout before Megatron
core, `mcore_gpt: false`), under model.language_model.:
- embedding.word_embeddings (vocabulary-parallel: rows split over the ranks), embedding.position_embeddings
  (learned_absolute positions; replicated);
- encoder.layers.N.{input_layernorm, post_attention_layernorm} (replicated; LayerNorm1P stores w - 1),
  self_attention.query_key_value (column-parallel: rows split), self_attention.dense (row-parallel: columns split,
  bias replicated), mlp.dense_h_to_4h (column-parallel), mlp.dense_h_to_4h_2 (the GLU's second input, non-fused
  activations), mlp.dense_4h_to_h (row-parallel);
- encoder.final_layernorm, output_layer (the untied head, vocabulary-parallel).
query_key_value's rows are grouped per key/value head (Megatron's layout, the same per head for multi-head
attention): for each group, the rows of its query heads, then its key head, then its value head. A fused GLU
("fast-swiglu") holds on each rank that rank's gate rows, then its up rows (the activation takes the first half).
"""

from __future__ import annotations

import logging
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath

import torch

from llmapi.errors import MissingDependencyError, ModelNotFoundError, UnsupportedModelError

logger = logging.getLogger(__name__)

CONFIG_FILE = "model_config.yaml"
WEIGHTS_FILE = "model_weights.ckpt"
_SHARD_DIR = re.compile(r"mp_rank_(\d+)")

# NeMo `activation` -> (HF hidden_act, gated). NeMo's GLUs apply the activation to the first input (dense_h_to_4h,
# or its first half when fused) and multiply by the second.
_ACTIVATIONS = {
    "squared-relu": ("relu2", False),
    "swiglu": ("silu", True),
    "fast-swiglu": ("silu", True),
    "gelu": ("gelu", False),
}
_NORMALIZATIONS = ("layernorm1p", "layernorm", "rmsnorm")
_POSITIONS = ("rope", "learned_absolute")
# Options whose other values change the model in ways this reader does not convert: name -> the values it takes.
_REQUIRED = {
    "mcore_gpt": (None, False),
    "transformer_engine": (None, False),
    "megatron_legacy": (None, False),
    "transformer_block_type": (None, "pre_ln"),
    "headscale": (None, False),
    "normalize_attention_scores": (None, True),
    "multi_query_attention": (None, False),
    "num_moe_experts": (None, 1),
    "pipeline_model_parallel_size": (None, 1),
    "virtual_pipeline_model_parallel_size": (None, 1),
}
_PRECISIONS = {"bf16": "bfloat16", "bf16-mixed": "bfloat16", "16": "float16", "16-mixed": "float16",
               "32": "float32", "32-true": "float32"}


# --- the archive ---


def _member_name(name: str) -> str | None:
    """A tar member's path inside the archive ("./a/b" -> "a/b", "." -> ""); None for one that would leave it."""
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        return None
    return "/".join(parts)


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:*")  # plain or compressed, detected
    except FileNotFoundError:
        raise ModelNotFoundError(f".nemo file {path} does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UnsupportedModelError(f"{path} is not a .nemo file (a tar archive): {e}") from e


def _regular_files(tar: tarfile.TarFile, path: Path) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """(path inside the archive, member) of each regular file, in archive order: read as a stream, so a gzip
    archive is decompressed once and a caller that stops early reads no further."""
    for member in tar:
        name = _member_name(member.name)
        if name is None:
            raise UnsupportedModelError(f"{path}: archive member {member.name!r} points outside the archive")
        if member.isfile() and name:  # links and special files are not part of a model archive
            yield name, member


def read_nemo_config(path: Path) -> dict:
    """model_config.yaml of a .nemo file; reading stops there (NeMo's archives hold it before the weights)."""
    import yaml

    path = Path(path)
    with _open_tar(path) as tar:
        text = next((tar.extractfile(m).read() for name, m in _regular_files(tar, path) if name == CONFIG_FILE), None)
    if text is None:
        raise UnsupportedModelError(f"{path} has no {CONFIG_FILE}: not a NeMo model archive")
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UnsupportedModelError(f"{path}: {CONFIG_FILE} is not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise UnsupportedModelError(f"{path}: {CONFIG_FILE} is not a mapping")
    return cfg


def extract(path: Path, dest: Path) -> list[str]:
    """Every file of the .nemo archive into `dest`, in one pass; returns their paths inside the archive."""
    path, dest = Path(path), Path(dest)
    names = []
    with _open_tar(path) as tar:
        for name, member in _regular_files(tar, path):
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 8 << 20)
            names.append(name)
    return names


def checkpoint_dtype(path: Path) -> str | None:
    """The dtype model_config.yaml's `precision` trained in (bf16 -> bfloat16, 16 -> float16, 32 -> float32)."""
    precision = read_nemo_config(path).get("precision")
    return _PRECISIONS.get(str(precision))


# --- the config ---


def _positive_int(cfg: dict, key: str, where: str, default=None) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UnsupportedModelError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def check_options(cfg: dict, where: str) -> None:
    """Raise UnsupportedModelError naming the first model_config.yaml option this reader does not convert."""
    for key, allowed in _REQUIRED.items():
        if cfg.get(key) not in allowed:
            raise UnsupportedModelError(f"{where}: {key}={cfg[key]!r} is not supported (supported: "
                                        f"{', '.join(repr(a) for a in allowed if a is not None)})")
    if cfg.get("activation", "gelu") not in _ACTIVATIONS:
        raise UnsupportedModelError(f"{where}: activation={cfg['activation']!r} is not supported "
                                    f"(supported: {', '.join(_ACTIVATIONS)})")
    if cfg.get("normalization", "layernorm") not in _NORMALIZATIONS:
        raise UnsupportedModelError(f"{where}: normalization={cfg['normalization']!r} is not supported "
                                    f"(supported: {', '.join(_NORMALIZATIONS)})")
    if cfg.get("position_embedding_type", "learned_absolute") not in _POSITIONS:
        raise UnsupportedModelError(f"{where}: position_embedding_type={cfg['position_embedding_type']!r} is not "
                                    f"supported (supported: {', '.join(_POSITIONS)})")
    factor = cfg.get("seq_len_interpolation_factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0):
        raise UnsupportedModelError(f"{where}: seq_len_interpolation_factor must be a positive number, got {factor!r}")
    pct = cfg.get("rotary_percentage", 1.0)
    if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0.0 < pct <= 1.0:
        raise UnsupportedModelError(f"{where}: rotary_percentage must be in (0, 1], got {pct!r}")


def _activation(cfg: dict) -> tuple[str, bool]:
    """(HF hidden_act, gated) of NeMo's `activation`, with its gelu as the MLP computes it: the tanh formula when the
    bias is fused into it (bias_activation_fusion, NeMo's default) or openai_gelu is set, else erf."""
    name = cfg.get("activation", "gelu")
    act, gated = _ACTIVATIONS[name]
    if name == "gelu" and (cfg.get("openai_gelu") or (cfg.get("bias", True) and cfg.get("bias_activation_fusion",
                                                                                         True))):
        act = "gelu_pytorch_tanh"
    return act, gated


def hf_config(cfg: dict, vocab_size: int, where: str, bos_token_id=None, eos_token_id=None,
              dtype: torch.dtype | None = None) -> dict:
    """The HF Nemotron config dict (with the NeMo options llmapi/models/nemotron.py reads) of a model_config.yaml."""
    check_options(cfg, where)
    hidden = _positive_int(cfg, "hidden_size", where)
    heads = _positive_int(cfg, "num_attention_heads", where)
    head_dim = cfg.get("kv_channels")
    if head_dim is None:
        if hidden % heads:
            raise UnsupportedModelError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads "
                                        f"{heads} (and kv_channels is not set)")
        head_dim = hidden // heads
    head_dim = _positive_int({"kv_channels": head_dim}, "kv_channels", where)
    groups = cfg.get("num_query_groups") or heads
    groups = _positive_int({"num_query_groups": groups}, "num_query_groups", where)
    if heads % groups:
        raise UnsupportedModelError(f"{where}: num_attention_heads {heads} is not a multiple of num_query_groups "
                                    f"{groups}")
    max_pos = cfg.get("max_position_embeddings") or cfg.get("encoder_seq_length")
    max_pos = _positive_int({"max_position_embeddings": max_pos}, "max_position_embeddings", where)
    act, gated = _activation(cfg)
    bias = bool(cfg.get("bias", True))
    out = {
        "architectures": ["NemotronForCausalLM"],
        "model_type": "nemotron",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": _positive_int(cfg, "ffn_hidden_size", where, 4 * hidden),
        "num_hidden_layers": _positive_int(cfg, "num_layers", where),
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": head_dim,
        "hidden_act": act,
        "gated_mlp": gated,
        "normalization": cfg.get("normalization", "layernorm"),
        "position_embedding_type": cfg.get("position_embedding_type", "learned_absolute"),
        "max_position_embeddings": max_pos,
        "norm_eps": float(cfg.get("layernorm_epsilon", 1e-5)),
        "rope_theta": float(cfg.get("rotary_base", 10000.0)),
        "partial_rotary_factor": float(cfg.get("rotary_percentage", 1.0)),
        "attention_bias": bias,
        "mlp_bias": bias,
        "tie_word_embeddings": bool(cfg.get("share_embeddings_and_output_weights", True)),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    if cfg.get("seq_len_interpolation_factor") is not None:  # positions divided by it: linear rope scaling
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(cfg["seq_len_interpolation_factor"])}
    if dtype is not None:
        out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


# --- the weights ---


def _load_shard(path: Path, where: str) -> dict[str, torch.Tensor]:
    from llmapi.engine.convert import _load_bin  # weights_only (no code from a pickle), mmap where possible

    try:
        shard = _load_bin(path)
    except Exception as e:  # a truncated file, or objects weights_only refuses (e.g. Transformer Engine state)
        raise UnsupportedModelError(f"cannot read {where}: {type(e).__name__}: {e}") from e
    shard = shard.get("state_dict", shard) if isinstance(shard, dict) else shard
    if not isinstance(shard, dict):
        raise UnsupportedModelError(f"{where} is not a state dict")
    out = {}
    for name, tensor in shard.items():
        if name.endswith("._extra_state"):
            continue  # Transformer Engine's fp8 metadata: nothing to convert
        if not isinstance(tensor, torch.Tensor):
            raise UnsupportedModelError(f"{where}: {name!r} is a {type(tensor).__name__}, not a tensor")
        for prefix in ("model.module.", "model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        out[name] = tensor
    return out


class NemoCheckpoint(Mapping):
    """The weights of an extracted .nemo as an HF-named (Nemotron) state dict: each tensor merged from the
    tensor-parallel shards, and query_key_value / a fused GLU's dense_h_to_4h taken apart, on first access.

    The shards are memory-mapped, so names and shapes are checked against model_config.yaml up front without reading
    weights. close() removes the extracted files.
    """

    def __init__(self, root: Path, cfg: dict, where: str, owns_root: bool = False):
        self.root, self.cfg, self.where = Path(root), cfg, where
        self._owns_root = owns_root
        check_options(cfg, where)
        self.files = self._shard_files()
        self._shards = [_load_shard(p, f"{where}: {p.relative_to(self.root)}") for p in self.files]
        self.tp = len(self._shards)
        self._plan: dict[str, tuple] = {}  # HF name -> (how, NeMo names...)
        self._build_plan()
        self.vocab_size = self._rows("language_model.embedding.word_embeddings.weight")
        self._check_shapes()

    # --- layout ---

    def _shard_files(self) -> list[Path]:
        single = self.root / WEIGHTS_FILE
        ranks = {}
        for d in self.root.iterdir():
            m = _SHARD_DIR.fullmatch(d.name)
            if m and d.is_dir():
                ranks[int(m.group(1))] = d / WEIGHTS_FILE
        if any(self.root.glob("tp_rank_*_pp_rank_*")):
            raise UnsupportedModelError(f"{self.where}: pipeline-parallel shards (tp_rank_NN_pp_rank_NNN) are not "
                                        "supported; re-save the model with pipeline_model_parallel_size 1")
        if single.is_file() and not ranks:
            files = [single]
        elif ranks and not single.is_file():
            missing = [f"mp_rank_{i:02d}" for i in range(max(ranks) + 1) if i not in ranks]
            if missing:
                raise UnsupportedModelError(f"{self.where}: tensor-parallel shard folder(s) {', '.join(missing)} "
                                            f"missing (found mp_rank_00 .. mp_rank_{max(ranks):02d} with gaps)")
            files = [ranks[i] for i in range(len(ranks))]
            absent = [str(p.relative_to(self.root)) for p in files if not p.is_file()]
            if absent:
                raise UnsupportedModelError(f"{self.where}: {', '.join(absent)} missing")
        elif ranks:
            raise UnsupportedModelError(f"{self.where}: holds both {WEIGHTS_FILE} and mp_rank_NN/{WEIGHTS_FILE}")
        else:
            if (self.root / "model_weights").is_dir():
                raise UnsupportedModelError(f"{self.where}: weights in a distributed checkpoint (model_weights/) "
                                            "are not supported; only model_weights.ckpt state dicts are read")
            raise UnsupportedModelError(f"{self.where} has no {WEIGHTS_FILE} (nor mp_rank_NN/{WEIGHTS_FILE})")
        tp = self.cfg.get("tensor_model_parallel_size", 1) or 1
        if tp != len(files):
            raise UnsupportedModelError(f"{self.where}: model_config.yaml says tensor_model_parallel_size {tp}, but "
                                        f"the archive holds {len(files)} weight shard(s)")
        return files

    def _build_plan(self) -> None:
        cfg = self.cfg
        layers = _positive_int(cfg, "num_layers", self.where)
        norm = cfg.get("normalization", "layernorm")
        norm_kinds = ("weight",) if norm == "rmsnorm" else ("weight", "bias")
        bias = bool(cfg.get("bias", True))
        kinds = ("weight", "bias") if bias else ("weight",)
        _, gated = _activation(cfg)
        fused_glu = gated and cfg["activation"].startswith("fast-")
        lm, plan = "language_model.", self._plan
        plan["model.embed_tokens.weight"] = ("col", lm + "embedding.word_embeddings.weight")
        if cfg.get("position_embedding_type", "learned_absolute") == "learned_absolute":
            plan["model.embed_positions.weight"] = ("rep", lm + "embedding.position_embeddings.weight")
        for i in range(layers):
            src, dst = f"{lm}encoder.layers.{i}.", f"model.layers.{i}."
            for kind in norm_kinds:
                plan[f"{dst}input_layernorm.{kind}"] = ("rep", f"{src}input_layernorm.{kind}")
                plan[f"{dst}post_attention_layernorm.{kind}"] = ("rep", f"{src}post_attention_layernorm.{kind}")
            for kind in kinds:
                qkv = f"{src}self_attention.query_key_value.{kind}"
                for j, part in enumerate(("q_proj", "k_proj", "v_proj")):
                    plan[f"{dst}self_attn.{part}.{kind}"] = ("qkv", qkv, j)
                plan[f"{dst}self_attn.o_proj.{kind}"] = ("row" if kind == "weight" else "rep",
                                                         f"{src}self_attention.dense.{kind}")
                h_to_4h = f"{src}mlp.dense_h_to_4h.{kind}"
                if fused_glu:
                    plan[f"{dst}mlp.gate_proj.{kind}"] = ("glu", h_to_4h, 0)
                    plan[f"{dst}mlp.up_proj.{kind}"] = ("glu", h_to_4h, 1)
                elif gated:
                    plan[f"{dst}mlp.gate_proj.{kind}"] = ("col", h_to_4h)
                    plan[f"{dst}mlp.up_proj.{kind}"] = ("col", f"{src}mlp.dense_h_to_4h_2.{kind}")
                else:
                    plan[f"{dst}mlp.up_proj.{kind}"] = ("col", h_to_4h)
                plan[f"{dst}mlp.down_proj.{kind}"] = ("row" if kind == "weight" else "rep",
                                                      f"{src}mlp.dense_4h_to_h.{kind}")
        for kind in norm_kinds:
            plan[f"model.norm.{kind}"] = ("rep", f"{lm}encoder.final_layernorm.{kind}")
        if not cfg.get("share_embeddings_and_output_weights", True):
            plan["lm_head.weight"] = ("col", lm + "output_layer.weight")

        expected = {entry[1] for entry in plan.values()}
        ignored = re.compile(r"(^|\.)rotary_pos_emb\.inv_freq$")  # recomputed from rotary_base
        for file, shard in zip(self.files, self._shards):
            names = {n for n in shard if not ignored.search(n)}
            where = f"{self.where}: {file.relative_to(self.root)}"
            missing = sorted(expected - names, key=_natural)
            unknown = sorted(names - expected, key=_natural)
            if missing:
                raise UnsupportedModelError(
                    f"{where} lacks {len(missing)} tensors the model_config.yaml model has: {_shown(missing)}")
            if unknown:
                raise UnsupportedModelError(
                    f"{where} has {len(unknown)} tensors this reader does not know: {_shown(unknown)}")

    def _rows(self, name: str) -> int:
        return sum(s[name].shape[0] for s in self._shards)

    def _check_shapes(self) -> None:
        cfg, tp = self.cfg, self.tp
        hf = hf_config(cfg, self.vocab_size, self.where)
        hidden, inter = hf["hidden_size"], hf["intermediate_size"]
        heads, groups, hd = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
        if heads % tp or groups % tp or inter % tp:
            raise UnsupportedModelError(
                f"{self.where}: {tp} tensor-parallel shards cannot each hold whole heads and FFN columns of "
                f"num_attention_heads={heads}, num_query_groups={groups}, ffn_hidden_size={inter}")
        q, kv = heads * hd, groups * hd
        want = {"model.embed_tokens.weight": (self.vocab_size, hidden), "lm_head.weight": (self.vocab_size, hidden),
                "model.embed_positions.weight": (hf["max_position_embeddings"], hidden)}
        shapes = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
                  "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        for name in self._plan:
            if name in want:
                continue
            module, kind = name.split(".")[-2:]
            if "norm" in module:
                shape = (hidden,)
            else:
                shape = shapes[module] if kind == "weight" else shapes[module][:1]
            want[name] = shape
        for name, entry in self._plan.items():
            got = self._merged_shape(entry)
            if got != want[name]:
                raise UnsupportedModelError(
                    f"{self.where}: {entry[1]} merged from {tp} shard(s) gives {name} the shape {list(got)}, "
                    f"model_config.yaml implies {list(want[name])}")

    def _merged_shape(self, entry: tuple) -> tuple[int, ...]:
        how, name = entry[0], entry[1]
        shapes = [tuple(s[name].shape) for s in self._shards]
        if any(len(s) != len(shapes[0]) or (how == "rep" and s != shapes[0]) for s in shapes):
            raise UnsupportedModelError(
                f"{self.where}: {name} has the shapes {[list(s) for s in shapes]} across the shards")
        if how == "rep":
            return shapes[0]
        dim = 1 if how == "row" else 0
        full = list(shapes[0])
        full[dim] = sum(s[dim] for s in shapes)
        if how == "glu":
            full[0] //= 2
        elif how == "qkv":
            heads, groups = self.cfg["num_attention_heads"], self.cfg.get("num_query_groups") or \
                self.cfg["num_attention_heads"]
            rows_per_group = heads // groups + 2  # its query heads, its key head, its value head
            if full[0] % (groups * rows_per_group):
                return tuple(full)  # reported as a shape mismatch
            head_dim = full[0] // (groups * rows_per_group)
            full[0] = head_dim * (heads if entry[2] == 0 else groups)
        return tuple(full)

    # --- Mapping: HF name -> merged tensor ---

    def __getitem__(self, name: str) -> torch.Tensor:
        how, src = self._plan[name][:2]
        pieces = [s[src] for s in self._shards]
        if how == "rep":
            return pieces[0]
        if how == "row":
            return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        if how == "col":
            return torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
        if how == "glu":  # each rank: its gate rows, then its up rows
            half = self._plan[name][2]
            return torch.cat([p.chunk(2, dim=0)[half] for p in pieces], dim=0)
        # qkv: the ranks hold whole groups, in order, so the merged rows are per group [q heads..., k, v]
        merged = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
        heads = self.cfg["num_attention_heads"]
        groups = self.cfg.get("num_query_groups") or heads
        per_group = heads // groups
        grouped = merged.reshape(groups, per_group + 2, -1, *merged.shape[1:])  # [ng, np/ng + 2, hn, (H)]
        part = self._plan[name][2]
        if part == 0:
            out = grouped[:, :per_group]
        else:
            out = grouped[:, per_group + part - 1]
        return out.reshape(-1, *merged.shape[1:]).contiguous()

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)

    def dtype(self) -> torch.dtype:
        return self._shards[0]["language_model.embedding.word_embeddings.weight"].dtype

    def close(self) -> None:
        self._shards.clear()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)


# --- the tokenizer ---


def _tokenizer_file(root: Path, cfg: dict, key: str) -> Path | None:
    """The file model_config.yaml's tokenizer.<key> names: "nemo:<name>" is a file of the archive; another path is
    looked up by its base name there (the training machine's path means nothing here)."""
    value = (cfg.get("tokenizer") or {}).get(key)
    if not value:
        return None
    name = str(value).removeprefix("nemo:")
    inside = _member_name(name)
    for candidate in ([root / inside] if inside else []) + [root / PurePosixPath(name).name]:
        if candidate.is_file():
            return candidate
    return None


def save_nemo_tokenizer(root: Path, cfg: dict, out_dir: Path, where: str) -> dict:
    """Write HF tokenizer files for an extracted .nemo into `out_dir`; returns {"bos_token_id", "eos_token_id"}.

    A SentencePiece tokenizer (tokenizer.library "sentencepiece") becomes an HF tokenizer built from the model's own
    settings, which encodes as SentencePiece does and adds no BOS (NeMo's generation adds none). Other tokenizer
    libraries leave the engine without a tokenizer, with a warning: pass LLM(tokenizer=...) or token-id prompts.
    """
    tok = cfg.get("tokenizer") or {}
    library = tok.get("library")
    model = _tokenizer_file(root, cfg, "model") if library == "sentencepiece" else None
    if model is None:
        what = (f"tokenizer library {library!r}" if library != "sentencepiece"
                else f"SentencePiece model {tok.get('model')!r}, which the archive does not hold")
        logger.warning("%s has a %s, which llmapi does not convert: the engine has no tokenizer; pass "
                       "LLM(tokenizer=...) or token-id prompts", where, what)
        return {"bos_token_id": None, "eos_token_id": None}
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is None or importlib.util.find_spec("google.protobuf") is None:
        raise MissingDependencyError(f"reading the SentencePiece tokenizer of {where} needs the sentencepiece and "
                                     "protobuf packages: pip install sentencepiece protobuf")
    from transformers import TokenizersBackend

    with tempfile.TemporaryDirectory(prefix="llmapi-nemo-tokenizer-") as tmp:
        shutil.copyfile(model, Path(tmp) / "tokenizer.model")
        try:
            tokenizer = TokenizersBackend.from_pretrained(tmp)
        except Exception as e:  # transformers raises ValueError, RuntimeError, ... for a file it cannot convert
            raise UnsupportedModelError(f"cannot convert the SentencePiece model {model.name} of {where} into an "
                                        f"HF tokenizer: {type(e).__name__}: {e}") from e
    tokenizer.save_pretrained(str(out_dir))
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


# --- the whole source ---


def load_nemo(path: Path, work_dir: Path | None = None) -> tuple[dict, dict, NemoCheckpoint]:
    """(model_config.yaml, HF config dict, HF-named lazy state dict) of a .nemo file, its options checked before
    anything is extracted. The archive is extracted into a new folder under `work_dir` (default: the system's
    temporary folder), which the state dict's close() removes."""
    path = Path(path)
    where = f".nemo file {path.name}"
    cfg = read_nemo_config(path)
    check_options(cfg, where)
    root = Path(tempfile.mkdtemp(prefix=path.stem + ".nemo-", dir=work_dir))
    try:
        extract(path, root)
        checkpoint = NemoCheckpoint(root, cfg, where, owns_root=True)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return cfg, hf_config(cfg, checkpoint.vocab_size, where, dtype=checkpoint.dtype()), checkpoint


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _shown(names: list[str]) -> str:
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
