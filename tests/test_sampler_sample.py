"""Tests of the batched sampler: greedy, suppression, top-k/top-p, seeded reproducibility, distribution."""

import math

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from llmapi.runtime.sampler import apply_top_k_top_p, first_argmax, gumbel_noise, row_keys, sample

# Upper 0.1% points of the chi-square distribution by degrees of freedom (standard tables).
CHI2_CRIT_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
                   8: 26.124, 9: 27.877, 10: 29.588, 11: 31.264, 12: 32.909, 13: 34.528,
                   14: 36.123, 15: 37.697, 19: 43.820}


def _batch(logits, temperature=1.0, top_k=0, top_p=1.0, seeds=None, output_index=0, suppress=None):
    """Build sample()'s keyword arguments; scalars are broadcast, suppress is a list of id lists."""
    num_rows = logits.shape[0]

    def per_row(v, dtype):
        return v.to(dtype) if torch.is_tensor(v) else torch.full((num_rows,), v, dtype=dtype)

    suppress = suppress or [[] for _ in range(num_rows)]
    offsets = [0]
    for ids in suppress:
        offsets.append(offsets[-1] + len(ids))
    return dict(
        logits=logits,
        temperature=per_row(temperature, torch.float32),
        top_k=per_row(top_k, torch.int32),
        top_p=per_row(top_p, torch.float32),
        seeds=per_row(torch.arange(num_rows) if seeds is None else seeds, torch.int64),
        output_index=per_row(output_index, torch.int32),
        suppress_offsets=torch.tensor(offsets, dtype=torch.int32),
        suppress_ids=torch.tensor([i for ids in suppress for i in ids], dtype=torch.int32),
    )


def _chi_square(counts, probs):
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


def test_greedy_is_argmax():
    logits = torch.randn(9, 300, generator=torch.Generator().manual_seed(0))
    out = sample(**_batch(logits, temperature=0.0, top_k=3, top_p=0.5))
    assert out.dtype == torch.int64
    assert torch.equal(out, logits.argmax(-1))
    assert torch.equal(sample(**_batch(logits, temperature=0.0), all_greedy=True), logits.argmax(-1))


@pytest.mark.parametrize("vocab", [128256, 49152, 32000, 4099, 100])
def test_first_argmax_is_torch_argmax(vocab):
    # Few distinct values: every row has its maximum many times, and the first one must win, as torch.argmax.
    g = torch.Generator().manual_seed(vocab)
    x = torch.randint(0, 5, (6, vocab), generator=g).float()
    x[1] = 0.0  # one value throughout: index 0
    x[2, -1] = 9.0  # the maximum in the last place
    x[3, vocab // 2:] = 7.0  # a tie between the two halves' starts
    x[4] = torch.randn(vocab, generator=g)
    x[5, vocab // 3] = float("nan")  # NaN counts as the maximum, as in torch.argmax
    expected = x.argmax(dim=-1)
    assert torch.equal(first_argmax(x), expected)
    assert expected[1] == 0 and expected[2] == vocab - 1 and expected[5] == vocab // 3


def test_suppression_masks_only_its_row():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    top = logits.argmax(-1)
    second = logits.topk(2).indices[:, 1]
    suppress = [[int(top[0])], [], [int(top[2]), int(second[2])], [7]]
    out = sample(**_batch(logits, temperature=0.0, suppress=suppress))
    third_of_row2 = logits.topk(3).indices[2, 2]
    assert out.tolist() == [int(second[0]), int(top[1]), int(third_of_row2), int(top[3])]


def test_suppressed_tokens_are_never_sampled():
    # Token 0 holds nearly all the mass, yet min_tokens suppression must keep it out.
    logits = torch.zeros(2000, 8)
    logits[:, 0] = 20.0
    out = sample(**_batch(logits, temperature=1.0, suppress=[[0, 3]] * 2000))
    assert not ((out == 0) | (out == 3)).any()
    assert len(set(out.tolist())) == 6


def _reference_keep(logits_row, k, p):
    scores = logits_row.unsqueeze(0)
    if k > 0:
        scores = TopKLogitsWarper(top_k=k)(None, scores)
    if p < 1.0:
        scores = TopPLogitsWarper(top_p=p)(None, scores)
    return torch.isfinite(scores[0])


@pytest.mark.parametrize("vocab_size", [7, 64, 1000])
def test_top_k_top_p_match_transformers(vocab_size):
    gen = torch.Generator().manual_seed(vocab_size)
    settings = [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.9), (0, 0.3), (3, 0.8), (50, 0.95), (0, 0.01),
                (vocab_size, 0.5), (vocab_size + 10, 1.0), (2, 0.999)]
    logits = torch.randn(len(settings), vocab_size, generator=gen) * 3
    logits[1, :3] = logits[1].max()  # a tie at the top-k threshold: all tied tokens stay, as in transformers
    top_k = torch.tensor([k for k, _ in settings], dtype=torch.int32)
    top_p = torch.tensor([p for _, p in settings], dtype=torch.float32)
    ours = torch.isfinite(apply_top_k_top_p(logits, top_k, top_p))
    for row, (k, p) in enumerate(settings):
        assert torch.equal(ours[row], _reference_keep(logits[row], k, p)), (k, p)
    # The filtered logits keep their values where finite.
    filtered = apply_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(filtered[ours], logits[ours])


def test_sampled_tokens_stay_in_the_kept_set():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(3)).expand(3000, 40).contiguous()
    kept = _reference_keep(logits[0], 6, 0.7)
    out = sample(**_batch(logits, temperature=1.3, top_k=6, top_p=0.7, seeds=torch.arange(3000) * 7919))
    assert kept[out].all()
    assert len(set(out.tolist())) == int(kept.sum())


