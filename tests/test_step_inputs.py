"""The runner's packed int32 step inputs: every section 16-byte aligned, and each one holding its batch array."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmapi.runtime.step_inputs import InputStager, IntLayout


def _batch(rng, num_requests: int, width: int):
    q = rng.integers(1, 9, num_requests)
    t = int(q.sum())
    prev_rows = np.full(t, -1, np.int32)
    fill = rng.choice(t, size=min(t, 3), replace=False)
    prev_rows[fill] = rng.integers(0, num_requests, len(fill))
    return SimpleNamespace(
        num_tokens=t, num_requests=num_requests, input_ids=rng.integers(1, 100, t).astype(np.int32),
        positions=rng.integers(0, 50, t).astype(np.int32), slot_mapping=rng.integers(0, 500, t).astype(np.int32),
        context_lens=(q + rng.integers(0, 20, num_requests)).astype(np.int32), query_lens=q.astype(np.int32),
        block_tables=rng.integers(0, 64, (num_requests, width)).astype(np.int32), prev_rows=prev_rows,
        seeds=np.zeros(num_requests, np.int64), top_k=np.zeros(num_requests, np.int32),
        output_index=np.zeros(num_requests, np.int32), suppress_offsets=np.zeros(num_requests + 1, np.int32),
        suppress_ids=np.zeros(0, np.int32), temperature=np.zeros(num_requests, np.float32),
        top_p=np.ones(num_requests, np.float32))


@pytest.mark.parametrize("num_requests,width,pad_to", [(1, 1, 0), (3, 5, 0), (7, 2, 8), (17, 3, 0), (65, 4, 96)])
def test_sections_are_aligned_and_hold_the_batch(num_requests, width, pad_to):
    rng = np.random.default_rng(num_requests)
    b = _batch(rng, num_requests, width)
    host, lay = InputStager(torch.device("cpu"), 16).pack_ints(b, pad_to=pad_to)
    n, m = max(b.num_tokens, pad_to), max(num_requests, pad_to)
    assert (lay.n, lay.m, lay.r, lay.width) == (n, m, num_requests, width)
    views = [lay.ids(host), lay.positions(host), lay.slots(host), lay.context_lens(host),
             lay.query_start_loc(host), lay.block_tables(host), lay.placeholders(host)]
    base = host.ctypes.data
    ends = []
    for v in views:
        start = (v.ctypes.data - base) // 4
        assert (v.ctypes.data - base) % 16 == 0, start
        ends.append((start, start + v.size))
    assert all(a[1] <= b_[0] for a, b_ in zip(ends, ends[1:]))  # in order, no overlap
    assert ends[-1][1] <= lay.size == len(host)
    t = b.num_tokens
    np.testing.assert_array_equal(lay.positions(host)[:t], b.positions)
    np.testing.assert_array_equal(lay.slots(host)[:t], b.slot_mapping)
    assert (lay.slots(host)[t:] == -1).all() and (lay.ids(host)[t:] == 0).all()
    fill = np.flatnonzero(b.prev_rows >= 0)
    keep = b.prev_rows < 0
    np.testing.assert_array_equal(lay.ids(host)[:t][keep], b.input_ids[keep])
    assert (lay.ids(host)[fill] == 0).all()
    np.testing.assert_array_equal(lay.placeholders(host), np.concatenate([fill, b.prev_rows[fill]]))
    np.testing.assert_array_equal(lay.context_lens(host)[:num_requests], b.context_lens)
    qsl = lay.query_start_loc(host)
    np.testing.assert_array_equal(qsl[:num_requests + 1], np.concatenate([[0], np.cumsum(b.query_lens)]))
    assert (qsl[num_requests + 1:] == t).all()
    np.testing.assert_array_equal(lay.block_tables(host), b.block_tables)


def test_placeholders_filled_from_previous_ids():
    rng = np.random.default_rng(5)
    b = _batch(rng, 6, 2)
    stager = InputStager(torch.device("cpu"), 16)
    host, lay = stager.pack_ints(b)
    dev = stager.copy_ints(host)
    prev = torch.arange(100, 106, dtype=torch.int32)
    stager.fill_placeholders(dev, lay, prev)
    fill = np.flatnonzero(b.prev_rows >= 0)
    assert lay.ids(dev)[fill].tolist() == [100 + int(j) for j in b.prev_rows[fill]]
    with pytest.raises(RuntimeError, match="previous step"):
        stager.fill_placeholders(dev, lay, None)


def test_layout_of_a_graph_size_matches_the_packed_batch():
    # DecodeGraphs reads its first five sections from IntLayout(G, G, 0, 0, 0): the same offsets.
    full, bare = IntLayout(32, 32, 20, 7, 11), IntLayout(32, 32, 0, 0, 0)
    buf = np.arange(full.size)
    for name in ("ids", "positions", "slots", "context_lens", "query_start_loc"):
        np.testing.assert_array_equal(getattr(full, name)(buf), getattr(bare, name)(buf))


@pytest.mark.parametrize("query_lens,decodes", [([1, 1, 1, 6, 1, 9], 3), ([4, 1, 1], 0), ([1, 1], 0), ([1, 5], 1)])
def test_staged_metadata_counts_the_leading_decodes(query_lens, decodes):
    b = _batch(np.random.default_rng(0), len(query_lens), 3)
    b.query_lens = np.array(query_lens, np.int32)
    b.num_tokens = int(sum(query_lens))
    for name in ("input_ids", "positions", "slot_mapping", "prev_rows"):
        setattr(b, name, np.resize(getattr(b, name), b.num_tokens))
    b.prev_rows[:] = -1
    b.context_lens = b.query_lens + 4
    inputs = InputStager(torch.device("cpu"), 16).stage(b)
    assert inputs.attn.num_decodes == decodes and inputs.attn.max_query_len == max(query_lens)
    assert inputs.attn.query_start_loc.tolist() == [0, *np.cumsum(query_lens).tolist()]
