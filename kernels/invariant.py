"""Batch-invariant linears and attention: a row's result does not depend on what else shares its batch.

Why: in bfloat16 (and float32) a matrix product's rounding can depend on the shape of the whole batch
(a library picks another blocking of the reduction for more rows), so a sequence's greedy text can change
with the problems it happens to be batched with: 6 of 12 greedy chain_sum texts did between
`concurrency=1` and a batched run. After He et al. ("Defeating nondeterminism in LLM inference", 2025)
and "Give Me FP32 or Give Me Death" (2025), every reduction a row takes part in is done in an order fixed
by that row alone:

- linears: rows in chunks of at most `LINEAR_ROWS`; whether a library kernel returns the same row for
  1..LINEAR_ROWS rows is probed once per weight (`rows_invariant`). If it does not, every row runs alone
  (a matrix-vector product, invariant by construction, slower);
- attention: every query row attends its own context in fixed chunks of `KEY_CHUNK` keys (positions
  [0, C), [C, 2C), ...), each chunk's softmax state merged into the running one in order. Decode rows,
  prefill rows and rows whose prefix came from the prefix cache all take the same chunks, so a token's
  attention output is the same whether it was computed alone, in a batch, in a prompt or one at a time.
  A fully masked chunk merges as an exact identity (its log-sum-exp is -inf), so the padding a batch
  adds changes nothing. Scores and the weighted sum are float32.

Limits: the per-chunk products are batched matmuls whose result per matrix must not depend on how many
matrices share the call, nor on how many query rows share one key chunk; tests/test_batch_invariance.py
checks that on the machine it runs on (linears are probed at load by `rows_invariant`). Compared with
the cascade (kernels/attention.py), decode rows read their shared prefixes once per row, not once per group.
Norms, rotary embeddings, activations and sampling are row-wise already.
"""

from __future__ import annotations

import torch

from .attention import PrefillSeq
from .decode_plan import DecodePlan

LINEAR_ROWS = 64  # a linear never sees more rows than this in one library call
KEY_CHUNK = 128  # keys per attention chunk; fixed for every row of every batch
QUERY_ROWS = 8  # query rows per attention product; fixed for decode and prefill alike


# ---------------------------------------------------------------------------------------------
# linears