def test_same_seed_and_index_give_same_token_in_any_batch():
    gen = torch.Generator().manual_seed(4)
    row = torch.randn(1, 500, generator=gen)
    alone = sample(**_batch(row, temperature=0.8, top_k=100, top_p=0.95, seeds=12345, output_index=17))
    # The same request at row 3 of a batch whose other rows differ in every setting.
    others = torch.randn(6, 500, generator=gen)
    logits = torch.cat([others[:3], row, others[3:]])
    args = _batch(logits, temperature=torch.tensor([0.0, 1.0, 0.5, 0.8, 2.0, 1.0, 0.3]),
                  top_k=torch.tensor([0, 5, 0, 100, 0, 1, 9]),
                  top_p=torch.tensor([1.0, 0.5, 1.0, 0.95, 0.9, 1.0, 1.0]),
                  seeds=torch.tensor([1, 2, 3, 12345, 5, 6, 7]),
                  output_index=torch.tensor([0, 9, 3, 17, 1, 0, 4]),
                  suppress=[[1], [], [2, 3], [], [], [4], []])
    assert int(sample(**args)[3]) == int(alone[0])
    # Without the top-k/top-p hint the noise is the same, so an unfiltered row draws the same token.
    plain = _batch(row, temperature=0.8, seeds=12345, output_index=17)
    assert torch.equal(sample(**plain), sample(**plain, any_top_k_top_p=False))


def test_seeds_and_output_indices_give_independent_draws():
    # Uniform logits over 4 tokens: the draws at output_index 0 and 1 of the same seed must look
    # like independent uniform draws (chi-square over the 16 joint outcomes).
    n = 4000
    logits = torch.zeros(n, 4)
    seeds = torch.arange(n) * 104729 + 11
    first = sample(**_batch(logits, seeds=seeds, output_index=0))
    second = sample(**_batch(logits, seeds=seeds, output_index=1))
    joint = [int(((first == a) & (second == b)).sum()) for a in range(4) for b in range(4)]
    assert _chi_square(joint, [1 / 16] * 16) < CHI2_CRIT_0_001[15]
    # One seed, many output indices: also uniform.
    many = sample(**_batch(torch.zeros(n, 4), seeds=99, output_index=torch.arange(n)))
    counts = [int((many == t).sum()) for t in range(4)]
    assert _chi_square(counts, [0.25] * 4) < CHI2_CRIT_0_001[3]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 6, 0.9), (1.5, 0, 0.8), (0.5, 4, 1.0)])
def test_distribution_matches_renormalised_softmax(temperature, top_k, top_p):
    vocab_size, n = 12, 20000
    logits = torch.linspace(2.0, -1.5, vocab_size).unsqueeze(0)
    kept = _reference_keep(logits[0] / temperature, top_k, top_p)
    probs = torch.softmax(logits[0] / temperature, -1) * kept
    probs = (probs / probs.sum()).tolist()
    out = sample(**_batch(logits.expand(n, vocab_size).contiguous(), temperature=temperature, top_k=top_k,
                          top_p=top_p, seeds=torch.arange(n) * 6364136223846793 + 1442695))
    counts = [int((out == t).sum()) for t in range(vocab_size)]
    assert all(c == 0 for c, k in zip(counts, kept.tolist()) if not k)
    kept_counts = [c for c, k in zip(counts, kept.tolist()) if k]
    kept_probs = [p for p, k in zip(probs, kept.tolist()) if k]
    assert _chi_square(kept_counts, kept_probs) < CHI2_CRIT_0_001[len(kept_probs) - 1]


def test_mixed_greedy_and_sampled_batch():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 200, generator=gen)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.7, 1.0, 0.0])
    seeds = torch.tensor([10, 20, 30, 40, 50, 60])
    out = sample(**_batch(logits, temperature=temperature, top_k=torch.tensor([0, 0, 5, 20, 0, 0]),
                          seeds=seeds, output_index=torch.tensor([0, 1, 2, 3, 4, 5])))
    greedy = temperature == 0
    assert torch.equal(out[greedy], logits.argmax(-1)[greedy])
    for row in (1, 3, 4):  # each sampled row draws what it draws alone
        alone = sample(**_batch(logits[row:row + 1], temperature=float(temperature[row]),
                                top_k=[0, 0, 5, 20, 0, 0][row], seeds=int(seeds[row]), output_index=row))
        assert int(out[row]) == int(alone[0])


