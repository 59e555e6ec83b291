"""The dispatcher behind `ttc.kernels` (the package re-exports it; its docstring has the table)."""


from __future__ import annotations

import contextlib
import functools
import importlib

import torch

from .attention import (GatherWorkspace, PrefillBatch, PrefillSeq, decode_attention as decode_attention_reference,
                        decode_attention_naive, flash_cpu_takes, merge_states,
                        prefill_attention as prefill_attention_reference, prefill_attention_batched,
                        prefill_attention_flash_cpu)
from .decode_plan import MAX_SEGMENTS, DecodePlan, GroupCache, SharedSegment, plan_decode
from .norm import rms_norm_cpu, rms_norm_reference
from .rotary import apply_rotary_reference, apply_rotary_tables, rotary_tables
from .sampling import sample_reference

__all__ = ["DecodePlan", "GatherWorkspace", "GroupCache", "PrefillBatch", "PrefillSeq", "SharedSegment", "plan_decode", "merge_states", "decode_attention",
           "decode_attention_naive", "prefill_attention", "rms_norm", "apply_rotary", "rotary_tables", "sample", "reference",
           "uses_triton", "has_triton", "triton_on_cpu", "static_work_table"]

_force_reference = False
_triton_on_cpu = False


@functools.cache
def has_triton() -> bool:
    """Whether Triton imports here; asked once, on the first CUDA tensor."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def uses_triton(t: torch.Tensor) -> bool:
    return (t.is_cuda or _triton_on_cpu) and not _force_reference and has_triton()


@contextlib.contextmanager
def triton_on_cpu():
    """Send CPU tensors through the Triton kernels inside this block: the tests' way to run the CUDA hot path
    (the engine's, the CUDA graph runner's) on a machine without a GPU. Needs TRITON_INTERPRET=1 set before the
    kernel modules are imported; the interpreter is slow, so only tiny models belong here."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton_on_cpu() needs TRITON_INTERPRET=1 (set before Triton's kernels are imported)")
    global _triton_on_cpu
    old, _triton_on_cpu = _triton_on_cpu, True
    try:
        yield
    finally:
        _triton_on_cpu = old


@functools.cache
def _triton(module: str):
    return importlib.import_module(f".{module}", __package__)


@contextlib.contextmanager
def reference():
    """Run every kernel's PyTorch reference inside this block."""
    global _force_reference
    old, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = old


def decode_attention(q, k_cache, v_cache, plan, scale: float, private_partial=None):
    """q (B, Hq, D); k_cache, v_cache (S, Hkv, D) -> (B, Hq, D): each shared segment read once per group.
    plan: a DecodePlan, or a `static_work_table` filled for this step (a CUDA graph's; Triton only).
    `private_partial`: the rows' private parts read in place (`int4_cpu.paged_partial`), on the CPU path."""
    if not isinstance(plan, DecodePlan):
        return _triton("attention_triton").decode_attention_static(q, k_cache, v_cache, plan, scale)
    if uses_triton(q):
        return _triton("attention_triton").decode_attention(q, k_cache, v_cache, plan, scale)
    if _force_reference:
        private_partial = None
    return decode_attention_reference(q, k_cache, v_cache, plan, scale, private_partial)


def static_work_table(max_rows: int, num_q_heads: int, num_kv_heads: int, head_dim: int, device, max_context: int,
                      slot_capacity: int, part_capacity: int | None = None):
    """Fixed-capacity decode-attention buffers that a CUDA graph reads (`attention_triton.StaticWorkTable`), with
    the tiling `decode_attention`'s Triton path uses. Sized for `max_rows` rows of up to `max_context` tokens:
    their partial states always fit (or `part_capacity` of them); a plan's slots fit up to `slot_capacity`."""
    module = _triton("attention_triton")
    G = num_q_heads // num_kv_heads
    rows_per_item = module.tile_rows(module.BLOCK_M, G) // G
    parts = part_capacity or max_rows * (-(-max_context // module.CHUNK) + MAX_SEGMENTS + 1)
    return module.StaticWorkTable(max_rows, num_q_heads, head_dim, rows_per_item, module.CHUNK, torch.device(device),
                                  parts, slot_capacity, MAX_SEGMENTS)


def prefill_attention(q, k_cache, v_cache, seqs, scale: float):
    """q (T, Hq, D); k_cache, v_cache (S, Hkv, D); seqs: each sequence's query rows and context slots.
    CPU: ATen's flash kernel in fixed tiles; CUDA (and the CUDA path on the CPU, `triton_on_cpu`): the sequences
    padded into a few SDPA calls; elsewhere, and under `reference()`, one SDPA call per sequence."""
    if _force_reference:
        return prefill_attention_reference(q, k_cache, v_cache, seqs, scale)
    if q.is_cuda or _triton_on_cpu:
        return prefill_attention_batched(q, k_cache, v_cache, seqs, scale)
    if flash_cpu_takes(q):
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


def sample(logits, temperature, top_k, top_p, min_p, uniforms, lse=None):
    """logits (B, V), per-row parameters (B,) and uniforms (B,) -> (tokens (B,) long, logprobs (B,) float32).

    The parameters may live on the CPU whatever the logits' device; each implementation moves them. lse: the
    rows' torch.logsumexp if the caller has it (the reference then skips that pass; the Triton kernel computes
    its own in the same pass as the rest).
    """
    if uses_triton(logits):
        return _triton("sampling_triton").sample(logits, temperature, top_k, top_p, min_p, uniforms)
    return sample_reference(logits, temperature, top_k, top_p, min_p, uniforms, lse)
