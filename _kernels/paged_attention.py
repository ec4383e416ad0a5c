"""Plain-torch paged attention over a packed batch: the CPU path and the oracle for the GPU kernels."""

import torch
import torch.nn.functional as F

from .kv_quant import as_bytes, dequantize_kv_ref, is_quantized, quantize_kv_ref


def write_kv_ref(
    k: torch.Tensor,  # [T, nkv, hd]
    v: torch.Tensor,  # [T, nkv, hd]
    k_cache: torch.Tensor,  # [num_blocks, block, nkv, hd]
    v_cache: torch.Tensor,  # [num_blocks, block, nkv, hd]
    slot_mapping: torch.Tensor,  # [T] int64: block * block_size + offset
    kv_scale: torch.Tensor | None = None,  # [2] (K, V) scales of a quantized (int8 / fp8) cache
) -> None:
    """Scatter this step's keys and values into their cache slots (in place), quantized for a quantized cache.

    A negative slot marks a padding token (e.g. a batch padded to a captured graph size): it is skipped.
    """
    num_blocks, block_size, nkv, hd = k_cache.shape
    k_flat = k_cache.view(num_blocks * block_size, nkv, hd)  # [slots, nkv, hd], shares k_cache's storage
    v_flat = v_cache.view(num_blocks * block_size, nkv, hd)
    slots = slot_mapping.to(torch.int64)
    if bool((slots < 0).any()):
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    if is_quantized(k_cache):
        k, v = quantize_kv_ref(k, kv_scale[0], k_cache.dtype), quantize_kv_ref(v, kv_scale[1], v_cache.dtype)
        k_flat, v_flat, k, v = as_bytes(k_flat), as_bytes(v_flat), as_bytes(k), as_bytes(v)
    k_flat.index_copy_(0, slots, k.to(k_flat.dtype))
    v_flat.index_copy_(0, slots, v.to(v_flat.dtype))


