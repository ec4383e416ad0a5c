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
    adapter_slots: Optional[torch.Tensor] = None  # [T] int32 LoRA slot per token (-1: none); None: no adapter
    adapter_slots_host: Optional[np.ndarray] = None  # the same on the host


def token_adapter_slots(batch) -> Optional[np.ndarray]:
    """[T] int32: the LoRA adapter slot of each of the batch's tokens (its request's), or None when no request
    of the batch has an adapter."""
    slots = getattr(batch, "adapter_slots", None)
    if slots is None or len(slots) == 0:
        return None
    slots = np.asarray(slots, dtype=np.int32)
    if slots.max() < 0:
        return None
    return np.repeat(slots, np.asarray(batch.query_lens))


def cross_metadata(batch, device: torch.device):
    """An encoder-decoder step's CrossMetadata (llmapi.layers.encdec_attention): the encoder inputs of the rows that
    run their encoder now (Batch.encoder_lens > 0), their cross slots, and every row's cross blocks and length."""
    from ..layers.encdec_attention import CrossMetadata

    enc_lens = np.asarray(batch.encoder_lens, dtype=np.int32)  # [R]
    starting = enc_lens[enc_lens > 0]  # [Re]
    positions = np.concatenate([np.arange(n, dtype=np.int32) for n in starting]) if len(starting) \
        else np.zeros(0, dtype=np.int32)
    start_loc = np.zeros(len(starting) + 1, dtype=np.int32)
    np.cumsum(starting, out=start_loc[1:])
    cross_lens = np.asarray(batch.cross_lens, dtype=np.int32)
    tables = np.asarray(batch.cross_block_tables, dtype=np.int32).reshape(len(cross_lens), -1)

    def dev(array, dtype=torch.int32):
        return torch.from_numpy(np.array(array)).to(device=device, dtype=dtype, non_blocking=True)  # a writable copy

    adapters = np.asarray(getattr(batch, "adapter_slots", ()), dtype=np.int32)  # [R]
    return CrossMetadata(
        encoder_ids=dev(np.asarray(batch.encoder_input_ids)), encoder_positions=dev(positions),
        encoder_start_loc=dev(start_loc), encoder_max_len=int(starting.max()) if len(starting) else 0,
        encoder_slot_mapping=dev(np.asarray(batch.cross_slot_mapping), torch.int64), cross_lens=dev(cross_lens),
        cross_block_tables=dev(tables), max_cross_len=int(cross_lens.max()) if len(cross_lens) else 0,
        # A request's encoder tokens take its LoRA adapter, as its decoder tokens do.
        encoder_adapter_slots=dev(np.repeat(adapters, enc_lens)) if len(adapters) and adapters.max() >= 0 else None)


