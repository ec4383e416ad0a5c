"""Prefill attention through torch's FlashAttention (LlmArgs.attn_backend="flash").

The packed Triton kernel reads K/V from the paged cache in place; FlashAttention's varlen kernel wants each
request's keys contiguous. This step's own keys and values are at hand as the layer computed them (K rotated,
in the model dtype), so a step of whole prompts attends over them directly, with no copy; a row with earlier
context (a prompt chunk after the first) has that context gathered from the cache, dequantized for an int8 / fp8
cache, into one contiguous [keys, kv heads, head_dim] copy per layer beside the step's keys (what TensorRT-LLM's
and vLLM's context attention read too: the fresh keys unquantized, the cached ones as cached). One varlen call,
causal from the bottom right (query j of a request with L queries and C keys sees keys <= C - L + j). The copy's
index plan is computed once per step and shared by the layers. Decodes stay on the Triton decode kernel, and a
layer with a sliding window stays on the packed kernel (its blocks before the window may be gone).
"""

from typing import NamedTuple

import torch

from llmapi._kernels.fp8_linear import quantize_fp8
from llmapi.layers.dispatch import use_triton

BACKENDS = ("triton", "flash")
"""LlmArgs.attn_backend's values: the Triton kernels for every step, or FlashAttention for prefill rows."""
KEYS_PER_QUERY = 16
"""A step's prefill rows take the gathered copy when their contexts hold at most this many keys per query token
(a prompt chunk holds 1-3: its attention's work grows with queries x keys, the copy's with keys alone); rows of a
few tokens over long contexts (speculative verification) stay on the packed kernel, which reads the cache in
place."""
MIN_QUERY = 256
"""... and when the step's longest query has at least this many tokens (the packed kernel's long tiling,
_kernels.prefill_attention.LONG_QUERY, not imported here: importing a Triton kernel module defines its kernels,
which must wait for the tests' TRITON_INTERPRET on a machine without a GPU): on
shorter prompts the copy and the varlen call cost more than the packed kernel's short tiles (H100, Llama-3.1-8B's
heads over an fp8 cache, `bench_kernels --prefill`: 64 x 128-token prompts 190 us against 100), where on long
steps they are even or ahead (4 x 2048 prompts 577 us against 571; an 8192-token chunk after 8192 tokens 4,789
against 5,401)."""
MAX_KEYS = 262144
"""... and at most this many keys in all: the copy's memory (K and V, 4 KiB a key at Llama-3.1-8B's 8 x 128 in
bfloat16) stays within the headroom the KV cache leaves."""


def flash_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why attn_backend="flash" cannot run on `device` with `dtype` activations; None when it can."""
    if device.type != "cuda":
        return f"runs torch's FlashAttention on a GPU; the device is {device}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"needs bfloat16 or float16 activations (FlashAttention's dtypes); the model runs in {dtype}"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no FlashAttention kernels"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"FlashAttention needs compute capability 8.0 or newer; {torch.cuda.get_device_name(device)} has " \
               f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
    return None


def _torch_flash(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """torch's FlashAttention varlen forward, causal (bottom-right aligned): [Tq, nh, hd]."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                   scale=scale)[0]


flash_varlen = _torch_flash
"""The varlen attention call (a module attribute, so that CPU tests can put a plain-torch one in its place)."""


def flash_applies(attn, first: int, query_tokens: int) -> bool:
    """Whether the rows first.. of the step `attn` (query_tokens in all) take flash_prefill: their host context
    lengths are known (an eager step), the step's longest query has MIN_QUERY tokens or more, and their keys are
    within KEYS_PER_QUERY per query token and MAX_KEYS. Decided once a step (cached on `attn`)."""
    key = ("applies", first)
    if key not in attn.scratch:
        lens = attn.context_lens_cpu
        attn.scratch[key] = lens is not None and attn.max_query_len >= MIN_QUERY \
            and int(lens[first:].sum()) <= min(KEYS_PER_QUERY * query_tokens, MAX_KEYS)
    return attn.scratch[key]


class ContextPlan(NamedTuple):
    """The copy of a step's prefill rows first.. (R' rows, Tq query tokens, P earlier-context keys; context_plan)."""

    prefix_slots: torch.Tensor
    """[P] int64: the cache slots of the rows' earlier context."""
    prefix_dst: torch.Tensor
    """[P] int64: where each of those keys goes in the copy."""
    fresh_dst: torch.Tensor | None
    """[Tq] int64: where each of this step's keys goes; None when P = 0 (no copy)."""
    cu_k: torch.Tensor
    """[R'+1] int32: the rows' key offsets in the copy."""
    max_k: int
    """The longest row's keys."""
    cu_q: torch.Tensor
    """[R'+1] int32: the rows' query offsets from row first's."""
    total: int
    """Keys in the copy: the rows' whole contexts."""
    src: torch.Tensor | None
    """[total] int64: where each key of the copy comes from, a cache slot or -1 - j for this step's key j (the
    Triton copy, kv_write.gather_kv); None when P = 0."""


