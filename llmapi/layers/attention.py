"""Attention over the paged KV cache for a packed batch of prefill chunks and decodes (no padding)."""

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from llmapi._kernels.fp8_linear import Fp8Input
from llmapi._kernels.paged_attention import paged_attention_ref, varlen_causal_attention_ref, write_kv_ref
from llmapi.layers import dispatch
from llmapi.layers.dispatch import use_triton
from llmapi.layers.flash_prefill import flash_applies
from llmapi.layers.rotary import rotate_qk


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache; shared by every attention layer of a step.

    Query token j of request r has absolute position context_lens[r] - query_lens[r] + j and attends
    causally to positions <= its own (all earlier KV is in the paged cache).
    """

    slot_mapping: torch.Tensor
    """[T] int64: block * tokens_per_block + offset, where each new token's K/V goes (negative: skip)."""
    query_lens: torch.Tensor
    """[R] int32: new tokens of each request in this step."""
    context_lens: torch.Tensor
    """[R] int32: tokens with KV after this step, this step's included."""
    query_start_loc: torch.Tensor
    """[R+1] int32: cumulative sum of query_lens, starting at 0."""
    block_tables: torch.Tensor
    """[R, max_blocks] int32: each request's block ids in order, padded with 0."""
    max_query_len: int
    """Largest query_lens entry."""
    max_context_len: int
    """Largest context_lens entry."""
    tokens_per_block: int
    """Tokens held by one KV block."""
    num_kv_splits: int = 0
    """CUDA decode steps: context splits per request (split-K); 0 picks a number from the batch."""
    num_decodes: int = 0
    """Leading requests with one query token each: in a step that also prefills, the Triton path runs these
    through the decode kernel and only the rest through the packed kernel (0: all through the packed one)."""
    cross: "object | None" = None
    """Encoder-decoder models: the step's encoder inputs and cross-attention blocks
    (llmapi.layers.encdec_attention.CrossMetadata); None for decoder-only models."""
    context_lens_cpu: "object | None" = None
    """[R] the context lengths on the host (a numpy array) where the step's builder has them (eager steps): what
    attn_backend="flash" sizes its gathers by without a device sync; None elsewhere."""
    scratch: dict = field(default_factory=dict, repr=False)
    """What the step's first attention layer derives from this metadata for the others (flash_prefill)."""

    @classmethod
    def build(cls, query_lens, context_lens, block_tables, tokens_per_block: int, slot_mapping=None, device=None):
        """Derive the cumulative and max fields (and slot_mapping when not given) from per-request lengths.

        Arguments may be lists, numpy arrays or tensors; the result lives on `device`.
        """
        host_lens = None if isinstance(context_lens, torch.Tensor) else context_lens  # lists, numpy arrays
        query_lens = torch.as_tensor(query_lens, dtype=torch.int32, device=device)  # [R]
        context_lens = torch.as_tensor(context_lens, dtype=torch.int32, device=device)  # [R]
        block_tables = torch.as_tensor(block_tables, dtype=torch.int32, device=device)  # [R, max_blocks]
        query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32, device=device)  # [R+1]
        query_start_loc[1:] = torch.cumsum(query_lens, 0)
        if slot_mapping is None:
            req = torch.repeat_interleave(torch.arange(len(query_lens), device=device), query_lens.long())  # [T]
            index_in_query = torch.arange(len(req), device=device) - query_start_loc[req]  # [T]
            positions = (context_lens - query_lens)[req] + index_in_query  # [T]
            block_ids = block_tables[req, positions // tokens_per_block].long()  # [T]
            slot_mapping = block_ids * tokens_per_block + positions % tokens_per_block
        return cls(
            slot_mapping=torch.as_tensor(slot_mapping, dtype=torch.int64, device=device),
            query_lens=query_lens,
            context_lens=context_lens,
            query_start_loc=query_start_loc,
            block_tables=block_tables,
            max_query_len=int(query_lens.max()) if len(query_lens) else 0,
            max_context_len=int(context_lens.max()) if len(context_lens) else 0,
            tokens_per_block=int(tokens_per_block),
            context_lens_cpu=None if host_lens is None else np.asarray(host_lens, dtype=np.int64),
        )


class Attention(nn.Module):
    """Writes this step's K/V into the layer's paged cache, then attends over it.

    Head counts come from the tensors, so a tensor-parallel shard (fewer heads per rank) needs no change here.
    An int8 / float8 cache (its dtype says which) is written quantized and read dequantized with the [2]
    (K, V) `kv_cache_scaling_factor` that llmapi.quantization.kv_cache gives the module.

    With `sliding_window` W (Mistral, StarCoder2), the query at position i attends to positions i - W < j <= i
    only, as transformers' sliding-window mask; the kernels skip the KV tiles wholly before the window, and
    the blocks there are never read (the executor hands them back, so their block-table entries may be -1).
    """

    def __init__(self, scale: float, sliding_window: int | None = None):
        super().__init__()
        if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                           or sliding_window < 1):
            raise ValueError(f"sliding_window={sliding_window!r} is invalid: must be None or an int >= 1")
        self.scale = scale
        self.sliding_window = sliding_window
        self.register_parameter("kv_cache_scaling_factor", None)  # [2] with a quantized cache
        # KvCacheConfig.use_fp8_context_fmha (set by the runner over an fp8 cache): the packed kernel's FP8 dots.
        self.fp8_context_fmha = False
        # LlmArgs.attn_backend == "flash" (set by the runner, set_attn_backend): prefill rows through torch's
        # FlashAttention (llmapi.layers.flash_prefill) where the layer has no window.
        self.flash_prefill = False
        self._kv_scales = None  # the cache's (K, V) scales as Python floats, read once (flash_prefill)

    def forward(
        self,
        q: torch.Tensor,  # [T, nh, hd]
        k: torch.Tensor,  # [T, nkv, hd]
        v: torch.Tensor,  # [T, nkv, hd]
        kv_cache: torch.Tensor | None,  # [2, num_blocks, tokens_per_block, nkv, hd]; 0 = K, 1 = V
        attn: AttentionMetadata,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,  # (cos, sin) [T, hd] to apply to q and k first
        quant_scale: torch.Tensor | None = None,  # the next FP8 linear's static input scale (see below)
    ):  # [T, nh, hd]
        """The attention output; with `quant_scale`, the Triton kernels store it as that FP8 linear's E4M3
        input, an Fp8Input of codes [T, nh, hd] (the torch path ignores it and returns the output)."""
        kv_scale = self.kv_cache_scaling_factor
        assert kv_cache is None or (kv_scale is not None) == (kv_cache.dtype in (torch.int8, torch.float8_e4m3fn))
        window = self.sliding_window
        if kv_cache is not None and use_triton(q):
            flash = self.flash_prefill and window is None \
                and flash_applies(attn, attn.num_decodes, q.shape[0] - attn.num_decodes)
            if flash and kv_scale is not None and self._kv_scales is None:
                self._kv_scales = tuple(float(x) for x in kv_scale.tolist())
            out = _attention_triton(q, k, v, kv_cache, attn, self.scale, rotary, kv_scale, quant_scale, window,
                                    self.fp8_context_fmha, flash, self._kv_scales)
            return out if quant_scale is None else Fp8Input(out, quant_scale, q.dtype)
        if rotary is not None:
            q, k = rotate_qk(q, k, *rotary)
        if kv_cache is None:
            # No cache (e.g. a memory-profiling run): every request's query is its whole sequence.
            return varlen_causal_attention_ref(q, k, v, attn.query_start_loc, self.scale, window)
        write_kv_ref(k, v, kv_cache[0], kv_cache[1], attn.slot_mapping, kv_scale)
        return paged_attention_ref(
            q, kv_cache[0], kv_cache[1], attn.query_start_loc, attn.context_lens, attn.block_tables, self.scale,
            kv_scale, window,
        )

    def extra_repr(self) -> str:
        window = "" if self.sliding_window is None else f", sliding_window={self.sliding_window}"
        return f"scale={self.scale:.4g}{window}"