def _fmix32_py(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _uniform_py(seed, sample_index, output_index, token_id):
    h = 0x243F6A88
    for word in (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, sample_index, output_index):
        h = _fmix32_py(((h ^ word) + 0x9E3779B9) & 0xFFFFFFFF)
    return ((_fmix32_py(h ^ token_id) >> 9) + 0.5) * 2.0**-23


def test_hash_matches_exact_integer_reference():
    # The tensor hash equals the same hash done in Python's unbounded integers: no int64 multiply
    # overflowed, so CPU and CUDA (which both run these int64 ops) agree bit for bit.
    seeds = [0, 1, 12345, 2**32 - 1, 2**32, 2**62 + 987654321, 2**63 - 1]
    indices = [0, 1, 5, 2**31 - 1, 77, 3, 1000]
    tokens = torch.tensor([[0, 1, 2, 31999, 128255, 2**20 + 3]])
    keys = row_keys(torch.tensor(seeds), torch.zeros(len(seeds), dtype=torch.int64), torch.tensor(indices))
    g = gumbel_noise(keys, tokens)  # [R, V]
    for r, (seed, oi) in enumerate(zip(seeds, indices)):
        for c, tok in enumerate(tokens[0].tolist()):
            u = _uniform_py(seed, 0, oi, tok)
            assert 0.0 < u < 1.0
            assert g[r, c].item() == pytest.approx(-math.log(-math.log(u)), rel=1e-5, abs=1e-6)


def test_sample_index_changes_the_draw():
    logits = torch.zeros(1000, 50)
    a = sample(**_batch(logits, seeds=torch.arange(1000)))
    b = sample(**_batch(logits, seeds=torch.arange(1000)), sample_index=torch.ones(1000, dtype=torch.int64))
    assert (a != b).float().mean() > 0.9


def test_bad_shapes_raise():
    logits = torch.zeros(3, 10)
    args = _batch(logits)
    args["top_p"] = torch.ones(2)
    with pytest.raises(ValueError, match="top_p"):
        sample(**args)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(64, 5000, generator=gen)
    args = _batch(logits, temperature=torch.rand(64, generator=gen) + 0.2,
                  top_k=torch.randint(0, 50, (64,), generator=gen), top_p=torch.rand(64, generator=gen) * 0.5 + 0.5,
                  seeds=torch.randint(0, 2**62, (64,), generator=gen), output_index=torch.arange(64) * 3,
                  suppress=[[i % 5000] for i in range(64)])
    cpu = sample(**args)
    gpu = sample(**{k: v.cuda() for k, v in args.items()})
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("filters", ["none", "top_k_top_p", "min_p"])
def test_chunked_draw_gives_each_row_its_own_token(monkeypatch, filters):
    # A large batch is drawn in chunks of rows (bounded temporaries); each row's token must be what the whole batch
    # drawn at once gives it, with greedy rows, suppressed ids and per-row settings mixed in.
    import llmapi.runtime.sampler as sampler

    g = torch.Generator().manual_seed(11)
    rows, vocab = 37, 301
    logits = torch.randn(rows, vocab, generator=g) * 3
    temperature = torch.rand(rows, generator=g) + 0.3
    temperature[::5] = 0.0  # greedy rows
    top_k = torch.randint(0, 40, (rows,), generator=g) if filters == "top_k_top_p" else 0
    top_p = torch.rand(rows, generator=g) * 0.6 + 0.4 if filters == "top_k_top_p" else 1.0
    suppress = [[int(logits[r].argmax()), r % vocab] if r % 3 == 0 else [] for r in range(rows)]
    kwargs = _batch(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                    seeds=torch.arange(rows) * 7919, output_index=torch.arange(rows) % 4, suppress=suppress)
    if filters == "min_p":
        kwargs["min_p"] = torch.rand(rows, generator=g) * 0.2
    any_filter = filters == "top_k_top_p"
    whole = sample(**{**kwargs, "logits": logits.clone()}, any_top_k_top_p=any_filter)
    for chunk_rows in (1, 4, 16):
        monkeypatch.setattr(sampler, "SAMPLE_CHUNK_LOGITS", chunk_rows * vocab)
        chunked = sample(**{**kwargs, "logits": logits.clone()}, any_top_k_top_p=any_filter)
        assert torch.equal(chunked, whole), chunk_rows
    for r, ids in enumerate(suppress):
        assert int(whole[r]) not in ids
    greedy = temperature < 1e-5
    assert torch.equal(whole[greedy], logits.masked_fill(
        torch.zeros_like(logits, dtype=torch.bool).index_put_(
            (torch.tensor([r for r, ids in enumerate(suppress) for _ in ids], dtype=torch.long),
             torch.tensor([i for ids in suppress for i in ids], dtype=torch.long)), torch.tensor(True)),
        float("-inf")).argmax(-1)[greedy])
    assert not torch.equal(whole[~greedy], logits.argmax(-1)[~greedy])  # rows were drawn, not all argmax