def context_plan(attn, first: int, query_tokens: int) -> ContextPlan:
    """The copy of rows first.. of the step `attn` (query_tokens in all). Row r's keys are its earlier context
    (C - L positions, read from the cache at prefix_slots) then this step's L keys; prefix_dst and fresh_dst place
    both in the copy. P = 0 (no row has earlier context: whole prompts) needs no copy, and then fresh_dst is None
    and cu_k is the queries'. Sized by the host's context lengths (attn.context_lens_cpu): no device sync.
    Computed once a step (cached on `attn`)."""
    key = ("plan", first)
    if key not in attn.scratch:
        lens = attn.context_lens_cpu[first:]
        rows = len(lens)
        total = int(lens.sum())
        longest = int(lens.max()) if rows else 0
        cu_q = attn.query_start_loc[first:] - attn.query_start_loc[first]
        device = cu_q.device
        prefix_total = total - query_tokens
        if prefix_total == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            attn.scratch[key] = ContextPlan(empty, empty, None, cu_q, longest, cu_q, total, None)
            return attn.scratch[key]
        ctx = attn.context_lens[first:first + rows]
        qlens = attn.query_lens[first:first + rows]
        cu_k = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        cu_k[1:] = torch.cumsum(ctx, 0)
        prefix = (ctx - qlens).long()  # [R'] earlier context of each row
        cu_p = torch.cumsum(prefix, 0) - prefix  # [R'] where each row's starts among the P
        row_ids = torch.arange(rows, device=device)
        req_q = torch.repeat_interleave(row_ids, qlens.long(), output_size=query_tokens)  # [Tq]
        fresh_dst = cu_k[req_q].long() + prefix[req_q] + torch.arange(query_tokens, device=device) - cu_q[req_q]
        req_p = torch.repeat_interleave(row_ids, prefix, output_size=prefix_total)  # [P]
        pos_p = torch.arange(prefix_total, device=device) - cu_p[req_p]  # [P] position in its request
        prefix_dst = cu_k[req_p].long() + pos_p
        block = attn.tokens_per_block
        slots = attn.block_tables[first:first + rows][req_p, pos_p // block].long() * block + pos_p % block
        src = torch.empty(total, dtype=torch.int64, device=device)
        src[prefix_dst] = slots
        src[fresh_dst] = -1 - torch.arange(query_tokens, device=device)
        attn.scratch[key] = ContextPlan(slots, prefix_dst, fresh_dst, cu_k, longest, cu_q, total, src)
    return attn.scratch[key]


def _with_context(fresh: torch.Tensor, cache: torch.Tensor, plan: ContextPlan, scale: float | None
                  ) -> torch.Tensor:
    """[plan.total, nkv, hd] in fresh's dtype: the cached context (codes times `scale` for a quantized cache) and the
    step's `fresh` keys or values, each at its place in the copy (in torch: the reference of gather_kv, which the
    Triton path takes)."""
    nkv, hd = cache.shape[-2], cache.shape[-1]
    raw = cache.view(torch.uint8) if cache.element_size() == 1 else cache  # one-byte codes gathered as bytes
    context = raw.view(-1, nkv, hd).index_select(0, plan.prefix_slots).view(cache.dtype).to(fresh.dtype)
    if scale is not None:
        context.mul_(scale)
    out = torch.empty((plan.total, nkv, hd), dtype=fresh.dtype, device=fresh.device)
    out.index_copy_(0, plan.prefix_dst, context)
    out.index_copy_(0, plan.fresh_dst, fresh)
    return out


def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, attn, first: int,
                  scale: float, kv_scales: tuple[float, float] | None, quant_scale: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the prefill rows first.. of the step `attn` (their queries `q` [Tq, nh, hd] and this step's
    keys `k` (rotated) and values `v` [Tq, nkv, hd], row first's first token at index 0) over their whole
    contexts: earlier context from the paged `kv_cache` [2, blocks, block, nkv, hd] (`kv_scales` (K, V)
    dequantize an int8 / fp8 cache), this step's keys from `k` and `v`. With `quant_scale` the result is the
    E4M3 codes quantize_fp8 gives. Written into `out` [Tq, nh, hd] when given. With the Triton kernels (CUDA
    tensors) the copy is one kernel for K and V (gather_kv) and the E4M3 codes one pass straight into `out`
    (quantize_fp8_rows); torch's ops do both otherwise."""
    plan = context_plan(attn, first, q.shape[0])
    triton_path = use_triton(q)
    if plan.fresh_dst is None:  # whole prompts: their keys are this step's
        keys, values = k, v
    elif triton_path:
        from llmapi._kernels.kv_write import gather_kv

        keys, values = gather_kv(k, v, kv_cache[0], kv_cache[1], plan.src, kv_scales)
    else:
        keys = _with_context(k, kv_cache[0], plan, None if kv_scales is None else kv_scales[0])
        values = _with_context(v, kv_cache[1], plan, None if kv_scales is None else kv_scales[1])
    q = q if q.stride(-1) == 1 else q.contiguous()
    result = flash_varlen(q, keys, values, plan.cu_q, plan.cu_k, attn.max_query_len, plan.max_k, scale)
    if quant_scale is not None and triton_path:
        from llmapi._kernels.fp8_quant import quantize_fp8_rows

        rows = result.shape[0]
        codes, _ = quantize_fp8_rows(result.reshape(rows, -1), quant_scale.float(),
                                     out=None if out is None else out.view(rows, -1))
        return codes.view(result.shape) if out is None else out
    if quant_scale is not None:
        result = quantize_fp8(result, quant_scale)
    if out is None:
        return result
    out.copy_(result)
    return out