def set_attn_backend(model: nn.Module, backend: str, dtype: torch.dtype, device: torch.device,
                     fp8_context_fmha: bool = False) -> int:
    """LlmArgs.attn_backend: "triton" (every step in the Triton kernels) or "flash" (the model's decoder-only
    Attention layers take prefill rows through torch's FlashAttention, llmapi.layers.flash_prefill); how many
    layers take it. ValueError where it cannot run (not a GPU, float32 activations, no such layers, or with
    use_fp8_context_fmha, which is the packed kernel's)."""
    from llmapi.layers.flash_prefill import BACKENDS, flash_unavailable

    if backend not in BACKENDS:
        raise ValueError(f"attn_backend={backend!r} is invalid: must be one of {', '.join(BACKENDS)}")
    if backend == "triton":
        return 0
    if device.type == "cuda" or not dispatch.TRITON_ON_CPU:
        reason = flash_unavailable(device, dtype)
        if reason is not None:
            raise ValueError(f"attn_backend='flash' {reason}")
    if fp8_context_fmha:
        raise ValueError("attn_backend='flash' and use_fp8_context_fmha exclude each other: the FP8 context FMHA "
                         "is the Triton packed kernel's")
    return _set_on_layers(model, "flash_prefill", "attn_backend='flash'")


