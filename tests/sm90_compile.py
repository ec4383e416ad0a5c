"""Compile Triton kernels for sm_90 (H100) to a cubin, with no GPU: catches what Triton's CPU interpreter lets
through (types, layouts, unsupported ops). Run without TRITON_INTERPRET (test_kernels_compile.py spawns it)."""

import collections
import itertools
import re
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llmapi._kernels.activation import _silu_and_mul_kernel
from llmapi._kernels.argmax import CHUNK, _chunk_argmax_kernel
from llmapi._kernels.decode_attention import _decode_split_kernel, _merge_splits_kernel
from llmapi._kernels.gemv import _gemv_kernel
from llmapi._kernels.prefill_attention import LONG_TILING, _packed_attention_kernel
from llmapi._kernels.layer_norm import _layer_norm_kernel
from llmapi._kernels.lora_sgmv import BLOCK_K, BLOCK_M, BLOCK_N, BLOCK_R, _expand_kernel, _shrink_kernel
from llmapi._kernels.rms_norm import _rms_norm_kernel
from llmapi._kernels.rotary import _rotary_kernel
from llmapi._kernels.varlen_attention import _varlen_attention_kernel
from llmapi._kernels.weight_only_gemv import _gemv_row_group_kernel, _gemv_row_kernel

SM90 = GPUTarget("cuda", 90, 32)


def sass_text(cubin: bytes) -> str:
    """A cubin's SASS, by the nvdisasm that ships with Triton."""
    import triton.backends.nvidia as nvidia

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(Path(nvidia.__file__).parent / "bin" / "nvdisasm"), "-c", f.name],
                              capture_output=True, text=True, check=True).stdout


def sass_ops(cubin: bytes) -> collections.Counter:
    """How many of each SASS opcode (modifiers dropped) a cubin holds."""
    return collections.Counter(m.group(1).split(".")[0] for m in
                               re.finditer(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)",
                                           sass_text(cubin)))


def compile_for_sm90(fn, signature: dict, constexprs: dict, divisible=(), **options):
    """`fn` compiled for sm_90 at these argument types and constexprs (its .asm holds the PTX and cubin); the
    arguments named in `divisible` specialized as multiples of 16 (pointers: 16-byte aligned), as Triton does at
    launch for such values."""
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), target=SM90,
                          options=options)


def weight_only_kernels():
    """The one-token int4 GEMVs (per channel and group-wise, with zero points) at Llama-3.1-8B's gate/up shape."""
    common = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "b_ptr": "*bf16",
              "out_ptr": "*bf16", "N": "i32", "K": "i32", "stride_wn": "i32"}
    yield ("int4 gemv row", _gemv_row_kernel, dict(common, magic="i32"),
           dict(BITS=4, HAS_ZERO=True, HAS_BIAS=False, BLOCK_N=16, BLOCK_K=2048, X_QUADS=False, PREFETCH=False),
           dict(num_warps=4))
    # x read as int64 quads of bfloat16, the next chunk prefetched (aligned as at launch: K a multiple of 16)
    yield ("int4 gemv row quads prefetch", _gemv_row_kernel, dict(common, magic="i32"),
           dict(BITS=4, HAS_ZERO=True, HAS_BIAS=False, BLOCK_N=8, BLOCK_K=1024, X_QUADS=True, PREFETCH=True),
           dict(num_warps=4, divisible=("x_ptr", "w_ptr", "s_ptr", "z_ptr", "out_ptr", "K", "stride_wn")))
    yield ("int4 gemv row group", _gemv_row_group_kernel, dict(common, stride_sn="i32", magic="i32"),
           dict(BITS=4, GROUP=128, HAS_ZERO=True, HAS_BIAS=False, BLOCK_N=8, BLOCK_K=1024), dict(num_warps=8))
    # The float GEMV at Llama-3.1-8B's qkv shape, aligned as at launch (torch's allocations, K a multiple of 16).
    yield ("bf16 gemv", _gemv_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16",
                                       "N": "i32", "K": "i32", "stride_wn": "i32"},
           dict(HAS_BIAS=False, BLOCK_N=8, BLOCK_K=1024),
           dict(num_warps=4, divisible=("x_ptr", "w_ptr", "b_ptr", "out_ptr", "K", "stride_wn")))


