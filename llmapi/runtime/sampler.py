"""Batched next-token sampling on the device: suppression, temperature, top-k/top-p/min-p, seeded Gumbel-max."""

from __future__ import annotations

import math

import torch

# Temperatures below this are greedy: dividing by a near-zero temperature overflows the logits to
# inf, and inf - inf in the softmax gives NaN (vLLM uses the same cut-off).
GREEDY_TEMPERATURE_EPS = 1e-5

_MASK32 = 0xFFFFFFFF
# murmur3 fmix32 multipliers, held as their negative twins (c - 2**32, equal to c modulo 2**32).
# A 32-bit value times a number of magnitude below 2**31 stays inside int64, so no multiply ever
# overflows: signed overflow is undefined in C++, and CPU and CUDA kernels need not agree on it.
_FMIX_C1 = 0x85EBCA6B - (1 << 32)
_FMIX_C2 = 0xC2B2AE35 - (1 << 32)
_GOLDEN32 = 0x9E3779B9  # added between absorbed words so that an all-zero key does not stay zero
_KEY_INIT = 0x243F6A88  # any fixed odd-looking start value: the first 32 bits of pi
_U_BITS = 23  # float32 holds (k + 0.5) * 2**-23 exactly for k < 2**23, so u never rounds to 0 or 1


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for x [R, V] (the first index of each row's maximum), in two passes: the max of each
    chunk, then the first chunk holding the largest. torch reduces one row of a 128K vocabulary in a single
    thread block (28 us on an H100, as long as a decode step's attention); chunks spread it over the GPU. The
    Triton kernel (_kernels/argmax.py) on a GPU, torch's reductions over about sqrt(V) chunks otherwise."""
    from llmapi.layers.dispatch import use_triton

    if use_triton(x) and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.stride(-1) == 1:
        from llmapi._kernels.argmax import row_argmax

        return row_argmax(x)
    rows, vocab = x.shape
    root = math.isqrt(vocab)
    chunk = next((c for c in range(max(root, 1), 4 * root + 1) if vocab % c == 0), None)
    if vocab < 4096 or chunk is None:
        return x.argmax(dim=-1)
    values, within = x.reshape(rows, vocab // chunk, chunk).max(dim=-1)  # [R, C]; max(dim) gives the first index
    best = values.argmax(dim=-1, keepdim=True)  # [R, 1] the first chunk with the row's maximum
    return (best * chunk + within.gather(1, best)).squeeze(1)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 values in [0, 2**32); returns a new tensor of the same shape."""
    h = h ^ (h >> 16)
    h = (h * _FMIX_C1) & _MASK32
    h = h ^ (h >> 13)
    h = (h * _FMIX_C2) & _MASK32
    return h ^ (h >> 16)


def _fmix32_(h: torch.Tensor) -> torch.Tensor:
    """In-place _fmix32 for the [R, V] noise tensor: one temporary at a time instead of five."""
    h.bitwise_xor_(h >> 16)
    h.mul_(_FMIX_C1).bitwise_and_(_MASK32)
    h.bitwise_xor_(h >> 13)
    h.mul_(_FMIX_C2).bitwise_and_(_MASK32)
    h.bitwise_xor_(h >> 16)
    return h


def row_keys(seeds: torch.Tensor, sample_index: torch.Tensor, output_index: torch.Tensor) -> torch.Tensor:
    """32-bit hash key of each row's (seed, sample_index, output_index): [R] int64 in [0, 2**32).

    Every input word is absorbed through a full fmix32 round, so keys of neighbouring output
    indices (or seeds) are unrelated.
    """
    seeds = seeds.to(torch.int64)
    words = (
        seeds & _MASK32,
        (seeds >> 32) & _MASK32,
        sample_index.to(torch.int64) & _MASK32,
        output_index.to(torch.int64) & _MASK32,
    )
    h = torch.full_like(seeds, _KEY_INIT)  # [R]
    for word in words:
        h = _fmix32(((h ^ word) + _GOLDEN32) & _MASK32)
    return h


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise g = -log(-log u), u = hash(key of the row, token id) in (0, 1).

    keys: [R] int64 from row_keys; token_ids: [R, V] or [1, V] integer ids. Returns [R, V] float32.
    The noise of a token depends only on its row key and its id, never on its column or on the
    other rows, which is what makes a seeded request reproducible in any batch.
    """
    h = keys.unsqueeze(1) ^ token_ids.to(torch.int64)  # [R, V] int64
    _fmix32_(h)
    u = (h >> (32 - _U_BITS)).to(torch.float32)  # [R, V]
    del h
    u.add_(0.5).mul_(2.0**-_U_BITS)
    return u.log_().neg_().log_().neg_()


def apply_min_p_(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf (in place) the tokens whose probability is below min_p times the row's top one.

    logits: [R, V] float32 in any column order; min_p: [R] float (0 = off). The float ops mirror
    transformers' MinPLogitsWarper (min_tokens_to_keep=1: the most likely token always stays).
    """
    probs = logits.softmax(dim=-1)  # [R, V]
    top = probs.amax(dim=-1, keepdim=True)  # [R, 1]
    remove = probs < min_p.to(torch.float32).unsqueeze(1) * top  # [R, V]
    del probs
    remove.scatter_(1, logits.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill_(remove, float("-inf"))


def suppress_(logits: torch.Tensor, suppress_offsets: torch.Tensor, suppress_ids: torch.Tensor) -> torch.Tensor:
    """Set to -inf (in place) the ids of each row's CSR entries: suppress_ids[off[r]:off[r+1]] in row r."""
    num_suppressed = suppress_ids.shape[0]
    if num_suppressed > 0:  # a shape, known on the host: no sync
        entries = torch.arange(num_suppressed, device=logits.device)  # [S]
        # Row of each CSR entry: the number of row ends (offsets[1:]) at or before it.
        rows = torch.searchsorted(suppress_offsets[1:].to(torch.int64).contiguous(), entries, right=True)  # [S]
        # new_full fills on the device: no host-to-device copy, so CUDA graphs can capture this.
        logits.index_put_((rows, suppress_ids.to(torch.int64)), logits.new_full((), float("-inf")))
    return logits


def _sorted_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
    min_p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row ascending (once) and mask what top-k, top-p then min-p remove, in sorted order.

    Returns (sorted_logits [R, V] float32 with removed entries at -inf, sorted_ids [R, V] int64).
    Ascending order and the float ops mirror transformers' TopKLogitsWarper, TopPLogitsWarper and
    MinPLogitsWarper, applied in that order.
    """
    vocab_size = logits.shape[1]
    sorted_logits, sorted_ids = logits.sort(dim=-1)  # [R, V] ascending
    if top_k is not None:
        k = top_k.to(torch.int64)
        k = torch.where((k <= 0) | (k > vocab_size), vocab_size, k)  # [R]; 0 = off
        kth_largest = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))  # [R, 1]
        # "<" rather than a position cut keeps ties with the k-th value, as TopKLogitsWarper does.
        sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        top_p = top_p.to(torch.float32)
        cum_probs = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)  # [R, V], in place: one tensor
        remove = cum_probs <= (1.0 - top_p).unsqueeze(1)  # [R, V] bool
        del cum_probs
        remove[:, -1] = False  # always keep the most likely token (min_tokens_to_keep=1)
        # top_p == 1 is off, as in transformers, which then skips the warper: without this, tokens
        # whose probability underflows to 0 would be removed.
        remove &= (top_p < 1.0).unsqueeze(1)
        sorted_logits.masked_fill_(remove, float("-inf"))
    if min_p is not None:
        apply_min_p_(sorted_logits, min_p)
    return sorted_logits, sorted_ids


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Set to -inf the logits that top-k (per row k, 0 = off) and then top-p (1 = off) remove.

    logits: [R, V] float32; top_k: [R] int (or None); top_p: [R] float (or None).
    Returns a new [R, V] tensor in the original token order; the same tokens stay finite as with
    transformers' TopKLogitsWarper then TopPLogitsWarper (min_tokens_to_keep=1).
    """
    sorted_logits, sorted_ids = _sorted_top_k_top_p(logits, top_k, top_p)
    return torch.empty_like(sorted_logits).scatter_(1, sorted_ids, sorted_logits)


# sample() draws the sampled rows of a batch in chunks of at most this many logits: the draw's temporaries (the sort's
# values and int64 ids, the noise's int64 hashes, the cumulative probabilities) take about 30 bytes a logit, 7.7 GB
# for 2,048 rows of a 128K vocabulary, against 1 GB a chunk. A row's draw depends on that row alone, so chunks give
# the same tokens.
SAMPLE_CHUNK_LOGITS = 1 << 25


def _check_shapes(logits: torch.Tensor, **per_row: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [R, V], got shape {tuple(logits.shape)}")
    num_rows = logits.shape[0]
    for name, tensor in per_row.items():
        if tuple(tensor.shape) != (num_rows,):
            raise ValueError(f"{name} must have shape [{num_rows}], got {tuple(tensor.shape)}")


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    output_index: torch.Tensor,
    suppress_offsets: torch.Tensor,
    suppress_ids: torch.Tensor,
    sample_index: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
    *,
    all_greedy: bool = False,
    any_top_k_top_p: bool = True,
) -> torch.Tensor:
    """Pick one token per row; all tensors on the logits' device, no host sync, no per-row loop.

    logits: [R, V] float32. temperature: [R] float (< 1e-5 means greedy). top_k: [R] int (0 = off).
    top_p: [R] float (1 = off). seeds: [R] int64. output_index: [R] int (index of the token being
    sampled in its request's output). suppress_offsets: [R+1] int CSR offsets into suppress_ids: [S]
    token ids set to -inf for that row (EOS and stop ids while under min_tokens).
    sample_index: [R] int, which of a request's parallel samples this is (default 0).
    min_p: [R] float (0 = off), applied after top-k and top-p; None: off for every row.
    all_greedy / any_top_k_top_p: optional hints the caller knows from host-side settings; they
    only skip work (hashing, the sort) and never change the result when true to the batch.
    Returns [R] int64 token ids.

    A sampled row draws argmax(filtered logits / T + g) with Gumbel noise g hashed from
    (seed, sample_index, output_index, token id): the same request gives the same tokens whatever
    batch it is in, and after preemption and recomputation.
    """
    num_rows, vocab_size = logits.shape if logits.dim() == 2 else (0, 0)
    if sample_index is None:
        sample_index = torch.zeros(num_rows, dtype=torch.int64, device=logits.device)
    _check_shapes(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds,
        output_index=output_index, sample_index=sample_index,
        **({} if min_p is None else {"min_p": min_p}),
    )
    if tuple(suppress_offsets.shape) != (num_rows + 1,):
        raise ValueError(f"suppress_offsets must have shape [{num_rows + 1}], got {tuple(suppress_offsets.shape)}")

    greedy = temperature < GREEDY_TEMPERATURE_EPS  # [R] bool
    # The division makes the one private [R, V] copy that suppression may then write into.
    scaled = logits.to(torch.float32) / temperature.to(torch.float32).masked_fill(greedy, 1.0).unsqueeze(1)

    suppress_(scaled, suppress_offsets, suppress_ids)

    greedy_ids = scaled.argmax(dim=-1)  # [R] int64
    if all_greedy:
        return greedy_ids

    keys = row_keys(seeds, sample_index, output_index)  # [R]
    rows = max(1, SAMPLE_CHUNK_LOGITS // max(vocab_size, 1))
    sampled_ids = torch.cat([
        _draw(scaled[a:a + rows], keys[a:a + rows], top_k[a:a + rows], top_p[a:a + rows],
              None if min_p is None else min_p[a:a + rows], any_top_k_top_p)
        for a in range(0, num_rows, rows)]) if num_rows > rows else \
        _draw(scaled, keys, top_k, top_p, min_p, any_top_k_top_p)
    return torch.where(greedy, greedy_ids, sampled_ids)


def _draw(scaled: torch.Tensor, keys: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
          min_p: torch.Tensor | None, any_top_k_top_p: bool) -> torch.Tensor:
    """sample()'s draw of each row of `scaled` [R, V] float32 (suppressed, divided by the temperature; written to):
    argmax of the filtered logits plus the rows' Gumbel noise. Returns [R] int64."""
    if any_top_k_top_p:
        # Sample in sorted order: the noise follows the token id, so the argmax is the same as in
        # vocabulary order, and no scatter back is needed.
        sorted_logits, sorted_ids = _sorted_top_k_top_p(scaled, top_k, top_p, min_p)  # [R, V] each
        best = sorted_logits.add_(gumbel_noise(keys, sorted_ids)).argmax(dim=-1, keepdim=True)  # [R, 1]
        return sorted_ids.gather(1, best).squeeze(1)  # [R]
    if min_p is not None:
        apply_min_p_(scaled, min_p)
    vocab_ids = torch.arange(scaled.shape[1], device=scaled.device).unsqueeze(0)  # [1, V]
    return scaled.add_(gumbel_noise(keys, vocab_ids)).argmax(dim=-1)  # [R]