def _align(count: int) -> int:
    """`count` int32 elements rounded up to 16 bytes."""
    return -(-count // 4) * 4


@dataclass(frozen=True)
class IntLayout:
    """Where each int32 input sits in a step's packed buffer (host and device alike):
    [ids n | positions n | slots n | context_lens m | query_start_loc m+1 | block tables r*width |
    placeholder rows p | their rows in the previous step p], each section starting on 16 bytes.

    Aligned sections keep every view's address a multiple of 16 bytes whatever the batch: Triton
    specializes a kernel on its pointers' alignment, and a step whose views moved would compile anew.
    """

    n: int  # token rows (the batch's, or a graph's padded size)
    m: int  # request rows
    r: int  # requests with block tables
    width: int  # block table width
    p: int  # placeholder tokens

    def _offsets(self) -> tuple:
        sizes = (self.n, self.n, self.n, self.m, self.m + 1, self.r * self.width, 2 * self.p)
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + _align(size))
        return tuple(starts)

    @property
    def size(self) -> int:
        return self._offsets()[-1]

    def _section(self, buffer, index: int, length: int):
        start = self._offsets()[index]
        return buffer[start:start + length]

    def ids(self, buffer):
        return self._section(buffer, 0, self.n)

    def positions(self, buffer):
        return self._section(buffer, 1, self.n)

    def slots(self, buffer):
        return self._section(buffer, 2, self.n)

    def context_lens(self, buffer):
        return self._section(buffer, 3, self.m)

    def query_start_loc(self, buffer):
        return self._section(buffer, 4, self.m + 1)

    def block_tables(self, buffer):  # [r, width]
        return self._section(buffer, 5, self.r * self.width).reshape(self.r, self.width)

    def placeholders(self, buffer):  # [2p]: the placeholder rows, then their rows in the previous step
        return self._section(buffer, 6, 2 * self.p)


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

    def __init__(self, device: torch.device, tokens_per_block: int, encoder_decoder: bool = False):
        self.device, self.tokens_per_block = device, tokens_per_block
        self.encoder_decoder = encoder_decoder  # steps carry encoder inputs and cross blocks (AttentionMetadata.cross)
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

    def pack_ints(self, batch, pad_to: int = 0) -> tuple[np.ndarray, "IntLayout"]:
        """The batch's int32 inputs in one host buffer, laid out as IntLayout says.

        n = max(T, pad_to) token rows and m = max(R, pad_to) request rows; padded rows are empty
        (slot -1, context 0, query length 0). Placeholders are the tokens whose id the previous
        step samples (Batch.prev_rows >= 0).
        """
        t, r = int(batch.num_tokens), int(batch.num_requests)
        tables = np.asarray(batch.block_tables)  # [R, W]
        width = tables.shape[1] if tables.ndim == 2 else 0
        prev_rows = np.asarray(batch.prev_rows)  # [T]
        fill = np.flatnonzero(prev_rows >= 0)  # [P]
        lay = IntLayout(max(t, pad_to), max(r, pad_to), r, width, len(fill))
        out = self._buffers.ints.get(lay.size)
        ids, pos, slots = lay.ids(out), lay.positions(out), lay.slots(out)
        ids[:t], pos[:t], slots[:t] = batch.input_ids, batch.positions, batch.slot_mapping
        ids[t:], pos[t:], slots[t:] = 0, 0, -1
        ids[fill] = 0  # -1 until filled on the device; never an out-of-range embedding row
        ctx, qsl = lay.context_lens(out), lay.query_start_loc(out)
        ctx[:r], ctx[r:] = batch.context_lens, 0
        qsl[0] = 0
        np.cumsum(batch.query_lens, out=qsl[1:r + 1])
        qsl[r + 1:] = t
        lay.block_tables(out).reshape(-1)[:] = tables.reshape(-1)
        placeholders = lay.placeholders(out)
        placeholders[:lay.p], placeholders[lay.p:] = fill, prev_rows[fill]
        return out, lay

    @staticmethod
    def fill_placeholders(dev: torch.Tensor, lay: "IntLayout", prev_ids: Optional[torch.Tensor]) -> None:
        """input_ids[t] = prev_ids[j] for the P placeholders of `dev` (pack_ints' buffer, on the device).

        Runs on the device, in stream order after the previous step's sampling: nothing waits.
        """
        if lay.p == 0:
            return
        if prev_ids is None:
            raise RuntimeError("the batch takes tokens sampled by a previous step, but none was run")
        index = lay.placeholders(dev).long()  # [2P]
        input_ids = lay.ids(dev)
        input_ids[index[:lay.p]] = prev_ids[index[lay.p:]].to(input_ids.dtype)

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
        host, lay = self.pack_ints(batch)
        dev = self.copy_ints(host)
        self.fill_placeholders(dev, lay, prev_ids)
        qsl = lay.query_start_loc(dev)
        q_lens = np.asarray(batch.query_lens)
        longer = np.flatnonzero(q_lens != 1)
        attn = AttentionMetadata(
            slot_mapping=lay.slots(dev), query_lens=qsl[1:] - qsl[:-1], context_lens=lay.context_lens(dev),
            query_start_loc=qsl, block_tables=lay.block_tables(dev),
            max_query_len=int(q_lens.max()), max_context_len=int(np.asarray(batch.context_lens).max()),
            tokens_per_block=self.tokens_per_block, num_kv_splits=num_kv_splits,
            num_decodes=int(longer[0]) if len(longer) else 0,  # the scheduler puts running decodes first
            cross=cross_metadata(batch, self.device) if self.encoder_decoder else None,
            context_lens_cpu=np.asarray(batch.context_lens))
        sampling, all_greedy, any_filter = self.sampling(batch)
        adapters = token_adapter_slots(batch)
        return StepInputs(lay.ids(dev), lay.positions(dev), attn, qsl[1:].long() - 1, sampling, all_greedy,
                          any_filter, None if adapters is None else torch.from_numpy(adapters).to(self.device),
                          adapters)
