"""Small Triton helpers shared by the kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cast_rtne(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 x -> dtype, rounded to nearest even as on the GPU.

    Triton 3.9's interpreter truncates float32 -> bfloat16 casts; there (INTERPRETED) the rounding
    is done on the bits first, so the cast that follows is exact. Compiled code takes the plain cast.
    """
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
