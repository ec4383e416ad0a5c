"""One step's inputs on the device: the executor's arrays packed into a few host buffers, one copy each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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


class _HostBuffers:
    """One step's three host buffers (int32, int64, float32)."""

    def __init__(self, pinned: bool):
        self.ints = _HostBuffer(torch.int32, pinned)
        self.longs = _HostBuffer(torch.int64, pinned)
        self.floats = _HostBuffer(torch.float32, pinned)
        self.copied = None  # CUDA event: the copies from these buffers have run


class InputStager:
    """Packs a Batch (numpy views) into three host buffers and copies each to the device once.

    With async scheduling a step is staged while the one before is still queued, so the host
    buffers come in two sets that steps take in turn (`next_step`): a set is refilled only once
    the copies of the step before last have run. The copies read the buffers asynchronously on CUDA.
    """

    def __init__(self, device: torch.device, tokens_per_block: int):
        self.device, self.tokens_per_block = device, tokens_per_block
        self._cuda = device.type == "cuda"
        self._sets = [_HostBuffers(self._cuda), _HostBuffers(self._cuda)]
        self._turn = 0

    @property
    def _buffers(self) -> _HostBuffers:
        return self._sets[self._turn]

    def next_step(self) -> None:
        """Call before staging a step: marks the copies queued so far, then takes the other set."""
        if self._cuda:
            self._buffers.copied = torch.cuda.Event()
            self._buffers.copied.record()
        self._turn ^= 1
        if self._buffers.copied is not None:
            self._buffers.copied.synchronize()  # the step before last: long done in a steady state

    def pack_ints(self, batch, pad_to: int = 0) -> tuple[np.ndarray, int, int, int, int]:
        """[ids n | positions n | slots n | context_lens m | query_start_loc m+1 | block tables R*W |
        placeholder tokens P | their rows in the previous step P], int32.

        n = max(T, pad_to), m = max(R, pad_to); padded rows are empty (slot -1, context 0, query length 0).
        Placeholders are the tokens whose id the previous step samples (Batch.prev_rows >= 0).
        Returns (array, n, m, W, P).
        """
        t, r = int(batch.num_tokens), int(batch.num_requests)
        tables = np.asarray(batch.block_tables)  # [R, W]
        width = tables.shape[1] if tables.ndim == 2 else 0
        prev_rows = np.asarray(batch.prev_rows)  # [T]
        fill = np.flatnonzero(prev_rows >= 0)  # [P]
        n, m, p = max(t, pad_to), max(r, pad_to), len(fill)
        tail = 3 * n + 2 * m + 1 + r * width
        out = self._buffers.ints.get(tail + 2 * p)
        ids, pos, slots = out[:n], out[n:2 * n], out[2 * n:3 * n]
        ids[:t], pos[:t], slots[:t] = batch.input_ids, batch.positions, batch.slot_mapping
        ids[t:], pos[t:], slots[t:] = 0, 0, -1
        ids[fill] = 0  # -1 until filled on the device; never an out-of-range embedding row
        ctx, qsl = out[3 * n:3 * n + m], out[3 * n + m:3 * n + 2 * m + 1]
        ctx[:r], ctx[r:] = batch.context_lens, 0
        qsl[0] = 0
        np.cumsum(batch.query_lens, out=qsl[1:r + 1])
        qsl[r + 1:] = t
        out[3 * n + 2 * m + 1:tail] = tables.reshape(-1)
        out[tail:tail + p], out[tail + p:] = fill, prev_rows[fill]
        return out, n, m, width, p

    @staticmethod
    def fill_placeholders(input_ids: torch.Tensor, dev: torch.Tensor, p: int,
                          prev_ids: Optional[torch.Tensor]) -> None:
        """input_ids[t] = prev_ids[j] for the P placeholders; `dev` ends with pack_ints' [t P | j P].

        Runs on the device, in stream order after the previous step's sampling: nothing waits.
        """
        if p == 0:
            return
        if prev_ids is None:
            raise RuntimeError("the batch takes tokens sampled by a previous step, but none was run")
        index = dev[len(dev) - 2 * p:].long()  # [2P]
        input_ids[index[:p]] = prev_ids[index[p:]].to(input_ids.dtype)

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
        longs = self._buffers.longs.get(4 * r + 1 + s)
        longs[:r], longs[r:2 * r], longs[2 * r:3 * r] = batch.seeds, batch.top_k, batch.output_index
        longs[3 * r:4 * r + 1], longs[4 * r + 1:] = batch.suppress_offsets, suppress
        floats = self._buffers.floats.get(2 * r)
        floats[:r], floats[r:] = batch.temperature, batch.top_p
        dl = torch.from_numpy(longs).to(self.device, non_blocking=True)
        df = torch.from_numpy(floats).to(self.device, non_blocking=True)
        tensors = dict(seeds=dl[:r], top_k=dl[r:2 * r], output_index=dl[2 * r:3 * r],
                       suppress_offsets=dl[3 * r:4 * r + 1], suppress_ids=dl[4 * r + 1:],
                       temperature=df[:r], top_p=df[r:])
        all_greedy = bool((floats[:r] < GREEDY_TEMPERATURE_EPS).all())
        any_filter = bool((longs[r:2 * r] > 0).any() or (floats[r:] < 1.0).any())
        return tensors, all_greedy, any_filter

    def stage(self, batch, num_kv_splits: int = 0, prev_ids: Optional[torch.Tensor] = None) -> StepInputs:
        """A step run eagerly: every input copied into fresh device memory; `prev_ids` [R'] are the
        previous step's sampled ids, which fill the batch's placeholders."""
        host, n, m, width, p = self.pack_ints(batch)
        dev = self.copy_ints(host)
        self.fill_placeholders(dev[:n], dev, p, prev_ids)
        r = int(batch.num_requests)
        qsl = dev[3 * n + m:3 * n + 2 * m + 1]
        q_lens = np.asarray(batch.query_lens)
        attn = AttentionMetadata(
            slot_mapping=dev[2 * n:3 * n], query_lens=qsl[1:] - qsl[:-1], context_lens=dev[3 * n:3 * n + m],
            query_start_loc=qsl, block_tables=dev[3 * n + 2 * m + 1:3 * n + 2 * m + 1 + r * width].view(r, width),
            max_query_len=int(q_lens.max()), max_context_len=int(np.asarray(batch.context_lens).max()),
            tokens_per_block=self.tokens_per_block, num_kv_splits=num_kv_splits)
        sampling, all_greedy, any_filter = self.sampling(batch)
        return StepInputs(dev[:n], dev[n:2 * n], attn, qsl[1:].long() - 1, sampling, all_greedy, any_filter)
