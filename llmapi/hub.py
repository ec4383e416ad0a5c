"""Resolve a model source (hub id, local HF directory, Meta checkpoint, NeMo .nemo file, GGUF file, fairseq checkpoint
or saved engine) and its cache identity."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from llmapi.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

SourceKind = Literal["hf_dir", "meta", "nemo", "gguf", "fairseq", "engine"]

# What a hub download fetches: configs and tokenizer files first, safetensors only when weights are needed.
CONFIG_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json",
]
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]

# Files of a local directory whose change must change the engine (configs, tokenizer, weights).
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".pth", ".json", ".model", ".txt", ".jinja")
_HEAD_BYTES = 1 << 20  # GGUF metadata (and the tensor table of small files) sits in the first MiB


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where it lies on disk and what identifies its content for the engine cache."""

    kind: SourceKind
    """"hf_dir" (config.json + weights), "meta" (Meta's params.json + consolidated.NN.pth), "nemo" (one NeMo .nemo
    file), "gguf" (one .gguf file), "fairseq" (a fairseq translation checkpoint: model.pt beside dict.{lang}.txt and
    bpecodes) or "engine" (a saved llmapi engine)."""
    path: Path
    """The directory (hf_dir, meta, engine) or the .nemo / .gguf file, or the fairseq model.pt."""
    identity: dict = field(compare=False)
    """JSON-able dict that changes whenever the content changes: the engine cache keys on it."""
    name: str = ""
    """What the user passed, for messages."""


def resolve_source(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    weights: bool = True,
    check_config: Callable[[dict], None] | None = None,
) -> ModelSource:
    """Find `model` on disk (or download it from the hub) and return it with its cache identity.

    weights=False fetches configs and tokenizer only (load_format="dummy"). check_config, when given, is
    called with the HF config.json before any weight is downloaded, so an unsupported model fails fast.
    """
    name = os.fspath(model)
    path = Path(name).expanduser()
    if path.exists():
        return _resolve_local(path.resolve(), name, weights)
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model path {name!r} does not exist")
    return _resolve_hub(name, revision, token, weights, check_config)


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else that does not exist is a missing local path.
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith((".gguf", ".nemo"))
            or (os.sep != "/" and os.sep in name))


def is_engine_dir(path: Path) -> bool:
    """True when `path` holds a saved llmapi engine (our config.json + build_config.json + manifest.json)."""
    if not ((path / "build_config.json").is_file() and (path / "manifest.json").is_file()):
        return False
    try:
        return "architecture" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False  # a broken config: let the engine check report it if the user insists


def weight_files(path: Path) -> list[Path]:
    """The checkpoint files of an HF directory: safetensors (per the index when there is one), else .bin."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        # The index names the shards; other *.safetensors (e.g. consolidated copies) are not part of the model.
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    return sorted(p for p in path.glob("pytorch_model*.bin"))


def _resolve_local(path: Path, name: str, weights: bool) -> ModelSource:
    if path.is_file():
        if path.suffix == ".nemo":
            return ModelSource("nemo", path, _file_identity(path, "nemo"), name)
        if path.suffix == ".pt" and _is_fairseq_dir(path.parent):
            return ModelSource("fairseq", path, _fairseq_identity(path), name)
        if path.suffix != ".gguf":
            raise ModelNotFoundError(
                f"{name!r} is a file but not a .gguf or .nemo file (nor a fairseq .pt beside dict.{{lang}}.txt); pass "
                "a model directory, a .gguf or a .nemo file")
        return ModelSource("gguf", path, _file_identity(path, "gguf"), name)
    if is_engine_dir(path):
        manifest = (path / "manifest.json").read_bytes()
        identity = {"kind": "engine", "path": str(path), "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
        return ModelSource("engine", path, identity, name)
    has_config = (path / "config.json").is_file()
    if has_config and (weight_files(path) or not weights):
        return ModelSource("hf_dir", path, _dir_identity(path), name)
    if (path / "params.json").is_file():  # Meta's own layout (HF weights beside it would have won above)
        from llmapi.engine import meta

        if meta.is_meta_dir(path):
            meta.shard_files(path)  # a gap in the shard numbers is named here, before any lookup
            return ModelSource("meta", path, _dir_identity(path, "meta"), name)
    if not has_config and _is_fairseq_dir(path):  # fairseq's translation releases: model.pt + dict.{lang}.txt
        from llmapi.engine import fairseq

        checkpoint = fairseq.checkpoint_file(path)  # model.pt, else the only *.pt; several are named here
        return ModelSource("fairseq", checkpoint, _fairseq_identity(checkpoint), name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0], _file_identity(ggufs[0], "gguf"), name)
    if len(ggufs) > 1:
        raise ModelNotFoundError(
            f"directory {name!r} holds {len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs)}); "
            "pass one file's path")
    nemos = sorted(path.glob("*.nemo"))
    if len(nemos) == 1 and not has_config:  # e.g. a NeMo model's hub repo: the .nemo file and a README
        return ModelSource("nemo", nemos[0], _file_identity(nemos[0], "nemo"), name)
    if has_config:
        raise ModelNotFoundError(
            f"directory {name!r} has a config.json but no weights (*.safetensors or pytorch_model*.bin)")
    if len(nemos) > 1:
        raise ModelNotFoundError(f"directory {name!r} holds {len(nemos)} .nemo files "
                                 f"({', '.join(p.name for p in nemos)}); pass one file's path")
    if (path / "params.json").is_file():
        raise ModelNotFoundError(
            f"directory {name!r} has a params.json but no consolidated.NN.pth weights (a Meta checkpoint needs both)")
    raise ModelNotFoundError(
        f"directory {name!r} is not a model: expected config.json + weights, params.json + consolidated.NN.pth "
        "(a Meta checkpoint), a .gguf or .nemo file, model.pt + dict.{lang}.txt (a fairseq checkpoint), or a saved "
        "llmapi engine")


def safetensors_header_sha256(path: Path) -> str:
    """sha256 of a safetensors file's JSON header (names, dtypes, shapes, offsets): cheap and content-telling."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return hashlib.sha256(f.read(min(n, 100 << 20))).hexdigest()


