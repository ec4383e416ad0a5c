"""Read original fairseq translation checkpoints (model.pt of a `transformer` model, dict.{src,tgt}.txt, bpecodes) as
transformers' FSMT form: an FSMT config, an FSMT-named state dict and FSMTTokenizer files, as transformers'
fairseq-to-FSMT conversion script (convert_fsmt_original_pytorch_checkpoint_to_pytorch.py) produces them.

A checkpoint is a pickle: {"args": argparse.Namespace, "model": state dict, ...} (fairseq before 0.10), or
{"cfg": {"model": ..., "task": ...}, "model": ...} (later fairseq; cfg an omegaconf DictConfig or plain containers,
its model section a Namespace, a dict or a DictConfig). It is unpickled by torch's weights-only loader, after a scan
of the pickle (which runs nothing) refused every global outside an allow-list of what such checkpoints hold.

The state dict follows fairseq's TransformerModel; older checkpoints (the 2018 WMT releases) keep names that fairseq
rewrites when it loads them (its upgrade_state_dict_named), and so does this reader:
- MultiheadAttention's in_proj_weight / in_proj_bias ([3 * dim, ...], rows q, k, v) -> q_proj, k_proj, v_proj;
- the encoder layer's layer_norms.0 / .1 -> self_attn_layer_norm / final_layer_norm, the decoder layer's
  layer_norms.0 / .1 / .2 -> self_attn_layer_norm / encoder_attn_layer_norm / final_layer_norm;
- decoder.embed_out (untied head) -> decoder.output_projection.weight; a tied head is decoder.embed_tokens.weight.
FSMT's names are fairseq's behind "model." (the conversion script's mapping); the sinusoidal positions' buffers and
the version counters hold no weights.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import pickletools
import re
import zipfile
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from llmapi.errors import MissingDependencyError, ModelNotFoundError, UnsafeCheckpointError, UnsupportedModelError

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"
BPE_CODES_FILES = ("bpecodes", "code")  # older fairseq releases called the merges file "code"
_DICT_FILE = re.compile(r"dict\.(.+)\.txt")
# fairseq's Dictionary puts these first; dict.*.txt lists only the symbols after them.
SPECIAL_SYMBOLS = ("<s>", "<pad>", "</s>", "<unk>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# --- the directory ---


def dictionary_files(path: Path) -> dict[str, Path]:
    """Language -> dict.{lang}.txt of a checkpoint directory."""
    found = {}
    for p in sorted(Path(path).glob("dict.*.txt")):
        m = _DICT_FILE.fullmatch(p.name)
        if m and p.is_file():
            found[m.group(1)] = p
    return found


def is_fairseq_dir(path: Path) -> bool:
    """True when `path` holds dict.*.txt and a checkpoint (model.pt, or *.pt files)."""
    path = Path(path)
    return bool(dictionary_files(path)) and any(p.is_file() for p in path.glob("*.pt"))


def checkpoint_file(path: Path) -> Path:
    """model.pt of a checkpoint directory, else its only *.pt; ModelNotFoundError names the choice it cannot make."""
    path = Path(path)
    if (path / CHECKPOINT_FILE).is_file():
        return path / CHECKPOINT_FILE
    found = sorted(p for p in path.glob("*.pt") if p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelNotFoundError(f"fairseq checkpoint directory {path} has no {CHECKPOINT_FILE} (nor any *.pt)")
    raise ModelNotFoundError(f"fairseq checkpoint directory {path} holds {len(found)} checkpoints "
                             f"({', '.join(p.name for p in found)}) and no {CHECKPOINT_FILE}; pass one file's path")


def bpe_codes_file(path: Path) -> Path | None:
    """bpecodes (or the older name "code") beside the checkpoint, None when absent."""
    return next((Path(path) / n for n in BPE_CODES_FILES if (Path(path) / n).is_file()), None)


def side_files(path: Path) -> list[Path]:
    """The files besides model.pt whose content the engine depends on: the dictionaries and the BPE codes."""
    files = list(dictionary_files(path).values())
    codes = bpe_codes_file(path)
    return files + ([codes] if codes is not None else [])


# --- the restricted unpickler ---

# Every global a fairseq translation checkpoint's pickle may name: its argparse.Namespace, omegaconf's containers
# and what they pickle (their metadata, value nodes, typing.Any and builtin types as key / element types, the
# defaultdict of their resolver cache), torch's tensors and storages, plain containers.
_ALLOWED_GLOBALS = frozenset({
    "argparse.Namespace",
    "collections.OrderedDict", "collections.defaultdict",
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.set", "builtins.frozenset", "builtins.int",
    "builtins.float", "builtins.complex", "builtins.str", "builtins.bool", "builtins.bytes", "builtins.bytearray",
    "_codecs.encode",  # how pickle protocol 2 writes bytes
    "typing.Any",
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state", "torch.nn.parameter.Parameter",
    "torch.Size", "torch.device", "torch.storage.UntypedStorage", "torch.storage.TypedStorage",
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode", "omegaconf.nodes.BytesNode",
    "omegaconf.nodes.PathNode",
})
_TORCH_STORAGE = re.compile(r"torch\.(\w+)Storage")  # torch.FloatStorage, torch.HalfStorage, ... (typed storages)
_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                         "BINUNICODE8"})
_LEGACY_PICKLES = 4  # legacy torch.save: magic number, protocol, sys info, then the object itself


def _allowed(name: str) -> bool:
    if name in _ALLOWED_GLOBALS:
        return True
    m = _TORCH_STORAGE.fullmatch(name)
    if m:
        return isinstance(getattr(torch, name[len("torch."):], None), type)
    module, _, attr = name.rpartition(".")
    return module == "torch" and isinstance(getattr(torch, attr, None), torch.dtype)  # torch.float16, ...


def _py3_name(module: str, name: str) -> str:
    # Protocol 2 pickles name Python 2 modules (__builtin__.long); pickle maps them as it loads, so does the scan.
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _scan_pickle(stream) -> list[str]:
    """module.name of every global one pickle (read up to its STOP) looks up, without running any of it.

    STACK_GLOBAL takes its names from the stack: they are resolved when the two pushes before it were strings (or
    memo reads of strings), else it is reported as unresolved, which no allow-list holds."""
    found: list[str] = []
    memo: dict[int, str | None] = {}
    pushed: deque = deque([None, None], maxlen=2)  # the top two stack items as pushed (None: not a string)
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, attr = arg.split(" ", 1)
            found.append(_py3_name(module, attr))
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = pushed
            ok = isinstance(module, str) and isinstance(attr, str)
            found.append(_py3_name(module, attr) if ok else "<a global STACK_GLOBAL computes>")
            pushed.append(None)
        elif name in ("EXT1", "EXT2", "EXT4"):
            found.append(f"<copyreg extension code {arg}>")
            pushed.append(None)
        elif name in _STRING_OPS:
            pushed.append(arg)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif name not in ("PROTO", "FRAME", "STOP"):
            pushed.append(None)
    return found


def pickle_globals(path: Path) -> list[str]:
    """The globals a torch checkpoint file's pickle names (zip format: its data.pkl; legacy format: the pickles before
    the tensor data), in order, found without unpickling anything."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if len(pkl) != 1:
                    raise UnsupportedModelError(f"{path} is a zip archive but not a torch checkpoint (no data.pkl)")
                with archive.open(pkl[0]) as stream:
                    return _scan_pickle(stream)
        found = []
        with open(path, "rb") as stream:
            for _ in range(_LEGACY_PICKLES):
                found += _scan_pickle(stream)
        return found
    except FileNotFoundError:
        raise ModelNotFoundError(f"fairseq checkpoint {path} does not exist") from None
    except UnsupportedModelError:
        raise
    except Exception as e:  # pickletools raises ValueError for garbage, zipfile BadZipFile, ...
        raise UnsupportedModelError(f"{path} is not a torch checkpoint: {type(e).__name__}: {e}") from e


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    if module.startswith("omegaconf") and importlib.util.find_spec("omegaconf") is None:
        raise MissingDependencyError(f"the checkpoint's config is an omegaconf object ({name}); reading it needs "
                                     "omegaconf: pip install omegaconf")
    return getattr(importlib.import_module(module), attr)


