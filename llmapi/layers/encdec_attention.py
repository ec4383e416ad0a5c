"""Attention of encoder-decoder models: the encoder's (non-causal, over each row's own tokens), the decoder's self
attention (causal, over the paged cache, with an optional relative position bias) and cross-attention (over the
request's cross blocks, which its encoder step filled)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmapi._kernels.paged_attention import paged_attention_ref, varlen_attention_ref, write_kv_ref
from llmapi.layers.dispatch import use_triton


@dataclass
class CrossMetadata:
    """The encoder inputs of a step and where every row's cross-attention K/V lies (AttentionMetadata.cross).

    Rows running their encoder this step have encoder_lens > 0; their encoder tokens are back to back in row order.
    """

    encoder_ids: torch.Tensor
    """[E] int32: encoder tokens of the rows whose encoder runs now."""
    encoder_positions: torch.Tensor
    """[E] int32: each encoder token's position in its row (0 ..)."""
    encoder_start_loc: torch.Tensor
    """[Re+1] int32: cumulative encoder lengths of those rows, starting at 0."""
    encoder_max_len: int
    """Longest encoder input of the step (0: no encoder runs)."""
    encoder_slot_mapping: torch.Tensor
    """[E] int64: each encoder token's slot in its row's cross blocks."""
    cross_lens: torch.Tensor
    """[R] int32: every row's encoder length (its cross K/V tokens)."""
    cross_block_tables: torch.Tensor
    """[R, max_cross_blocks] int32: every row's cross blocks, padded with 0."""
    max_cross_len: int
    """Largest cross_lens entry."""
    encoder_adapter_slots: torch.Tensor | None = None
    """[E] int32: each encoder token's LoRA adapter slot (its request's; -1: none), or None when no request of the
    step has an adapter."""

    @property
    def num_encoder_tokens(self) -> int:
        return int(self.encoder_ids.shape[0])


def encoder_attention(q, k, v, cross: CrossMetadata, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """[E, nh, hd] x3 -> [E, nh, hd]: every encoder token attends to all tokens of its own row (+ bias)."""
    if use_triton(q):
        from llmapi._kernels.varlen_attention import varlen_attention

        return varlen_attention(q, k, v, cross.encoder_start_loc, cross.encoder_max_len, scale, causal=False,
                                position_bias=bias)
    return varlen_attention_ref(q, k, v, cross.encoder_start_loc, scale, causal=False, position_bias=bias)


def _check_kv_scale(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> None:
    # A quantized (int8 / float8) cache is written and read with its attention's [2] (K, V) scales, a float one
    # without: the model gives every attention over the cache a scale exactly when the runner quantizes the cache.
    assert (kv_scale is not None) == (kv_cache.dtype in (torch.int8, torch.float8_e4m3fn)), \
        f"KV cache of dtype {kv_cache.dtype} with kv_scale {'set' if kv_scale is not None else 'None'}"


def write_kv(k, v, kv_cache, slot_mapping, kv_scale=None) -> None:
    """K/V [N, nkv, hd] into the layer's paged cache at `slot_mapping` [N]; a quantized cache takes the codes of
    K / kv_scale[0] and V / kv_scale[1]."""
    _check_kv_scale(kv_cache, kv_scale)
    if use_triton(k):
        from llmapi._kernels.kv_write import write_kv as write_kv_triton

        write_kv_triton(k, v, kv_cache[0], kv_cache[1], slot_mapping, kv_scale)
    else:
        write_kv_ref(k, v, kv_cache[0], kv_cache[1], slot_mapping, kv_scale)


def paged_attention(q, kv_cache, query_start_loc, context_lens, block_tables, max_query_len: int, max_context_len: int,
                    scale: float, causal: bool, bias: torch.Tensor | None, kv_scale=None) -> torch.Tensor:
    """[T, nh, hd] -> [T, nh, hd] over the paged cache: causal (the decoder's self attention, the query's position
    is its row's context length minus the tokens after it) or not (cross-attention: every cached key of the row).
    A quantized cache is read as codes times kv_scale [2] (K, V)."""
    _check_kv_scale(kv_cache, kv_scale)
    if use_triton(q):
        from llmapi._kernels.decode_attention import num_splits_for, paged_decode_attention
        from llmapi._kernels.prefill_attention import paged_packed_attention

        if max_query_len == 1:
            splits = num_splits_for(q.shape[0], kv_cache.shape[3], max_context_len,
                                    quantized=kv_cache.element_size() == 1)
            return paged_decode_attention(q, kv_cache[0], kv_cache[1], context_lens, block_tables, scale, splits,
                                          kv_scale=kv_scale, position_bias=bias, max_context_len=max_context_len)
        return paged_packed_attention(q, kv_cache[0], kv_cache[1], query_start_loc, context_lens, block_tables, scale,
                                      kv_scale=kv_scale, causal=causal, position_bias=bias,
                                      max_query_len=max_query_len)
    return paged_attention_ref(q, kv_cache[0], kv_cache[1], query_start_loc, context_lens, block_tables, scale,
                               kv_scale, causal=causal, position_bias=bias)