def _dir_identity(path: Path, kind: str = "hf_dir") -> dict:
    files = []
    for p in sorted(path.iterdir()):
        if not (p.is_file() and p.name.endswith(_IDENTITY_SUFFIXES)):
            continue
        st = p.stat()
        entry = {"name": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if p.suffix == ".safetensors":
            # Same size and a touched-back mtime can still hide new weights; the header catches re-saved files.
            entry["header_sha256"] = safetensors_header_sha256(p)
        elif p.suffix not in (".bin", ".pth") and st.st_size <= 64 << 20:
            entry["sha256"] = _sha256_head(p, st.st_size)  # configs and tokenizer files: hash them whole
        files.append(entry)
    return {"kind": kind, "path": str(path), "files": files}


def _is_fairseq_dir(path: Path) -> bool:
    from llmapi.engine import fairseq

    return fairseq.is_fairseq_dir(path)


def _fairseq_identity(checkpoint: Path) -> dict:
    """model.pt's identity (size, mtime, head) plus the hashes of the dictionaries and BPE codes beside it."""
    from llmapi.engine import fairseq

    identity = _file_identity(checkpoint, "fairseq")
    identity["files"] = [{"name": p.name, "sha256": _sha256_head(p, p.stat().st_size)}
                         for p in fairseq.side_files(checkpoint.parent)]
    return identity


def _file_identity(path: Path, kind: str) -> dict:
    st = path.stat()
    return {"kind": kind, "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "head_sha256": _sha256_head(path, _HEAD_BYTES)}


def _sha256_head(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(limit)).hexdigest()


def hf_hub_cache_dir() -> str:
    """huggingface_hub's cache folder, read from the environment now (its constants are frozen at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hf_hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but at call time."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _resolve_hub(repo_id: str, revision: str | None, token, weights: bool, check_config) -> ModelSource:
    # Configs first: the architecture check runs before gigabytes of weights are fetched, and the
    # second call pins the commit the first one resolved, so both halves come from one revision.
    snapshot = _download(repo_id, revision, token, CONFIG_PATTERNS)
    commit = Path(snapshot).name
    config_path = Path(snapshot) / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"hub repo {repo_id!r} (revision {revision or 'main'}) has no config.json; "
            "for a GGUF repo, download the .gguf file and pass its path")
    if check_config is not None:
        check_config(json.loads(config_path.read_text()))
    if weights:
        snapshot = _download(repo_id, commit, token, CONFIG_PATTERNS + WEIGHT_PATTERNS)
        if not weight_files(Path(snapshot)):
            raise ModelNotFoundError(f"hub repo {repo_id!r} at {commit} has no *.safetensors weights")
    identity = {"kind": "hub", "repo_id": repo_id, "commit": commit}
    return ModelSource("hf_dir", Path(snapshot), identity, repo_id)


def _download(repo_id: str, revision: str | None, token, patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    offline = hf_hub_offline()
    where = f"{repo_id!r}" + (f" (revision {revision})" if revision else "")
    try:
        return snapshot_download(repo_id, revision=revision, token=token, cache_dir=hf_hub_cache_dir(),
                                 local_files_only=offline, allow_patterns=patterns)
    except HFValidationError as e:
        raise ModelNotFoundError(f"{repo_id!r} is neither an existing path nor a valid hub repo id ({e})") from e
    except GatedRepoError as e:  # before RepositoryNotFoundError: it is a subclass
        raise ModelNotFoundError(f"hub repo {where} is gated: accept its terms on the hub and pass token=") from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"{repo_id!r} is neither an existing path nor a hub repo (or it is private: pass token=)") from e
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"hub repo {repo_id!r} has no revision {revision!r}") from e
    except (LocalEntryNotFoundError, EntryNotFoundError) as e:
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline
               else "it is not cached and the hub cannot be reached")
        raise ModelNotFoundError(f"cannot get hub repo {where}: {why} ({hf_hub_cache_dir()})") from e
