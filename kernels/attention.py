"""Attention over the paged KV pool: decode with shared prefixes (cascade), and prefill.

Why: tree search and sampling keep many branches whose KV shares long prefixes. Attending to a
shared prefix once per group (one batched product for every query of the group), then to each
branch's own blocks, and merging the two partial softmax states by log-sum-exp, reads the shared
KV once instead of once per branch. On a CPU that is the difference between gathering
B * context slots per layer and gathering prefix + B * suffix.

The plan (which slots are shared by which rows) is built once per step from the block tables and
reused by every layer. Two references live here:
- `decode_attention`: the cascade above, in plain PyTorch (the CPU path and the Triton twin's oracle);
- `decode_attention_naive`: every branch gathers its whole context; the slow, obviously-right twin.

Shapes: q (B, Hq, D); k_cache, v_cache (S, Hkv, D) for one layer, S = num_blocks * block_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SharedSegment:
    rows: torch.Tensor | None  # (b,) query rows that attend to these slots; None means every row
    slots: torch.Tensor  # (T,) pool slots of full blocks shared by exactly those rows


@dataclass(frozen=True)
class DecodePlan:
    """Where each of B single-token queries finds its keys."""

    segments: tuple[SharedSegment, ...]
    private_slots: torch.Tensor  # (B, P) slots of each row's unshared tokens, padded with its first context slot (written, finite)
    private_bias: torch.Tensor  # (B, 1, 1, P) 0 where valid, -inf on padding
    all_slots: torch.Tensor  # (B, Tmax) every row's whole context (for the naive twin and tests)
    all_bias: torch.Tensor  # (B, 1, 1, Tmax)


def plan_decode(block_tables: list[list[int]], lengths: list[int], block_size: int,
                max_segments: int = 8, min_shared_tokens: int = 16, dtype: torch.dtype = torch.float32) -> DecodePlan:
    """Group full blocks by the exact set of rows that use them.

    A block used by two or more rows becomes part of that row-set's shared segment; everything else
    (and segments beyond `max_segments`, smallest first, or shorter than `min_shared_tokens`) is
    gathered per row. Folding a segment into the private part is always correct, only slower, so the
    caps bound the per-layer op count on wide, shallow trees. Only the grouping walks blocks in
    Python; per-token slot arithmetic is vectorized (B * context tokens would be too slow in a loop).
    """
    B = len(block_tables)
    users: dict[int, list[int]] = {}
    for row, (table, n) in enumerate(zip(block_tables, lengths)):
        for block in table[: n // block_size]:  # only full blocks can be shared
            users.setdefault(block, []).append(row)
    by_rows: dict[tuple[int, ...], list[int]] = {}
    for block, rows in users.items():
        if len(rows) > 1:
            by_rows.setdefault(tuple(rows), []).append(block)
    groups = sorted(by_rows.items(), key=lambda kv: -len(kv[1]) * len(kv[0]))
    kept = [(rows, blocks) for rows, blocks in groups[:max_segments] if len(blocks) * block_size >= min_shared_tokens]

    offsets = torch.arange(block_size)
    segments = []
    for rows, blocks in kept:
        slots = (torch.tensor(blocks, dtype=torch.long)[:, None] * block_size + offsets).reshape(-1)
        row_index = None if len(rows) == B else torch.tensor(rows, dtype=torch.long)
        segments.append(SharedSegment(rows=row_index, slots=slots))

    # (B, NB) block table padded with block 0; (B, Tmax) slots of every context position
    width = max(len(t) for t in block_tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)
    n = torch.tensor(lengths, dtype=torch.long)[:, None]
    t_max = int(max(lengths))
    pos = torch.arange(t_max)
    block_of_pos = table[:, pos // block_size]  # (B, Tmax)
    all_slots = block_of_pos * block_size + pos % block_size
    valid = pos[None, :] < n
    # padding points at the row's first context slot, which holds written (finite) K/V: the pool is
    # torch.empty, and an unwritten slot may hold NaN bits, which a -inf mask does not cancel (0 * NaN)
    all_slots = torch.where(valid, all_slots, all_slots[:, :1])
    all_bias = torch.zeros(B, 1, 1, t_max).masked_fill_(~valid[:, None, None, :], NEG_INF)

    shared = torch.tensor(sorted({b for _, blocks in kept for b in blocks}), dtype=torch.long)
    private = valid & ~torch.isin(block_of_pos, shared) if len(kept) else valid
    counts = private.sum(1)
    p_max = max(1, int(counts.max()))
    # stable sort moves each row's private positions to the front, in order
    order = torch.argsort((~private).to(torch.int8), dim=1, stable=True)[:, :p_max]
    private_slots = all_slots.gather(1, order)
    private_bias = torch.zeros(B, 1, 1, p_max, dtype=dtype).masked_fill_(
        (torch.arange(p_max)[None, :] >= counts[:, None])[:, None, None, :], NEG_INF)
    return DecodePlan(tuple(segments), private_slots, private_bias, all_slots, all_bias)


def _partial_reference(q, k, v, bias, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    # rows with no valid key (lse = -inf) get zero weights, not NaN
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
    o = torch.matmul(probs.to(v.dtype), v).float()
    return o, lse


def _flash_cpu_available() -> bool:
    try:
        x = torch.zeros(1, 1, 2, 4)
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(x, x, x, scale=1.0)
        return True
    except Exception:
        return False


_FLASH_CPU = _flash_cpu_available()


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float):
    """Softmax state of q over k/v: (normalized output, log-sum-exp).

    q (N, H, G, D), k and v (N, H, T, D); bias broadcastable to (N, H, G, T) (0 or -inf).
    Returns o (N, H, G, D) and lse (N, H, G), both float32. On CPU this is PyTorch's fused flash
    attention, which returns the log-sum-exp the cascade merge needs (one op instead of ~8).
    Rows whose keys are all masked are left to the reference, which defines them as (0, -inf).
    """
    if _FLASH_CPU and q.device.type == "cpu" and q.dim() == 4 and q.dtype in (torch.float32, torch.bfloat16):
        mask = None if bias is None else bias.to(q.dtype)  # a no-op when the plan was built in q's dtype
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
        return o.float(), lse
    return _partial_reference(q, k, v, bias, scale)


def merge_states(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor):
    """Merge two partial softmax states over disjoint key sets: o (..., D), lse (...)."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.nan_to_num(neginf=0.0)
    w_a = torch.exp(lse_a - safe)[..., None]
    w_b = torch.exp(lse_b - safe)[..., None]
    return o_a * w_a + o_b * w_b, lse


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: DecodePlan,
                     scale: float) -> torch.Tensor:
    """Cascade attention: each shared segment once per group, then private slots per row, merged.

    q (B, Hq, D) -> (B, Hq, D) in q's dtype. Grouped-query: Hq = Hkv * G.
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G, D)

    # private part: (B, Hkv, G, D) @ (B, Hkv, D, P)
    P = plan.private_slots.shape[1]
    flat = plan.private_slots.view(-1)  # index_select is ~9x faster than advanced indexing here
    k = k_cache.index_select(0, flat).view(B, P, Hkv, D).permute(0, 2, 1, 3)  # (B, Hkv, P, D)
    v = v_cache.index_select(0, flat).view(B, P, Hkv, D).permute(0, 2, 1, 3)
    o, lse = _partial(qg, k, v, plan.private_bias, scale)  # (B, Hkv, G, D), (B, Hkv, G)

    for seg in plan.segments:
        ks = k_cache.index_select(0, seg.slots).permute(1, 0, 2)  # (Hkv, T, D), once for the whole group
        vs = v_cache.index_select(0, seg.slots).permute(1, 0, 2)
        qs = qg if seg.rows is None else qg[seg.rows]
        b = qs.shape[0]
        q_heads = qs.permute(1, 0, 2, 3).reshape(1, Hkv, b * G, D)  # every query of the group in one product
        o_s, lse_s = _partial(q_heads, ks[None], vs[None], None, scale)
        o_s = o_s.reshape(Hkv, b, G, D).permute(1, 0, 2, 3)
        lse_s = lse_s.reshape(Hkv, b, G).permute(1, 0, 2)
        if seg.rows is None:
            o, lse = merge_states(o, lse, o_s, lse_s)
        else:
            o_m, lse_m = merge_states(o[seg.rows], lse[seg.rows], o_s, lse_s)
            o = o.index_copy(0, seg.rows, o_m)
            lse = lse.index_copy(0, seg.rows, lse_m)
    return o.reshape(B, Hq, D).to(q.dtype)


def decode_attention_naive(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: DecodePlan,
                           scale: float) -> torch.Tensor:
    """Every row gathers its whole context: no sharing. The slow twin of decode_attention."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    k = k_cache[plan.all_slots].permute(0, 2, 1, 3)  # (B, Hkv, T, D)
    v = v_cache[plan.all_slots].permute(0, 2, 1, 3)
    o, _ = _partial_reference(q.reshape(B, Hkv, Hq // Hkv, D), k, v, plan.all_bias, scale)
    return o.reshape(B, Hq, D).to(q.dtype)


@dataclass(frozen=True)
class PrefillSeq:
    q_start: int  # rows [q_start, q_end) of the flattened queries belong to this sequence
    q_end: int
    slots: torch.Tensor  # (Tk,) the sequence's whole context, new tokens last


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqs: list[PrefillSeq],
                      scale: float) -> torch.Tensor:
    """Causal attention for sequences extended by several tokens each. q (T, Hq, D) -> (T, Hq, D)."""
    out = torch.empty_like(q)
    Hq, Hkv = q.shape[1], k_cache.shape[1]
    for s in seqs:
        tq, tk = s.q_end - s.q_start, s.slots.numel()
        qs = q[s.q_start:s.q_end].transpose(0, 1)  # (Hq, Tq, D)
        k = k_cache.index_select(0, s.slots).transpose(0, 1)  # (Hkv, Tk, D)
        v = v_cache.index_select(0, s.slots).transpose(0, 1)
        # query i sits at context position tk - tq + i and sees keys up to it
        mask = torch.arange(tk)[None, :] <= (torch.arange(tq)[:, None] + (tk - tq))
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, k, v, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
        out[s.q_start:s.q_end] = o.transpose(0, 1)
    return out
