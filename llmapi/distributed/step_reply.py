"""A decoding step's answer, from the sampling rank to rank 0, as one flat byte buffer: the StepOutput's arrays,
the rows that failed alone (a small JSON part) and the step's logits records (prompt chunks, generation rows)."""

from __future__ import annotations

import json
from typing import List, Optional, Sequence

import numpy as np
import torch

from llmapi.runtime.decode import StepOutput
from llmapi.runtime.logits_records import GenerationRow, PromptChunk

_DTYPES = (np.int32, np.int64, np.uint64, np.float32, np.int8, np.uint8)
_OUTPUT_ARRAYS = ("tokens", "scores", "logprobs", "ranks", "top_ids", "top_logprobs")
_CHUNK_ARRAYS = ("token_logprobs", "ranks", "top_ids", "top_logprobs")


def pack_arrays(arrays: Sequence[Optional[np.ndarray]]) -> np.ndarray:  # -> [bytes] uint8
    """Arrays (None allowed) as one buffer: an int64 header (count; per array its dtype's code, or -1 for
    None, its rank and shape), then each array's bytes, 8-byte aligned."""
    header = [len(arrays)]
    for a in arrays:
        header += [-1] if a is None else [_DTYPES.index(a.dtype.type), a.ndim, *a.shape]
    parts = [np.array([len(header)] + header, dtype=np.int64).tobytes()]
    for a in arrays:
        if a is not None:
            data = np.ascontiguousarray(a).tobytes()
            parts.append(data + b"\0" * (-len(data) % 8))
    return np.frombuffer(bytearray(b"".join(parts)), dtype=np.uint8)


def unpack_arrays(buf: np.ndarray) -> List[Optional[np.ndarray]]:
    """pack_arrays' arrays, as views of `buf` (writable if it is)."""
    size = int(buf[:8].view(np.int64)[0])
    header = buf[8:8 + 8 * size].view(np.int64).tolist()
    offset, at, out = 8 + 8 * size, 1, []
    for _ in range(header[0]):
        code = header[at]
        if code < 0:
            out.append(None)
            at += 1
            continue
        ndim = header[at + 1]
        shape, dtype = tuple(header[at + 2:at + 2 + ndim]), np.dtype(_DTYPES[code])
        at += 2 + ndim
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out.append(buf[offset:offset + nbytes].view(dtype).reshape(shape))
        offset += nbytes + (-nbytes % 8)
    return out


def _host(t) -> Optional[np.ndarray]:
    return None if t is None else t.cpu().numpy()


def pack_reply(out: dict, prompt: Sequence[PromptChunk], generation: Sequence[GenerationRow]) -> np.ndarray:
    """decode()'s output (device tensors under StepOutput's names) and the step's records, as one buffer."""
    arrays = [_host(out.get(name)) for name in _OUTPUT_ARRAYS]
    errors = out.get("errors")
    arrays.append(None if not errors else np.frombuffer(json.dumps(errors).encode(), dtype=np.uint8))
    meta = np.array([[c.request_id, c.first, c.num_positions, c.logits is not None, c.token_logprobs is not None]
                     for c in prompt], dtype=np.uint64).reshape(len(prompt), 5)  # all >= 0; ids are uint64
    arrays.append(meta)
    for c in prompt:
        arrays += [_host(c.logits)] + [_host(getattr(c, name)) for name in _CHUNK_ARRAYS]
    arrays.append(np.array([[g.request_id, g.index, g.seqs[0], len(g.seqs)] for g in generation],
                           dtype=np.uint64).reshape(len(generation), 4))
    arrays.append(torch.stack([g.logits for g in generation]).cpu().numpy() if generation else None)
    # A speculative step's top lists, one per token (SpeculativeStepOutput.top_per_token).
    arrays.append(np.ones(1, dtype=np.uint8) if out.get("top_per_token") else None)
    return pack_arrays(arrays)


def unpack_reply(buf: np.ndarray):
    """pack_reply's buffer -> (StepOutput with host arrays, prompt chunks, generation rows)."""
    arrays = unpack_arrays(buf)
    fields = dict(zip(_OUTPUT_ARRAYS, arrays))
    errors = arrays[len(_OUTPUT_ARRAYS)]
    out = StepOutput(**fields, errors=None if errors is None else
                     {int(k): v for k, v in json.loads(errors.tobytes().decode()).items()})
    rest = arrays[len(_OUTPUT_ARRAYS) + 1:]
    meta, rest = rest[0], rest[1:]
    # Copies: a record outlives the step's buffer, and crosses to the user's process in a spawned job.
    as_tensor = (lambda a: None if a is None else torch.from_numpy(a.copy()))
    prompt = []
    for rid, first, num, _, _ in meta.tolist():
        logits, *lp = (as_tensor(a) for a in rest[:5])
        rest = rest[5:]
        prompt.append(PromptChunk(rid, first, num, logits, *lp))
    gen_meta, gen_logits, per_token = rest
    if per_token is not None:
        from llmapi.speculative.step import SpeculativeStepOutput

        out = SpeculativeStepOutput(**vars(out), top_per_token=True)
    generation = [GenerationRow(rid, index, range(start, start + count), as_tensor(gen_logits[i]))
                  for i, (rid, index, start, count) in enumerate(gen_meta.tolist())]
    return out, prompt, generation


def _padded(a: Optional[np.ndarray], rows: int, width: int, fill, dtype) -> np.ndarray:
    out = np.full((rows, width), fill, dtype=dtype)
    if a is not None:
        out[:, :a.shape[1]] = a
    return out


def merge_outputs(parts: Sequence[StepOutput]) -> StepOutput:
    """The StepOutput of a step cut into micro-batches, as one decode() of the whole step gives it: rows in
    order, candidates padded with -1 to the widest, absent logprob outputs as decode() fills rows that
    asked for none (NaN, rank 0, id -1)."""
    if len(parts) == 1:
        return parts[0]  # a speculative step runs whole: its top_per_token stays
    rows = [p.tokens.shape[0] for p in parts]
    k = max(p.tokens.shape[1] for p in parts)

    def column(name: str, width: int, fill, dtype):
        if all(getattr(p, name) is None for p in parts):
            return None
        return np.concatenate([_padded(getattr(p, name), r, width, fill, dtype) for p, r in zip(parts, rows)])

    tops = [p.top_ids.shape[1] for p in parts if p.top_ids is not None]
    top = max(tops, default=0)
    errors, start = {}, 0
    for p, r in zip(parts, rows):
        errors.update({start + row: message for row, message in (p.errors or {}).items()})
        start += r
    return StepOutput(tokens=column("tokens", k, -1, np.int32), scores=column("scores", k, 0.0, np.float32),
                      logprobs=column("logprobs", k, np.nan, np.float32), ranks=column("ranks", k, 0, np.int32),
                      top_ids=column("top_ids", top, -1, np.int32),
                      top_logprobs=column("top_logprobs", top, 0.0, np.float32), errors=errors or None)