def attention_kernels():
    """Decode (1 and 4 splits), merge and packed attention over a bfloat16 / fp8 cache, output bfloat16 or
    E4M3 codes (QUANT_OUT), at Llama-3.1-8B's head shapes."""
    for cache, quant in itertools.product(("bf16", "fp8e4nv"), (False, True)):
        kv_quant = 2 if cache == "fp8e4nv" else 0
        out = "fp8e4nv" if quant else "bf16"
        args = {"q_ptr": "*bf16", "k_cache_ptr": f"*{cache}", "v_cache_ptr": f"*{cache}", "block_tables_ptr": "*i32",
                "context_lens_ptr": "*i32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": f"*{out}",
                "scale_ptr": "*fp32", "qs_ptr": "*fp32", "bias_ptr": "*fp32", "q_stride_t": "i32",
                "q_stride_h": "i32", "out_stride_t": "i32", "out_stride_h": "i32", "bt_stride": "i32",
                "cache_stride_block": "i32", "bias_m1": "i32", "scale_log2": "fp32", "num_splits": "i32",
                "min_tiles": "i32"}
        for splits in (1, 4):
            yield (f"decode {cache} quant_out={quant} splits={splits}", _decode_split_kernel, args,
                   dict(NH=32, NKV=8, GROUP=4, GROUP_P=16, HD=128, BLOCK_D=128, PAGE=32, BLOCK_N=32 if kv_quant else 64,
                        SPLIT=splits > 1, DOT_DTYPE=tl.float16 if kv_quant else tl.bfloat16, PRECISION="tf32",
                        KV_QUANT=kv_quant, QUANT_OUT=quant, WINDOW=0, HAS_BIAS=False),
                   dict(num_warps=1 if kv_quant else 4, num_stages=(1 if splits > 1 else 2) if kv_quant else 3))
        yield (f"merge quant_out={quant}", _merge_splits_kernel,
               {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": f"*{out}", "q_ptr": "*bf16",
                "qs_ptr": "*fp32", "out_stride_t": "i32", "out_stride_h": "i32", "num_splits": "i32"},
               dict(NH=32, HD=128, BLOCK_D=128, BLOCK_S=32, QUANT_OUT=quant), dict(num_warps=1))
        packed_args = {"q_ptr": "*bf16", "k_cache_ptr": f"*{cache}", "v_cache_ptr": f"*{cache}", "out_ptr": f"*{out}",
                       "query_start_loc_ptr": "*i32", "context_lens_ptr": "*i32", "block_tables_ptr": "*i32",
                       "scale_ptr": "*fp32", "qs_ptr": "*fp32", "bias_ptr": "*fp32", "num_requests": "i32",
                       "q_stride_t": "i32", "q_stride_h": "i32", "out_stride_t": "i32", "out_stride_h": "i32",
                       "bt_stride": "i32", "cache_stride_block": "i32", "bias_m1": "i32", "scale_log2": "fp32"}
        yield (f"packed {cache} quant_out={quant}", _packed_attention_kernel, packed_args,
               dict(NKV=8, GROUP=4, GROUP_P=4, HD=128, BLOCK_D=128, PAGE=32, BLOCK_Q=16, BLOCK_M=64, BLOCK_N=64,
                    DOT_DTYPE=tl.bfloat16, PRECISION="tf32", KV_QUANT=kv_quant, QUANT_OUT=quant, WINDOW=0,
                    CAUSAL=True, HAS_BIAS=False, FP8_ATTN=0),
               dict(num_warps=4, num_stages=2))
        if cache == "fp8e4nv":  # FP8 attention (fp8_attention): E4M3 Q.K and P.V, both tilings
            for block_m, block_n, warps, stages in ((64, 32, 4, 1), LONG_TILING):
                yield (f"packed fp8 attention {block_m}x{block_n} quant_out={quant}", _packed_attention_kernel,
                       packed_args,
                       dict(NKV=8, GROUP=4, GROUP_P=4, HD=128, BLOCK_D=128, PAGE=32, BLOCK_Q=block_m // 4,
                            BLOCK_M=block_m, BLOCK_N=block_n, DOT_DTYPE=tl.bfloat16, PRECISION="tf32", KV_QUANT=2,
                            QUANT_OUT=quant, WINDOW=0, CAUSAL=True, HAS_BIAS=False, FP8_ATTN=1),
                       dict(num_warps=warps, num_stages=stages))
        if not quant:  # LONG_TILING, which long prompts' steps take
            block_m, block_n, warps, stages = LONG_TILING
            yield (f"packed {cache} long tiling", _packed_attention_kernel, packed_args,
                   dict(NKV=8, GROUP=4, GROUP_P=4, HD=128, BLOCK_D=128, PAGE=32, BLOCK_Q=block_m // 4, BLOCK_M=block_m,
                        BLOCK_N=block_n, DOT_DTYPE=tl.bfloat16, PRECISION="tf32", KV_QUANT=kv_quant, QUANT_OUT=False,
                        WINDOW=0, CAUSAL=True, HAS_BIAS=False, FP8_ATTN=0),
                   dict(num_warps=warps, num_stages=stages))
        if cache == "bf16" and not quant:  # a sliding window (StarCoder2-7B's 4096): the windowed tile ranges
            yield (f"decode {cache} window=4096", _decode_split_kernel, args,
                   dict(NH=32, NKV=8, GROUP=4, GROUP_P=16, HD=128, BLOCK_D=128, PAGE=32, BLOCK_N=64, SPLIT=True,
                        DOT_DTYPE=tl.bfloat16, PRECISION="tf32", KV_QUANT=0, QUANT_OUT=False, WINDOW=4096,
                        HAS_BIAS=False),
                   dict(num_warps=4, num_stages=3))
            yield (f"packed {cache} window=4096", _packed_attention_kernel, packed_args,
                   dict(NKV=8, GROUP=4, GROUP_P=4, HD=128, BLOCK_D=128, PAGE=32, BLOCK_Q=16, BLOCK_M=64, BLOCK_N=64,
                        DOT_DTYPE=tl.bfloat16, PRECISION="tf32", KV_QUANT=0, QUANT_OUT=False, WINDOW=4096,
                        CAUSAL=True, HAS_BIAS=False, FP8_ATTN=0),
                   dict(num_warps=4, num_stages=2))


