"""Communication between ranks: TP collectives, and rank 0's calls (a method code plus raw bytes, never pickle)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

# Rank 0's calls to every rank: call(method, payload), as nano-vllm's model runner.
INIT, STEP, RELEASE, EXIT = 1, 2, 3, 4

# Batch arrays in wire order: name, dtype, length in terms of R (requests), T (tokens), B (blocks per row),
# S (suppressed ids).
_BATCH_FIELDS = (
    ("input_ids", np.int32, "T"), ("positions", np.int32, "T"), ("slot_mapping", np.int64, "T"),
    ("query_lens", np.int32, "R"), ("context_lens", np.int32, "R"), ("block_tables", np.int32, "RB"),
    ("do_sample", np.int8, "R"), ("temperature", np.float32, "R"), ("top_k", np.int32, "R"),
    ("top_p", np.float32, "R"), ("seeds", np.int64, "R"), ("output_index", np.int32, "R"),
    ("suppress_offsets", np.int32, "R+1"), ("suppress_ids", np.int32, "S"), ("logprobs", np.int32, "R"),
)


class GroupComm:
    """The collectives a tensor-parallel layer needs, over one torch.distributed group."""

    def __init__(self, group, size: int):
        self.group, self.size = group, size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:  # in place: sum over the group
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:  # [.., n, ..] -> [.., size * n, ..]
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


def _length(kind: str, r: int, t: int, b: int, s: int) -> int:
    return {"T": t, "R": r, "RB": r * b, "R+1": r + 1, "S": s}[kind]


def encode_batch(batch) -> bytes:
    """A _core.Batch as bytes: a header of four int64 counts, then each array, 8-byte aligned."""
    if (np.asarray(batch.prev_rows) >= 0).any():
        raise RuntimeError("async scheduling (placeholder input ids) runs on one rank only")
    tables = np.asarray(batch.block_tables)
    r, t = int(batch.num_requests), int(batch.num_tokens)
    b, s = (tables.shape[1] if tables.ndim == 2 else 0), len(batch.suppress_ids)
    parts = [np.array([r, t, b, s], dtype=np.int64).tobytes()]
    for name, dtype, _ in _BATCH_FIELDS:
        data = np.ascontiguousarray(getattr(batch, name), dtype=dtype).tobytes()
        parts.append(data + b"\0" * (-len(data) % 8))
    return b"".join(parts)


def decode_batch(data: bytes) -> SimpleNamespace:
    """The batch encode_batch wrote, as numpy arrays under _core.Batch's attribute names."""
    r, t, b, s = (int(v) for v in np.frombuffer(data, dtype=np.int64, count=4))
    fields, offset = {}, 32
    for name, dtype, kind in _BATCH_FIELDS:
        n = _length(kind, r, t, b, s)
        fields[name] = np.frombuffer(data, dtype=dtype, count=n, offset=offset)
        offset += n * np.dtype(dtype).itemsize
        offset += -offset % 8
    fields["block_tables"] = fields["block_tables"].reshape(r, b)
    return SimpleNamespace(num_requests=r, num_tokens=t, **fields)


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


def sampled_width(top: int) -> int:
    """Int32 columns per row of a step's answer: the token alone, or with logprobs and `top` top logprobs."""
    return 1 if top < 0 else 3 + 2 * top


def pack_sampled(tokens: torch.Tensor, logprobs: dict | None, top: int) -> torch.Tensor:  # -> [R, W] int32
    """A step's sampled tokens [R] and (top >= 0) their logprob outputs (see decode.logprob_outputs) as one
    int32 tensor: [token | rank | logprob | top_ids L | top_logprobs L], floats bit-cast."""
    if top < 0:
        return tokens.to(torch.int32)[:, None]
    as_int = (lambda t: t.float().contiguous().view(torch.int32))
    cols = [tokens.to(torch.int32)[:, None], logprobs["ranks"], as_int(logprobs["logprobs"])]
    if top > 0:
        cols += [logprobs["top_ids"], as_int(logprobs["top_logprobs"])]
    return torch.cat(cols, dim=1)


def unpack_sampled(packed: np.ndarray, top: int):
    """pack_sampled's [R, W] array -> the tokens [R], or a StepOutput when the step wanted logprobs."""
    from llmapi.runtime.decode import StepOutput

    if top < 0:
        return np.ascontiguousarray(packed[:, 0])
    as_float = (lambda a: np.ascontiguousarray(a).view(np.float32))
    out = StepOutput(tokens=np.ascontiguousarray(packed[:, :1]), ranks=np.ascontiguousarray(packed[:, 1:2]),
                     logprobs=as_float(packed[:, 2:3]))
    if top > 0:
        out.top_ids = np.ascontiguousarray(packed[:, 3:3 + top])
        out.top_logprobs = as_float(packed[:, 3 + top:])
    return out