def _gather_kv(cache: torch.Tensor, block_ids: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """cache [num_blocks, block, nkv, hd], block_ids [..., nb] -> [..., nb * block, nkv, hd] in `dtype` (a copy);
    a quantized cache's codes are dequantized with `scale`."""
    blocks = as_bytes(cache)[block_ids.to(torch.int64)].flatten(-4, -3)  # [..., nb * block, nkv, hd]
    if is_quantized(cache):
        return dequantize_kv_ref(blocks.view(cache.dtype), scale, dtype)
    return blocks.to(dtype)


def check_position_bias(position_bias: torch.Tensor | None, num_heads: int, device: torch.device) -> int:
    """M of a relative position bias table (0 for None): float32 [num_heads, 2M-1] on `device`, where query
    position qp and key position kp add bias[h, clamp(kp - qp, -(M-1), M-1) + M - 1] to head h's score."""
    if position_bias is None:
        return 0
    if not isinstance(position_bias, torch.Tensor):
        raise TypeError(f"position_bias must be a tensor, not {type(position_bias).__name__}")
    if position_bias.dtype != torch.float32:
        raise ValueError(f"position_bias is {position_bias.dtype}; it must be float32")
    if position_bias.dim() != 2 or position_bias.shape[0] != num_heads or position_bias.shape[1] % 2 != 1:
        raise ValueError(f"position_bias has shape {list(position_bias.shape)}; it must be [num_heads, 2M-1] = "
                         f"[{num_heads}, odd]")
    if position_bias.device != device:
        raise ValueError(f"position_bias is on {position_bias.device}, the queries on {device}")
    return (position_bias.shape[1] + 1) // 2


def check_attention_mode(causal: bool, position_bias: torch.Tensor | None, sliding_window: int | None) -> None:
    """Non-causal attention (cross-attention, an encoder) takes neither a sliding window nor, over the paged
    cache, a position bias: its queries have no positions there."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, not {type(causal).__name__}")
    if not causal and sliding_window is not None:
        raise ValueError(f"sliding_window={sliding_window} needs causal attention (causal=False was given)")
    if not causal and position_bias is not None:
        raise ValueError("position_bias needs causal attention over the cache: cross-attention queries have no "
                         "positions relative to the encoder's keys (causal=False was given)")


def _bias_mask(position_bias, q_pos, k_pos, seen, dtype):
    """Additive mask [nh, *q_pos.shape, S]: each (query, key)'s bias entry (zeros without a bias), -inf where
    `seen` [*q_pos.shape, S] is False. q_pos [...], k_pos [..., S] (broadcast against q_pos[..., None])."""
    if position_bias is None:
        mask = torch.zeros((1, *seen.shape), dtype=dtype, device=seen.device)
    else:
        m = (position_bias.shape[1] + 1) // 2
        rel = (k_pos - q_pos[..., None]).clamp(-(m - 1), m - 1) + m - 1  # [..., S] index into the table
        mask = position_bias.to(dtype)[:, rel]  # [nh, ..., S]
    return mask.masked_fill(~seen, float("-inf"))


def _masked_attention(q, k, v, scale, q_pos, k_pos, causal, window, position_bias):
    """q [L, nh, hd] at positions q_pos [L], k, v [S, nkv, hd] at k_pos [S]: softmax(scale q.k + bias) v over
    the keys each query sees (with `causal`, k_pos <= q_pos; with `window` W also k_pos > q_pos - W), in float32
    at least (the bias is float32). A query that sees no key gets 0. Returns [L, nh, hd] in q's dtype."""
    seq_q, nh, hd = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    if k.shape[0] == 0:
        return torch.zeros_like(q)
    group = nh // k.shape[1]
    qh = q.to(dtype).transpose(0, 1)  # [nh, L, hd]
    kh = k.to(dtype).repeat_interleave(group, 1).transpose(0, 1)  # [nh, S, hd]
    vh = v.to(dtype).repeat_interleave(group, 1).transpose(0, 1)
    seen = torch.ones(seq_q, k.shape[0], dtype=torch.bool, device=q.device)  # [L, S]
    if causal:
        seen = k_pos[None, :] <= q_pos[:, None]
        if window:
            seen &= k_pos[None, :] > q_pos[:, None] - window
    mask = _bias_mask(position_bias, q_pos, k_pos[None, :], seen, dtype)  # [nh or 1, L, S]
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)  # [nh, L, hd]
    o = o.masked_fill(~seen.any(1)[None, :, None], 0.0)  # a fully masked row: 0, not NaN
    return o.transpose(0, 1).to(q.dtype)


