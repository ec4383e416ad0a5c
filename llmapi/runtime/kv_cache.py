"""Paged KV cache: how many blocks fit, and the per-layer cache tensors."""

from __future__ import annotations

import logging
import os
from typing import List

import torch

from ..config import KvCacheConfig
from ..errors import LLMAPIError

logger = logging.getLogger(__name__)

CPU_DEFAULT_TOKENS = 32768


def bytes_per_token(engine_config: dict, dtype: torch.dtype, num_layers: int, num_kv_heads: int | None = None) -> int:
    """K and V of one token over `num_layers` layers (`num_kv_heads` per layer: this rank's, default all)."""
    elem = torch.empty((), dtype=dtype).element_size()
    heads = engine_config["num_key_value_heads"] if num_kv_heads is None else num_kv_heads
    return 2 * num_layers * heads * engine_config["head_dim"] * elem


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def num_kv_blocks(engine_config: dict, cfg: KvCacheConfig, device: torch.device, dtype: torch.dtype,
                  tokens_per_block: int, num_layers: int, num_kv_heads: int | None = None,
                  extra_bytes_per_token: int = 0, step_peak_bytes: int = 0) -> int:
    """Blocks the cache gets: a fraction of free GPU memory, or a token count / byte size on CPU.

    On a GPU the fraction is of the memory free once the weights are loaded and the largest step has run, as
    TensorRT-LLM sizes it: `step_peak_bytes` is what that step took at its peak beyond the weights (the runner's
    profile step), which stays free beside the cache whatever the fraction. extra_bytes_per_token: what else each
    cached token holds (a speculative drafter's KV, the target's hidden states for an EAGLE head), in the same
    blocks."""
    per_block = (bytes_per_token(engine_config, dtype, num_layers, num_kv_heads) + extra_bytes_per_token) \
        * tokens_per_block
    per_token = per_block // tokens_per_block
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if step_peak_bytes >= free:
            raise LLMAPIError(f"the KV cache gets no memory: the largest step takes {step_peak_bytes / 2**30:.2f} "
                              f"GiB at its peak and {free / 2**30:.2f} GiB are free once the weights are loaded; "
                              "lower max_num_tokens or max_batch_size")
        budget = int((free - step_peak_bytes) * cfg.free_gpu_memory_fraction)
    elif cfg.max_tokens is None:
        budget = min(CPU_DEFAULT_TOKENS * per_token, _available_ram() // 4)
    else:
        budget = cfg.max_tokens * per_token
    if cfg.max_tokens is not None:
        budget = min(budget, cfg.max_tokens * per_token)
    if cfg.max_bytes is not None:
        budget = min(budget, cfg.max_bytes)
    blocks = budget // per_block
    if blocks < 1:
        raise LLMAPIError(f"the KV cache gets no block: {budget} bytes available, "
                          f"{per_block} bytes per block of {tokens_per_block} tokens")
    logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", blocks, tokens_per_block,
                blocks * per_block / 2**20)
    return int(blocks)


def allocate_kv_caches(engine_config: dict, layers: range, num_blocks: int, tokens_per_block: int,
                       device: torch.device, dtype: torch.dtype, num_kv_heads: int | None = None) -> List[torch.Tensor]:
    """One tensor per layer of `layers` (this pipeline stage's, in order), `num_kv_heads` heads (this TP rank's):
    [2 (K, V), num_blocks, tokens_per_block, kv_heads, head_dim]."""
    heads = engine_config["num_key_value_heads"] if num_kv_heads is None else num_kv_heads
    shape = (2, num_blocks, tokens_per_block, heads, engine_config["head_dim"])
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