def encdec_attention_kernels():
    """At T5-base's heads (16 x 64, bfloat16): decode and packed attention with a relative position bias,
    packed cross-attention (CAUSAL off) over a bf16 and an fp8 cache, and the varlen kernel as the encoder (not
    causal, biased) and causal."""
    signatures = {name: signature for name, _, signature, _, _ in attention_kernels()}
    decode_args = signatures["decode bf16 quant_out=False splits=1"]
    packed_args = signatures["packed bf16 quant_out=False"]
    head = dict(HD=64, BLOCK_D=64, PAGE=16, DOT_DTYPE=tl.bfloat16, PRECISION="tf32", QUANT_OUT=False, WINDOW=0)
    yield ("decode bf16 bias", _decode_split_kernel, decode_args,
           dict(NH=16, NKV=16, GROUP=1, GROUP_P=16, BLOCK_N=64, SPLIT=True, KV_QUANT=0, HAS_BIAS=True, **head),
           dict(num_warps=4, num_stages=3))
    for name, cache, causal, bias in (("bias", "bf16", True, True), ("cross", "bf16", False, False),
                                      ("cross", "fp8e4nv", False, False)):
        kv_quant = 2 if cache == "fp8e4nv" else 0
        yield (f"packed {cache} {name}", _packed_attention_kernel,
               dict(packed_args, k_cache_ptr=f"*{cache}", v_cache_ptr=f"*{cache}"),
               dict(NKV=16, GROUP=1, GROUP_P=1, BLOCK_Q=64, BLOCK_M=64, BLOCK_N=32, KV_QUANT=kv_quant, CAUSAL=causal,
                    HAS_BIAS=bias, FP8_ATTN=0, **head),
               dict(num_warps=4, num_stages=1 if kv_quant else 2))
    varlen_args = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16",
                   "query_start_loc_ptr": "*i32", "bias_ptr": "*fp32", "max_q_blocks": "i32", "q_stride_t": "i32",
                   "q_stride_h": "i32", "k_stride_t": "i32", "k_stride_h": "i32", "v_stride_t": "i32",
                   "v_stride_h": "i32", "out_stride_t": "i32", "out_stride_h": "i32", "bias_m1": "i32",
                   "scale_log2": "fp32"}
    for causal, bias in ((False, True), (True, False)):
        yield (f"varlen causal={causal} bias={bias}", _varlen_attention_kernel, varlen_args,
               dict(GROUP=1, GROUP_P=1, HD=64, BLOCK_D=64, BLOCK_Q=64, BLOCK_M=64, BLOCK_N=32, DOT_DTYPE=tl.bfloat16,
                    PRECISION="tf32", CAUSAL=causal, HAS_BIAS=bias),
               dict(num_warps=4, num_stages=2))


