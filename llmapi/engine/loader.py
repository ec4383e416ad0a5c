"""Stream a rank's safetensors file straight into a model's parameters: no intermediate copy of the weights.

Reading the file into a dict of tensors first (safetensors.torch.load_file) and then copying each
into its parameter costs a second pass over every byte and, on CUDA, a second copy of the weights in
device memory. Here each tensor's bytes are read with readinto() into the parameter itself (CPU), or
into one of two page-locked staging buffers whose asynchronous host-to-device copy overlaps the read
of the next chunk (CUDA). The bytes read are hashed (xxh3_128) on a second thread as they arrive, so
the file is checked against its manifest at no extra read and, xxhash being faster than the read, at
no measurable extra time.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import xxhash

from llmapi.errors import CorruptEngineError

# safetensors dtype names, as the format's specification lists them.
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
             "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 << 20  # safetensors' own limit
CHUNK_BYTES = 64 << 20  # one staging buffer; two are used in turn
HASH_PIECE = 16 << 20  # with a checksum, bytes are read and hashed in pieces (or batches) of this size
FAST_HASH = "xxh3_128"  # the manifest's key for the checksum verified on every load


def fast_hasher():
    """A new hasher of the FAST_HASH checksum (hexdigest() gives the manifest's value)."""
    return xxhash.xxh3_128()


def read_header(path: Path, size: int | None = None) -> tuple[dict, int]:
    """(tensor entries by name, byte offset of the data section); CorruptEngineError if the header is damaged.

    Every entry's byte range lies inside the data section and matches its dtype and shape.
    """
    path = Path(path)
    size = path.stat().st_size if size is None else size
    with open(path, "rb") as f:
        header, raw = _read_header(f, path, size)
    return header, len(raw)


def _read_header(f, path: Path, size: int) -> tuple[dict, bytes]:
    """The parsed header of the open file `f` (at its start), and its raw bytes (length prefix included)."""

    def bad(why: str):
        return CorruptEngineError(f"engine {path.parent}: {path.name} has a damaged safetensors header: {why}")

    head = f.read(8)
    if len(head) < 8:
        raise bad("file shorter than 8 bytes")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER, size - 8):
        raise bad(f"header length {n} exceeds the file ({size} bytes)")
    raw = head + f.read(n)
    try:
        header = json.loads(raw[8:])
    except ValueError as e:
        raise bad(f"not JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            shape, dtype = info["shape"], info["dtype"]
        except (TypeError, KeyError, ValueError) as e:
            raise bad(f"entry {name!r} lacks dtype/shape/data_offsets") from e
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise bad(f"tensor {name!r} byte range [{begin}, {end}) is outside the data section ({data_size} bytes)")
        if dtype not in ST_DTYPES:
            raise bad(f"tensor {name!r} has dtype {dtype!r}, which this library does not read")
        need = math.prod(shape) * ST_DTYPES[dtype].itemsize
        if end - begin != need:
            raise bad(f"tensor {name!r} holds {end - begin} bytes, but {dtype}{shape} needs {need}")
    return header, raw


def _byte_view(t: torch.Tensor) -> torch.Tensor:  # any contiguous tensor -> [nbytes] uint8 over its storage
    return t.reshape(-1).view(torch.uint8)


class _Digest:
    """The FAST_HASH of the bytes handed to `update`, in order, computed on a second thread (xxhash releases
    the GIL) while the caller reads the next bytes. Small pieces are handed over in batches of HASH_PIECE
    bytes: one hand-over per tensor would cost more than hashing a small tensor. A file smaller than that is
    hashed inline: a thread would cost more than it saves."""

    def __init__(self, size: int):
        self.hasher = fast_hasher()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="llmapi-checksum") if size > HASH_PIECE else None
        self.pending: list[Future] = []
        self.batch, self.batch_bytes = [], 0

    def update(self, data, flush: bool = False) -> Future | None:
        """Hash `data` (bytes, or a [n] uint8 CPU tensor left unchanged until it is hashed) after what came
        before; with flush, or once the batch is full, returns the future of the batch that holds it."""
        data = data.numpy() if isinstance(data, torch.Tensor) else data
        if self.pool is None:
            self.hasher.update(data)
            return None
        self.batch.append(data)
        self.batch_bytes += len(self.batch[-1])
        if not flush and self.batch_bytes < HASH_PIECE:
            return None
        batch, self.batch, self.batch_bytes = self.batch, [], 0
        future = self.pool.submit(self._hash, batch)
        self.pending.append(future)
        return future

    def _hash(self, batch: list) -> None:
        for data in batch:
            self.hasher.update(data)

    def hexdigest(self) -> str:
        if self.batch:
            self.update(b"", flush=True)
        self.close()
        for future in self.pending:
            future.result()
        return self.hasher.hexdigest()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class _Staging:
    """Two page-locked buffers used in turn; a buffer is refilled only after its last copy (and hash) has finished."""

    def __init__(self, chunk: int):
        self.buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.events = [None, None]
        self.hashed: list[Future | None] = [None, None]
        self.turn = 0

    def copy(self, f, dst: torch.Tensor, digest: _Digest | None) -> None:  # dst: [n] uint8 on the device, n <= chunk
        i, self.turn = self.turn, 1 - self.turn
        if self.events[i] is not None:
            self.events[i].synchronize()
        if self.hashed[i] is not None:
            self.hashed[i].result()
        buf = self.buffers[i][:dst.numel()]
        _read_exactly(f, buf)
        dst.copy_(buf, non_blocking=True)
        self.events[i] = torch.cuda.Event()
        self.events[i].record()
        self.hashed[i] = digest.update(buf, flush=True) if digest is not None else None

    def finish(self) -> None:
        for event in self.events:
            if event is not None:
                event.synchronize()