def _set_on_layers(model: nn.Module, flag: str, setting: str) -> int:
    """Turns `flag` on in each of the model's decoder-only Attention layers; how many. ValueError naming `setting`
    where there are none (encoder-decoder models' attention takes neither setting)."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"{setting} applies to decoder-only models' attention; {type(model).__name__} has none")
    for m in layers:
        setattr(m, flag, True)
    return len(layers)


def enable_fp8_context_fmha(model: nn.Module, kv_dtype: torch.dtype, device: torch.device) -> int:
    """KvCacheConfig.use_fp8_context_fmha: the model's Attention layers take the packed kernel's FP8 dots; how
    many. ValueError unless the cache is fp8, the Triton kernels run on `device` and the model has such layers
    (encoder-decoder models' attention does not take it)."""
    if kv_dtype != torch.float8_e4m3fn:
        raise ValueError(f"use_fp8_context_fmha needs an fp8 KV cache (kv_cache_dtype fp8); this one is {kv_dtype}")
    if device.type != "cuda" and not dispatch.TRITON_ON_CPU:
        raise ValueError(f"use_fp8_context_fmha runs in the Triton kernels, on a GPU; the device is {device}")
    return _set_on_layers(model, "fp8_context_fmha", "use_fp8_context_fmha")


def _attention_triton(q, k, v, kv_cache, attn: AttentionMetadata, scale: float, rotary, kv_scale,
                      quant_scale=None, window: int | None = None, fp8_attention: bool = False,
                      flash: bool = False, kv_scales: tuple[float, float] | None = None) -> torch.Tensor:
    """The Triton kernels: (rotary +) KV write, then split-K decode attention or packed attention (their
    output E4M3 codes at `quant_scale` when given), each over the last `window` positions with a window; with
    `fp8_attention` the packed kernel's dots on E4M3 operands. With `flash` the prefill rows go through
    flash_prefill instead of the packed kernel (`kv_scales`: a quantized cache's (K, V) scales as floats)."""
    from llmapi._kernels.decode_attention import attention_out, num_splits_for, paged_decode_attention
    from llmapi._kernels.kv_write import write_kv
    from llmapi._kernels.prefill_attention import paged_packed_attention
    from llmapi._kernels.rotary import rotary_qk_, rotary_write_kv_

    if rotary is not None and flash:  # flash_prefill reads this step's rotated keys: k is rotated in place too
        rotary_qk_(q, k, *rotary)
        write_kv(k, v, kv_cache[0], kv_cache[1], attn.slot_mapping, kv_scale)
    elif rotary is not None:
        rotary_write_kv_(q, k, v, *rotary, kv_cache[0], kv_cache[1], attn.slot_mapping, kv_scale)
    else:
        write_kv(k, v, kv_cache[0], kv_cache[1], attn.slot_mapping, kv_scale)
    read = attn.max_context_len if window is None else min(attn.max_context_len, window)  # keys a query reads
    quantized = kv_cache.element_size() == 1  # int8 / fp8 codes
    if attn.max_query_len == 1:  # decodes only: request r's token is row r
        splits = attn.num_kv_splits or num_splits_for(q.shape[0], k.shape[1], read, quantized=quantized)
        if window is not None:  # a graph's splits are sized for its longest context, not for the window
            splits = min(splits, num_splits_for(q.shape[0], k.shape[1], read, quantized=quantized))
        return paged_decode_attention(q, kv_cache[0], kv_cache[1], attn.context_lens, attn.block_tables, scale,
                                      splits, kv_scale=kv_scale, quant_scale=quant_scale, sliding_window=window,
                                      max_context_len=read)
    d = attn.num_decodes
    if flash:
        from llmapi.layers.flash_prefill import flash_prefill

        if d == 0:
            return flash_prefill(q, k, v, kv_cache, attn, 0, scale, kv_scales, quant_scale)
    if d == 0:
        return paged_packed_attention(q, kv_cache[0], kv_cache[1], attn.query_start_loc, attn.context_lens,
                                      attn.block_tables, scale, kv_scale=kv_scale, quant_scale=quant_scale,
                                      sliding_window=window, max_query_len=attn.max_query_len,
                                      fp8_attention=fp8_attention)
    # The leading decodes (rows 0..d-1, one per request) through the decode kernel: the packed kernel gives a
    # one-token request a whole query tile. The tails are copied: a view d rows in would move the kernels'
    # pointer alignment from step to step (Triton compiles a kernel per alignment).
    out = attention_out(q, None, quant_scale)
    splits = num_splits_for(d, k.shape[1], read, quantized=quantized)
    paged_decode_attention(q[:d], kv_cache[0], kv_cache[1], attn.context_lens[:d], attn.block_tables[:d], scale,
                           splits, out=out[:d], kv_scale=kv_scale, quant_scale=quant_scale, sliding_window=window,
                           max_context_len=read)
    if flash:
        flash_prefill(q[d:], k[d:], v[d:], kv_cache, attn, d, scale, kv_scales, quant_scale, out=out[d:])
        return out
    paged_packed_attention(q[d:], kv_cache[0], kv_cache[1], attn.query_start_loc[d:] - d, attn.context_lens[d:].clone(),
                           attn.block_tables[d:].clone(), scale, out=out[d:], kv_scale=kv_scale,
                           quant_scale=quant_scale, sliding_window=window, max_query_len=attn.max_query_len,
                           fp8_attention=fp8_attention)
    return out
