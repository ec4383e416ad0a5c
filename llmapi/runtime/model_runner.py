"""ModelRunner: one rank's model, KV cache and sampler; runs the executor's packed batches."""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List

import numpy as np
import torch

from ..config import KvCacheConfig
from ..layers.attention import AttentionMetadata
from ..models import get_model_class
from .decode import StepOutput, decode
from .kv_cache import allocate_kv_caches, num_kv_blocks
from .logits_records import LogitsRecords
from .request_state import RequestState

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _tensor(array, device, dtype=None) -> torch.Tensor:
    # The executor's arrays are read-only views; copy them so torch owns the memory.
    return torch.tensor(np.asarray(array), device=device, dtype=dtype)


class ModelRunner:
    """The executor calls `submit(batch)` then `collect(handle)` from its loop thread.

    This runner is synchronous: `submit` runs the forward and the decoding step and returns its
    results still on the device; `collect` copies them to the host. `logits_processors` maps a
    request id to its Python logits processor (set by the LLM before it enqueues the request);
    `records` holds the prompt logprobs and context / generation logits of requests that asked."""

    def __init__(self, engine_dir: str, engine_config: dict, device: torch.device,
                 kv_cache_config: KvCacheConfig, tokens_per_block: int, load_format: str = "auto"):
        self.config = engine_config
        self.device = device
        self.dtype = torch_dtype(engine_config["dtype"])
        self.tokens_per_block = tokens_per_block
        model_cls = get_model_class(engine_config["architecture"])
        self.model = model_cls(engine_config, device=device, dtype=self.dtype)
        weights_path = os.path.join(engine_dir, "rank0.safetensors")
        if load_format == "dummy" and not os.path.exists(weights_path):
            weights = model_cls.dummy_weights(engine_config, self.dtype, seed=0)
        else:
            from safetensors.torch import load_file
            weights = load_file(weights_path, device=str(device))
        self.model.load_weights(weights)
        del weights
        num_layers = engine_config["num_hidden_layers"]
        self.num_blocks = num_kv_blocks(engine_config, kv_cache_config, device, self.dtype,
                                        tokens_per_block, num_layers)
        self.kv_caches: List[torch.Tensor] = allocate_kv_caches(
            engine_config, num_layers, self.num_blocks, tokens_per_block, device, self.dtype)
        self.state = RequestState(engine_config["vocab_size"], device)
        self.logits_processors: Dict[int, Callable] = {}
        self.records = LogitsRecords()

    def _copy_blocks(self, copies: np.ndarray) -> None:
        """Copy-on-write of shared blocks: every layer's K and V of block src -> dst ([C, 2])."""
        if len(copies) == 0:
            return
        src = torch.tensor(copies[:, 0], dtype=torch.long, device=self.device)
        dst = torch.tensor(copies[:, 1], dtype=torch.long, device=self.device)
        for cache in self.kv_caches:  # [2, num_blocks, block, kv_heads, head_dim]
            cache[:, dst] = cache[:, src]

    @torch.inference_mode()
    def submit(self, batch) -> dict:
        dev = self.device
        self._copy_blocks(np.asarray(batch.block_copies))
        input_ids = _tensor(batch.input_ids, dev, torch.long)          # [T]
        positions = _tensor(batch.positions, dev, torch.long)          # [T]
        query_lens = _tensor(batch.query_lens, dev, torch.int32)       # [R]
        context_lens = _tensor(batch.context_lens, dev, torch.int32)   # [R]
        query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32, device=dev)
        torch.cumsum(query_lens, 0, out=query_start_loc[1:])
        q_host = np.asarray(batch.query_lens)
        c_host = np.asarray(batch.context_lens)
        attn = AttentionMetadata(
            slot_mapping=_tensor(batch.slot_mapping, dev, torch.long),
            query_lens=query_lens,
            context_lens=context_lens,
            query_start_loc=query_start_loc,
            block_tables=_tensor(batch.block_tables, dev, torch.int32),
            max_query_len=int(q_host.max()),
            max_context_len=int(c_host.max()),
            tokens_per_block=self.tokens_per_block,
        )
        hidden = self.model(input_ids, positions, attn, self.kv_caches)  # [T, H]
        query_start = np.concatenate([[0], np.cumsum(q_host)])
        self.records.record_prompt(batch, hidden, query_start, self.model.compute_logits)
        last = query_start_loc[1:].long() - 1                              # [R]
        logits = self.model.compute_logits(hidden[last])                    # [R, V] fp32
        self.records.record_generation(batch, logits)  # copies: decoding writes into logits
        return decode(logits, batch, self.state, self.logits_processors)

    def collect(self, handle: dict) -> StepOutput:
        host = {name: (t.to("cpu").numpy() if t is not None else None) for name, t in handle.items()}
        return StepOutput(**host)