def _safe_globals(objects: list):
    """torch's context that adds `objects` to the weights-only loader's allowed globals (torch >= 2.5); torch 2.4
    has only the process-wide add_safe_globals (these objects are harmless to leave there)."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(objects)
    import contextlib

    torch.serialization.add_safe_globals(objects)
    return contextlib.nullcontext()


def load_checkpoint(path: Path) -> dict:
    """The unpickled checkpoint dict of a fairseq model.pt, its pickle's globals checked against the allow-list first.

    UnsafeCheckpointError names a global outside it (nothing was unpickled then). A zip-format file's tensors are
    memory-mapped, so they are read from disk when first used."""
    path = Path(path)
    names = list(dict.fromkeys(pickle_globals(path)))
    refused = [n for n in names if not _allowed(n)]
    if refused:
        raise UnsafeCheckpointError(
            f"fairseq checkpoint {path} names {len(refused)} global(s) outside the allow-list of what a fairseq "
            f"checkpoint holds (argparse.Namespace, omegaconf containers, torch tensors and storages, plain "
            f"containers): {', '.join(refused)}; nothing in it was run")
    # torch's weights-only loader allows tensors and plain containers itself; the rest is added for this load.
    try:
        extra = [_resolve(n) for n in names if not n.startswith("torch.")]
    except MissingDependencyError:
        raise
    except (ImportError, AttributeError) as e:  # e.g. a node class the installed omegaconf does not have
        raise UnsupportedModelError(f"cannot read fairseq checkpoint {path}: {type(e).__name__}: {e}") from e
    mmap = zipfile.is_zipfile(path)
    try:
        with _safe_globals(extra):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated file, an opcode the weights-only loader does not run, ...
        raise UnsupportedModelError(f"cannot read fairseq checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not isinstance(state.get("model"), Mapping):
        raise UnsupportedModelError(f"{path} is not a fairseq checkpoint (a dict whose 'model' is the state dict)")
    return state


# --- the model arguments ---

# fairseq's `transformer` architectures (fairseq/models/transformer/transformer_legacy.py): each sets these unless
# the args already hold them, then base_architecture fills the rest. Saved args normally hold every field their
# architecture set at training time; older ones lack fields added later, which get these defaults as fairseq gives.
_ARCHITECTURES = {
    "transformer": {},
    "transformer_wmt_en_de": {},
    "transformer_tiny": dict(encoder_embed_dim=64, encoder_ffn_embed_dim=64, encoder_layers=2,
                             encoder_attention_heads=2, decoder_layers=2, decoder_attention_heads=2),
    "transformer_iwslt_de_en": dict(encoder_embed_dim=512, encoder_ffn_embed_dim=1024, encoder_attention_heads=4,
                                    encoder_layers=6, decoder_embed_dim=512, decoder_ffn_embed_dim=1024,
                                    decoder_attention_heads=4, decoder_layers=6),
}
_BIG = dict(encoder_embed_dim=1024, encoder_ffn_embed_dim=4096, encoder_attention_heads=16,
            encoder_normalize_before=False, decoder_embed_dim=1024, decoder_ffn_embed_dim=4096,
            decoder_attention_heads=16, dropout=0.3)
_ARCHITECTURES["transformer_vaswani_wmt_en_de_big"] = _BIG
_ARCHITECTURES["transformer_vaswani_wmt_en_fr_big"] = {**_BIG, "dropout": 0.1}
_ARCHITECTURES["transformer_wmt_en_de_big"] = {"attention_dropout": 0.1, **_BIG}
_ARCHITECTURES["transformer_wmt_en_de_big_t2t"] = {"encoder_normalize_before": True, "decoder_normalize_before": True,
                                                   "attention_dropout": 0.1, "activation_dropout": 0.1, **_BIG}
_BASE_DEFAULTS = dict(
    encoder_embed_dim=512, encoder_ffn_embed_dim=2048, encoder_layers=6, encoder_attention_heads=8,
    encoder_normalize_before=False, encoder_learned_pos=False, decoder_layers=6, decoder_attention_heads=8,
    decoder_normalize_before=False, decoder_learned_pos=False, attention_dropout=0.0, activation_dropout=0.0,
    activation_fn="relu", dropout=0.1, adaptive_softmax_cutoff=None, share_decoder_input_output_embed=False,
    share_all_embeddings=False, no_token_positional_embeddings=False, adaptive_input=False, no_cross_attention=False,
    cross_self_attention=False, no_scale_embedding=False, layernorm_embedding=False, encoder_layers_to_keep=None,
    decoder_layers_to_keep=None, encoder_layerdrop=0.0, decoder_layerdrop=0.0, quant_noise_pq=0,
)
_DEFAULT_MAX_POSITIONS = 1024  # fairseq's DEFAULT_MAX_SOURCE_POSITIONS / DEFAULT_MAX_TARGET_POSITIONS

# fairseq activation_fn -> transformers ACT2FN name of the same function (gelu_accurate / gelu_fast: the tanh form).
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_accurate": "gelu_new", "gelu_fast": "gelu_new",
                "tanh": "tanh", "linear": "linear", "swish": "silu", "relu_squared": "relu2"}
# Options FSMT's model has no place for: arg -> what it is, for the message. Each is refused when truthy.
_UNSUPPORTED_OPTIONS = {
    "encoder_normalize_before": "pre-norm encoder layers (FSMT is post-norm)",
    "decoder_normalize_before": "pre-norm decoder layers (FSMT is post-norm)",
    "encoder_learned_pos": "learned encoder positions (FSMT's are sinusoidal)",
    "decoder_learned_pos": "learned decoder positions (FSMT's are sinusoidal)",
    "no_token_positional_embeddings": "no positional embeddings",
    "layernorm_embedding": "a layer norm on the embeddings",
    "adaptive_input": "adaptive input embeddings",
    "adaptive_softmax_cutoff": "an adaptive softmax",
    "cross_self_attention": "cross+self attention",
    "no_cross_attention": "a decoder without cross-attention",
    "encoder_layers_to_keep": "encoder layers pruned at load (encoder_layers_to_keep)",
    "decoder_layers_to_keep": "decoder layers pruned at load (decoder_layers_to_keep)",
    "quant_noise_pq": "quant-noise projections",
    "scale_attn": "NormFormer attention layer norms (scale_attn)",
    "scale_fc": "NormFormer FFN layer norms (scale_fc)",
    "scale_heads": "NormFormer head scaling (scale_heads)",
    "scale_resids": "NormFormer residual scaling (scale_resids)",
}


def _plain(value, where: str):
    """A Namespace / omegaconf section as plain dicts and lists (omegaconf is imported only when one is there)."""
    if isinstance(value, argparse.Namespace):
        return {k: _plain(v, where) for k, v in vars(value).items()}
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        try:
            value = OmegaConf.to_container(value, resolve=True)
        except Exception as e:  # an interpolation that does not resolve, a container of another omegaconf version
            raise UnsupportedModelError(f"{where}: cannot read its omegaconf cfg: {type(e).__name__}: {e}") from e
    if isinstance(value, Mapping):
        return {k: _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    return value


def _flatten_model_cfg(model: dict) -> dict:
    """A TransformerConfig-style section (nested encoder / decoder / quant_noise) as fairseq's flat arg names."""
    flat = dict(model)
    for section in ("encoder", "decoder", "quant_noise"):
        nested = flat.get(section)
        if isinstance(nested, dict):
            del flat[section]
            for k, v in nested.items():
                flat.setdefault(f"{section}_{k}", v)
    return flat


