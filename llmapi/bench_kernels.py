"""Paged decode attention vs device memory bandwidth: `python -m llmapi.bench_kernels [--batch 64 --context 1024]`."""

from __future__ import annotations

import argparse

import torch


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
    a = p.parse_args(argv)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    blocks_per_seq = -(-a.context // a.block)
    num_blocks = a.batch * blocks_per_seq
    # Shuffled block ids: no request's blocks are contiguous, as in a long-running server.
    tables = torch.randperm(num_blocks, device=dev).view(a.batch, blocks_per_seq).to(torch.int32)
    k_cache = torch.randn(num_blocks, a.block, a.kv_heads, a.head_dim, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(a.batch, a.heads, a.head_dim, device=dev, dtype=dtype)
    ctx = torch.full((a.batch,), a.context, dtype=torch.int32, device=dev)
    kv_bytes = 2 * a.batch * a.context * a.kv_heads * a.head_dim * k_cache.element_size()
    src = torch.empty(1 << 30, dtype=torch.int16, device=dev).random_()
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    bandwidth = 2 * src.numel() * src.element_size() / (copy_ms * 1e-3)
    print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (bytes read + written)")
    print(f"batch {a.batch}, context {a.context}, heads {a.heads}/{a.kv_heads}, head_dim {a.head_dim}: "
          f"{kv_bytes / 1e6:.0f} MB of K/V")
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    chosen = num_splits_for(a.batch, a.kv_heads, a.context, num_sms)
    for splits in sorted({1, 2, 4, 8, chosen}):
        ms = triton.testing.do_bench(
            lambda: paged_decode_attention(q, k_cache, v_cache, ctx, tables, a.head_dim**-0.5, splits),
            warmup=50, rep=300, return_mode="median")
        moved = kv_bytes + 2 * q.numel() * q.element_size()
        print(f"splits {splits:2d}{' (default)' if splits == chosen else '          '}: {ms * 1e3:7.1f} us  "
              f"{moved / (ms * 1e-3) / 1e12:.2f} TB/s = {100 * moved / (ms * 1e-3) / bandwidth:.0f}% of the copy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
