"""Triton twin of `rotary.apply_rotary_reference`: rotary embedding on the new tokens, in place.

Why: the reference builds the rotated q and k with four float32 temporaries and a concatenation;
this kernel reads each new token's q and k heads once and writes them back rotated, in place in the
fused qkv projection output (the caller passes the (T, Hq + Hkv, D) view of it).

Reference: `rotary.apply_rotary_reference(x, cos, sin)`, half-split layout (transformers'
rotate_half): for x = [x1, x2], out = [x1*cos - x2*sin, x2*cos + x1*sin], in float32, cast back.
Limits: x (T, H, D) with a contiguous last dim (rows and heads may be strided); D even, <= 1024.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_util import cast_rtne


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_ot, stride_oh, stride_c,
                   H: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   INTERPRETED: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    ok = (h < H)[:, None] & (i < HALF)[None, :]
    src = x_ptr + t * stride_xt + h[:, None] * stride_xh + i[None, :]  # (BLOCK_H, BLOCK_HALF) first halves
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * stride_c + i, mask=i < HALF, other=0.0)[None, :]
    s = tl.load(sin_ptr + t * stride_c + i, mask=i < HALF, other=0.0)[None, :]
    dst = out_ptr + t * stride_ot + h[:, None] * stride_oh + i[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(dst, cast_rtne(x1 * c - x2 * s, ty, INTERPRETED), mask=ok)
    tl.store(dst + HALF, cast_rtne(x2 * c + x1 * s, ty, INTERPRETED), mask=ok)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """x (T, H, D); cos, sin (T, D/2) float32. Returns the rotated tensor: x itself when inplace."""
    T, H, D = x.shape
    assert x.stride(-1) == 1 and D % 2 == 0, "the head dim must be contiguous and even"
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    out = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
    _rotary_kernel[(T,)](x, out, cos, sin, x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0),
                         H=H, HALF=D // 2, BLOCK_H=triton.next_power_of_2(H),
                         BLOCK_HALF=triton.next_power_of_2(D // 2), INTERPRETED=x.device.type != "cuda")
    return out


# -------------------------------------------------------------------------------------------------
# Benchmark: python -m ttc.kernels.rotary_triton (do_bench on CUDA; on CPU it times the reference)

def _bench():
    from ._timing import copy_bandwidth, floor_ms, time_ms
    from .rotary import apply_rotary_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth() if device == "cuda" else None
    Hq, Hkv, D = 9, 3, 64  # SmolLM2-135M: rotary on q and k, straight out of the fused qkv projection
    for T in (64, 4096):
        for dtype in (torch.bfloat16, torch.float32):
            qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device=device).to(dtype)
            x = qkv[:, : (Hq + Hkv) * D].view(T, Hq + Hkv, D)
            ang = torch.rand(T, D // 2, device=device) * 6.28
            cos, sin = ang.cos(), ang.sin()
            fns = {"reference": lambda: apply_rotary_reference(x, cos, sin)}
            if device == "cuda":
                fns["triton in place"] = lambda: apply_rotary(x, cos, sin, inplace=True)
            for name, fn in fns.items():
                print(f"T={T:5d} {str(dtype):15s} {name:16s} {time_ms(fn, device):8.4f} ms")
            if bandwidth:
                nbytes = 2 * x.numel() * x.element_size() + 2 * cos.numel() * 4
                print(f"T={T:5d} {str(dtype):15s} {'floor':16s} {floor_ms(nbytes, bandwidth):8.4f} ms")


if __name__ == "__main__":
    _bench()
