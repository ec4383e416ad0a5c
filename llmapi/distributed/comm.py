"""Communication between ranks: TP collectives, and rank 0's calls (a method code plus raw bytes).

Nothing in a call is unpickled but a request's logits processor, which the user's process pickled (by
reference: llmapi.core_request.pickled_processor) and only the sampling rank loads.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

# Rank 0's calls to every rank: call(method, payload), as nano-vllm's model runner. ADAPTER: an adapter into its
# device slot (llmapi.lora.runtime.AdapterInstall as safetensors bytes), before the step that first uses it.
INIT, STEP, RELEASE, EXIT, ADAPTER = 1, 2, 3, 4, 5

# Batch arrays in wire order: name, dtype, length in terms of R (requests), T (tokens), B (blocks per row),
# S (suppressed ids), C (block copies), N (logit bias entries), H (state entries), D (drafter input ids),
# E (encoder tokens), X (cross blocks per row).
_BATCH_FIELDS = (
    ("input_ids", np.int32, "T"), ("prev_rows", np.int32, "T"), ("positions", np.int32, "T"),
    ("slot_mapping", np.int64, "T"),
    ("query_lens", np.int32, "R"), ("context_lens", np.int32, "R"), ("block_tables", np.int32, "RB"),
    ("do_sample", np.int8, "R"), ("temperature", np.float32, "R"), ("top_k", np.int32, "R"),
    ("top_p", np.float32, "R"), ("seeds", np.int64, "R"), ("output_index", np.int32, "R"),
    ("suppress_offsets", np.int32, "R+1"), ("suppress_ids", np.int32, "S"), ("logprobs", np.int32, "R"),
    # The decoding step's (llmapi.runtime.decode) and the block copies every rank makes.
    ("request_ids", np.uint64, "R"), ("seq_index", np.int32, "R"), ("block_copies", np.int32, "C2"),
    ("num_candidates", np.int32, "R"), ("beam", np.int8, "R"), ("min_p", np.float32, "R"),
    ("repetition_penalty", np.float32, "R"), ("presence_penalty", np.float32, "R"),
    ("frequency_penalty", np.float32, "R"), ("bias_offsets", np.int32, "R+1"), ("bias_ids", np.int32, "N"),
    ("bias_values", np.float32, "N"), ("prompt_logprobs", np.int32, "R"), ("context_logits", np.int8, "R"),
    ("generation_logits", np.int8, "R"), ("prompt_lens", np.int32, "R"), ("next_token_ids", np.int32, "R"),
    ("slots", np.int32, "R"), ("slot_copy_from", np.int32, "R"), ("slot_reset", np.int8, "R"),
    ("state_start", np.int32, "R"), ("state_offsets", np.int32, "R+1"), ("state_ids", np.int32, "H"),
    ("adapter_slots", np.int32, "R"),
    # Speculative decoding: each row's drafts, and the drafter's catch-up inputs.
    ("num_draft_tokens", np.int32, "R"), ("draft_start", np.int32, "R"), ("draft_offsets", np.int32, "R+1"),
    ("draft_input_ids", np.int32, "D"),
    # Encoder-decoder: the encoder inputs run this step, their cross-KV slots, each row's cross blocks; and the
    # forced EOS of rows at their last token.
    ("encoder_input_ids", np.int32, "E"), ("encoder_lens", np.int32, "R"), ("cross_slot_mapping", np.int64, "E"),
    ("cross_lens", np.int32, "R"), ("cross_block_tables", np.int32, "RX"), ("forced_token_ids", np.int32, "R"),
)
_COUNTS = ("R", "T", "B", "S", "C", "N", "H", "D", "E", "X")

# One output tensor for every rank's part (torch >= 2.13 names it all_gather_single).
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class GroupComm:
    """The collectives a tensor-parallel layer needs, over one torch.distributed group.

    Both are safe to capture in a CUDA graph (NCCL): no host synchronization, and each call allocates the same
    tensors whatever the values, so a replay reads and writes what the capture did.
    """

    def __init__(self, group, size: int):
        self.group, self.size = group, size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:  # in place: sum over the group
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:  # [.., n, ..] -> [.., size * n, ..]
        x = x.contiguous()
        parts = torch.empty((self.size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        _gather_single(parts, x, group=self.group)  # the parts one after another along dim 0
        dim = dim % x.dim()
        parts = parts.view((self.size,) + tuple(x.shape))  # [size, .., n, ..]
        return parts.movedim(0, dim).flatten(dim, dim + 1)  # side by side along `dim`


class CountingComm:
    """A communicator that records each collective it passes on: `log` gets ("all_reduce", shape) and
    ("all_gather", shape, dim) entries, and `mark(label)` puts a label between them (e.g. a layer's start)."""

    def __init__(self, inner):
        self.inner, self.size, self.log = inner, inner.size, []

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(("all_reduce", tuple(x.shape)))
        return self.inner.all_reduce(x)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        self.log.append(("all_gather", tuple(x.shape), dim))
        return self.inner.all_gather(x, dim)

    def mark(self, label) -> None:
        self.log.append(("mark", label))


def _length(kind: str, counts: dict) -> int:
    if kind in ("RB", "RX"):
        return counts["R"] * counts[kind[1]]
    if kind == "R+1":
        return counts["R"] + 1
    if kind == "C2":
        return 2 * counts["C"]
    return counts[kind]


def _aligned(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 8)


def encode_batch(batch, processors_added: dict | None = None, processors_dropped=()) -> bytes:
    """A _core.Batch as bytes: a header of int64 counts, then each array, 8-byte aligned; then the logits
    processors the sampling rank takes on ({request id: pickled bytes}) or drops (request ids) before it runs
    this step: two int64 counts, the dropped ids, then per added one its id, its length and its bytes."""
    tables, cross = np.asarray(batch.block_tables), np.asarray(batch.cross_block_tables)
    counts = dict(R=int(batch.num_requests), T=int(batch.num_tokens), B=tables.shape[1] if tables.ndim == 2 else 0,
                  S=len(batch.suppress_ids), C=len(np.asarray(batch.block_copies)), N=len(batch.bias_ids),
                  H=len(batch.state_ids), D=len(batch.draft_input_ids), E=len(batch.encoder_input_ids),
                  X=cross.shape[1] if cross.ndim == 2 else 0)
    parts = [np.array([counts[k] for k in _COUNTS], dtype=np.int64).tobytes()]
    for name, dtype, _ in _BATCH_FIELDS:
        parts.append(_aligned(np.ascontiguousarray(getattr(batch, name), dtype=dtype).tobytes()))
    added = processors_added or {}
    parts.append(np.array([len(added), len(processors_dropped)], dtype=np.int64).tobytes())
    parts.append(np.array(list(processors_dropped), dtype=np.uint64).tobytes())
    for rid, data in added.items():
        parts.append(np.array([rid, len(data)], dtype=np.uint64).tobytes() + _aligned(data))
    return b"".join(parts)


def decode_batch(data: bytes) -> SimpleNamespace:
    """The batch encode_batch wrote, as numpy arrays under _core.Batch's attribute names, with
    `processors_added` ({request id: pickled bytes}) and `processors_dropped` (request ids)."""
    counts = dict(zip(_COUNTS, (int(v) for v in np.frombuffer(data, dtype=np.int64, count=len(_COUNTS)))))
    fields, offset = {}, 8 * len(_COUNTS)
    for name, dtype, kind in _BATCH_FIELDS:
        n = _length(kind, counts)
        fields[name] = np.frombuffer(data, dtype=dtype, count=n, offset=offset)
        offset += n * np.dtype(dtype).itemsize
        offset += -offset % 8
    r = counts["R"]
    fields["block_tables"] = fields["block_tables"].reshape(r, counts["B"])
    fields["block_copies"] = fields["block_copies"].reshape(counts["C"], 2)
    fields["cross_block_tables"] = fields["cross_block_tables"].reshape(r, counts["X"])
    num_added, num_dropped = (int(v) for v in np.frombuffer(data, dtype=np.int64, count=2, offset=offset))
    offset += 16
    dropped = np.frombuffer(data, dtype=np.uint64, count=num_dropped, offset=offset).tolist()
    offset += 8 * num_dropped
    added = {}
    for _ in range(num_added):
        rid, size = (int(v) for v in np.frombuffer(data, dtype=np.uint64, count=2, offset=offset))
        offset += 16
        added[rid] = data[offset:offset + size]
        offset += size + (-size % 8)
    return SimpleNamespace(num_requests=r, num_tokens=counts["T"], max_cross_blocks=counts["X"],
                           processors_added=added, processors_dropped=dropped, **fields)

class ControlChannel:
    """Rank 0 broadcasts calls over the control group; every other rank receives them in order."""

    def __init__(self, group):
        self.group = group
        self._pending = []  # rank 0's broadcasts still on the wire, with the tensors they send

    def send(self, method: int, payload: bytes = b"") -> None:
        """Rank 0: start broadcasting a call; returns without waiting for the other ranks to take it."""
        header = torch.tensor([method, len(payload)], dtype=torch.int64)
        works = [dist.broadcast(header, 0, group=self.group, async_op=True)]
        body = None
        if payload:
            body = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            works.append(dist.broadcast(body, 0, group=self.group, async_op=True))
        self._pending.append((works, header, body))
        # Completed broadcasts need no tracking; the rest complete in order behind the newest.
        while len(self._pending) > 1 and all(w.is_completed() for w in self._pending[0][0]):
            self._pending.pop(0)

    def send_json(self, method: int, obj) -> None:
        self.send(method, json.dumps(obj).encode())

    def flush(self) -> None:
        """Rank 0: wait until every call sent so far has reached every rank."""
        for works, _, _ in self._pending:
            for w in works:
                w.wait()
        self._pending.clear()

    def recv(self) -> tuple[int, bytes]:
        """Any rank but 0: the next call (blocks until rank 0 sends one)."""
        header = torch.empty(2, dtype=torch.int64)
        dist.broadcast(header, 0, group=self.group)
        method, size = int(header[0]), int(header[1])
        if size == 0:
            return method, b""
        body = torch.empty(size, dtype=torch.uint8)
        dist.broadcast(body, 0, group=self.group)
        return method, body.numpy().tobytes()

