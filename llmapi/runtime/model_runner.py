"""ModelRunner: one rank's model, KV cache and sampler; runs the executor's packed batches."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from ..config import KvCacheConfig
from ..distributed.mapping import Mapping, local_kv_heads
from ..distributed.sharding import build_rank_model, load_rank_model
from ..engine.format import rank_file
from ..layers.attention import AttentionMetadata
from .kv_cache import allocate_kv_caches, num_kv_blocks
from .sampler import sample

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _tensor(array, device, dtype=None) -> torch.Tensor:
    # The executor's arrays are read-only views; copy them so torch owns the memory.
    return torch.tensor(np.asarray(array), device=device, dtype=dtype)


@dataclass
class StepInputs:
    """One batch's tensors on the device."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    last: torch.Tensor  # [R] index of each request's last token in the batch
    batch: object  # the batch itself, for the sampling arrays


class ModelRunner:
    """The executor calls `submit(batch)` then `collect(handle)` from its loop thread.

    This runner is synchronous: `submit` runs the forward and the sampler and returns the sampled
    ids still on the device; `collect` makes the one device-to-host copy of the step. With several
    ranks each holds its shard (`mapping`, `comm`: see llmapi.distributed) and a rank's driver calls
    prepare / forward / logits / sample itself."""

    def __init__(self, engine_dir: str, engine_config: dict, device: torch.device,
                 kv_cache_config: KvCacheConfig, tokens_per_block: int, load_format: str = "auto",
                 mapping: Optional[Mapping] = None, comm=None):
        self.config = engine_config
        self.device = device
        self.dtype = torch_dtype(engine_config["dtype"])
        self.tokens_per_block = tokens_per_block
        self.mapping = mapping or Mapping()
        self.model = build_rank_model(engine_config, self.mapping, device, self.dtype, comm)
        dummy = load_format == "dummy" and not os.path.exists(os.path.join(engine_dir, rank_file(self.mapping.rank)))
        load_rank_model(self.model, engine_dir, self.mapping.rank, dummy, engine_config, self.dtype, device)
        layers = self.mapping.stage_layers(engine_config["num_hidden_layers"])
        kv_heads = local_kv_heads(engine_config["num_key_value_heads"], self.mapping.tp_size)
        self.num_blocks = num_kv_blocks(engine_config, kv_cache_config, device, self.dtype,
                                        tokens_per_block, len(layers), kv_heads)
        self.kv_caches: List[Optional[torch.Tensor]] = []
        self.allocate_kv_caches(self.num_blocks)

    def allocate_kv_caches(self, num_blocks: int) -> None:
        """(Re)allocate the cache with `num_blocks` blocks (ranks agree on the smallest count)."""
        self.num_blocks = num_blocks
        self.kv_caches = []  # the old cache goes first
        self.kv_caches = allocate_kv_caches(
            self.config, self.mapping.stage_layers(self.config["num_hidden_layers"]), num_blocks,
            self.tokens_per_block, self.device, self.dtype,
            local_kv_heads(self.config["num_key_value_heads"], self.mapping.tp_size))

    def prepare(self, batch) -> StepInputs:
        dev = self.device
        query_lens = _tensor(batch.query_lens, dev, torch.int32)       # [R]
        query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32, device=dev)
        torch.cumsum(query_lens, 0, out=query_start_loc[1:])
        attn = AttentionMetadata(
            slot_mapping=_tensor(batch.slot_mapping, dev, torch.long),
            query_lens=query_lens,
            context_lens=_tensor(batch.context_lens, dev, torch.int32),  # [R]
            query_start_loc=query_start_loc,
            block_tables=_tensor(batch.block_tables, dev, torch.int32),
            max_query_len=int(np.asarray(batch.query_lens).max()),
            max_context_len=int(np.asarray(batch.context_lens).max()),
            tokens_per_block=self.tokens_per_block,
        )
        return StepInputs(input_ids=_tensor(batch.input_ids, dev, torch.long),  # [T]
                          positions=_tensor(batch.positions, dev, torch.long),  # [T]
                          attn=attn, last=query_start_loc[1:].long() - 1, batch=batch)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:  # [T, H]
        """This rank's layers; `hidden` [T, H] is the previous pipeline stage's output."""
        return self.model(inputs.input_ids, inputs.positions, inputs.attn, self.kv_caches, hidden=hidden)

    @torch.inference_mode()
    def logits(self, inputs: StepInputs, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [R, V] fp32
        return self.model.compute_logits(hidden[inputs.last])

    @torch.inference_mode()
    def sample(self, inputs: StepInputs, logits: torch.Tensor) -> torch.Tensor:  # [R, V] -> [R]
        batch, dev = inputs.batch, self.device
        return sample(
            logits,
            temperature=_tensor(batch.temperature, dev, torch.float32),
            top_k=_tensor(batch.top_k, dev, torch.int32),
            top_p=_tensor(batch.top_p, dev, torch.float32),
            seeds=_tensor(batch.seeds, dev, torch.long),
            output_index=_tensor(batch.output_index, dev, torch.int32),
            suppress_offsets=_tensor(batch.suppress_offsets, dev, torch.int32),
            suppress_ids=_tensor(batch.suppress_ids, dev, torch.long),
        )

    def submit(self, batch) -> torch.Tensor:
        inputs = self.prepare(batch)
        return self.sample(inputs, self.logits(inputs, self.forward(inputs)))

    def collect(self, handle: torch.Tensor) -> np.ndarray:
        return handle.to("cpu").numpy().astype(np.int32)
