"""What the Triton kernels share: the matrix-unit operand dtype and precision for a model dtype."""

import torch
import triton.language as tl
from triton import knobs

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_args(dtype: torch.dtype) -> dict:
    """DOT_DTYPE / PRECISION constexprs for tl.dot on `dtype` inputs.

    float32 stays IEEE (Triton would use tf32). Triton's CPU interpreter multiplies bfloat16's raw
    bits in tl.dot (seen in 3.7), so there bfloat16 operands are widened to float32.
    """
    interpreted = knobs.runtime.interpret
    dot_dtype = tl.float32 if interpreted and dtype == torch.bfloat16 else _TL[dtype]
    return {"DOT_DTYPE": dot_dtype, "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