def model_args(state: dict, where: str) -> dict:
    """The checkpoint's model arguments as fairseq's flat names (plus source_lang / target_lang and the position
    limits from the task), the architecture's defaults filled in where the args lack a field."""
    if state.get("args") is not None:
        args = _plain(state["args"], where)
        if not isinstance(args, dict):
            raise UnsupportedModelError(f"{where}: 'args' is a {type(state['args']).__name__}, not an "
                                        "argparse.Namespace")
    elif state.get("cfg") is not None:
        cfg = _plain(state["cfg"], where)
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
            raise UnsupportedModelError(f"{where}: its 'cfg' has no model section")
        args = _flatten_model_cfg(cfg["model"])
        task = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
        for key in ("source_lang", "target_lang", "max_source_positions", "max_target_positions"):
            if args.get(key) is None and task.get(key) is not None:
                args[key] = task[key]
    else:
        raise UnsupportedModelError(f"{where} has neither 'args' nor 'cfg': not a fairseq model checkpoint")
    arch = args.get("arch") or args.get("_name")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"{where}: fairseq architecture {arch!r} is not supported; the reader takes the encoder-decoder "
            f"`transformer` architectures ({', '.join(sorted(_ARCHITECTURES))})")
    args["arch"] = arch
    for key, value in _ARCHITECTURES[arch].items():
        args.setdefault(key, value)
    for key, value in _BASE_DEFAULTS.items():
        args.setdefault(key, value)
    args.setdefault("decoder_embed_dim", args["encoder_embed_dim"])
    args.setdefault("decoder_ffn_embed_dim", args["encoder_ffn_embed_dim"])
    args.setdefault("decoder_output_dim", args["decoder_embed_dim"])
    args.setdefault("decoder_input_dim", args["decoder_embed_dim"])
    if not args["activation_dropout"]:  # as fairseq's layers read it: relu_dropout was its name before fairseq 0.7
        args["activation_dropout"] = args.get("relu_dropout") or 0.0
    if args.get("max_source_positions") is None:  # the oldest checkpoints had one max_positions for both sides
        args["max_source_positions"] = args.get("max_positions") or _DEFAULT_MAX_POSITIONS
    if args.get("max_target_positions") is None:
        args["max_target_positions"] = args.get("max_positions") or _DEFAULT_MAX_POSITIONS
    if args["share_all_embeddings"]:
        args["share_decoder_input_output_embed"] = True  # fairseq's build_model sets it so
    return args


