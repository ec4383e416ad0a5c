"""A rank's adapters: the wrappers applied to its model, and the installs of adapters into device slots.

The user's side decides which adapter sits in which slot (llmapi.lora.manager) and sends an AdapterInstall
before the first request that uses it; the runner applies it between steps (ModelRunner: at the next submit;
several ranks: rank 0 hands it to every rank before the next step). Installs go in stream order behind the steps
already queued, and a slot is reused only once no request that used it is left in the executor.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..models.gpt import layer_linears
from .layers import LoraBatch, LoraLinear, PromptTableEmbedding
from .weights import rank_capacity


@dataclass
class AdapterInstall:
    """What to put in a device slot: a LoRA adapter's pairs (engine linear name -> (A [r, in], B [out, r]), full
    and unsharded) or a prompt table's rows ([rows, hidden])."""

    kind: str  # "lora" | "prompt"
    slot: int
    linears: Optional[dict] = None
    table: Optional[torch.Tensor] = None

    def to_bytes(self) -> bytes:
        """safetensors bytes (for another process: no pickle)."""
        from safetensors.torch import save

        tensors = {}
        if self.table is not None:
            tensors["table"] = self.table.contiguous()
        for name, (a, b) in (self.linears or {}).items():
            tensors[name + ".lora_a"], tensors[name + ".lora_b"] = a.contiguous(), b.contiguous()
        meta = {"kind": self.kind, "slot": str(self.slot)}
        return save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "AdapterInstall":
        from safetensors.torch import load

        data = bytes(data)
        size = int.from_bytes(data[:8], "little")  # safetensors: header length, then the JSON header
        meta = json.loads(data[8:8 + size]).get("__metadata__") or {}
        kind, slot = meta.get("kind", "lora"), int(meta.get("slot", 0))
        tensors = load(data)
        linears = {name.removesuffix(".lora_a"): (tensors[name], tensors[name.removesuffix(".lora_a") + ".lora_b"])
                   for name in tensors if name.endswith(".lora_a")}
        return cls(kind, slot, linears if kind == "lora" else None, tensors.get("table"))


def _full_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """Engine linear name suffix -> (in_features, out_features) of the full (unsharded) linear."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    return {"attention.qkv": (hidden, q + 2 * kv), "attention.dense": (q, hidden),
            "mlp.gate_up": (hidden, 2 * inter), "mlp.fc": (hidden, inter), "mlp.proj": (inter, hidden)}


class RunnerAdapters:
    """The adapters of one rank's model: LoraLinear wrappers around each layer's declared linears (max_loras slots
    of max_lora_rank per HF linear), the prompt-table embedding (on the first pipeline stage), and the installs
    queued for the next step.

    settings: {"max_loras", "max_lora_rank"} for LoRA and/or {"prompt_slots", "prompt_rows"} for prompt tables
    (JSON-able: it crosses to the other ranks in the INIT call)."""

    def __init__(self, model, engine_config: dict, settings: dict, device, dtype: torch.dtype):
        self.settings = dict(settings)
        self.linears: dict[str, LoraLinear] = {}
        self.batch: Optional[LoraBatch] = None
        self.embedding: Optional[PromptTableEmbedding] = None
        self._pending: list[AdapterInstall] = []
        self._lock = threading.Lock()
        if settings.get("max_loras"):
            self._wrap_linears(model, engine_config, settings["max_loras"], settings["max_lora_rank"], device, dtype)
        t = model.transformer
        if settings.get("prompt_slots") and t.vocab_embedding is not None:
            rows = settings["prompt_slots"] * settings["prompt_rows"]
            self.embedding = PromptTableEmbedding(t.vocab_embedding, engine_config["vocab_size"], rows,
                                                  engine_config["hidden_size"], dtype, device)
            t.vocab_embedding = self.embedding

    def _wrap_linears(self, model, cfg: dict, slots: int, max_rank: int, device, dtype) -> None:
        self.batch = LoraBatch(slots)
        capacity = rank_capacity(cfg, max_rank)
        shapes = _full_shapes(cfg)
        specs = layer_linears(cfg)
        for index, layer in model.transformer.layers.named_children():  # this pipeline stage's, global indices
            for spec in specs:
                block_name, linear_name = spec.name.split(".")
                block = getattr(layer, block_name)
                in_f, out_f = shapes[spec.name]
                wrapped = LoraLinear(getattr(block, linear_name), in_f, out_f, slots,
                                     capacity.get(spec.name, max_rank), self.batch, dtype, device)
                setattr(block, linear_name, wrapped)
                self.linears[f"transformer.layers.{index}.{spec.name}"] = wrapped

    # ---------------------------------------------------------------- installs
    def queue(self, install: AdapterInstall) -> None:
        """From any thread: applied by the next apply_pending (the runner's, before its next step)."""
        with self._lock:
            self._pending.append(install)

    def apply_pending(self) -> None:
        if not self._pending:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        for install in pending:
            self.install(install)

    @torch.inference_mode()
    def install(self, install: AdapterInstall) -> None:
        if install.kind == "lora":
            linears = install.linears or {}
            for name, module in self.linears.items():
                module.install(install.slot, linears.get(name))
        elif self.embedding is not None:  # stages after the first embed nothing
            rows = self.settings["prompt_rows"]
            block = self.embedding.table[install.slot * rows:(install.slot + 1) * rows]
            block.zero_()
            block[:install.table.shape[0]].copy_(install.table)

    # ---------------------------------------------------------------- steps
    def begin(self, token_slots: Optional[torch.Tensor], host_slots: Optional[np.ndarray] = None) -> None:
        """Before a forward: the step's adapter slot per token ([T] on the device, -1: none), or None (no adapter)."""
        if self.batch is not None:
            self.batch.set(token_slots, host_slots)


__all__ = ["AdapterInstall", "RunnerAdapters"]
