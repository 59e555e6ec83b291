"""Linear layers with weights pre-packed for oneDNN (the CPU fast path for bfloat16).

Why: `F.linear` on a plain (out, in) bf16 weight re-lays the weight out on every call; oneDNN's
blocked layout, packed once at load, runs the decode-shaped products (1-64 rows) 1.5-2x faster on
CPUs with AVX512-BF16 / AMX (measured in docs/benchmarks.md). This is what inductor's CPU
"freezing" does; doing it here keeps the model eager and readable.
Reference: `F.linear(x, weight, bias)`. Limits: CPU, bfloat16, 2-D inputs; anything else takes the
reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_FOR_ROWS = 16  # oneDNN picks a blocking for this many rows; other row counts still work


def _mkldnn_packing_available() -> bool:
    try:
        w = torch.zeros(8, 8, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_FOR_ROWS)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 8, dtype=torch.bfloat16), packed, None, "none", [], "")
        return torch.backends.mkldnn.is_available()
    except Exception:  # a build without oneDNN, or an op signature this version lacks
        return False


MKLDNN_PACKING = _mkldnn_packing_available()


class Linear:
    """y = x @ weight.T + bias, with the weight packed once where a faster layout exists."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True):
        self.weight, self.bias = weight, bias  # (out, in), (out,)
        self.packed = None
        if pack and MKLDNN_PACKING and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_FOR_ROWS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dim() == 2:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def parts(self):
        """(function, tensors) with function(x, *tensors) == self.reference(x): a module-level function and plain
        tensors, so that one torch.compile graph can take any layer's linears as arguments (ttc/decoder/compiled.py).
        The plain weight, not the packed one: a oneDNN-packed tensor has an opaque layout inductor cannot lower."""
        return F.linear, (self.weight, self.bias)
