"""One step's inputs on the device: the executor's arrays packed into a few host buffers, one copy each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..layers.attention import AttentionMetadata
from ..runtime.sampler import GREEDY_TEMPERATURE_EPS


@dataclass
class StepInputs:
    """A step's model and sampler inputs, on the device."""

    input_ids: torch.Tensor  # [T'] int32 (T' >= T: padded rows of a captured graph size at the end)
    positions: torch.Tensor  # [T'] int32
    attn: AttentionMetadata
    last_rows: torch.Tensor  # [R] int64: each request's last token row, whose logits are sampled
    sampling: dict  # the sampler's per-row tensors, by its argument names
    all_greedy: bool
    any_top_k_top_p: bool


class _HostBuffer:
    """A growable host buffer, page-locked on CUDA so that copies from it are asynchronous."""

    def __init__(self, dtype: torch.dtype, pinned: bool):
        self.dtype, self.pinned = dtype, pinned
        self.tensor = torch.empty(0, dtype=dtype)

    def get(self, n: int) -> np.ndarray:
        if self.tensor.numel() < n:
            self.tensor = torch.empty(max(n, 2 * self.tensor.numel()), dtype=self.dtype, pin_memory=self.pinned)
        return self.tensor[:n].numpy()


class InputStager:
    """Packs a Batch (numpy views) into three host buffers and copies each to the device once.

    The host buffers are reused: a step's copies must have finished before the next stage() (the
    runner's collect() waits on the step, which comes after its copies in stream order).
    """

    def __init__(self, device: torch.device, tokens_per_block: int):
        self.device, self.tokens_per_block = device, tokens_per_block
        pinned = device.type == "cuda"
        self._ints = _HostBuffer(torch.int32, pinned)
        self._longs = _HostBuffer(torch.int64, pinned)
        self._floats = _HostBuffer(torch.float32, pinned)

    def pack_ints(self, batch, pad_to: int = 0) -> tuple[np.ndarray, int, int, int]:
        """[ids n | positions n | slots n | context_lens m | query_start_loc m+1 | block tables R*W], int32.

        n = max(T, pad_to), m = max(R, pad_to); padded rows are empty (slot -1, context 0, query length 0).
        Returns (array, n, m, W).
        """
        t, r = int(batch.num_tokens), int(batch.num_requests)
        tables = np.asarray(batch.block_tables)  # [R, W]
        width = tables.shape[1] if tables.ndim == 2 else 0
        n, m = max(t, pad_to), max(r, pad_to)
        out = self._ints.get(3 * n + 2 * m + 1 + r * width)
        ids, pos, slots = out[:n], out[n:2 * n], out[2 * n:3 * n]
        ids[:t], pos[:t], slots[:t] = batch.input_ids, batch.positions, batch.slot_mapping
        ids[t:], pos[t:], slots[t:] = 0, 0, -1
        ctx, qsl = out[3 * n:3 * n + m], out[3 * n + m:3 * n + 2 * m + 1]
        ctx[:r], ctx[r:] = batch.context_lens, 0
        qsl[0] = 0
        np.cumsum(batch.query_lens, out=qsl[1:r + 1])
        qsl[r + 1:] = t
        out[3 * n + 2 * m + 1:] = tables.reshape(-1)
        return out, n, m, width

    def copy_ints(self, host: np.ndarray, device_buffer: torch.Tensor | None = None) -> torch.Tensor:
        dev = torch.empty(len(host), dtype=torch.int32, device=self.device) if device_buffer is None \
            else device_buffer[:len(host)]
        dev.copy_(torch.from_numpy(host), non_blocking=True)
        return dev

    @staticmethod
    def all_greedy(batch) -> bool:
        return bool((np.asarray(batch.temperature) < GREEDY_TEMPERATURE_EPS).all())

    def sampling(self, batch) -> tuple[dict, bool, bool]:
        """The sampler's per-row tensors (two copies), and the all_greedy / any_top_k_top_p hints."""
        r = int(batch.num_requests)
        suppress = np.asarray(batch.suppress_ids)
        s = len(suppress)
        longs = self._longs.get(4 * r + 1 + s)
        longs[:r], longs[r:2 * r], longs[2 * r:3 * r] = batch.seeds, batch.top_k, batch.output_index
        longs[3 * r:4 * r + 1], longs[4 * r + 1:] = batch.suppress_offsets, suppress
        floats = self._floats.get(2 * r)
        floats[:r], floats[r:] = batch.temperature, batch.top_p
        dl = torch.from_numpy(longs).to(self.device, non_blocking=True)
        df = torch.from_numpy(floats).to(self.device, non_blocking=True)
        tensors = dict(seeds=dl[:r], top_k=dl[r:2 * r], output_index=dl[2 * r:3 * r],
                       suppress_offsets=dl[3 * r:4 * r + 1], suppress_ids=dl[4 * r + 1:],
                       temperature=df[:r], top_p=df[r:])
        all_greedy = bool((floats[:r] < GREEDY_TEMPERATURE_EPS).all())
        any_filter = bool((longs[r:2 * r] > 0).any() or (floats[r:] < 1.0).any())
        return tensors, all_greedy, any_filter

    def stage(self, batch, num_kv_splits: int = 0) -> StepInputs:
        """A step run eagerly: every input copied into fresh device memory."""
        host, n, m, width = self.pack_ints(batch)
        dev = self.copy_ints(host)
        r = int(batch.num_requests)
        qsl = dev[3 * n + m:3 * n + 2 * m + 1]
        q_lens = np.asarray(batch.query_lens)
        attn = AttentionMetadata(
            slot_mapping=dev[2 * n:3 * n], query_lens=qsl[1:] - qsl[:-1], context_lens=dev[3 * n:3 * n + m],
            query_start_loc=qsl, block_tables=dev[3 * n + 2 * m + 1:].view(r, width),
            max_query_len=int(q_lens.max()), max_context_len=int(np.asarray(batch.context_lens).max()),
            tokens_per_block=self.tokens_per_block, num_kv_splits=num_kv_splits)
        sampling, all_greedy, any_filter = self.sampling(batch)
        return StepInputs(dev[:n], dev[n:2 * n], attn, qsl[1:].long() - 1, sampling, all_greedy, any_filter)
