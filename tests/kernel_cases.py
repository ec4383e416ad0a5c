"""Random inputs for the Triton kernel tests: paged KV caches with shuffled blocks, and the error measure."""

import math
import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the kernels run in Triton's interpreter; it must be chosen before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Bounds on |out - ref| / |ref| against a float64 reference, by input dtype.
REL_ERROR = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.6e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "the kernel left NaN (an unwritten output element?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def paged_case(query_lens, context_lens, nh, nkv, hd, block, dtype, seed, device=DEVICE):
    """A filled paged cache (this step's K/V included) at shuffled block ids, with queries and metadata.

    Returns q [T, nh, hd], k_cache, v_cache [num_blocks, block, nkv, hd], query_start_loc [R+1] int32,
    context_lens [R] int32, block_tables [R, max_blocks] int32 (padded with a valid id).
    """
    g = torch.Generator().manual_seed(seed)
    needed = [math.ceil(c / block) for c in context_lens]
    num_blocks = sum(needed) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(needed) + 1
    tables = []
    for n in needed:
        ids = [perm.pop() for _ in range(n)]
        tables.append(ids + [ids[0]] * (width - n))
    k_cache = torch.randn(num_blocks, block, nkv, hd, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block, nkv, hd, generator=g).to(dtype)
    q = torch.randn(sum(query_lens), nh, hd, generator=g).to(dtype)
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    to = dict(device=device)
    return (q.to(**to), k_cache.to(**to), v_cache.to(**to), qsl.to(**to),
            torch.tensor(context_lens, dtype=torch.int32, **to), torch.tensor(tables, dtype=torch.int32, **to))


def assert_top5_rule(first, second, label: str = "") -> None:
    """Two runs' RequestOutputs of the same greedy requests (logprobs=5): up to the first mismatch the tokens are
    equal, and there each side's token is in the other's top 5 (vLLM's rule). `label` names the case on failure."""
    for one, other in zip(first, second, strict=True):
        a, b = one.outputs[0], other.outputs[0]
        i = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        if i is not None:
            assert a.token_ids[i] in b.logprobs[i] and b.token_ids[i] in a.logprobs[i], \
                f"{label}request {one.request_id}, token {i}: {a.token_ids[i]} against {b.token_ids[i]}"
