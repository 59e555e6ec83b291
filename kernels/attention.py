"""Attention over the paged KV pool: decode with shared prefixes (cascade), and prefill.

Why: tree search and sampling keep many branches whose KV shares long prefixes. Attending to a
shared prefix once per group (one batched product for every query of the group), then to each
branch's own blocks, and merging the two partial softmax states by log-sum-exp, reads the shared
KV once instead of once per branch. On a CPU that is the difference between gathering
B * context slots per layer and gathering prefix + B * suffix.

The plan (which slots are shared by which rows) is built once per step from the block tables and
reused by every layer (`decode_plan.plan_decode`). Two references live here:
- `decode_attention`: the cascade above, in plain PyTorch (the CPU path and the Triton twin's oracle);
- `decode_attention_naive`: every branch gathers its whole context; the slow, obviously-right twin.

Shapes: q (B, Hq, D); k_cache, v_cache (S, Hkv, D) for one layer, S = num_blocks * block_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decode_plan import DecodePlan, PrivateBucket


class GatherWorkspace:
    """Output buffers for the decode step's KV gathers, kept and reused across layers and steps.

    Why: at 128 rows the private gather of one layer is ~37 MB per tensor. glibc serves any block
    above its mmap ceiling (32 MB) with a fresh mmap, so every gather page-faults its whole output
    in and unmaps it after: measured on a 2-core EPYC, 40 ms a layer against 7 ms into a kept buffer.
    One workspace per engine (engine calls are serialized); not safe to share between threads.
    Buffers only grow; `release` drops them.
    """

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def gather(self, name: str, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """source.index_select(0, index) written into the kept buffer `name`: (len(index), *source.shape[1:])."""
        row = source.shape[1:]
        need = index.numel() * source[0].numel()
        key = (name, source.dtype, source.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < need:
            buf = self._buffers[key] = torch.empty(need, dtype=source.dtype, device=source.device)
        out = buf[:need].view(index.numel(), *row)
        return torch.index_select(source, 0, index, out=out)

    def release(self) -> None:
        self._buffers.clear()


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
                     scale: float, private_partial=None) -> torch.Tensor:
    """Cascade attention: each shared segment once per group, then private slots per row, merged.

    q (B, Hq, D) -> (B, Hq, D) in q's dtype. Grouped-query: Hq = Hkv * G. `private_partial(q, k_cache, v_cache,
    slots, bias, scale) -> (o, lse)`: the private part computed where the keys lie instead of gathered first
    (ttc.kernels.int4_cpu.paged_partial, for the models on those kernels); None: gathered, then `_partial`.
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G, D)

    # private part, per bucket of rows: (b, Hkv, G, D) @ (b, Hkv, D, p)
    states = []
    for i, bucket in enumerate(plan.private_buckets or (PrivateBucket(None, plan.private_slots, plan.private_bias),)):
        b, P = bucket.slots.shape
        q_rows = qg if bucket.rows is None else qg[bucket.rows]
        if private_partial is not None:
            states.append(private_partial(q_rows, k_cache, v_cache, bucket.slots, bucket.bias, scale))
            continue
        flat = bucket.slots.view(-1)  # index_select is ~9x faster than advanced indexing here
        if plan.workspace is not None:
            k, v = plan.workspace.gather(f"k{i}", k_cache, flat), plan.workspace.gather(f"v{i}", v_cache, flat)
        else:
            k, v = k_cache.index_select(0, flat), v_cache.index_select(0, flat)
        k = k.view(b, P, Hkv, D).permute(0, 2, 1, 3)  # (b, Hkv, P, D)
        v = v.view(b, P, Hkv, D).permute(0, 2, 1, 3)
        states.append(_partial(q_rows, k, v, bucket.bias, scale))
    if len(states) == 1:
        o, lse = states[0]  # (B, Hkv, G, D), (B, Hkv, G)
    else:
        o = torch.cat([s[0] for s in states]).index_select(0, plan.bucket_unsort)
        lse = torch.cat([s[1] for s in states]).index_select(0, plan.bucket_unsort)

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


class PrefillBatch(list):
    """The sequences of one prefill forward (a list of PrefillSeq, read as such everywhere), with what the batched
    attention builds from them once and every layer reads (`prefill_groups`, made on first use)."""

    def __init__(self, seqs=()):
        super().__init__(seqs)
        self.groups: tuple | None = None  # ((device, query heads), [PrefillGroup, ...]) of the first call


@dataclass(frozen=True)
class PrefillGroup:
    """b sequences attended in one padded call: query rows padded to Tq, keys to Tk."""

    q_index: torch.Tensor  # (b, Tq) rows of the flattened queries; padding repeats the sequence's first row
    q_valid: torch.Tensor  # (b, Tq) bool: a real query row
    q_rows: torch.Tensor  # (n,) q_index[q_valid]: where the group's outputs go
    k_slots: torch.Tensor  # (b, Tk) pool slots; padding repeats the sequence's first slot (written, finite)
    mask: torch.Tensor  # (b, 1, Tq, Tk) bool: key j is visible to query i (causal, within the context)


PREFILL_MAX_WASTE = 2.0  # a group's padded (query x key) area stays within this many times its sequences' own
# a group's scores (heads x b x Tq x Tk) stay within this many elements, or within its first sequence's own: SDPA with
# a mask may take its math path, which holds every score (and their softmax) at once; one sequence alone is what the
# per-sequence reference holds too
PREFILL_MAX_SCORES = 1 << 26


def prefill_groups(seqs: list[PrefillSeq], device: torch.device, heads: int = 1,
                   max_waste: float = PREFILL_MAX_WASTE, max_scores: int = PREFILL_MAX_SCORES):
    """Sequences grouped for padded calls, longest context first: a sequence joins the current group while the
    padded area (b * Tq * Tk) stays within `max_waste` times the group's real one (plus 4,096, so that short
    sequences share a call) and the group's scores (heads * b * Tq * Tk) within `max_scores`. Index tensors are
    built on the device from one (4, b) copy per group."""
    order = sorted(range(len(seqs)), key=lambda i: -seqs[i].slots.numel())
    flat = torch.cat([s.slots for s in seqs]) if len(seqs) > 1 else seqs[0].slots  # (sum Tk,)
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + s.slots.numel())
    chunks, current, real, most_q = [], [], 0, 0
    for i in order:
        tq, tk = seqs[i].q_end - seqs[i].q_start, seqs[i].slots.numel()
        if current:
            big_k = seqs[current[0]].slots.numel()  # the first is the longest
            padded = (len(current) + 1) * max(most_q, tq) * big_k
            if padded > max_waste * (real + tq * tk) + 4096 or heads * padded > max_scores:
                chunks.append(current)
                current, real, most_q = [], 0, 0
        current.append(i)
        real, most_q = real + tq * tk, max(most_q, tq)
    chunks.append(current)
    groups = []
    for chunk in chunks:
        meta = torch.tensor([[seqs[i].q_end - seqs[i].q_start for i in chunk], [seqs[i].slots.numel() for i in chunk],
                             [seqs[i].q_start for i in chunk], [offsets[i] for i in chunk]], device=device)
        tq, tk, q_start, k_start = meta  # (b,) each
        big_q, big_k = max(seqs[i].q_end - seqs[i].q_start for i in chunk), seqs[chunk[0]].slots.numel()
        ar_q, ar_k = torch.arange(big_q, device=device), torch.arange(big_k, device=device)
        q_valid = ar_q[None, :] < tq[:, None]
        k_valid = ar_k[None, :] < tk[:, None]
        q_index = q_start[:, None] + torch.where(q_valid, ar_q[None, :], 0)
        k_slots = flat[k_start[:, None] + torch.where(k_valid, ar_k[None, :], 0)]
        # query i sits at context position tk - tq + i and sees keys up to it; a padded query row (i >= tq)
        # sees the whole context: finite, and dropped
        causal = ar_k[None, None, :] <= (tk - tq)[:, None, None] + ar_q[None, :, None]
        groups.append(PrefillGroup(q_index, q_valid, q_index[q_valid], k_slots, (k_valid[:, None, :] & causal)[:, None]))
    return groups


def prefill_attention_batched(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              seqs: list[PrefillSeq], scale: float) -> torch.Tensor:
    """`prefill_attention` with the sequences padded into a few SDPA calls (`prefill_groups`): the CUDA path.
    q (T, Hq, D) -> (T, Hq, D).

    Why: the reference's loop costs ~7 launches per sequence and layer (a verifier scoring 64 continuations
    on a 24-layer model: ~10,000 launches a forward); here it is ~8 per group and layer, the groups' index
    tensors built once per forward (a PrefillBatch keeps them). The cost is the padding, bounded by
    PREFILL_MAX_WASTE. Twin: the reference, row for row up to the last bits of the softmax's sums."""
    Hq, Hkv = q.shape[1], k_cache.shape[1]
    key = (q.device, Hq)
    kept = seqs.groups if isinstance(seqs, PrefillBatch) else None
    if kept is not None and kept[0] == key:
        groups = kept[1]
    else:
        groups = prefill_groups(seqs, q.device, Hq)
        if isinstance(seqs, PrefillBatch):
            seqs.groups = (key, groups)
    out = torch.empty_like(q)
    for g in groups:
        qs = q[g.q_index].transpose(1, 2)  # (b, Hq, Tq, D)
        k = k_cache[g.k_slots].transpose(1, 2)  # (b, Hkv, Tk, D)
        v = v_cache[g.k_slots].transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(qs, k, v, attn_mask=g.mask, scale=scale,
                                                             enable_gqa=Hq != Hkv)
        out[g.q_rows] = o.transpose(1, 2)[g.q_valid]  # (n, Hq, D)
    return out


PREFILL_TILE = 32  # query rows per flash call; one tile is one q block of ATen's CPU kernel (< 192 rows)


def prefill_attention_flash_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                seqs: list[PrefillSeq], scale: float) -> torch.Tensor:
    """`prefill_attention` on ATen's CPU flash kernel, in fixed tiles: the CPU fast path. q (T, Hq, D) -> (T, Hq, D).

    SDPA with a mask and enable_gqa on 3-D tensors falls to its math path on CPU: the whole (Hq, Tq, Tk)
    score matrix, a masked softmax and two bmm (at 1,000 tokens, 60% of the prefill's time).

    Why tiles of one fixed shape: a query row's rounding in the flash kernel depends on how many rows share
    its call (a call of 1-3 rows takes another GEMM path) and on the key count (the softmax's vector tail).
    So a prompt prefilled whole and the same prompt prefilled after a cached prefix, or after a shorter
    prompt's KV, would differ in the last bits, and a seeded sample at a boundary would flip. Here every call
    takes the PREFILL_TILE rows at absolute positions [a, a + TILE), a a multiple of TILE (rows that are
    cached or past the end ride along as zero queries), and the keys [0, a + TILE) (zero-padded past the
    context, masked). A row's output is then a function of its position and context alone. The cost: at most
    TILE - 1 padded rows per sequence and call, and one call per tile (32 per layer at 1,000 tokens).
    Keys are repeated to the Hq query heads (a (Tk, Hq, D) copy: 2 MB at 1,000 tokens); query head h reads
    key head h // G, as enable_gqa does.
    """
    out = torch.empty_like(q)
    Hq, D = q.shape[1], q.shape[2]
    groups = Hq // k_cache.shape[1]
    tile = PREFILL_TILE
    # within a tile, row i may see key columns up to a + i: the last TILE columns are causal
    causal = torch.zeros(tile, tile, dtype=q.dtype).masked_fill_(
        torch.ones(tile, tile, dtype=torch.bool).triu_(1), float("-inf"))
    for s in seqs:
        tq, tk = s.q_end - s.q_start, s.slots.numel()
        first = tk - tq  # the context position of the first new row
        padded = -(-tk // tile) * tile
        k = q.new_zeros(padded, Hq, D)
        v = q.new_zeros(padded, Hq, D)
        k_ctx, v_ctx = k_cache.index_select(0, s.slots), v_cache.index_select(0, s.slots)  # (Tk, Hkv, D)
        k[:tk] = k_ctx.repeat_interleave(groups, dim=1) if groups > 1 else k_ctx
        v[:tk] = v_ctx.repeat_interleave(groups, dim=1) if groups > 1 else v_ctx
        k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, Hq, padded, D)
        for a in range(first // tile * tile, tk, tile):
            lo, hi = max(a, first), min(a + tile, tk)  # the real new rows of this tile
            q_tile = q.new_zeros(tile, Hq, D)
            q_tile[lo - a:hi - a] = q[s.q_start + lo - first:s.q_start + hi - first]
            bias = torch.cat([causal.new_zeros(tile, a), causal], dim=1)  # (TILE, a + TILE)
            o, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q_tile.transpose(0, 1)[None], k[:, :, :a + tile], v[:, :, :a + tile], attn_mask=bias, scale=scale)
            out[s.q_start + lo - first:s.q_start + hi - first] = o[0, :, lo - a:hi - a].transpose(0, 1)
    return out


def flash_cpu_takes(q: torch.Tensor) -> bool:
    """Whether `prefill_attention_flash_cpu` runs for q (a CPU float32/bfloat16 tensor, kernel present)."""
    return _FLASH_CPU and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqs: list[PrefillSeq],
                      scale: float) -> torch.Tensor:
    """Causal attention for sequences extended by several tokens each. q (T, Hq, D) -> (T, Hq, D).

    The reference (SDPA with a boolean mask): the slow twin of `prefill_attention_flash_cpu`, and the
    path on CUDA, where SDPA picks a fused kernel itself. Unlike the tiled fast path, its rows may round
    differently with and without a cached prefix."""
    out = torch.empty_like(q)
    Hq, Hkv = q.shape[1], k_cache.shape[1]
    for s in seqs:
        tq, tk = s.q_end - s.q_start, s.slots.numel()
        qs = q[s.q_start:s.q_end].transpose(0, 1)  # (Hq, Tq, D)
        k = k_cache.index_select(0, s.slots).transpose(0, 1)  # (Hkv, Tk, D)
        v = v_cache.index_select(0, s.slots).transpose(0, 1)
        # query i sits at context position tk - tq + i and sees keys up to it
        mask = torch.arange(tk, device=q.device)[None, :] <= (torch.arange(tq, device=q.device)[:, None] + (tk - tq))
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, k, v, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
        out[s.q_start:s.q_end] = o.transpose(0, 1)
    return out
