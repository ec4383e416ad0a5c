"""Read a GGUF file through transformers' GGUF reader: HF config, dequantized HF state dict, tokenizer files."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from pathlib import Path
from typing import Callable, Iterator

import torch

from llmapi.errors import UnsupportedModelError

logger = logging.getLogger(__name__)


def _hf_config(parsed_config: dict):
    """Turn the GGUF reader's config fields into an HF config object (with "architectures")."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    fields = dict(parsed_config)
    fields.pop("_model_name_or_path", None)
    model_type = fields.pop("model_type")
    # Going through the config class fills defaults and the transformers-version rope layout
    # (rope_theta -> rope_parameters), so convert_hf sees what save_pretrained would have written.
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if arch is None:
        raise UnsupportedModelError(f"GGUF model type {model_type!r} has no causal-LM class in transformers")
    return AutoConfig.for_model(model_type, architectures=[arch], **fields)


_SHARING = threading.Lock()


@contextlib.contextmanager
def parsed_once() -> Iterator[None]:
    """Within this block transformers' GGUF calls share what they would each build anew from the `gguf` package:
    one reader per file (the config, the tensors and the tokenizer each open one, and a reader parses every
    metadata field in Python: seconds for a 49K-token vocabulary) and one tensor-name map per architecture and
    layer count (built once per module of the model otherwise). Both are read-only once built. One block at a
    time: the names are the gguf module's own, restored on the way out."""
    import gguf

    with _SHARING:
        reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers = {}

        def shared_reader(path, *args, **kwargs):
            key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
            if key not in readers:
                readers[key] = reader(path, *args, **kwargs)
            return readers[key]

        gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.cache(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _read(path: Path, **kwargs) -> dict:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(str(path), **kwargs)
    except (ValueError, NotImplementedError) as e:  # transformers' way of saying "architecture not supported"
        raise UnsupportedModelError(f"cannot read GGUF file {path.name}: {e}") from e


def load_gguf_config(path: Path) -> tuple[dict, dict]:
    """(HF config dict, generation config dict) from the GGUF metadata alone, no tensor read."""
    parsed = _read(path)
    return _hf_config(parsed["config"]).to_dict(), _generation_config(parsed["config"])


def load_gguf(path: Path, check_config: Callable[[dict], object] | None = None
              ) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(HF config dict, HF-named float32 state dict, generation config) of a GGUF file.

    transformers dequantizes every tensor and undoes llama.cpp's q/k row permutation, so the state
    dict is what the model's own safetensors would hold (in float32). check_config sees the HF config
    dict before any tensor is dequantized.
    """
    from transformers import AutoModelForCausalLM

    parsed = _read(path)
    hf_config, generation = _hf_config(parsed["config"]), _generation_config(parsed["config"])
    if check_config is not None:
        check_config(hf_config.to_dict())
    # The reader maps GGUF names to HF names by walking a model's state dict; a meta-device model
    # gives it those names without allocating any weight.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    parsed = _read(path, return_tensors=True, model_to_load=skeleton)  # tqdm over tensors is transformers' own
    return hf_config.to_dict(), parsed["tensors"], generation


def _generation_config(parsed_config: dict) -> dict:
    # GGUF's eos is the chat end-of-turn token for instruct models (SmolLM2: <|im_end|>), which is what
    # generation must stop on; the HF repo's generation_config.json says the same.
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: parsed_config[k] for k in keys if parsed_config.get(k) is not None}


def save_gguf_tokenizer(path: Path, out_dir: Path, token_ids: dict) -> None:
    """Build the HF tokenizer from the GGUF vocab/merges/chat template and save it into `out_dir`.

    token_ids ({"bos_token_id": ..., "eos_token_id": ...}, from the GGUF metadata) name the special
    tokens: some transformers versions (5.17) build the tokenizer with eos = bos for SmolLM2's GGUF.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for field in ("bos", "eos", "pad"):
        token_id = token_ids.get(f"{field}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{field}_token", tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.save_pretrained(str(out_dir))