def check_variant(args: dict, where: str) -> None:
    """UnsupportedModelError naming the first option of the checkpoint FSMT's model cannot express."""
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if args.get(key):
            raise UnsupportedModelError(f"{where}: the model has {what} ({key}={args[key]!r}), which FSMT cannot "
                                        "express")
    if args["activation_fn"] not in _ACTIVATIONS:
        raise UnsupportedModelError(f"{where}: activation_fn {args['activation_fn']!r} is not supported (supported: "
                                    f"{', '.join(_ACTIVATIONS)})")
    for key in ("encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_layers", "encoder_attention_heads",
                "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_layers", "decoder_attention_heads",
                "max_source_positions", "max_target_positions"):
        value = args[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UnsupportedModelError(f"{where}: {key} must be a positive integer, got {value!r}")
    dim = args["encoder_embed_dim"]
    for key in ("decoder_embed_dim", "decoder_input_dim", "decoder_output_dim"):
        if args[key] != dim:
            raise UnsupportedModelError(f"{where}: {key} {args[key]} differs from encoder_embed_dim {dim}; FSMT has "
                                        "one model width (d_model)")
    for side in ("encoder", "decoder"):
        heads = args[f"{side}_attention_heads"]
        if dim % heads:
            raise UnsupportedModelError(f"{where}: embed dim {dim} is not divisible by {side}_attention_heads {heads}")


def fsmt_config(args: dict, src_vocab_size: int, tgt_vocab_size: int, dtype: torch.dtype | None = None) -> dict:
    """The FSMT config dict (as FSMTConfig.to_dict() writes it) the conversion script makes from these args."""
    from transformers import FSMTConfig

    fields = dict(
        architectures=["FSMTForConditionalGeneration"],
        activation_dropout=float(args["activation_dropout"]),
        activation_function=_ACTIVATIONS[args["activation_fn"]],
        attention_dropout=float(args["attention_dropout"]),
        d_model=args["decoder_embed_dim"],
        dropout=float(args["dropout"]),
        init_std=0.02,
        max_position_embeddings=args["max_source_positions"],
        src_vocab_size=src_vocab_size,
        tgt_vocab_size=tgt_vocab_size,
        langs=[args["source_lang"], args["target_lang"]],
        encoder_attention_heads=args["encoder_attention_heads"],
        encoder_ffn_dim=args["encoder_ffn_embed_dim"],
        encoder_layerdrop=float(args["encoder_layerdrop"]),
        encoder_layers=args["encoder_layers"],
        decoder_attention_heads=args["decoder_attention_heads"],
        decoder_ffn_dim=args["decoder_ffn_embed_dim"],
        decoder_layerdrop=float(args["decoder_layerdrop"]),
        decoder_layers=args["decoder_layers"],
        bos_token_id=BOS_ID, pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=EOS_ID,
        is_encoder_decoder=True,
        scale_embedding=not args["no_scale_embedding"],
        tie_word_embeddings=bool(args["share_all_embeddings"]),
        # the script's generation defaults (its best-BLEU search: 5 beams, no early stopping, length penalty 1.0)
        num_beams=5, early_stopping=False, length_penalty=1.0,
    )
    config = FSMTConfig(**fields)
    if dtype is not None:
        config.dtype = dtype
    return config.to_dict()


def generation_config(config: dict) -> dict:
    """generation_config.json of the FSMT model (transformers' GenerationConfig.from_model_config keeps these)."""
    keys = ("bos_token_id", "pad_token_id", "eos_token_id", "decoder_start_token_id", "forced_eos_token_id",
            "num_beams", "early_stopping", "length_penalty", "max_length")
    return {k: config[k] for k in keys if config.get(k) is not None}


# --- the dictionaries ---


def read_dictionary(path: Path) -> list[str]:
    """The symbols of a fairseq dict.{lang}.txt by id: <s> <pad> </s> <unk>, then one per "symbol count" line.

    As fairseq's Dictionary.add_from_file: a repeated symbol is an error unless its line ends in
    "#fairseq:overwrite", which gives it a new id (the last one is what the symbol encodes to)."""
    symbols = list(SPECIAL_SYMBOLS)
    seen = set(symbols)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UnsupportedModelError(f"fairseq dictionary {path} is not UTF-8 text: {e}") from e
    for number, line in enumerate(lines, 1):
        parts = line.rstrip().rsplit(" ", 1)
        overwrite = len(parts) == 2 and parts[1] == "#fairseq:overwrite"
        if overwrite:
            parts = parts[0].rsplit(" ", 1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise UnsupportedModelError(f"fairseq dictionary {path}, line {number}: expected '<symbol> <count>', "
                                        f"got {line!r}")
        word = parts[0]
        if word in seen and not overwrite:
            raise UnsupportedModelError(f"fairseq dictionary {path}, line {number}: symbol {word!r} repeats (fairseq "
                                        "allows that only with '#fairseq:overwrite')")
        seen.add(word)
        symbols.append(word)
    return symbols


def fsmt_vocab(symbols: list[str]) -> dict[str, int]:
    """FSMTTokenizer's vocabulary of a fairseq dictionary (the conversion script's rewrite_dict_keys): a continued
    piece "le@@" is "le", a word-final piece "er" is "er</w>", the special symbols stay as they are."""
    vocab = {}
    for i, symbol in enumerate(symbols):
        key = symbol if symbol in SPECIAL_SYMBOLS else (symbol[:-2] if symbol.endswith("@@") else symbol + "</w>")
        vocab[key] = i  # later ids win, as fairseq's indices do
    return vocab


# --- the weights ---

_ATTN_PARTS = ("q_proj", "k_proj", "v_proj")
_ENCODER_NORMS = {"0": "self_attn_layer_norm", "1": "final_layer_norm"}
_DECODER_NORMS = {"0": "self_attn_layer_norm", "1": "encoder_attn_layer_norm", "2": "final_layer_norm"}
# Tensors that hold no weights: the sinusoidal tables' dtype buffers (and their pre-2018 cached tables), the
# encoder's and decoder's version counters.
_IGNORED = re.compile(r"(encoder|decoder)\.(version|embed_positions\._float_tensor|embed_positions\.weights)")


def _upgraded_names(names: list[str], share_output: bool) -> dict[str, tuple[str, int | None]]:
    """fairseq's current name of every checkpoint tensor -> (the checkpoint's name, None or the third of an
    in_proj tensor it is), as fairseq's upgrade_state_dict_named renames them."""
    plan: dict[str, tuple[str, int | None]] = {}
    for name in names:
        if _IGNORED.fullmatch(name):
            continue
        m = re.fullmatch(r"(.+)\.in_proj_(weight|bias)", name)
        if m:
            for j, part in enumerate(_ATTN_PARTS):
                plan[f"{m.group(1)}.{part}.{m.group(2)}"] = (name, j)
            continue
        m = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.layer_norms\.(\d+)\.(weight|bias)", name)
        norms = _ENCODER_NORMS if m and m.group(1) == "encoder" else _DECODER_NORMS
        if m and m.group(3) in norms:
            plan[f"{m.group(1)}.layers.{m.group(2)}.{norms[m.group(3)]}.{m.group(4)}"] = (name, None)
            continue
        plan[name] = (name, None)
    if "decoder.output_projection.weight" not in plan:
        source = "decoder.embed_tokens.weight" if share_output else "decoder.embed_out"
        if source in plan:
            plan["decoder.output_projection.weight"] = plan[source]
            if not share_output:
                del plan[source]
    return plan


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """fairseq's (current) name -> shape of every tensor of the FSMT-expressible transformer of this config."""
    d = config["d_model"]
    shapes = {"encoder.embed_tokens.weight": (config["src_vocab_size"], d),
              "decoder.embed_tokens.weight": (config["tgt_vocab_size"], d),
              "decoder.output_projection.weight": (config["tgt_vocab_size"], d)}

    def linear(prefix: str, out: int, inp: int) -> None:
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (out, inp), (out,)

    for side in ("encoder", "decoder"):
        ffn = config[f"{side}_ffn_dim"]
        attns = ("self_attn",) if side == "encoder" else ("self_attn", "encoder_attn")
        for i in range(config[f"{side}_layers"]):
            layer = f"{side}.layers.{i}"
            for attn in attns:
                for part in (*_ATTN_PARTS, "out_proj"):
                    linear(f"{layer}.{attn}.{part}", d, d)
                shapes[f"{layer}.{attn}_layer_norm.weight"] = shapes[f"{layer}.{attn}_layer_norm.bias"] = (d,)
            linear(f"{layer}.fc1", ffn, d)
            linear(f"{layer}.fc2", d, ffn)
            shapes[f"{layer}.final_layer_norm.weight"] = shapes[f"{layer}.final_layer_norm.bias"] = (d,)
    return shapes


class FairseqCheckpoint(Mapping):
    """A fairseq transformer's state dict under FSMTForConditionalGeneration's names ("model." + fairseq's current
    name), old names rewritten and in_proj tensors taken apart on access, one tensor at a time."""

    def __init__(self, state_dict: Mapping, config: dict, where: str, share_output: bool | None = None):
        """share_output: the head is the decoder's input embedding (share_decoder_input_output_embed; default:
        config's tie_word_embeddings), so an old checkpoint without decoder.output_projection.weight has it there."""
        self.where = where
        self._tensors = dict(state_dict)
        for name, tensor in self._tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise UnsupportedModelError(f"{where}: {name!r} is a {type(tensor).__name__}, not a tensor")
        if share_output is None:
            share_output = bool(config["tie_word_embeddings"])
        plan = _upgraded_names(list(self._tensors), share_output)
        want = expected_shapes(config)
        from llmapi.engine.meta import _natural, _shown

        missing = sorted(set(want) - set(plan), key=_natural)
        unknown = sorted(set(plan) - set(want), key=_natural)
        if missing:
            raise UnsupportedModelError(f"{where} lacks {len(missing)} tensors of the model its args describe: "
                                        f"{_shown(missing)}")
        if unknown:
            raise UnsupportedModelError(f"{where} has {len(unknown)} tensors this reader does not know: "
                                        f"{_shown(unknown)}")
        for name, shape in want.items():
            got = self._shape(plan[name])
            if got != shape:
                raise UnsupportedModelError(f"{where}: {plan[name][0]} gives {name} the shape {list(got)}, the args "
                                            f"and dictionaries imply {list(shape)}")
        self._plan = {"model." + name: plan[name] for name in sorted(want, key=_natural)}
        self._storage_owner: dict[int, str] = {}  # storage address -> the one name handed that storage itself

    def _shape(self, entry: tuple[str, int | None]) -> tuple[int, ...]:
        name, third = entry
        shape = tuple(self._tensors[name].shape)
        if third is None:
            return shape
        if not shape or shape[0] % 3:
            return (-1,)  # reported as a shape mismatch
        return (shape[0] // 3, *shape[1:])

    def __getitem__(self, name: str) -> torch.Tensor:
        source, third = self._plan[name]
        tensor = self._tensors[source]
        if third is not None:  # in_proj rows: q, then k, then v
            rows = tensor.shape[0] // 3
            return tensor.narrow(0, third * rows, rows).clone()
        # Every name gets a tensor of its own, as from a safetensors checkpoint: a shared embedding (one storage
        # under encoder.embed_tokens, decoder.embed_tokens and the head) is copied for each name after the first.
        owner = self._storage_owner.setdefault(tensor.untyped_storage().data_ptr(), name)
        return tensor if owner == name else tensor.clone()

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)

    def dtype(self) -> torch.dtype:
        return self._tensors[self._plan["model.encoder.embed_tokens.weight"][0]].dtype

    def close(self) -> None:
        self._tensors.clear()
        self._storage_owner.clear()


# --- the tokenizer ---


def _merges(codes: Path) -> str | None:
    """merges.txt for FSMTTokenizer from BPE codes: subword-nmt's (a "#version: 0.2" header, then "a b" lines) or
    fastBPE's ("a b count" lines), one merge "a b" per line; None for subword-nmt's version 0.1 codes, whose
    end-of-word convention FSMTTokenizer does not follow."""
    lines = codes.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].startswith("#version:"):
        if lines[0].split()[-1] != "0.2":
            return None
        lines = lines[1:]
    elif lines and len(lines[0].split()) == 2:
        return None  # subword-nmt codes without a header are version 0.1
    return "".join(" ".join(line.split()[:2]) + "\n" for line in lines if line.strip())


def save_fsmt_tokenizer(path: Path, args: dict, src_symbols: list[str], tgt_symbols: list[str], out_dir: Path,
                        bpe: str | None = None, tokenizer: str | None = None) -> bool:
    """Write FSMTTokenizer's files (vocab-src.json, vocab-tgt.json, merges.txt, tokenizer_config.json) for the
    checkpoint in `path` into `out_dir`, as the conversion script does; True when written.

    FSMTTokenizer runs Moses (sacremoses) and then BPE with the checkpoint's codes. Without BPE codes beside the
    checkpoint, or when its cfg names another tokenizer or BPE, the engine gets no tokenizer (a warning says so)."""
    codes = bpe_codes_file(path)
    why = None
    if bpe not in (None, "subword_nmt", "fastbpe"):
        why = f"its cfg names the BPE {bpe!r}"
    elif tokenizer not in (None, "moses"):
        why = f"its cfg names the tokenizer {tokenizer!r}"
    elif codes is None:
        why = f"it has no BPE codes ({' or '.join(BPE_CODES_FILES)})"
    merges = _merges(codes) if why is None else None
    if why is None and merges is None:
        why = f"its {codes.name} are subword-nmt version 0.1 codes"
    if why is not None:
        logger.warning("fairseq checkpoint %s: %s, which FSMTTokenizer (Moses + BPE) does not run: the engine has no "
                       "tokenizer; pass token-id prompts or LLM(tokenizer=...)", path, why)
        return False
    if importlib.util.find_spec("sacremoses") is None:
        raise MissingDependencyError("the tokenizer of a fairseq translation model (Moses + BPE, transformers' "
                                     "FSMTTokenizer) needs sacremoses: pip install 'llmapi[fairseq]'")
    src_vocab = fsmt_vocab(src_symbols)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab-src.json").write_text(json.dumps(src_vocab, ensure_ascii=False, indent=2), encoding="utf-8")
    (out_dir / "vocab-tgt.json").write_text(json.dumps(fsmt_vocab(tgt_symbols), ensure_ascii=False, indent=2),
                                            encoding="utf-8")
    (out_dir / "merges.txt").write_text(merges, encoding="utf-8")
    # The script lowercases input when no source symbol has an upper-case letter.
    do_lower_case = all(k.islower() for k in src_vocab)
    tokenizer_config = {"tokenizer_class": "FSMTTokenizer", "langs": [args["source_lang"], args["target_lang"]],
                        "model_max_length": args["max_source_positions"], "do_lower_case": do_lower_case}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    return True


def _cfg_name(state: dict, section: str) -> str | None:
    """cfg[section]._name of a newer checkpoint (its tokenizer / bpe), None when not recorded."""
    cfg = state.get("cfg")
    if cfg is None:
        return None
    try:
        value = cfg[section]
    except (KeyError, TypeError, AttributeError):
        return None
    if value is None:
        return None
    if isinstance(value, argparse.Namespace):
        return getattr(value, "_name", None)
    try:
        return value.get("_name")
    except AttributeError:
        return None


# --- the whole source ---


def read_fairseq(checkpoint: Path, out_dir: Path | None = None) -> tuple[dict, FairseqCheckpoint, dict]:
    """(FSMT config dict, FSMT-named state dict, generation config) of a fairseq translation checkpoint; the
    FSMTTokenizer files go into `out_dir` when given. close() the state dict when done.

    The dictionaries (dict.{source_lang}.txt, dict.{target_lang}.txt) and BPE codes are read beside `checkpoint`;
    model.pt is unpickled once (memory-mapped when it is a zip-format file)."""
    checkpoint = Path(checkpoint)
    where = f"fairseq checkpoint {checkpoint}"
    state = load_checkpoint(checkpoint)
    args = model_args(state, where)
    for key in ("source_lang", "target_lang"):
        if not isinstance(args.get(key), str):
            side = "source" if key == "source_lang" else "target"
            raise UnsupportedModelError(f"{where}: its args do not name the {side} language ({key}="
                                        f"{args.get(key)!r}), which picks dict.{{lang}}.txt")
    check_variant(args, where)
    dicts = dictionary_files(checkpoint.parent)
    symbols = {}
    for key in ("source_lang", "target_lang"):
        lang = args[key]
        if lang not in dicts:
            raise ModelNotFoundError(f"{where}: dict.{lang}.txt ({key}) is missing beside it (found: "
                                     f"{', '.join(p.name for p in dicts.values()) or 'none'})")
        symbols[key] = read_dictionary(dicts[lang])
    if args["share_all_embeddings"] and symbols["source_lang"] != symbols["target_lang"]:
        raise UnsupportedModelError(f"{where}: share_all_embeddings needs a joined dictionary, but "
                                    f"dict.{args['source_lang']}.txt and dict.{args['target_lang']}.txt differ")
    model = state["model"]
    for key, name in (("source_lang", "encoder.embed_tokens.weight"), ("target_lang", "decoder.embed_tokens.weight")):
        tensor = model.get(name)
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.shape[0] != len(symbols[key]):
            raise UnsupportedModelError(f"{where}: {name} has {tensor.shape[0]} rows, but dict.{args[key]}.txt gives "
                                        f"{len(symbols[key])} symbols (with the 4 special ones)")
    embed = model.get("encoder.embed_tokens.weight")
    dtype = embed.dtype if isinstance(embed, torch.Tensor) else None
    config = fsmt_config(args, len(symbols["source_lang"]), len(symbols["target_lang"]), dtype)
    weights = FairseqCheckpoint(model, config, where, share_output=bool(args["share_decoder_input_output_embed"]))
    if out_dir is not None:
        save_fsmt_tokenizer(checkpoint.parent, args, symbols["source_lang"], symbols["target_lang"], Path(out_dir),
                            bpe=_cfg_name(state, "bpe"), tokenizer=_cfg_name(state, "tokenizer"))
    return config, weights, generation_config(config)
