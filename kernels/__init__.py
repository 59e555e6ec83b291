"""ttc.kernels: the one place that decides which implementation of each fast path runs.

Triton kernels run on CUDA tensors when Triton is importable; everything else runs the PyTorch
reference, which is also the CPU fast path. `reference()` forces the references (tests, debugging).

| fast path | reference (CPU, oracle) | Triton twin (CUDA) |
| --- | --- | --- |
| decode attention over shared prefixes | `attention.decode_attention` | `attention_triton.decode_attention` |
| prefill attention (causal, cached prefix) | `attention.prefill_attention` (SDPA, masked) | none; CPU: `attention.prefill_attention_flash_cpu` |
| RMSNorm (+ residual add) | `norm.rms_norm_reference` | `norm_triton.rms_norm` |
| rotary embedding (in place on request) | `rotary.apply_rotary_reference` | `rotary_triton.apply_rotary` |
| int4 linear (Q4_1 codes) and int8 head (Q8_0), float32 activations, CPU | `quant.Int4Linear.reference`, F.linear on the float head | none; x86 AVX2: `int4_cpu` (C++, built on first use) |
| decode attention's private part read in place (the int4 CPU models) | gather + `attention._partial` | none; x86 AVX2: `int4_cpu.paged_partial` |
| a decode layer's work between attention calls (the int4 CPU models) | the model's eager layer | none; x86 AVX2: `int4_cpu.FusedLayer` (same bits) |
| temperature / top-k / top-p / min-p sampling, drawn in vocabulary order | `sampling.sample_reference` | `sampling_triton.sample` |

Prefill attention has no Triton twin yet: on CPU it runs ATen's flash kernel in fixed tiles
(`prefill_attention_flash_cpu`, whose rows do not depend on a cached prefix), elsewhere the reference
(SDPA, which picks a fused kernel on CUDA).
Sampling has one PyTorch implementation: the engine's sampler (`ttc.decoder.sampling.sample`) is an
adapter over `sample` below, so a seed draws the same token on CPU and CUDA (up to float32 rounding
at a boundary; see `sampling_triton`).
The Triton modules are imported on the first CUDA call, never on a CPU-only path, so `import ttc`
does not pay for Triton and a test can set TRITON_INTERPRET before the kernels are compiled.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch

from .attention import (DecodePlan, GatherWorkspace, PrefillSeq, SharedSegment, decode_attention as decode_attention_reference,
                        decode_attention_naive, flash_cpu_takes, merge_states, plan_decode,
                        prefill_attention as prefill_attention_reference, prefill_attention_flash_cpu)
from .norm import rms_norm_cpu, rms_norm_reference
from .rotary import apply_rotary_reference, apply_rotary_tables, rotary_tables
from .sampling import sample_reference

__all__ = ["DecodePlan", "GatherWorkspace", "PrefillSeq", "SharedSegment", "plan_decode", "merge_states", "decode_attention",
           "decode_attention_naive", "prefill_attention", "rms_norm", "apply_rotary", "rotary_tables", "sample", "reference",
           "uses_triton", "has_triton"]

_force_reference = False


@functools.cache
def has_triton() -> bool:
    """Whether Triton imports here; asked once, on the first CUDA tensor."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def uses_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and not _force_reference and has_triton()


@functools.cache
def _triton(module: str):
    return importlib.import_module(f".{module}", __name__)


@contextlib.contextmanager
def reference():
    """Run every kernel's PyTorch reference inside this block."""
    global _force_reference
    old, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = old


def decode_attention(q, k_cache, v_cache, plan: DecodePlan, scale: float, private_partial=None):
    """q (B, Hq, D); k_cache, v_cache (S, Hkv, D) -> (B, Hq, D): each shared segment read once per group.
    `private_partial`: the rows' private parts read in place (`int4_cpu.paged_partial`), on the CPU path."""
    if uses_triton(q):
        return _triton("attention_triton").decode_attention(q, k_cache, v_cache, plan, scale)
    if _force_reference:
        private_partial = None
    return decode_attention_reference(q, k_cache, v_cache, plan, scale, private_partial)


def prefill_attention(q, k_cache, v_cache, seqs, scale: float):
    """q (T, Hq, D); k_cache, v_cache (S, Hkv, D); seqs: each sequence's query rows and context slots."""
    if not _force_reference and flash_cpu_takes(q):
        return prefill_attention_flash_cpu(q, k_cache, v_cache, seqs, scale)
    return prefill_attention_reference(q, k_cache, v_cache, seqs, scale)


def rms_norm(x, weight, eps: float, residual=None):
    """x (..., H) -> y, or (y, x + residual) when residual is given."""
    if uses_triton(x):
        return _triton("norm_triton").rms_norm(x, weight, eps, residual)
    if _force_reference:
        return rms_norm_reference(x, weight, eps, residual)
    return rms_norm_cpu(x, weight, eps, residual)


def apply_rotary(x, cos, sin, inplace: bool = False, tables=None):
    """x (T, H, D); cos, sin (T, D/2). Returns the rotated tensor; with inplace, that is x itself.

    `tables` (from `rotary_tables(cos, sin)`, built once per forward) enables the CPU fast path.
    """
    if uses_triton(x):
        return _triton("rotary_triton").apply_rotary(x, cos, sin, inplace=inplace)
    if tables is not None and not _force_reference:
        out = apply_rotary_tables(x, *tables)
    else:
        out = apply_rotary_reference(x, cos, sin)
    return x.copy_(out) if inplace else out


def sample(logits, temperature, top_k, top_p, min_p, uniforms):
    """logits (B, V), per-row parameters (B,) and uniforms (B,) -> (tokens (B,) long, logprobs (B,) float32).

    The parameters may live on the CPU whatever the logits' device; each implementation moves them.
    """
    if uses_triton(logits):
        return _triton("sampling_triton").sample(logits, temperature, top_k, top_p, min_p, uniforms)
    return sample_reference(logits, temperature, top_k, top_p, min_p, uniforms)
