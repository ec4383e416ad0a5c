"""Paged decode attention vs device memory bandwidth: `python -m llmapi.bench_kernels [--batch 64 --context 1024]`;
`--prefill`: the packed (prefill) attention kernel's FLOP rate on the long-prompt steps of the throughput grid, for each
tile configuration in PREFILL_CONFIGS, beside torch's flash attention and cuDNN's fused attention on the same causal
prompts; `--gemv`: one token through each Llama-3.1-8B linear, bfloat16 (F.linear and the Triton GEMV) and int4
weight-only (per channel and group 128), in CUDA graphs, as bandwidth; `--fp8-gemm`: each Llama-3.1-8B linear in FP8
(the runner's fp8_linear: torch._scaled_mm) at the decode graphs' row counts, in CUDA graphs, as FLOP rate, with the row
counts that take longer than a larger one flagged (a graph padded to such a size loses time)."""

from __future__ import annotations

import argparse
import itertools

import torch

from llmapi.runtime.cuda_graph import GRAPH_BATCH_SIZES


def main(argv=None) -> int:
    import triton.testing

    from llmapi._kernels.decode_attention import num_splits_for, paged_decode_attention

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--prefill", action="store_true", help="sweep the packed attention kernel's tile configurations")
    p.add_argument("--decode-sweep", action="store_true",
                   help="sweep the decode kernel's tilings and splits on the grid's decode steps")
    p.add_argument("--kv-dtype", choices=["bfloat16", "fp8"], default="bfloat16", help="the cache's dtype")
    p.add_argument("--gemv", action="store_true",
                   help="bs 1 linears: bfloat16 (cuBLAS, Triton) and int4 weight-only, as bandwidth")
    p.add_argument("--fp8-gemm", action="store_true",
                   help="FP8 linears at the decode graphs' row counts (past 256), as FLOP rate")
    p.add_argument("--rows", type=_rows, default=None, metavar="M[,M...]",
                   help="--fp8-gemm's row counts (default: the graph ladder's from 256 up, and 448)")
    a = p.parse_args(argv)
    if a.gemv:
        return gemv_sweep()
    if a.fp8_gemm:
        return fp8_gemm_sweep(a.rows or FP8_GEMM_ROWS)
    if a.prefill:
        return prefill_sweep(a)
    if a.decode_sweep:
        return decode_sweep(a)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    blocks_per_seq = -(-a.context // a.block)
    num_blocks = a.batch * blocks_per_seq
    # Shuffled block ids: no request's blocks are contiguous, as in a long-running server.
    tables = torch.randperm(num_blocks, device=dev).view(a.batch, blocks_per_seq).to(torch.int32)
    k_cache = torch.randn(num_blocks, a.block, a.kv_heads, a.head_dim, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    kv_scale = None
    if a.kv_dtype == "fp8":
        k_cache, v_cache = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
        kv_scale = torch.ones(2, device=dev)
    q = torch.randn(a.batch, a.heads, a.head_dim, device=dev, dtype=dtype)
    ctx = torch.full((a.batch,), a.context, dtype=torch.int32, device=dev)
    kv_bytes = 2 * a.batch * a.context * a.kv_heads * a.head_dim * k_cache.element_size()
    bandwidth = copy_bandwidth(dev)
    print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (bytes read + written)")
    print(f"batch {a.batch}, context {a.context}, heads {a.heads}/{a.kv_heads}, head_dim {a.head_dim}, {a.kv_dtype}: "
          f"{kv_bytes / 1e6:.0f} MB of K/V")
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    chosen = num_splits_for(a.batch, a.kv_heads, a.context, num_sms, quantized=a.kv_dtype == "fp8")
    for splits in sorted({1, 2, 4, 8, chosen}):
        ms = triton.testing.do_bench(
            lambda: paged_decode_attention(q, k_cache, v_cache, ctx, tables, a.head_dim**-0.5, splits,
                                           kv_scale=kv_scale, max_context_len=a.context),
            warmup=50, rep=300, return_mode="median")
        moved = kv_bytes + 2 * q.numel() * q.element_size()
        print(f"splits {splits:2d}{' (default)' if splits == chosen else '          '}: {ms * 1e3:7.1f} us  "
              f"{moved / (ms * 1e-3) / 1e12:.2f} TB/s = {100 * moved / (ms * 1e-3) / bandwidth:.0f}% of the copy")
    return 0


# (name, query lengths, context lengths) of packed steps at max_num_tokens 8192: four 2048-token prompts
# (2048/128), a 5000-token prompt with a 3192-token chunk of the next (5000/500), the last 8192-token chunk of a
# 20000-token prompt (20000/2000), 64 128-token prompts (128/x).
PREFILL_STEPS = (
    ("4 x 2048", [2048] * 4, [2048] * 4),
    ("5000 + 3192", [5000, 3192], [5000, 3192]),
    ("8192 @ 16384", [8192], [16384]),
    ("3616 @ 20000", [3616], [20000]),
    ("64 x 128", [128] * 64, [128] * 64),
)
# (block_m, block_n, num_warps, num_stages); the first is the kernel's default for a quantized cache.
PREFILL_CONFIGS = ((64, 32, 4, 1), (64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 4, 2), (128, 64, 4, 2),
                   (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3))


# (name, rows, shortest context, longest context) of decode steps in the grid's rows at the bench's defaults (FP8
# cache of about 1.0M tokens on an H100): each row's contexts spread evenly between the two lengths.
DECODE_STEPS = (
    ("128/128", 2048, 129, 256),
    ("128/2048", 2048, 129, 900),
    ("128/4096", 512, 129, 4224),
    ("1000/1000", 955, 1001, 2000),
    ("2048/2048", 400, 2049, 4096),
    ("20000/2000", 48, 20001, 22000),
)
# (block_n, num_warps, num_stages) of the decode kernel; the first two are its defaults for a quantized cache.
DECODE_CONFIGS = ((32, 1, 1), (32, 1, 2), (32, 1, 3), (32, 2, 2), (64, 1, 2), (64, 2, 2), (64, 2, 3), (64, 4, 2),
                  (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2))


def decode_sweep(a) -> int:
    """Each DECODE_STEPS step through paged_decode_attention at each DECODE_CONFIGS tiling, with the default
    split count and twice and four times it: microseconds and K/V bytes read per second, against a
    device-to-device copy."""
    import triton.testing

    from llmapi._kernels.decode_attention import num_splits_for, paged_decode_attention

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    bandwidth = copy_bandwidth(dev)
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"{torch.cuda.get_device_name(dev)}, heads {a.heads}/{a.kv_heads}, head_dim {a.head_dim}, cache "
          f"{a.kv_dtype}, block {a.block}; device-to-device copy {bandwidth / 1e12:.2f} TB/s")
    for name, rows, lo, hi in DECODE_STEPS:
        ctx = torch.linspace(lo, hi, rows, device=dev).round().to(torch.int32)
        tables, k_cache, v_cache, kv_scale = paged_cache(a, ((ctx + a.block - 1) // a.block).tolist(), g)
        q = torch.randn(rows, a.heads, a.head_dim, device=dev, generator=g, dtype=torch.bfloat16)
        moved = 2 * int(ctx.sum()) * a.kv_heads * a.head_dim * k_cache.element_size()
        chosen = num_splits_for(rows, a.kv_heads, hi, num_sms, quantized=a.kv_dtype == "fp8")
        print(f"step {name}: {rows} rows, context {lo}-{hi}, {moved / 1e6:.0f} MB of K/V, default splits {chosen}")
        first = None
        for splits in sorted({chosen, min(32, 2 * chosen), min(32, 4 * chosen)}):
            for bn, warps, stages in DECODE_CONFIGS:
                def run():
                    return paged_decode_attention(q, k_cache, v_cache, ctx, tables, a.head_dim**-0.5, splits,
                                                  kv_scale=kv_scale, block_n=bn, num_warps=warps, num_stages=stages)
                try:
                    out = run()
                    ms = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")
                except Exception as e:  # a tiling the device cannot run: say so and go on
                    print(f"  splits {splits:2d} {bn:3d} w{warps} s{stages}: failed ({type(e).__name__}: "
                          f"{str(e)[:80]})")
                    continue
                first = out if first is None else first
                diff = (out.float() - first.float()).abs().max().item()
                print(f"  splits {splits:2d} {bn:3d} w{warps} s{stages}: {ms * 1e3:8.1f} us  "
                      f"{moved / (ms * 1e-3) / 1e12:5.2f} TB/s = {100 * moved / (ms * 1e-3) / bandwidth:3.0f}% of "
                      f"the copy  max diff {diff:.1e}")
    return 0


def paged_cache(a, blocks: list[int], g: torch.Generator):
    """(block tables, K cache, V cache, kv_scale) on CUDA: each request's `blocks` at shuffled ids, random bfloat16
    K/V (as E4M3 codes at scale 1 with --kv-dtype fp8, kv_scale None otherwise)."""
    dev = g.device
    perm = torch.randperm(sum(blocks), device=dev, generator=g).to(torch.int32)
    tables = torch.zeros(len(blocks), max(blocks), dtype=torch.int32, device=dev)
    at = 0
    for r, n in enumerate(blocks):
        tables[r, :n] = perm[at:at + n]
        at += n
    shape = (sum(blocks), a.block, a.kv_heads, a.head_dim)
    k_cache = torch.randn(shape, device=dev, generator=g, dtype=torch.bfloat16)
    v_cache = torch.randn(shape, device=dev, generator=g, dtype=torch.bfloat16)
    if a.kv_dtype != "fp8":
        return tables, k_cache, v_cache, None
    return tables, k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn), torch.ones(2, device=dev)


def copy_bandwidth(dev: torch.device) -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.int16, device=dev).random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def prefill_sweep(a) -> int:
    """Each PREFILL_STEPS step through paged_packed_attention at each PREFILL_CONFIGS tiling (over an fp8 cache,
    also with fp8_attention): microseconds, TFLOP/s (4 * heads * head_dim per query-key pair seen) and the largest
    difference from the first config's output; then attn_backend="flash" (flash_prefill: the step's own keys with
    earlier context copied beside them, and torch's FlashAttention varlen call), cuDNN's fused attention over
    the same copy (cudnn_varlen), and torch's scaled_dot_product_attention (bfloat16, contiguous K/V, causal) per
    prompt."""
    import numpy as np
    import torch.nn.functional as F
    import triton.testing

    from llmapi._kernels.prefill_attention import paged_packed_attention
    from llmapi.layers.attention import AttentionMetadata
    from llmapi.layers.flash_prefill import flash_prefill

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name(dev)}, heads {a.heads}/{a.kv_heads}, head_dim {a.head_dim}, "
          f"cache {a.kv_dtype}, block {a.block}")
    for name, q_lens, ctx_lens in PREFILL_STEPS:
        tables, k_cache, v_cache, kv_scale = paged_cache(a, [-(-c // a.block) for c in ctx_lens], g)
        q = torch.randn(sum(q_lens), a.heads, a.head_dim, device=dev, generator=g, dtype=torch.bfloat16)
        qsl = torch.tensor([0] + q_lens, device=dev).cumsum(0).to(torch.int32)
        ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=dev)
        pairs = sum(ql * (c - ql) + ql * (ql + 1) // 2 for ql, c in zip(q_lens, ctx_lens))
        flops = 4 * a.heads * a.head_dim * pairs
        print(f"step {name}: {sum(q_lens)} query tokens, {flops / 1e12:.2f} TFLOP")
        first = None
        # With an fp8 cache each tiling runs again with the FP8 dots (fp8_attention), after the bfloat16 ones.
        for fp8, (bm, bn, warps, stages) in [(f, c) for f in ((False, True) if kv_scale is not None else (False,))
                                             for c in PREFILL_CONFIGS]:
            def run(out=None):
                return paged_packed_attention(q, k_cache, v_cache, qsl, ctx, tables, a.head_dim**-0.5, out=out,
                                              kv_scale=kv_scale, block_m=bm, block_n=bn, num_warps=warps,
                                              num_stages=stages, fp8_attention=fp8)
            name = f"{'fp8 ' if fp8 else ''}{bm:3d}x{bn:<3d} w{warps} s{stages}"
            try:
                out = run()
                ms = triton.testing.do_bench(run, warmup=10, rep=100, return_mode="median")
            except Exception as e:  # a tiling that does not fit the device (shared memory): say so and go on
                print(f"  {name}: failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            first = out if first is None else first
            diff = (out.float() - first.float()).abs().max().item()
            print(f"  {name}: {ms * 1e3:9.1f} us  {flops / (ms * 1e-3) / 1e12:6.1f} TFLOP/s  max diff {diff:.2e}")
        # attn_backend="flash": the copy of each row's earlier context beside the step's keys (its plan once a
        # step, the copy each layer) and torch's FlashAttention varlen call, against the first tiling's output.
        attn = AttentionMetadata(slot_mapping=qsl, query_lens=qsl[1:] - qsl[:-1], context_lens=ctx,
                                 query_start_loc=qsl, block_tables=tables, max_query_len=max(q_lens),
                                 max_context_len=max(ctx_lens), tokens_per_block=a.block,
                                 context_lens_cpu=np.asarray(ctx_lens))
        kv = torch.stack([k_cache, v_cache])
        scales = None if kv_scale is None else tuple(kv_scale.tolist())
        # The step's own keys and values as the layer passes them (here: the cache's, at unit scales).
        lens = torch.tensor(q_lens, device=dev)
        req = torch.repeat_interleave(torch.arange(len(q_lens), device=dev), lens)
        pos = (ctx - lens)[req] + torch.arange(len(req), device=dev) - qsl[req]
        slots = tables[req, pos // a.block].long() * a.block + pos % a.block
        fresh_k, fresh_v = ((c.view(torch.uint8) if c.element_size() == 1 else c).flatten(0, 1)[slots]
                            .view(c.dtype).to(torch.bfloat16) for c in (k_cache, v_cache))

        def flash(out=None):
            return flash_prefill(q, fresh_k, fresh_v, kv, attn, 0, a.head_dim**-0.5, scales, out=out)
        try:
            out = flash()
            ms = triton.testing.do_bench(flash, warmup=10, rep=100, return_mode="median")
            diff = (out.float() - first.float()).abs().max().item() if first is not None else float("nan")
            print(f"  flash backend (copy + varlen): {ms * 1e3:9.1f} us  {flops / (ms * 1e-3) / 1e12:6.1f} TFLOP/s  "
                  f"max diff {diff:.2e}")
        except Exception as e:
            print(f"  flash backend: failed ({type(e).__name__}: {str(e)[:120]})")
        cudnn_varlen(q, fresh_k, fresh_v, k_cache, v_cache, attn, scales, a.head_dim**-0.5, flops, first)
        # torch's flash attention over the same prompts (whole prompts from position 0 only: ctx == query)
        if all(ql == c for ql, c in zip(q_lens, ctx_lens)):
            qs = [t.transpose(0, 1).unsqueeze(0) for t in q.split(q_lens)]
            ks = [torch.randn(1, a.kv_heads, ql, a.head_dim, device=dev, dtype=torch.bfloat16) for ql in q_lens]

            def sdpa():
                for qq, kk in zip(qs, ks):
                    F.scaled_dot_product_attention(qq, kk, kk, is_causal=True, enable_gqa=True)
            ms = triton.testing.do_bench(sdpa, warmup=10, rep=100, return_mode="median")
            print(f"  torch sdpa (bf16, per prompt): {ms * 1e3:9.1f} us  {flops / (ms * 1e-3) / 1e12:6.1f} TFLOP/s")
    return 0


def cudnn_varlen(q, fresh_k, fresh_v, k_cache, v_cache, attn, scales, scale: float, flops: int, first) -> None:
    """--prefill: torch's cuDNN fused attention (its varlen entry, causal) over the flash backend's copy of the
    step's keys, GQA heads as they are and, where cuDNN refuses those, expanded: microseconds, TFLOP/s and the
    largest difference from the packed kernel's output (a chunk after earlier context shows whether its causal
    mask is aligned to the bottom right, as the step needs)."""
    import triton.testing

    from llmapi._kernels.kv_write import gather_kv
    from llmapi.layers.flash_prefill import context_plan

    plan = context_plan(attn, 0, q.shape[0])
    keys, values = (fresh_k, fresh_v) if plan.src is None else \
        gather_kv(fresh_k, fresh_v, k_cache, v_cache, plan.src, scales)
    group = q.shape[1] // keys.shape[1]
    for label in ("GQA", "K/V heads expanded"):  # the expanded copy only where cuDNN refuses GQA heads
        kk, vv = (keys, values) if label == "GQA" else (keys.repeat_interleave(group, 1),
                                                        values.repeat_interleave(group, 1))

        def cudnn():
            return torch.ops.aten._cudnn_attention_forward(q, kk, vv, None, plan.cu_q, plan.cu_k, attn.max_query_len,
                                                           plan.max_k, False, 0.0, True, False, scale=scale)[0]
        try:
            out = cudnn()
            ms = triton.testing.do_bench(cudnn, warmup=10, rep=100, return_mode="median")
        except Exception as e:  # not in this torch / cuDNN build, or not for these shapes: say so and go on
            print(f"  cuDNN varlen ({label}): failed ({type(e).__name__}: {str(e)[:120]})")
            continue
        diff = (out.float() - first.float()).abs().max().item() if first is not None else float("nan")
        print(f"  cuDNN varlen ({label}): {ms * 1e3:9.1f} us  {flops / (ms * 1e-3) / 1e12:6.1f} TFLOP/s  "
              f"max diff {diff:.2e}")
        return


# (name, out features, in features) of Llama-3.1-8B's linears, the head last.
GEMV_SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
               ("head", 128256, 4096))


GEMV_TILINGS = ((8, 1024, 4), (4, 1024, 4), (16, 1024, 8), (8, 512, 4), (8, 2048, 8))
"""(BLOCK_N, BLOCK_K, num_warps) of the bf16 Triton GEMV that --gemv times."""

INT4_ROW_TILINGS = ((8, 1024, 4), (16, 1024, 4), (16, 1024, 8), (32, 1024, 8), (8, 2048, 4), (16, 2048, 8),
                    (8, 512, 4), (4, 1024, 4))
"""(BLOCK_N, BLOCK_K, num_warps) of the one-token int4 per-channel kernel that --gemv times beside its default on
the layers' linears, each with x read as quads or not and with the next chunk prefetched or not."""
INT4_ROW_MODES = ((False, False), (True, False), (False, True), (True, True))
"""(x_quads, prefetch) of the one-token int4 per-channel kernel that --gemv times at each INT4_ROW_TILINGS."""


def graph_us(fns, dev: torch.device, replays: int = 20) -> float:
    """Microseconds per call of `fns` (one call each, in order) captured back to back in one CUDA graph: the
    decode graphs' conditions (no launch gaps; distinct weights, so no call finds another's in L2)."""
    for fn in fns:  # compile and warm outside the capture
        fn()
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    stop.record()
    torch.cuda.synchronize(dev)
    return start.elapsed_time(stop) * 1e3 / (replays * len(fns))


def gemv_sweep() -> int:
    """One token through each GEMV_SHAPES linear, each kind called on enough distinct copies of the weights (1 GiB
    of bfloat16 or more in all, a quarter of that in int4: well past the L2) back to back in a CUDA graph: bfloat16
    through F.linear (cuBLAS) and through the Triton GEMV at each GEMV_TILINGS tiling, int4 weight-only through
    weight_only_gemv per channel and per group of 128: microseconds a call and the weights' bytes per second
    against a device copy's (the bound of a bs 1 decode step)."""
    from llmapi._kernels.gemv import gemv
    from llmapi._kernels.weight_only import quantize_weight_ref
    from llmapi._kernels.weight_only_gemv import weight_only_gemv

    dev = torch.device("cuda")
    bandwidth = copy_bandwidth(dev)
    print(f"{torch.cuda.get_device_name(dev)}: device-to-device copy {bandwidth / 1e12:.2f} TB/s (read + written)")
    g = torch.Generator(device=dev).manual_seed(0)
    for name, n, k in GEMV_SHAPES:
        copies = max(1, -(-(1 << 30) // (2 * n * k)))  # int4's quarter of 1 GiB is still 5x the L2
        ws = [torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device=dev, generator=g, dtype=torch.bfloat16)
        kinds = [("bf16 F.linear", 2 * n * k, [lambda w=w: torch.nn.functional.linear(x, w) for w in ws])]
        for bn, bk, warps in GEMV_TILINGS:
            if k % bk == 0:
                kinds.append((f"bf16 triton {bn}x{bk} w{warps}", 2 * n * k,
                              [lambda w=w, bn=bn, bk=bk, warps=warps: gemv(x, w, block_n=bn, block_k=bk,
                                                                          num_warps=warps) for w in ws]))
        ref = torch.nn.functional.linear(x.float(), ws[0].float())
        err = (gemv(x, ws[0]).float() - ref).abs().max().item()
        for group in (None, 128):
            packed = [quantize_weight_ref(w, 4, group) for w in ws]
            moved = packed[0][0].numel() + packed[0][1].numel() * packed[0][1].element_size()
            kinds.append((f"int4 {'group 128' if group else 'channel'}", moved,
                          [lambda qw=qw, scale=scale, group=group: weight_only_gemv(x, qw, scale, None, 4, group)
                           for qw, scale in packed]))
            tilings = () if group or name == "head" else itertools.product(INT4_ROW_TILINGS, INT4_ROW_MODES)
            for (bn, bk, warps), (quads, prefetch) in tilings:
                if k % bk == 0:
                    kinds.append((f"int4 channel {bn}x{bk} w{warps}{' quads' * quads}{' prefetch' * prefetch}",
                                  moved, [lambda qw=qw, scale=scale, tune=dict(block_n=bn, block_k=bk,
                                                                                num_warps=warps, x_quads=quads,
                                                                                prefetch=prefetch):
                                          weight_only_gemv(x, qw, scale, None, 4, **tune) for qw, scale in packed]))
        print(f"  {name} {n} x {k} ({copies} copies; triton GEMV's largest difference from float32: {err:.1e})")
        for label, moved, fns in kinds:
            us = graph_us(fns, dev)
            rate = moved / (us * 1e-6)
            print(f"    {label:26s}: {us:8.1f} us  {rate / 1e12:.2f} TB/s = {100 * rate / bandwidth:.0f}% of the copy")
        del ws, packed, kinds
        torch.cuda.empty_cache()
    return 0


def _rows(text: str) -> list[int]:
    from llmapi.bench import batch_sizes

    return sorted(set(batch_sizes(text)))


FP8_GEMM_ROWS = tuple(sorted({m for m in GRAPH_BATCH_SIZES if m >= 256} | {448}))
"""--fp8-gemm's default row counts: the decode graph ladder's from 256 up, and 448 (out of it since an H100 ran 440
requests slower in the 448-row graph than in the 512-row one)."""


def slower_than_larger(us_by_rows: dict) -> list:
    """The row counts whose time is above that of some larger row count, smallest first: a decode graph of that
    size costs more than padding on to the larger one."""
    rows = sorted(us_by_rows)
    return [m for i, m in enumerate(rows) if any(us_by_rows[b] < us_by_rows[m] for b in rows[i + 1:])]


def fp8_gemm_sweep(rows) -> int:
    """Each GEMV_SHAPES linear but the head (bfloat16 in the runner) through fp8_linear with a static input scale
    (the "FP8" recipe: the input quantized, then torch._scaled_mm), at each of `rows`, on enough distinct copies
    of the weights back to back in a CUDA graph that no call finds its weights in the L2: microseconds a call and
    TFLOP/s, then a layer's four linears summed, with the row counts that take longer than a larger one."""
    from llmapi._kernels.fp8_linear import fp8_linear, quantize_fp8_weight

    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}: FP8 linears (static input scale, torch._scaled_mm), "
          f"rows {', '.join(map(str, rows))}")
    g = torch.Generator(device=dev).manual_seed(0)
    layer = {m: 0.0 for m in rows}
    act_scale = torch.tensor([5.0 / 448], device=dev)  # randn inputs: |x| < 5 fits E4M3's range
    for name, n, k in GEMV_SHAPES[:-1]:
        copies = max(1, -(-(256 << 20) // (n * k)))  # 256 MiB of E4M3 weights: 5x the L2
        weights = [quantize_fp8_weight(torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16) * 0.02,
                                       per_channel=False) for _ in range(copies)]
        us = {}
        for m in rows:
            x = torch.randn(m, k, device=dev, generator=g, dtype=torch.bfloat16)
            us[m] = graph_us([lambda w=w, s=s: fp8_linear(x, w, s, None, act_scale) for w, s in weights], dev)
            layer[m] += us[m]
        print(f"  {name} {n} x {k} ({copies} copies)")
        for m in rows:
            print(f"    {m:5d} rows: {us[m]:8.1f} us  {2 * m * n * k / (us[m] * 1e-6) / 1e12:6.0f} TFLOP/s  "
                  f"{us[m] / m * 1e3:6.1f} ns a row")
        print(f"    slower than a larger row count: {slower_than_larger(us) or 'none'}")
        del weights
        torch.cuda.empty_cache()
    print("  a layer's four linears:")
    for m in rows:
        print(f"    {m:5d} rows: {layer[m]:8.1f} us  {layer[m] / m * 1e3:6.1f} ns a row")
    print(f"    slower than a larger row count: {slower_than_larger(layer) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