def rows_invariant(linear, in_features: int, dtype: torch.dtype, seed: int = 0) -> bool:
    """Whether `linear` returns bit-identical rows for batches of 1..LINEAR_ROWS rows (a sample of sizes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(LINEAR_ROWS, in_features, generator=g).to(dtype)
    alone = torch.cat([linear(x[i:i + 1]) for i in range(LINEAR_ROWS)])
    return all(torch.equal(linear(x[:m]), alone[:m]) for m in (2, 3, 16, 17, LINEAR_ROWS))


class InvariantLinear:
    """A linear whose rows do not depend on the batch: fixed row chunks where the kernel allows, else row by row."""

    __slots__ = ("chunk", "inner")

    def __init__(self, inner, in_features: int, dtype: torch.dtype):
        self.inner = inner
        self.chunk = LINEAR_ROWS if rows_invariant(inner, in_features, dtype) else 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.chunk:
            return self.inner(x)
        return torch.cat([self.inner(part) for part in x.split(self.chunk)])

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.reference(x)

    def __getattr__(self, name):  # weight, bias, ... of the wrapped linear
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------------------------
# attention


def _chunk_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float):
    """Softmax state of queries over one key chunk, in float32.

    q (N, Hkv, M, D), k and v (N, Hkv, C, D), valid broadcastable to (N, Hkv, M, C) -> o (N, Hkv, M, D),
    lse (N, Hkv, M). Rows with no valid key get (0, -inf), which merges as an identity. Both products run
    on blocks of exactly QUERY_ROWS query rows (zero rows pad the last block), because a BLAS kernel may round
    a product of a few rows differently from the same rows inside a taller one (seen on an AVX2 CPU for
    fewer than 4 rows): so decode's G rows and a prompt's tq*G rows meet the same kernel shape."""
    N, Hkv, M, D = q.shape
    padded = -(-M // QUERY_ROWS) * QUERY_ROWS

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (N, Hkv, M, X) -> (N, Hkv, padded / R, R, X), zero-padded
        if padded > M:
            x = torch.cat([x, x.new_zeros(N, Hkv, padded - M, x.shape[-1])], dim=2)
        return x.view(N, Hkv, padded // QUERY_ROWS, QUERY_ROWS, x.shape[-1])

    scores = torch.matmul(blocks(q.float()), k.float().transpose(-1, -2)[:, :, None]) * scale
    scores = scores.view(N, Hkv, padded, -1)[:, :, :M].masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
    o = torch.matmul(blocks(probs), v.float()[:, :, None])
    return o.view(N, Hkv, padded, D)[:, :, :M], lse


def _merge(o: torch.Tensor | None, lse: torch.Tensor | None, o_c: torch.Tensor, lse_c: torch.Tensor):
    """Fold a chunk's state into the running one (None: the chunk is the first). Exact when either side is empty."""
    if o is None:
        return o_c, lse_c
    new = torch.logaddexp(lse, lse_c)
    safe = new.nan_to_num(neginf=0.0)
    return o * torch.exp(lse - safe)[..., None] + o_c * torch.exp(lse_c - safe)[..., None], new


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: DecodePlan,
                     scale: float) -> torch.Tensor:
    """q (B, Hq, D) -> (B, Hq, D): each row over its own context (plan.all_slots), KEY_CHUNK keys at a time."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G, D)
    lengths = (plan.all_bias[:, 0, 0, :] == 0).sum(1)  # (B,) context lengths
    slots = plan.all_slots  # (B, Tmax); plan_decode points padding at the row's first (written) slot
    o = lse = None
    for start in range(0, slots.shape[1], KEY_CHUNK):
        chunk = slots[:, start:start + KEY_CHUNK]
        width = chunk.shape[1]
        if width < KEY_CHUNK:  # every chunk is KEY_CHUNK wide, so every row's reduction has the same length
            chunk = torch.cat([chunk, chunk[:, :1].expand(B, KEY_CHUNK - width)], dim=1)
        k = k_cache.index_select(0, chunk.reshape(-1)).view(B, KEY_CHUNK, Hkv, D).transpose(1, 2)
        v = v_cache.index_select(0, chunk.reshape(-1)).view(B, KEY_CHUNK, Hkv, D).transpose(1, 2)
        valid = (torch.arange(start, start + KEY_CHUNK) < lengths[:, None])[:, None, None, :]  # (B, 1, 1, C)
        o, lse = _merge(o, lse, *_chunk_state(qg, k, v, valid, scale))
    return o.reshape(B, Hq, D).to(q.dtype)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqs: list[PrefillSeq],
                      scale: float) -> torch.Tensor:
    """Causal attention, q (T, Hq, D) -> (T, Hq, D), in the same fixed key chunks as `decode_attention`: one
    sequence's query rows share each key chunk (one product per chunk), each row masked to its own position."""
    _, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    out = torch.empty_like(q)
    for s in seqs:
        tq, tk = s.q_end - s.q_start, s.slots.numel()
        qs = q[s.q_start:s.q_end].reshape(tq, Hkv, G, D).permute(1, 0, 2, 3).reshape(1, Hkv, tq * G, D)
        position = torch.arange(tk - tq, tk).repeat_interleave(G)  # (tq*G,) each query row's own position
        o = lse = None
        for start in range(0, tk, KEY_CHUNK):
            chunk = s.slots[start:start + KEY_CHUNK]
            width = chunk.numel()
            if width < KEY_CHUNK:
                chunk = torch.cat([chunk, chunk[:1].expand(KEY_CHUNK - width)])
            k = k_cache.index_select(0, chunk).transpose(0, 1)[None]  # (1, Hkv, C, D)
            v = v_cache.index_select(0, chunk).transpose(0, 1)[None]
            keys = torch.arange(start, start + KEY_CHUNK)
            valid = ((keys[None, :] <= position[:, None]) & (keys[None, :] < tk))[None, None]  # (1, 1, tq*G, C)
            o, lse = _merge(o, lse, *_chunk_state(qs, k, v, valid, scale))
        out[s.q_start:s.q_end] = o.reshape(Hkv, tq, G, D).permute(1, 0, 2, 3).reshape(tq, Hq, D).to(q.dtype)
    return out