def other_kernels():
    for dtype in ("bf16", "fp16", "fp32"):
        yield (f"argmax {dtype}", _chunk_argmax_kernel,
               {"x_ptr": f"*{dtype}", "key_ptr": "*i32", "idx_ptr": "*i32", "V": "i32", "x_stride": "i64",
                "num_chunks": "i32"}, dict(CHUNK=CHUNK), dict(num_warps=8))
    for quant in (False, True):
        out = "fp8e4nv" if quant else "bf16"
        yield (f"rms_norm quant={quant}", _rms_norm_kernel,
               {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": f"*{out}", "qs_ptr": "*fp32",
                "x_stride": "i32", "res_stride": "i32", "out_stride": "i32", "eps": "fp32"},
               dict(H=4096, BLOCK=4096, HAS_RESIDUAL=True, NORM_TY=tl.bfloat16, QUANT=quant), dict(num_warps=16))
        yield (f"silu_and_mul quant={quant}", _silu_and_mul_kernel,
               {"x_ptr": "*bf16", "out_ptr": f"*{out}", "qs_ptr": "*fp32", "x_stride": "i32", "out_stride": "i32"},
               dict(INTER=14336, BLOCK=1024, QUANT=quant), dict(num_warps=4))
        yield (f"layer_norm quant={quant}", _layer_norm_kernel,
               {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": f"*{out}",
                "qs_ptr": "*fp32", "x_stride": "i32", "res_stride": "i32", "out_stride": "i32", "eps": "fp32"},
               dict(H=6144, BLOCK=8192, HAS_RESIDUAL=True, QUANT=quant), dict(num_warps=16))
    # Rotary fused with the KV write, whole-head (Llama) and partial (GPT-NeoX style, half of each head) over
    # an fp8 cache; and partial in place.
    for rotary_dim, cache, write_kv in ((128, "bf16", True), (64, "fp8e4nv", True), (64, "bf16", False)):
        yield (f"rotary rotary_dim={rotary_dim} cache={cache} write_kv={write_kv}", _rotary_kernel,
               {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16",
                "k_cache_ptr": f"*{cache}", "v_cache_ptr": f"*{cache}", "slot_ptr": "*i64", "scale_ptr": "*fp32",
                "q_stride_t": "i32", "q_stride_h": "i32", "k_stride_t": "i32", "k_stride_h": "i32",
                "v_stride_t": "i32", "v_stride_h": "i32", "cs_stride_t": "i32"},
               dict(NH=32, NKV=8, HD=128, HALF=rotary_dim // 2, BLOCK_QH=32, BLOCK_KH=8, BLOCK_HALF=rotary_dim // 2,
                    BLOCK_D=128, BLOCK_PASS=max(128 - rotary_dim, 1), WRITE_KV=write_kv,
                    KV_QUANT=2 if cache == "fp8e4nv" else 0), dict(num_warps=4))


