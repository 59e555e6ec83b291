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

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

NEG_INF = float("-inf")
MAX_SEGMENTS = 8  # plan_decode's cap on shared segments (what a fixed-size work table must hold per row)
VECTORIZE_FROM = 4096  # plan_decode groups blocks with tensor ops from this many (row, full block) entries up


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


@dataclass(frozen=True)
class SharedSegment:
    rows: torch.Tensor | None  # (b,) query rows that attend to these slots; None means every row
    slots: torch.Tensor  # (T,) pool slots of full blocks shared by exactly those rows


@dataclass(frozen=True)
class PrivateBucket:
    """Rows whose private parts are of similar length, gathered and attended together."""

    rows: torch.Tensor | None  # (b,) query rows in this bucket; None means every row, in order
    slots: torch.Tensor  # (b, p) their private slots, padded as in DecodePlan.private_slots
    bias: torch.Tensor  # (b, 1, 1, p)


@dataclass(frozen=True)
class DecodePlan:
    """Where each of B single-token queries finds its keys."""

    segments: tuple[SharedSegment, ...]
    private_slots: torch.Tensor  # (B, P) slots of each row's unshared tokens, padded with its first context slot (written, finite)
    private_bias: torch.Tensor  # (B, 1, 1, P) 0 where valid, -inf on padding
    block_table: torch.Tensor  # (B, NB) each row's blocks, padded with block 0
    lengths: torch.Tensor  # (B,) each row's context length
    block_size: int
    workspace: GatherWorkspace | None = field(default=None, compare=False)  # kept gather buffers, or fresh ones
    # the private part split by length (a partition of the rows), and the permutation that puts the
    # buckets' concatenated outputs back in row order (None with one bucket)
    private_buckets: tuple[PrivateBucket, ...] = ()
    bucket_unsort: torch.Tensor | None = None
    # a plan on a device keeps its CPU twin: what host-side planning reads (the Triton work table), so no step
    # copies the plan back from the device
    host: "DecodePlan | None" = field(default=None, compare=False, repr=False)

    @functools.cached_property
    def all_slots(self) -> torch.Tensor:
        """(B, Tmax) every row's whole context, padding pointed at the row's first context slot (written, finite:
        the pool is torch.empty, and an unwritten slot may hold NaN bits, which a -inf mask does not cancel).
        For the naive twin, the batch-invariant attention and tests; computed on first use (B * Tmax ops a
        step that the cascade does not need)."""
        pos = torch.arange(int(self.lengths.max()), device=self.block_table.device)
        slots = self.block_table[:, pos // self.block_size] * self.block_size + pos % self.block_size
        return torch.where(pos[None, :] < self.lengths[:, None], slots, slots[:, :1])

    @functools.cached_property
    def all_bias(self) -> torch.Tensor:
        """(B, 1, 1, Tmax) float32: 0 on each row's context, -inf on padding."""
        pos = torch.arange(int(self.lengths.max()), device=self.block_table.device)
        valid = pos[None, :] < self.lengths[:, None]
        return torch.zeros(valid.shape, device=valid.device).masked_fill_(~valid, NEG_INF)[:, None, None, :]

    def to(self, device: torch.device | str) -> "DecodePlan":
        """This plan with its tensors on `device` (itself on the CPU or where it already is)."""
        device = torch.device(device)
        here = self.private_slots.device
        if device.type == here.type and (device.index is None or device.index == here.index):
            return self
        return _plan_to(self.host or self, device)


def plan_decode(block_tables: list[list[int]], lengths: list[int], block_size: int,
                max_segments: int = MAX_SEGMENTS, min_shared_tokens: int = 16, dtype: torch.dtype = torch.float32,
                workspace: GatherWorkspace | None = None) -> DecodePlan:
    """Group full blocks by the exact set of rows that use them.

    A block used by two or more rows becomes part of that row-set's shared segment; everything else
    (and segments beyond `max_segments`, smallest first, or shorter than `min_shared_tokens`) is
    gathered per row. Folding a segment into the private part is always correct, only slower, so the
    caps bound the per-layer op count on wide, shallow trees. Blocks are grouped with dense tensor ops over the
    (B, NB) block table (`shared_groups`) from `VECTORIZE_FROM` (row, full block) entries up, and below that by
    walking them in Python (`shared_groups_loop`, also the twin); the rest is vectorized per block. The plan
    is built on the CPU; `DecodePlan.to(device)` moves it.
    """
    B = len(block_tables)
    width = max(len(t) for t in block_tables)
    # numpy reads the nested lists ~3x faster than torch.tensor (1.1 against 3.5 ms at 256 rows x 288 blocks)
    table = torch.from_numpy(np.array([t + [0] * (width - len(t)) for t in block_tables], dtype=np.int64))
    n = torch.tensor(lengths, dtype=torch.long)
    entries = sum(min(len(t), m // block_size) for t, m in zip(block_tables, lengths))  # full blocks in all
    kept = (shared_groups(table, n, block_size, max_segments, min_shared_tokens) if entries >= VECTORIZE_FROM
            else shared_groups_loop(block_tables, lengths, block_size, max_segments, min_shared_tokens))

    offsets = torch.arange(block_size)
    segments = []
    for rows, blocks in kept:
        slots = (blocks[:, None] * block_size + offsets).reshape(-1)
        segments.append(SharedSegment(rows=None if len(rows) == B else rows, slots=slots))

    # Per block, not per token (B * Tmax ops would cost ~10x more at long contexts): (B, NB) block table padded
    # with block 0; a row's private blocks (unshared, or of a folded segment), compacted to the front in table
    # order, become its private slots. Only full blocks can be shared, so a partial last block is always
    # private and the last of them: a row's first `counts` expanded slots are exactly its private tokens.
    n_blocks = -(-n // block_size)  # (B,)
    in_context = torch.arange(width)[None, :] < n_blocks[:, None]  # (B, NB)
    private_blocks = in_context
    if kept:  # membership by lookup in a (max block + 1,) mask: 0.15 ms at 256 x 288 blocks, a binary search 1.0
        is_shared = torch.zeros(int(table.max()) + 1, dtype=torch.bool)
        for _, blocks in kept:
            is_shared[blocks] = True
        private_blocks = in_context & ~is_shared[table]
    own_blocks = private_blocks.sum(1)
    counts = own_blocks * block_size - (n_blocks * block_size - n)  # the partial last block's missing tokens
    p_max = max(1, int(counts.max()))
    order = torch.argsort((~private_blocks).to(torch.int8), dim=1, stable=True)[:, :max(1, int(own_blocks.max()))]
    expanded = (table.gather(1, order)[:, :, None] * block_size + offsets).reshape(B, -1)[:, :p_max]  # (B, P)
    padding = torch.arange(p_max)[None, :] >= counts[:, None]
    private_slots = torch.where(padding, table[:, :1] * block_size, expanded)  # the row's first context slot
    private_bias = torch.zeros(B, 1, 1, p_max, dtype=dtype).masked_fill_(padding[:, None, None, :], NEG_INF)
    buckets, unsort = _bucket_private(private_slots, private_bias, counts)
    return DecodePlan(tuple(segments), private_slots, private_bias, table, n, block_size, workspace, buckets, unsort)


def shared_groups(table: torch.Tensor, lengths: torch.Tensor, block_size: int, max_segments: int = MAX_SEGMENTS,
                  min_shared_tokens: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The shared segments a plan keeps: [(rows (b,) ascending, blocks (k,)), ...], the full blocks used by exactly
    those b >= 2 rows, largest (k * b) first, at most `max_segments`, each at least `min_shared_tokens` long.
    table (B, NB) long, each row's blocks padded; lengths (B,).

    Why vectorized: walking every (row, block) in Python cost ~6 ms a step at 256 rows of 4,600 tokens, more than
    a GPU's whole decode step. Every op is dense over the (B, NB) table (boolean-mask indexing costs ~10x a
    dense op here): entries that are not full blocks point at a spare block id. Block ids are pool indices, so
    a block's rows are counted by a bincount (no sort). Each shared block's set of rows is B bits in
    ceil(B / 32) words (one accumulating scatter; 32-bit words in int64 keep every sum positive), and
    torch.unique over those words groups the blocks exactly. A row that lists a block twice (no engine makes
    one) would carry a bit: the words then hold fewer bits than entries, and the loop answers instead. Order,
    ties included, is the loop's (`shared_groups_loop`, the twin): groups by first appearance in row-major
    order, blocks within a group likewise, then a stable sort by size; so the segments' slots, and the sums
    over them, are the loop's bit for bit."""
    B, NB = table.shape
    full = torch.arange(NB)[None, :] < (lengths // block_size)[:, None]  # (B, NB): only full blocks can be shared
    spare = int(table.max()) + 1
    blocks = table.masked_fill(~full, spare)  # (B, NB)
    users = torch.bincount(blocks.view(-1), minlength=spare + 1)
    users[spare] = 0
    shared_ids = torch.nonzero(users > 1).squeeze(1)  # (S,) block ids, ascending
    S = shared_ids.numel()
    if S == 0:
        return []
    compact = torch.full_like(users, S)  # S: the spare slot every unshared entry goes to
    compact[shared_ids] = torch.arange(S)
    slot = compact[blocks]  # (B, NB) each entry's shared block as 0..S-1, or S
    W = -(-B // 32)
    row = torch.arange(B)[:, None]
    bits = torch.zeros((S + 1) * W, dtype=torch.long)
    bits.index_put_(((slot * W + row // 32).view(-1),), (torch.ones_like(slot) << (row % 32)).view(-1), accumulate=True)
    bits = bits.view(S + 1, W)[:S]
    if int(_popcount(bits).sum()) != int(users[shared_ids].sum()):  # a carry: some row lists a block twice
        return shared_groups_loop(table.tolist(), lengths.tolist(), block_size, max_segments, min_shared_tokens)
    _, group = torch.unique(bits, dim=0, return_inverse=True)  # (S,) each shared block's group
    G = int(group.max()) + 1
    first = torch.full((S + 1,), B * NB).scatter_reduce_(0, slot.view(-1), torch.arange(B * NB), "amin")[:S]
    group_first = torch.full((G,), B * NB).scatter_reduce_(0, group, first, "amin")
    size = torch.bincount(group, minlength=G) * torch.zeros(G, dtype=torch.long).scatter_(0, group, users[shared_ids])
    order = torch.argsort(group_first)  # the loop's insertion order, then its stable sort by size
    order = order[torch.argsort(-size[order], stable=True)]
    kept = []
    for g in order[:max_segments].tolist():
        members = torch.nonzero(group == g).squeeze(1)
        if members.numel() * block_size < min_shared_tokens:
            continue
        members = members[torch.argsort(first[members])]
        word_bits = (bits[members[0], :, None] >> torch.arange(32)) & 1  # (W, 32): its rows, ascending
        kept.append((torch.nonzero(word_bits.view(-1)).squeeze(1), shared_ids[members]))
    return kept


_POPCOUNT_BYTE = torch.tensor([bin(i).count("1") for i in range(256)])


def _popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each non-negative int64 below 2**40 (bytes looked up in a 256-entry table)."""
    return sum(_POPCOUNT_BYTE[(words >> (8 * i)) & 255] for i in range(5))


def shared_groups_loop(block_tables: list[list[int]], lengths: list[int], block_size: int,
                       max_segments: int = MAX_SEGMENTS, min_shared_tokens: int = 16):
    """`shared_groups` by walking every row's full blocks in Python: the twin, and the faster path for small
    tables (a few hundred blocks: the vectorized path's ~30 tensor ops cost more)."""
    users: dict[int, list[int]] = {}
    for row, (blocks, n) in enumerate(zip(block_tables, lengths)):
        for block in blocks[: n // block_size]:
            users.setdefault(block, []).append(row)
    by_rows: dict[tuple[int, ...], list[int]] = {}
    for block, rows in users.items():
        if len(rows) > 1:
            by_rows.setdefault(tuple(rows), []).append(block)
    groups = sorted(by_rows.items(), key=lambda kv: -len(kv[1]) * len(kv[0]))
    return [(torch.tensor(rows, dtype=torch.long), torch.tensor(blocks, dtype=torch.long))
            for rows, blocks in groups[:max_segments] if len(blocks) * block_size >= min_shared_tokens]


def _plan_to(plan: DecodePlan, device: torch.device) -> DecodePlan:
    """The plan with every tensor on `device`: one host-to-device copy per dtype (index and bias tensors), not
    one per tensor (a plan holds ~10-30), then views into the copies."""
    tensors: list[torch.Tensor] = []
    index: dict[int, int] = {}  # a tensor the plan holds twice (one bucket's are the plan's own) moves once

    def take(t):
        if t is None:
            return None
        if id(t) not in index:
            index[id(t)] = len(tensors)
            tensors.append(t)
        return index[id(t)]

    segs = [(take(s.rows), take(s.slots)) for s in plan.segments]
    buckets = [(take(b.rows), take(b.slots), take(b.bias)) for b in plan.private_buckets]
    fields = [take(t) for t in (plan.private_slots, plan.private_bias, plan.block_table, plan.lengths, plan.bucket_unsort)]
    moved: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in {t.dtype for t in tensors}:
        ids = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].reshape(-1) for i in ids]).to(device)
        for i, part in zip(ids, torch.split(flat, [tensors[i].numel() for i in ids])):
            moved[i] = part.view(tensors[i].shape)

    def get(i):
        return None if i is None else moved[i]

    return DecodePlan(tuple(SharedSegment(get(r), get(sl)) for r, sl in segs), *(get(i) for i in fields[:4]),
                      plan.block_size, plan.workspace, tuple(PrivateBucket(get(r), get(sl), get(b)) for r, sl, b in buckets),
                      get(fields[4]), host=plan)


def _bucket_private(private_slots: torch.Tensor, private_bias: torch.Tensor, counts: torch.Tensor,
                    min_rows: int = 8, max_buckets: int = 8, min_saving: float = 0.15):
    """Split rows, sorted by private length, into equal-count buckets, each padded only to its own longest.

    Why: in an eval, rows range from a few private tokens to hundreds; padding every row to the
    longest gathers and attends ~2x the keys that exist (measured 18-25 ms a layer at 128 rows against
    11-12 ms in 8 buckets, on a 2-core EPYC). Each bucket costs a few ops per layer, so rows are split
    only while every bucket keeps `min_rows` rows and the padded keys shrink by `min_saving` or more.
    """
    B = private_slots.shape[0]
    whole = (PrivateBucket(None, private_slots, private_bias),)
    k = max_buckets
    while k > 1 and B // k < min_rows:
        k //= 2
    if k == 1:
        return whole, None
    order = torch.argsort(counts, stable=True)
    bounds = [B * i // k for i in range(k + 1)]
    widths = [max(1, int(counts[order[bounds[i + 1] - 1]])) for i in range(k)]  # sorted: the last is the longest
    padded = sum(w * (bounds[i + 1] - bounds[i]) for i, w in enumerate(widths))
    if padded > (1 - min_saving) * B * private_slots.shape[1]:
        return whole, None
    buckets = []
    for i, w in enumerate(widths):
        rows = order[bounds[i]:bounds[i + 1]]
        buckets.append(PrivateBucket(rows, private_slots[rows, :w].contiguous(), private_bias[rows, :, :, :w].contiguous()))
    return tuple(buckets), torch.argsort(order)


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
