"""RMSNorm, optionally fused with the residual add that precedes it.

Reference: y = x / sqrt(mean(x^2) + eps) * w, computed in float32 and cast back (as transformers does).
With `residual`, the sum x + residual is formed first and returned too, so a layer does
`h, x = rms_norm(a, w, eps, residual=x)`: one pass instead of an add and a norm.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None):
    """x (..., H), weight (H,). Returns y, or (y, x + residual) when residual is given."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = (y * weight.float()).to(x.dtype)
    return (y, x) if residual is not None else y


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """The CPU fast path: PyTorch's fused rms_norm in float32, bit-identical to the reference
    (tests/test_kernels_cpu.py) in 1-3 ops instead of 8; each op costs ~5 us at decode sizes."""
    if residual is not None:
        x = x + residual
    y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)
    return (y, x) if residual is not None else y
