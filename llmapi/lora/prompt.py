"""Prompt-tuning tables: NeMo prompt-learning .nemo files and plain tensor files, as [tasks, tokens, hidden].

A NeMo prompt-tuning checkpoint is a .nemo tar of model_config.yaml, whose `task_templates` list the tasks by
`taskname`, and model_weights.ckpt, whose "prompt_table" entry holds each task's
prompt_table.<taskname>.prompt_embeddings.weight [tokens, hidden] (the layout TensorRT-LLM's
nemo_prompt_convert.py reads). Tasks are numbered in task_templates order, those without weights skipped; shorter
tasks are padded with zero rows to the longest, as TensorRT-LLM's converter pads them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..errors import AdapterError
from .weights import check_adapter_path


def _nemo_tables(path: Path, where: str) -> list[torch.Tensor]:
    from ..engine import nemo

    try:
        cfg = nemo.read_nemo_config(path)
    except Exception as e:  # not a tar, no model_config.yaml
        raise AdapterError(f"{where} is not a NeMo prompt-tuning checkpoint ({e})") from None
    templates = cfg.get("task_templates")
    if not isinstance(templates, list) or not templates:
        raise AdapterError(f"{where}: model_config.yaml has no task_templates: not a prompt-tuning checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        names = nemo.extract(path, Path(tmp))
        ckpt = Path(tmp) / nemo.WEIGHTS_FILE
        if nemo.WEIGHTS_FILE not in names:
            raise AdapterError(f"{where} has no {nemo.WEIGHTS_FILE}")
        try:
            weights = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterError(f"{where}: {nemo.WEIGHTS_FILE} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(weights, dict):
        raise AdapterError(f"{where}: {nemo.WEIGHTS_FILE} is not a state dict")
    table = weights.get("prompt_table", weights)
    if not isinstance(table, dict):
        raise AdapterError(f"{where}: its prompt_table entry is not a dict of tensors")
    tasks = []
    for template in templates:
        name = template.get("taskname") if isinstance(template, dict) else None
        tensor = table.get(f"prompt_table.{name}.prompt_embeddings.weight")
        if tensor is not None:
            tasks.append(tensor)
    if not tasks:
        raise AdapterError(f"{where} holds no prompt_table.<taskname>.prompt_embeddings.weight for the tasks of "
                           f"its task_templates ({[t.get('taskname') for t in templates if isinstance(t, dict)]})")
    return tasks


def _tensor_file(path: Path, where: str) -> torch.Tensor:
    try:
        if path.suffix == ".npy":
            import numpy as np

            return torch.from_numpy(np.load(path, allow_pickle=False))
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterError(f"{where} cannot be read as a tensor file ({type(e).__name__}: {e})") from None
    if isinstance(tensors, torch.Tensor):
        return tensors
    if isinstance(tensors, dict) and len(tensors) == 1 and isinstance(next(iter(tensors.values())), torch.Tensor):
        return next(iter(tensors.values()))
    if isinstance(tensors, dict) and isinstance(tensors.get("prompt_table"), torch.Tensor):
        return tensors["prompt_table"]
    raise AdapterError(f"{where} holds no single tensor (or 'prompt_table' tensor) of prompt embeddings")


def load_prompt_table(path: str, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The table of a prompt-tuning checkpoint as [tasks, tokens, hidden] in `dtype`."""
    p = check_adapter_path(path)
    where = f"prompt table {path}"
    if p.is_dir():
        raise AdapterError(f"{where} is a directory; a NeMo .nemo file or a tensor file is expected")
    if p.suffix == ".nemo":
        tasks = _nemo_tables(p, where)
    else:
        t = _tensor_file(p, where)
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3:
            raise AdapterError(f"{where}: a tensor of shape {tuple(t.shape)}; expected [tasks, tokens, hidden] or "
                               "[tokens, hidden]")
        tasks = list(t)
    for t in tasks:
        if t.dim() != 2 or t.shape[1] != hidden_size:
            raise AdapterError(f"{where}: embeddings of shape {tuple(t.shape)}, but the base model's hidden size is "
                               f"{hidden_size}: a table for another base model?")
    longest = max(t.shape[0] for t in tasks)
    table = torch.zeros(len(tasks), longest, hidden_size)
    for i, t in enumerate(tasks):
        table[i, :t.shape[0]] = t.float()
    return table.to(dtype)


__all__ = ["load_prompt_table"]
