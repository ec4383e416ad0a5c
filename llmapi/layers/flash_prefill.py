"""Prefill attention through torch's FlashAttention (LlmArgs.attn_backend="flash").

The packed Triton kernel reads K/V from the paged cache in place; FlashAttention's varlen kernel wants each
request's keys contiguous. Each step gathers the prefill rows' whole contexts (this step's keys included, as
written to the cache) into one contiguous [keys, kv heads, head_dim] copy per layer, dequantized to the query's
dtype for an int8 / fp8 cache, and runs one varlen call, causal from the bottom right (query j of a request with
L queries and C keys sees keys <= C - L + j). The copy reads each context once (a few percent of the attention's
time on long prompts); the slots it reads are computed once per step and shared by the layers. Decodes stay on
the Triton decode kernel, and a layer with a sliding window stays on the packed kernel (its blocks before the
window may be gone).
"""

import torch

from llmapi._kernels.fp8_linear import quantize_fp8

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


def context_gather(attn, first: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(slots [K] int64, cu_k [R'+1] int32, longest context) of rows first.. of the step `attn`: every context
    position's cache slot, request after request. Needs the host's context lengths (attn.context_lens_cpu):
    no device sync. Computed once a step (cached on `attn`)."""
    key = ("gather", first)
    if key not in attn.scratch:
        lens = attn.context_lens_cpu[first:]
        rows = len(lens)
        ctx = attn.context_lens[first:first + rows]
        device = ctx.device
        cu_k = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        cu_k[1:] = torch.cumsum(ctx, 0)
        total = int(lens.sum())
        req = torch.repeat_interleave(torch.arange(rows, device=device), ctx.long(), output_size=total)  # [K]
        pos = torch.arange(total, device=device) - cu_k[req].long()  # [K]
        block = attn.tokens_per_block
        slots = attn.block_tables[first:first + rows][req, pos // block].long() * block + pos % block
        attn.scratch[key] = (slots, cu_k, int(lens.max()) if rows else 0)
    return attn.scratch[key]


def flash_prefill(q: torch.Tensor, kv_cache: torch.Tensor, attn, first: int, scale: float,
                  kv_scales: tuple[float, float] | None, quant_scale: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the prefill rows first.. of the step `attn` (their queries `q` [Tq, nh, hd], row first's
    first token at q[0]) over their whole contexts in the paged `kv_cache` [2, blocks, block, nkv, hd], K/V of
    this step already written. `kv_scales` (K, V) dequantize an int8 / fp8 cache (K's scale folds into the
    softmax scale, V's multiplies the output); with `quant_scale` the result is the E4M3 codes quantize_fp8
    gives. Written into `out` [Tq, nh, hd] when given."""
    slots, cu_k, max_k = context_gather(attn, first)
    nkv, hd = kv_cache.shape[-2], kv_cache.shape[-1]
    # One-byte codes are gathered as bytes (index kernels need not cover the float8 dtypes).
    raw = kv_cache.view(torch.uint8) if kv_cache.element_size() == 1 else kv_cache
    k = raw[0].view(-1, nkv, hd).index_select(0, slots).view(kv_cache.dtype)
    v = raw[1].view(-1, nkv, hd).index_select(0, slots).view(kv_cache.dtype)
    if kv_scales is not None:  # int8 / fp8 codes: exact in bfloat16 and float16
        k, v = k.to(q.dtype), v.to(q.dtype)
        scale = scale * kv_scales[0]
    cu_q = attn.query_start_loc[first:] - attn.query_start_loc[first]
    q = q if q.stride(-1) == 1 else q.contiguous()
    result = flash_varlen(q, k, v, cu_q, cu_k, attn.max_query_len, max_k, scale)
    if kv_scales is not None and kv_scales[1] != 1.0:
        result = result * kv_scales[1]
    if quant_scale is not None:
        result = quantize_fp8(result, quant_scale)
    if out is None:
        return result
    out.copy_(result)
    return out