def _read_exactly(f, dst: torch.Tensor) -> None:  # dst: [n] uint8 on the CPU
    view = memoryview(dst.numpy())
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise CorruptEngineError(f"{f.name} ended early: the file is shorter than its header says")
        done += got


def load_into(path: Path, params: Mapping[str, torch.Tensor], chunk: int = CHUNK_BYTES,
              checksum: str | None = None) -> None:
    """Read every tensor of the safetensors file `path` into the tensor of the same name in `params`.

    The names must match exactly and the shapes agree (CorruptEngineError otherwise, naming them). A tensor
    stored in another dtype than its parameter's is converted, as Tensor.copy_ would. `checksum`: the file's
    FAST_HASH from the manifest; the bytes streamed (header, then every tensor in file order: the whole
    file, which safetensors writes without holes) must hash to it, else CorruptEngineError names the file.
    """
    path = Path(path)
    digest = None
    try:
        with open(path, "rb", buffering=0) as f, torch.no_grad():
            size = os.fstat(f.fileno()).st_size
            digest = _Digest(size) if checksum is not None else None
            header, raw = _read_header(f, path, size)
            data_start = len(raw)
            if digest is not None:
                digest.update(raw)
            _check_fits(header, params)
            devices = {p.device.type for p in params.values()}
            staging = _Staging(chunk) if "cuda" in devices else None
            # In file order: one sequential pass over the file.
            for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                param, dtype = params[name], ST_DTYPES[info["dtype"]]
                f.seek(data_start + info["data_offsets"][0])
                direct = param.dtype == dtype and param.is_contiguous()
                target = param if direct else torch.empty(param.shape, dtype=dtype, device=param.device)
                dst = _byte_view(target)
                if target.device.type == "cpu" and digest is None:
                    _read_exactly(f, dst)
                elif target.device.type == "cpu":
                    # In pieces, so the hash of a large tensor runs while the rest of it is read.
                    for begin in range(0, dst.numel(), HASH_PIECE):
                        _read_exactly(f, dst[begin:begin + HASH_PIECE])
                        digest.update(dst[begin:begin + HASH_PIECE])
                else:
                    for begin in range(0, dst.numel(), chunk):
                        staging.copy(f, dst[begin:begin + chunk], digest)
                if not direct:
                    param.copy_(target)
            if staging is not None:
                staging.finish()
        if digest is not None and digest.hexdigest() != checksum:
            raise CorruptEngineError(f"engine {path.parent}: {path.name} fails its {FAST_HASH} checksum "
                                     "(its content changed after it was built)")
    finally:
        if digest is not None:
            digest.close()


def _check_fits(header: dict, params: Mapping[str, torch.Tensor]) -> None:
    missing, unexpected = sorted(set(params) - set(header)), sorted(set(header) - set(params))
    if missing or unexpected:
        raise CorruptEngineError(f"engine weights do not fit the model: missing {missing}, unexpected {unexpected}")
    for name, info in header.items():
        if tuple(info["shape"]) != tuple(params[name].shape):
            raise CorruptEngineError(f"engine tensor {name!r} has shape {tuple(info['shape'])}, "
                                     f"expected {tuple(params[name].shape)}")
