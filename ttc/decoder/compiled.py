"""The decode step's work between two attention calls, compiled once with torch.compile (inductor).

Why: a decode step of a small model on a CPU is mostly per-op overhead (~1,800 ops of ~5-7 us each for the
embedded model), not arithmetic. Between layer i's attention and layer i+1's, the eager model runs ~20 ops:
o-proj, residual add, RMSNorm, gate/up-proj, SiLU, multiply, down-proj, residual add, RMSNorm, qkv-proj and the
rotary embedding. Inductor fuses the element-wise ones around the (library) matmuls.

How: `between(...)` is a pure function of tensors, and every layer passes its own weights as arguments, so
one graph serves all layers (dynamo guards on shapes and dtypes, not on which layer's tensors come in).
Row counts are symbolic (`dynamic=True`), so a run does not recompile as batches grow and shrink; one row
(one stream) gets its own specialised graph. Attention, the KV writes and the head stay eager: their shapes
and plans change every step. Limits: CPU; plain and quantized linears that expose `parts()`; not combined
with batch invariance (its linears chunk rows in Python). If torch.compile cannot build or run the graph
(no C++ compiler, an op inductor cannot lower), the model logs one warning and runs eager from then on.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ttc.kernels.rotary import apply_rotary_reference

log = logging.getLogger(__name__)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)


def between(a, x, cos, sin, eps: float, q_heads: int, kv_heads: int, o, mlp_norm, gate_up, down, next_norm, qkv):
    """Layer i after its attention, then layer i+1 up to its attention.

    a (T, Hq*D) attention output, x (T, H) residual stream; o/gate_up/down/qkv are `(function, tensors)` from a
    linear's `parts()` (qkv may be None after the last layer). Returns (x, h, qk (T, Hq+Hkv, D) rotated, v
    (T, Hkv, D)); h is the next norm's output (the head's input after the last layer)."""
    x = x + o[0](a, *o[1])
    h = _norm(x, mlp_norm, eps)
    gate, up = gate_up[0](h, *gate_up[1]).chunk(2, dim=-1)
    x = x + down[0](F.silu(gate) * up, *down[1])
    h = _norm(x, next_norm, eps)
    if qkv is None:
        return x, h, None, None
    return (x, h) + _project(h, cos, sin, q_heads, kv_heads, qkv)


def _project(h, cos, sin, q_heads: int, kv_heads: int, qkv):
    t = h.shape[0]
    out = qkv[0](h, *qkv[1])  # (T, (Hq + 2Hkv) * D)
    d = out.shape[1] // (q_heads + 2 * kv_heads)
    qk = apply_rotary_reference(out[:, : (q_heads + kv_heads) * d].reshape(t, q_heads + kv_heads, d), cos, sin)
    return qk, out[:, (q_heads + kv_heads) * d:].reshape(t, kv_heads, d)


def first(h, cos, sin, q_heads: int, kv_heads: int, qkv):
    """Layer 0 up to its attention: h (T, H) normed embeddings -> (qk rotated, v)."""
    return _project(h, cos, sin, q_heads, kv_heads, qkv)


class CompiledLayers:
    """The compiled `first` and `between` for one model, and the per-layer argument tuples they take."""

    def __init__(self, model):
        self.parts = [{name: layer[name].parts() for name in ("qkv", "o", "gate_up", "down")} for layer in model.layers]
        self.first = torch.compile(first, dynamic=True)
        self.between = torch.compile(between, dynamic=True)

    @classmethod
    def build(cls, model) -> CompiledLayers | None:
        if model.batch_invariant:
            raise ValueError("compile and batch_invariant cannot be combined: invariant linears chunk rows in Python")
        layers = model.layers
        if not all(hasattr(layer[n], "parts") for layer in layers for n in ("qkv", "o", "gate_up", "down")):
            log.warning("torch.compile skipped: a linear of this weight format has no functional form")
            return None
        return cls(model)