def _decode_attention(q, k_cache, v_cache, rows, context_lens, block_tables, scale, kv_scale, out, window,
                      position_bias=None):
    """All one-token queries of the batch in one call: each attends to its context (its last `window` positions
    with a sliding window; the blocks before those are not gathered, they may be released), with a position
    bias for the query at position context_len - 1 (then in float32 at least)."""
    d, nh, hd = len(rows), q.shape[1], q.shape[2]
    block_size, nkv = k_cache.shape[1], k_cache.shape[2]
    ctx = context_lens.to(torch.int64)  # [D]
    lo = (ctx - window).clamp(min=0) if window else torch.zeros_like(ctx)  # [D] first position each query sees
    first = lo // block_size  # [D] its block's index in the block table
    num_blocks = int(((ctx + block_size - 1) // block_size - first).max())
    cols = (first[:, None] + torch.arange(num_blocks, device=q.device)).clamp(max=block_tables.shape[1] - 1)
    ids = block_tables.to(torch.int64).gather(1, cols)  # [D, nb]
    k = _gather_kv(k_cache, ids, kv_scale[0], q.dtype).transpose(1, 2)  # [D, nkv, S, hd]
    v = _gather_kv(v_cache, ids, kv_scale[1], q.dtype).transpose(1, 2)  # [D, nkv, S, hd]
    # The q heads sharing one kv head (GQA) stand in for the query-length axis: no kv repeat needed.
    qd = q[rows].view(d, nkv, nh // nkv, hd)  # [D, nkv, group, hd]
    key_pos = first[:, None] * block_size + torch.arange(k.shape[2], device=q.device)  # [D, S]
    # Padding blocks past the context, and positions before the window, masked out.
    mask = ((key_pos < ctx[:, None]) & (key_pos >= lo[:, None]))[:, None, None, :]  # [D, 1, 1, S]
    if position_bias is None:
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=mask, scale=scale)
        out[rows] = o.reshape(d, nh, hd)
        return
    dtype = torch.promote_types(q.dtype, torch.float32)
    seen = mask[:, 0, 0]  # [D, S]
    bias = _bias_mask(position_bias, ctx - 1, key_pos, seen, dtype)  # [nh, D, S]
    bias = bias.transpose(0, 1).reshape(d, nkv, nh // nkv, -1)  # [D, nkv, group, S]
    o = F.scaled_dot_product_attention(qd.to(dtype), k.to(dtype), v.to(dtype), attn_mask=bias, scale=scale)
    o = o.masked_fill(~seen.any(1)[:, None, None, None], 0.0)  # an empty context: 0, not NaN
    out[rows] = o.reshape(d, nh, hd).to(q.dtype)


def _chunk_attention(q, k, v, scale, window=None):
    """q [L, nh, hd] are the last L of the S positions of k, v [S, nkv, hd]; causal, and with `window` query i
    sees only keys j > i - window. Returns [L, nh, hd]."""
    seq_q, nh, hd = q.shape
    seq_k, nkv = k.shape[0], k.shape[1]
    group = nh // nkv
    qg = q.view(seq_q, nkv, group, hd).permute(1, 2, 0, 3)  # [nkv, group, L, hd]
    kg = k.permute(1, 0, 2)[:, None].expand(nkv, group, seq_k, hd)  # [nkv, group, S, hd], a view
    vg = v.permute(1, 0, 2)[:, None].expand(nkv, group, seq_k, hd)
    if seq_q == seq_k and not window:
        o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)
    else:
        # SDPA's is_causal aligns the mask top-left; these queries sit at the end of the keys.
        q_pos = torch.arange(seq_k - seq_q, seq_k, device=q.device)[:, None]  # [L, 1], from the first key
        k_pos = torch.arange(seq_k, device=q.device)[None, :]  # [1, S]
        mask = k_pos <= q_pos  # [L, S]
        if window:
            mask &= k_pos > q_pos - window
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
    return o.permute(2, 0, 1, 3).reshape(seq_q, nh, hd)


def paged_attention_ref(
    q: torch.Tensor,  # [T, nh, hd]
    k_cache: torch.Tensor,  # [num_blocks, block, nkv, hd]
    v_cache: torch.Tensor,  # [num_blocks, block, nkv, hd]
    query_start_loc: torch.Tensor,  # [R+1] int32, cumsum of query lengths
    context_lens: torch.Tensor,  # [R] int32, tokens with KV in the cache (this step's included)
    block_tables: torch.Tensor,  # [R, max_blocks] int32, padded with any valid block id
    scale: float,
    kv_scale: torch.Tensor | None = None,  # [2] (K, V) scales of a quantized cache
    sliding_window: int | None = None,
    causal: bool = True,
    position_bias: torch.Tensor | None = None,  # [nh, 2M-1] float32 relative position bias
) -> torch.Tensor:  # [T, nh, hd]
    """Attention of a packed batch of prefill chunks and decodes over the paged KV cache (GQA-aware).

    Query j of request r sits at position i = context_lens[r] - query_len[r] + j and attends to every cached
    position <= i; with `sliding_window` W only to positions in (i - W, i], as transformers' sliding-window
    mask. Blocks wholly before a request's window are never read: their block-table entries may be stale or
    -1 (released). This step's K/V must already be in the cache (write_kv_ref). A quantized cache is
    dequantized (codes times scale, in float32, then the query's dtype) before the float attention.

    With `position_bias` (M = its width + 1 over 2), the score of head h for the key at position p gets
    position_bias[h, clamp(p - i, -(M-1), M-1) + M - 1] added after the scale (T5's relative bias); the
    attention then runs in float32 at least. With causal=False (cross-attention) every query of request r
    attends to all context_lens[r] cached keys, whatever its query length (no window, no bias); a request
    with no key gets 0.
    """
    check_attention_mode(causal, position_bias, sliding_window)
    check_position_bias(position_bias, q.shape[1], q.device)
    kv_scale = (None, None) if kv_scale is None else kv_scale
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    ctx_lens = context_lens.tolist()
    block_size = k_cache.shape[1]
    decodes = [r for r in range(len(ctx_lens)) if starts[r + 1] - starts[r] == 1]
    if decodes:
        idx = torch.tensor(decodes, device=q.device)
        rows = query_start_loc[:-1].to(torch.int64)[idx]  # [D] token index of each decode
        # A one-token query at position context_len - 1 sees every key, causal or not (no window without causal).
        _decode_attention(q, k_cache, v_cache, rows, context_lens[idx], block_tables[idx], scale, kv_scale, out,
                          sliding_window, position_bias)
    for r in range(len(ctx_lens)):
        start, end = starts[r], starts[r + 1]
        if end - start <= 1:
            continue
        ctx = ctx_lens[r]
        # The first block holding a key that the chunk's first query sees.
        first = max(0, ctx - (end - start) - sliding_window + 1) // block_size if sliding_window else 0
        blocks = block_tables[r, first:(ctx + block_size - 1) // block_size]
        key_start = first * block_size
        k = _gather_kv(k_cache, blocks, kv_scale[0], q.dtype)[: ctx - key_start]  # [S, nkv, hd]
        v = _gather_kv(v_cache, blocks, kv_scale[1], q.dtype)[: ctx - key_start]
        if causal and position_bias is None:
            out[start:end] = _chunk_attention(q[start:end], k, v, scale, sliding_window)
        else:
            q_pos = torch.arange(ctx - (end - start), ctx, device=q.device)  # [L] (unused without causal)
            k_pos = torch.arange(key_start, ctx, device=q.device)  # [S]
            out[start:end] = _masked_attention(q[start:end], k, v, scale, q_pos, k_pos, causal, sliding_window,
                                               position_bias)
    return out


def varlen_attention_ref(
    q: torch.Tensor,  # [T, nh, hd]
    k: torch.Tensor,  # [T, nkv, hd]
    v: torch.Tensor,  # [T, nkv, hd]
    query_start_loc: torch.Tensor,  # [R+1] int32
    scale: float,
    causal: bool = True,
    position_bias: torch.Tensor | None = None,  # [nh, 2M-1] float32 relative position bias
    sliding_window: int | None = None,
) -> torch.Tensor:  # [T, nh, hd]
    """Attention of each request over its own new tokens only (no cache: whole prompts, an encoder's input),
    at positions 0..len-1: with `causal` token i sees tokens j <= i (with `sliding_window` W only j > i - W),
    without it every token of its request (the encoder). `position_bias` adds
    position_bias[h, clamp(j - i, -(M-1), M-1) + M - 1] to head h's scaled score, as in paged_attention_ref
    (the attention then runs in float32 at least)."""
    check_attention_mode(causal, None, sliding_window)
    check_position_bias(position_bias, q.shape[1], q.device)
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for start, end in zip(starts[:-1], starts[1:]):
        if end <= start:
            continue
        if causal and position_bias is None:
            out[start:end] = _chunk_attention(q[start:end], k[start:end], v[start:end], scale, sliding_window)
        else:
            pos = torch.arange(end - start, device=q.device)  # [L]
            out[start:end] = _masked_attention(q[start:end], k[start:end], v[start:end], scale, pos, pos, causal,
                                               sliding_window, position_bias)
    return out


def varlen_causal_attention_ref(
    q: torch.Tensor,  # [T, nh, hd]
    k: torch.Tensor,  # [T, nkv, hd]
    v: torch.Tensor,  # [T, nkv, hd]
    query_start_loc: torch.Tensor,  # [R+1] int32
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [T, nh, hd]
    """Causal attention of each request over its own new tokens only (no cache: whole prompts); with
    `sliding_window` W, token i sees tokens j > i - W only. varlen_attention_ref with causal=True."""
    return varlen_attention_ref(q, k, v, query_start_loc, scale, sliding_window=sliding_window)