def lora_kernels():
    """Batched LoRA shrink and expand over bfloat16 (tensor cores) and float32 (IEEE) slots."""
    for dtype, dot, precision in (("bf16", tl.bfloat16, "tf32"), ("fp32", tl.float32, "ieee")):
        meta = {"order_ptr": "*i32", "starts_ptr": "*i32", "counts_ptr": "*i32"}
        yield (f"lora shrink {dtype}", _shrink_kernel,
               {"x_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "s_ptr": "*fp32", **meta, "K": "i32", "R": "i32",
                "K_PER_SPLIT": "i32", "stride_xm": "i32", "stride_as": "i32", "stride_ar": "i32", "stride_ss": "i32",
                "stride_sm": "i32"},
               dict(DOT_DTYPE=dot, PRECISION=precision, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, SPLIT=16), {})
        yield (f"lora expand {dtype}", _expand_kernel,
               {"s_ptr": "*fp32", "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", **meta, "N": "i32", "R": "i32",
                "NUM_SPLITS": "i32", "stride_ss": "i32", "stride_sm": "i32", "stride_bs": "i32", "stride_bn": "i32",
                "stride_ym": "i32"},
               dict(DOT_DTYPE=dot, PRECISION=precision, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
                    SPLIT_P=16), {})


def kernels() -> list:
    """(name, kernel, signature, constexprs, options) of every kernel compiled here."""
    return list(itertools.chain(attention_kernels(), encdec_attention_kernels(), other_kernels(), lora_kernels(),
                                weight_only_kernels()))


def check(index: int) -> str:
    """Kernel `index` of kernels() compiled for sm_90, with the checks on its code that some kernels have: its
    line of output."""
    name, fn, signature, constexprs, options = kernels()[index]
    kernel = compile_for_sm90(fn, signature, constexprs, **options)
    if name.startswith("int4 gemv"):  # the codes become floats by bit operations, not conversions
        assert "cvt.rn.f32.s32" not in kernel.asm["ptx"], f"{name}: an int-to-float conversion per code"
        # ... masked in place (_scaled_nibble), not shifted down and sign-extended one by one (that took an
        # SGXT per code: 192 for 272 FFMA in the one-token kernel; none now)
        ops = sass_ops(kernel.asm["cubin"])
        assert ops["SGXT"] <= ops["FFMA"] / 8, f"{name}: {ops['SGXT']} SGXT for {ops['FFMA']} FFMA"
    if name == "int4 gemv row quads prefetch":  # x read 8 bytes a load; 2-byte loads for the scales and zero
        sass = sass_text(kernel.asm["cubin"])  # points only (x by 2-byte gathers: eight or more a chunk)
        assert "LDG.E.64" in sass and sass.count("LDG.E.U16") <= 4, f"{name}: 2-byte x loads"
    if name == "bf16 gemv":  # the weights read 16 bytes a load, not 2
        sass = sass_text(kernel.asm["cubin"])
        assert "LDG.E.128" in sass and "LDG.E.U16" not in sass, f"{name}: scalar weight loads"
    return f"{name}: {len(kernel.asm['cubin'])} bytes"


if __name__ == "__main__":
    import multiprocessing
    import os

    # Each kernel compiles on its own (Triton's front end, then ptxas): one process a core, in kernels()'s order.
    with multiprocessing.get_context("fork").Pool(min(len(os.sched_getaffinity(0)), 4)) as pool:
        for line in pool.imap(check, range(len(kernels()))):
            print(line, flush=True)
