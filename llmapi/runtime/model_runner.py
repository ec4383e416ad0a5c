"""ModelRunner: one rank's model, KV cache and sampler; runs the executor's packed batches."""

from __future__ import annotations

import logging
import os
import time
from typing import List

import numpy as np
import torch

from ..config import KvCacheConfig
from ..models import get_model_class
from .kv_cache import allocate_kv_caches, num_kv_blocks
from .sampler import sample
from .step_inputs import InputStager

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


class _Step:
    """A submitted step: its sampled ids on the way to a host buffer, and the event that marks their arrival."""

    def __init__(self, host_ids: torch.Tensor, event):
        self.host_ids, self.event = host_ids, event


class StepStats:
    """Where the runner's time goes: steps (captured or eager), host time in submit, waits in collect."""

    def __init__(self):
        self.steps = self.graph_steps = self.tokens = 0
        self.submit_s = self.wait_s = 0.0

    def as_dict(self) -> dict:
        return dict(vars(self))


class ModelRunner:
    """The executor calls `submit(batch)` then `collect(handle)` from its loop thread.

    `submit` stages the inputs (one host-to-device copy per buffer), runs the forward (a captured
    CUDA graph for decode batches on CUDA) and the sampler, and starts the one device-to-host copy
    of the sampled ids; `collect` waits for that copy.
    """

    def __init__(self, engine_dir: str, engine_config: dict, device: torch.device,
                 kv_cache_config: KvCacheConfig, tokens_per_block: int, load_format: str = "auto",
                 max_batch_size: int = 1024, cuda_graphs: bool = True):
        started = time.perf_counter()
        self.config = engine_config
        self.device = device
        self.dtype = torch_dtype(engine_config["dtype"])
        self.tokens_per_block = tokens_per_block
        model_cls = get_model_class(engine_config["architecture"])
        self.model = model_cls(engine_config, device=device, dtype=self.dtype)
        weights_path = os.path.join(engine_dir, "rank0.safetensors")
        if load_format == "dummy" and not os.path.exists(weights_path):
            # Drawn where they are used: an 8B model's weights take minutes to draw on a CPU.
            weights = model_cls.dummy_weights(engine_config, self.dtype, seed=0, device=device)
        else:
            # Measured on an H100 machine: faster than copying from a memory map of the file (10.8 s vs 15.3 s for 8B).
            from safetensors.torch import load_file
            weights = load_file(weights_path, device=str(device))
        self.model.load_weights(weights)
        del weights
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the loaded copies' memory goes back before the KV cache is sized
        logger.info("weights loaded in %.2f s", time.perf_counter() - started)
        num_layers = engine_config["num_hidden_layers"]
        self.num_blocks = num_kv_blocks(engine_config, kv_cache_config, device, self.dtype,
                                        tokens_per_block, num_layers)
        self.kv_caches: List[torch.Tensor] = allocate_kv_caches(
            engine_config, num_layers, self.num_blocks, tokens_per_block, device, self.dtype)
        self.stager = InputStager(device, tokens_per_block)
        self.stats = StepStats()
        self.graphs = None
        if device.type == "cuda":
            self._ids_host = torch.empty(0, dtype=torch.int32, pin_memory=True)
            if cuda_graphs:
                from .cuda_graph import DecodeGraphs

                max_blocks = -(-engine_config["max_position_embeddings"] // tokens_per_block)
                captured = time.perf_counter()
                with torch.inference_mode():
                    self.graphs = DecodeGraphs(self.model, self.kv_caches, self.stager, max_batch_size,
                                               max_blocks, engine_config["num_key_value_heads"])
                logger.info("decode graphs captured in %.2f s", time.perf_counter() - captured)

    @torch.inference_mode()
    def submit(self, batch) -> _Step:
        started = time.perf_counter()
        step = self._submit(batch)
        stats = self.stats
        stats.steps, stats.tokens = stats.steps + 1, stats.tokens + int(batch.num_tokens)
        stats.submit_s += time.perf_counter() - started
        return step

    def _submit(self, batch) -> _Step:
        size = self.graphs.size_for(batch) if self.graphs is not None else 0
        self.stats.graph_steps += bool(size)
        if size:
            logits, greedy_ids = self.graphs.run(batch, size)  # [R, V] float32, [R]
            if len(batch.suppress_ids) == 0 and self.stager.all_greedy(batch):
                ids = greedy_ids  # exactly what sample() gives these rows, computed inside the graph
            else:
                sampling, all_greedy, any_filter = self.stager.sampling(batch)
                ids = sample(logits, **sampling, all_greedy=all_greedy, any_top_k_top_p=any_filter)
        else:
            inputs = self.stager.stage(batch)
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn, self.kv_caches)  # [T, H]
            logits = self.model.compute_logits(hidden[inputs.last_rows])  # [R, V] float32
            ids = sample(logits, **inputs.sampling, all_greedy=inputs.all_greedy,
                         any_top_k_top_p=inputs.any_top_k_top_p)  # [R] int64
        if self.device.type != "cuda":
            return _Step(ids.to(torch.int32), None)
        r = ids.shape[0]
        if self._ids_host.numel() < r:
            self._ids_host = torch.empty(max(r, 2 * self._ids_host.numel()), dtype=torch.int32, pin_memory=True)
        host = self._ids_host[:r]
        host.copy_(ids.to(torch.int32), non_blocking=True)  # the step's one device-to-host copy
        event = torch.cuda.Event()
        event.record()
        return _Step(host, event)

    def collect(self, handle: _Step) -> np.ndarray:
        if handle.event is not None:
            started = time.perf_counter()
            handle.event.synchronize()
            self.stats.wait_s += time.perf_counter() - started
        return handle.host_ids.numpy().copy()
