"""A rank's adapters: the wrappers applied to its model, and the installs of adapters into device slots.

An encoder-decoder model's linears of both stacks are wrapped (its linear_layers()), and its encoder's tokens run
with their request's slot as its decoder tokens do (encoder_scope).

The user's side decides which adapter sits in which slot (llmapi.lora.manager) and sends an AdapterInstall
before the first request that uses it; the runner applies it between steps (ModelRunner: at the next submit;
several ranks: rank 0 hands it to every rank before the next step). Installs go in stream order behind the steps
already queued, and a slot is reused only once no request that used it is left in the executor.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..models.gpt import layer_linears
from .layers import LoraBatch, LoraLinear, PromptTableEmbedding
from .weights import linear_parts, rank_capacity


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


def _declared_shapes(cfg: dict) -> dict[str, tuple[int, int, int]]:
    """Engine linear name -> (in_features, out_features, HF linears stacked in it), from the family's
    fused_linears declaration."""
    return {part.engine: (part.in_features, part.total_rows, part.parts) for part in linear_parts(cfg).values()}


def encoder_token_slots(attn) -> torch.Tensor:
    """[E] int32: the adapter slot of each encoder token of an encoder-decoder step (its request's, -1 for none),
    as the runner staged them (CrossMetadata.encoder_adapter_slots)."""
    cross = attn.cross
    if cross.encoder_adapter_slots is not None:
        return cross.encoder_adapter_slots
    return torch.full((cross.num_encoder_tokens,), -1, dtype=torch.int32, device=cross.encoder_ids.device)


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
            if hasattr(model, "encoder_scope"):  # encoder-decoder: the encoder's tokens take their requests' slots
                model.encoder_scope = self.encoder_scope
        t = getattr(model, "transformer", None)  # encoder-decoder models take no prompt tables
        if settings.get("prompt_slots") and t is not None and t.vocab_embedding is not None:
            rows = settings["prompt_slots"] * settings["prompt_rows"]
            self.embedding = PromptTableEmbedding(t.vocab_embedding, engine_config["vocab_size"], rows,
                                                  engine_config["hidden_size"], dtype, device)
            t.vocab_embedding = self.embedding

    def _wrap_linears(self, model, cfg: dict, slots: int, max_rank: int, device, dtype) -> None:
        self.batch = LoraBatch(slots)
        for name, block, linear_name, in_f, out_f, rank in self._targets(model, cfg, max_rank):
            wrapped = LoraLinear(getattr(block, linear_name), in_f, out_f, slots, rank, self.batch, dtype, device)
            setattr(block, linear_name, wrapped)
            self.linears[name] = wrapped

    @staticmethod
    def _targets(model, cfg: dict, max_rank: int):
        """(engine linear name, its block, the linear's attribute, full in / out features, slot rank) of every
        linear that takes adapters."""
        if hasattr(model, "linear_layers"):  # several stacks (encoder-decoder): the model lists its layers
            names = {id(module): name for name, module in model.named_modules()}  # as the engine's tensors name them
            declared = _declared_shapes(cfg)
            for layer, specs in model.linear_layers():
                for spec in specs:
                    name = f"{names[id(layer)]}.{spec.name}"
                    if name in declared:  # a linear the family names no HF module for takes no adapter
                        in_f, out_f, parts = declared[name]
                        block_name, linear_name = spec.name.split(".")
                        yield name, getattr(layer, block_name), linear_name, in_f, out_f, parts * max_rank
            return
        capacity = rank_capacity(cfg, max_rank)
        shapes = _full_shapes(cfg)
        specs = layer_linears(cfg)
        for index, layer in model.transformer.layers.named_children():  # this pipeline stage's, global indices
            for spec in specs:
                block_name, linear_name = spec.name.split(".")
                in_f, out_f = shapes[spec.name]
                yield (f"transformer.layers.{index}.{spec.name}", getattr(layer, block_name), linear_name,
                       in_f, out_f, capacity.get(spec.name, max_rank))

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

    @contextlib.contextmanager
    def encoder_scope(self, attn):
        """An encoder-decoder step's encoder pass (EncoderDecoderModel.encoder_scope): its tokens run with their
        requests' slots, the cross-attention K/V of its output too; the decoder tokens' come back after."""
        batch = self.batch
        if batch is None or not batch.active:  # no request of the step has an adapter
            yield
            return
        decoder = batch.state()
        batch.set(encoder_token_slots(attn))
        try:
            yield
        finally:
            batch.restore(decoder)


__all__ = ["AdapterInstall", "RunnerAdapters"]
