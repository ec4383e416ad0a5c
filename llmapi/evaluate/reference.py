"""The transformers model on the same weights as an engine, the reference that `llmapi eval --compare hf` runs."""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import UnsupportedModelError


def load_hf_reference(model: str, dtype: str, device: torch.device, revision: Optional[str] = None):
    """AutoModelForCausalLM from the source `model` names (hub id, HF directory or GGUF file), in `dtype`.

    The engine's own dtype should be passed, so both sides compute in the same precision. A saved
    engine directory holds no transformers checkpoint and is refused.
    """
    from transformers import AutoModelForCausalLM

    from ..engine import format as fmt
    from ..hub import resolve_source

    source = resolve_source(model, revision=revision)
    if source.kind == "engine":
        raise UnsupportedModelError(f"--compare hf needs the model's checkpoint (hub id, Hugging Face directory "
                                    f"or GGUF file); {model!r} is a saved engine directory")
    if source.kind == "gguf":
        # transformers dequantizes the GGUF blocks, as our converter does.
        hf = AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name,
                                                  dtype=fmt.DTYPES[dtype])
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=fmt.DTYPES[dtype])
    return hf.to(device).eval()
