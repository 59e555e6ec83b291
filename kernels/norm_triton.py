"""Triton twin of `norm.rms_norm_reference`: RMSNorm fused with the residual add before it.

Why: in decode every layer does `x = x + f(x); h = norm(x)` twice, on a few rows of a few hundred
features. Unfused that is three kernels (add, a float32 reduction, the scale) and three round trips
of x; here it is one program per row that reads x and the residual once and writes h and x + r.

Reference: `norm.rms_norm_reference(x, weight, eps, residual=None)`: the sum is rounded to x's dtype
first (as the reference does), then normalized in float32 and cast back.
Limits: hidden size <= 65536 (one row is one tile); the last dim must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_util import cast_rtne


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, stride_x, stride_r, stride_y, stride_s, eps,
                     H: tl.constexpr, BLOCK_H: tl.constexpr, HAS_RESIDUAL: tl.constexpr, INTERPRETED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_H)
    ok = i < H
    x = tl.load(x_ptr + row * stride_x + i, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + i, mask=ok, other=0.0).to(tl.float32))
        x = cast_rtne(x, s_ptr.dtype.element_ty, INTERPRETED)  # the sum in the model's dtype, as the reference
        tl.store(s_ptr + row * stride_s + i, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / H + eps)
    w = tl.load(w_ptr + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + i, cast_rtne(xf * rstd * w, y_ptr.dtype.element_ty, INTERPRETED), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x (..., H), weight (H,). Returns y, or (y, x + residual) when residual is given (new tensors)."""
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    assert x2.stride(-1) == 1, "the hidden dim must be contiguous"
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, H)
        s = torch.empty_like(y)
    else:
        r2 = s = y  # unused by the kernel
    block = triton.next_power_of_2(H)
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, y, s, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0),
                                     eps, H=H, BLOCK_H=block, HAS_RESIDUAL=residual is not None,
                                     INTERPRETED=x.device.type != "cuda",
                                     num_warps=min(16, max(1, block // 256)))
    y = y.view(x.shape)
    return (y, s.view(x.shape)) if residual is not None else y


# -------------------------------------------------------------------------------------------------
# Benchmark: python -m ttc.kernels.norm_triton (do_bench on CUDA; on CPU it times the reference)

def _bench():
    from ._timing import copy_bandwidth, floor_ms, time_ms
    from .norm import rms_norm_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth() if device == "cuda" else None
    H = 576  # SmolLM2-135M
    w = torch.rand(H, device=device) + 0.5
    for rows in (64, 4096):
        for dtype in (torch.bfloat16, torch.float32):
            x, r = (torch.randn(rows, H, device=device).to(dtype) for _ in range(2))
            fns = {"reference": lambda: rms_norm_reference(x, w, 1e-5, residual=r)}
            if device == "cuda":
                fns["triton"] = lambda: rms_norm(x, w, 1e-5, residual=r)
            for name, fn in fns.items():
                print(f"rows={rows:5d} {str(dtype):15s} {name:10s} {time_ms(fn, device):8.4f} ms")
            if bandwidth:
                nbytes = 4 * x.numel() * x.element_size()  # read x and r, write y and x + r
                print(f"rows={rows:5d} {str(dtype):15s} {'floor':10s} {floor_ms(nbytes, bandwidth):8.4f} ms")


if __name__ == "__main__":
    _bench()
