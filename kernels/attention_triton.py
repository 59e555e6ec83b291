"""Triton twin of `attention.decode_attention`: shared-prefix (cascade) decode attention, split-K.

Why: at a decode step of a search tree, B branches each add one query token, and most of their
context lives in blocks shared by a group of branches. Plain paged attention reads every shared
block once per branch; here a shared segment is read once for all the queries of its group (a
(rows*G, D) x (D, T) product per kv head), each branch's own slots are read by that branch alone,
and the partial softmax states are merged by log-sum-exp. Long slot ranges are split into chunks
(flash-decoding), so one long sequence still fills the GPU.

Reference: `attention.decode_attention` (the CPU cascade) and `attention.decode_attention_naive`
(every branch reads its whole context); both are the oracles of tests/test_kernels_triton.py.

The work table is derived once per step from the `DecodePlan` (`work_table`, memoized on the plan)
and reused by every layer. Each work item is (rows, slot range): a run of query rows that all
attend to the same contiguous run of entries in a flat slot list. Stage 1 computes one partial
state (o, lse) per (item, row, q head); stage 2 merges each row's partial states.

Limits: bfloat16/float16/float32; head_dim a multiple of 16 is fastest (others are padded). A group
wider than one tile (block_m // G rows, 21 for SmolLM2) is split into row chunks, each reading the
shared slots again (from L2 after the first). The table is built on the CPU (a few small torch ops
per step, like `plan_decode` itself) and copied to the device once per step. The stage-1 programs
read the item count from the device and stride over the items, so a CUDA graph captures one fixed grid
over a `StaticWorkTable` (fixed-capacity buffers refilled in place: `decode_attention_static`).
On CPU tensors the kernels run only under Triton's interpreter (TRITON_INTERPRET=1, set before this
module is imported). Triton 3.9's interpreter gets bfloat16 `tl.dot` wrong and truncates float32 ->
bfloat16 casts, so there (INTERPRETED) operands are upcast to float32 and casts round explicitly;
the compiled GPU path keeps native bfloat16 products.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton_util import cast_rtne
from .decode_plan import MAX_SEGMENTS, DecodePlan

LOG2E = 1.4426950408889634
BLOCK_M = 64  # queries per shared item's tile (rows * G, a power of two)
CHUNK = 256  # slots per item: one long context becomes several items (flash-decoding)


# -------------------------------------------------------------------------------------------------
# The work table: planned once per step, on the CPU, moved to the device in one copy.

@dataclass(frozen=True)
class WorkTable:
    """Items are rows of (row_start, n_rows, slot_start, n_slots, part_start) into `rows` and `slots`.

    Partial state number part_start + i belongs to query row rows[row_start + i].
    Row b's partial states are part_ids[part_ptr[b]:part_ptr[b + 1]]. The kernels read how many items there are
    from `counts` (on the device), not from the launch grid, so a CUDA graph's fixed grid serves any step.
    """

    shared_items: torch.Tensor  # (Ns, 5) int32: items over shared segments, several rows each
    private_items: torch.Tensor  # (Np, 5) int32: items over one row's own slots
    rows: torch.Tensor  # (R,) int32 query rows
    slots: torch.Tensor  # (S,) int32 pool slots
    part_ptr: torch.Tensor  # (B + 1,) int32
    part_ids: torch.Tensor  # (P,) int32
    counts: torch.Tensor  # (2,) int32: [Ns, Np], what the kernels read
    num_parts: int
    max_item_rows: int  # most rows in one shared item: sets the tile height of the shared launch


def _items(row_start: torch.Tensor, n_rows: torch.Tensor, slot_start: torch.Tensor, n_slots: torch.Tensor):
    return torch.stack([row_start, n_rows, slot_start, n_slots, torch.zeros_like(n_rows)], 1)


def _host(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.cpu()


def host_work_table(plan: DecodePlan, rows_per_item: int, chunk: int) -> dict[str, torch.Tensor]:
    """The work table's pieces on the CPU (int64): split every shared segment into (row chunk x slot chunk)
    items and every row's private slots into slot chunks; number the partial states; index them by row.
    A plan on the device is read through its host twin (`plan.host`), so no step copies it back."""
    plan = plan.host if plan.host is not None else plan
    B = plan.private_slots.shape[0]
    rows, slots, shared = [], [], []
    n_rows_total = n_slots_total = 0
    for seg in plan.segments:
        seg_rows = torch.arange(B) if seg.rows is None else _host(seg.rows)
        seg_slots = _host(seg.slots)
        n, t = seg_rows.numel(), seg_slots.numel()
        r0 = torch.arange(0, n, rows_per_item)  # row chunk starts
        s0 = torch.arange(0, t, chunk)  # slot chunk starts
        r0, s0 = r0.repeat_interleave(s0.numel()), s0.repeat(r0.numel())
        shared.append(_items(n_rows_total + r0, (n - r0).clamp(max=rows_per_item),
                             n_slots_total + s0, (t - s0).clamp(max=chunk)))
        rows.append(seg_rows)
        slots.append(seg_slots)
        n_rows_total += n
        n_slots_total += t

    valid = _host(plan.private_bias)[:, 0, 0, :] == 0  # (B, P)
    counts = valid.sum(1)
    n_chunks = -(-counts // chunk)  # a row with no private slot gets no item
    row_of = torch.arange(B).repeat_interleave(n_chunks)
    first_chunk = (n_chunks.cumsum(0) - n_chunks).repeat_interleave(n_chunks)
    k = torch.arange(row_of.numel()) - first_chunk  # chunk index within its row
    offs = counts.cumsum(0) - counts
    private = _items(n_rows_total + row_of, torch.ones_like(row_of),
                     n_slots_total + offs[row_of] + k * chunk, (counts[row_of] - k * chunk).clamp(max=chunk))
    rows.append(torch.arange(B))
    slots.append(_host(plan.private_slots)[valid])  # row-major: each row's slots in order

    items = torch.cat(shared + [private]) if shared else private
    all_rows = torch.cat(rows)
    part_start = items[:, 1].cumsum(0) - items[:, 1]
    items[:, 4] = part_start
    part_row = all_rows[torch.repeat_interleave(items[:, 0], items[:, 1])
                        + torch.arange(int(items[:, 1].sum())) - part_start.repeat_interleave(items[:, 1])]
    part_ids = torch.argsort(part_row, stable=True)
    part_ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(part_row, minlength=B).cumsum(0)])
    n_shared = sum(s.shape[0] for s in shared)
    return {"shared_items": items[:n_shared], "private_items": items[n_shared:], "rows": all_rows,
            "slots": torch.cat(slots), "part_ptr": part_ptr, "part_ids": part_ids,
            "counts": torch.tensor([n_shared, items.shape[0] - n_shared])}


def build_work_table(plan: DecodePlan, rows_per_item: int, chunk: int, device: torch.device) -> WorkTable:
    """`host_work_table`, moved to the device in one copy."""
    host = host_work_table(plan, rows_per_item, chunk)
    # each piece padded to 16 bytes: the kernels' pointers then keep one alignment from step to step, so Triton
    # (which specializes on a pointer's 16-byte alignment) does not compile a variant per step's layout
    pieces = [torch.nn.functional.pad(t.reshape(-1), (0, -t.numel() % 4)) for t in host.values()]
    flat = torch.cat(pieces).to(torch.int32).to(device)  # one host-to-device copy
    out = {name: part[:t.numel()] for (name, t), part in zip(host.items(), torch.split(flat, [p.numel() for p in pieces]))}
    shared = host["shared_items"]
    return WorkTable(out["shared_items"].view(-1, 5), out["private_items"].view(-1, 5), out["rows"], out["slots"],
                     out["part_ptr"], out["part_ids"], out["counts"], num_parts=host["part_ids"].numel(),
                     max_item_rows=int(shared[:, 1].max()) if shared.shape[0] else 0)


class StaticWorkTable:
    """A work table of fixed capacity, refilled in place every step: what a captured decode step reads.

    Why: a CUDA graph replays fixed launches on fixed addresses, while a step's table changes size with the
    plan. Here every piece is a region of one device buffer (the slots, the largest, last), refilled from
    a pinned host twin in one copy of the used prefix; the kernels run a fixed grid and loop over the items
    `counts` names. The merge reads `part_ptr` for the bucket's rows: rows past the step's own get no parts,
    hence zero output. `fill` refuses (returns False) a plan beyond the capacity; that step runs eager.
    Also holds the partial-state buffers, so a replay allocates nothing.
    """

    def __init__(self, max_rows: int, num_q_heads: int, head_dim: int, rows_per_item: int, chunk: int,
                 device: torch.device, part_capacity: int, slot_capacity: int, max_segments: int = MAX_SEGMENTS):
        """part_capacity: partial states (one per item and row it holds; every item holds a row, so it bounds
        the items too); a row of context c has at most ceil(c / chunk) + max_segments + 1 of them."""
        self.max_rows, self.rows_per_item, self.chunk = max_rows, rows_per_item, chunk
        self.part_capacity = part_capacity
        sizes = {"shared_items": part_capacity * 5, "private_items": part_capacity * 5,
                 "rows": (max_segments + 1) * max_rows, "part_ptr": max_rows + 1,
                 "part_ids": part_capacity, "counts": 4, "slots": slot_capacity}
        self.offsets, total = {}, 0
        for name, n in sizes.items():
            self.offsets[name] = (total, n)
            total += -(-n // 4) * 4  # every region starts 16-byte aligned
        self.flat = torch.zeros(total, dtype=torch.int32, device=device)
        self.staging = torch.zeros(total, dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
        view = {name: self.flat[o:o + n] for name, (o, n) in self.offsets.items()}
        self.table = WorkTable(view["shared_items"].view(-1, 5), view["private_items"].view(-1, 5), view["rows"],
                               view["slots"], view["part_ptr"], view["part_ids"], view["counts"],
                               num_parts=self.part_capacity, max_item_rows=rows_per_item)
        self.o_part = torch.empty(self.part_capacity, num_q_heads, head_dim, dtype=torch.float32, device=device)
        self.lse_part = torch.empty(self.part_capacity, num_q_heads, dtype=torch.float32, device=device)

    def fill(self, plan: DecodePlan) -> bool:
        """Write the step's table into the buffers (a copy queued on the current stream: the caller makes sure
        the previous one is done before the next `fill`); False (nothing written) if it exceeds the capacity."""
        host = host_work_table(plan, self.rows_per_item, self.chunk)
        B = host["part_ptr"].numel() - 1
        if B > self.max_rows or any(host[n].numel() > self.offsets[n][1]
                                    for n in ("shared_items", "private_items", "rows", "part_ids", "slots")):
            return False
        # rows past the step's own (up to the bucket's) end with the last part: no parts, zero output
        host["part_ptr"] = torch.cat([host["part_ptr"], host["part_ptr"][-1:].expand(self.max_rows - B)])
        end = 0
        for name, t in host.items():
            o, _ = self.offsets[name]
            self.staging[o:o + t.numel()] = t.reshape(-1)
            end = max(end, o + t.numel())
        self.flat[:end].copy_(self.staging[:end], non_blocking=True)  # one copy; the slots region is last
        return True


_memo: tuple = (None, None, None)  # (weakref to the plan, key, table): every layer of a step hits it


def work_table(plan: DecodePlan, rows_per_item: int, chunk: int, device: torch.device) -> WorkTable:
    global _memo
    ref, key, table = _memo
    if ref is not None and ref() is plan and key == (rows_per_item, chunk, device):
        return table
    table = build_work_table(plan, rows_per_item, chunk, device)
    _memo = (weakref.ref(plan), (rows_per_item, chunk, device), table)
    return table


# -------------------------------------------------------------------------------------------------
# Stage 1: one partial softmax state per (item, row, q head)

@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, items_ptr, count_ptr, rows_ptr, slots_ptr, o_part_ptr, lse_part_ptr,
                    scale_log2, stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                    G: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    # programs stride over the items: the count comes from the device, so a fixed grid (a CUDA graph's) serves
    # any step; an eager launch has one program per item
    n_items = tl.load(count_ptr)
    h = tl.program_id(1)  # kv head
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        _partial_item(q_ptr, k_ptr, v_ptr, items_ptr, rows_ptr, slots_ptr, o_part_ptr, lse_part_ptr, scale_log2,
                      stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, item, h,
                      G, HQ, D, BLOCK_D, BLOCK_M, BLOCK_N, PRECISION, INTERPRETED)


@triton.jit
def _partial_item(q_ptr, k_ptr, v_ptr, items_ptr, rows_ptr, slots_ptr, o_part_ptr, lse_part_ptr, scale_log2,
                  stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, item, h,
                  G: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    row_start = tl.load(items_ptr + item * 5 + 0)
    n_rows = tl.load(items_ptr + item * 5 + 1)
    slot_start = tl.load(items_ptr + item * 5 + 2)
    n_slots = tl.load(items_ptr + item * 5 + 3)
    part_start = tl.load(items_ptr + item * 5 + 4)

    # queries of this item: m = local_row * G + g, the G query heads sharing kv head h
    m = tl.arange(0, BLOCK_M)
    m_ok = m < n_rows * G
    local_row = m // G
    qh = h * G + m % G
    row = tl.load(rows_ptr + row_start + local_row, mask=m_ok, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + row[:, None] * stride_qb + qh[:, None] * stride_qh + d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if INTERPRETED:  # the interpreter's bfloat16 tl.dot is wrong: multiply in float32 there
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # running max, log2 domain
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, n_slots, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < n_slots
        slot = tl.load(slots_ptr + slot_start + n, mask=n_ok, other=0).to(tl.int64)
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_ks + h * stride_kh + d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + h * stride_vh + d[None, :], mask=kv_ok, other=0.0)
        if INTERPRETED:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    part = (part_start + local_row).to(tl.int64)
    o = acc / l_i[:, None]
    tl.store(o_part_ptr + (part[:, None] * HQ + qh[:, None]) * D + d[None, :], o, mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_part_ptr + part * HQ + qh, m_i + tl.log2(l_i), mask=m_ok)


# -------------------------------------------------------------------------------------------------
# Stage 2: merge each row's partial states by log-sum-exp (the `merge_states` primitive, n-way)

@triton.jit
def _merge_kernel(o_part_ptr, lse_part_ptr, part_ptr, part_ids_ptr, out_ptr, stride_ob, stride_oh,
                  HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr):
    b = tl.program_id(0)
    qh = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    first = tl.load(part_ptr + b)
    last = tl.load(part_ptr + b + 1)
    m = tl.full((), -1.0e30, tl.float32)
    l = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(first, last):
        part = tl.load(part_ids_ptr + i).to(tl.int64)
        lse = tl.load(lse_part_ptr + part * HQ + qh)
        o = tl.load(o_part_ptr + (part * HQ + qh) * D + d, mask=d_ok, other=0.0)
        m_new = tl.maximum(m, lse)
        a = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * a + o * w
        l = l * a + w
        m = m_new
    out = tl.where(l > 0, acc / tl.maximum(l, 1e-30), 0.0)  # a row with no keys gets 0, as the reference
    out = cast_rtne(out, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + qh * stride_oh + d, out, mask=d_ok)


# -------------------------------------------------------------------------------------------------
# Launcher

def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: DecodePlan, scale: float,
                     block_m: int = BLOCK_M, block_n: int = 64, chunk: int = CHUNK) -> torch.Tensor:
    """q (B, Hq, D); k_cache, v_cache (S, Hkv, D) -> (B, Hq, D) in q's dtype. Same contract as the reference.

    block_m: queries per shared item (rows * G, padded to a power of two); chunk: slots per item.
    """
    B, Hq, D = q.shape
    G = Hq // k_cache.shape[1]
    block_m = tile_rows(block_m, G)
    table = work_table(plan, block_m // G, chunk, q.device)
    o_part = torch.empty(table.num_parts, Hq, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(table.num_parts, Hq, dtype=torch.float32, device=q.device)
    ns, np_ = table.shared_items.shape[0], table.private_items.shape[0]
    # the widest item decides the tile height; small groups need no more than 16 queries
    shared_m = max(16, min(block_m, triton.next_power_of_2(max(1, table.max_item_rows) * G)))
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    _launch(q, k_cache, v_cache, table, o_part, lse_part, out, scale, (ns, np_), shared_m, block_n)
    return out


def decode_attention_static(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, static: StaticWorkTable,
                            scale: float, programs: int = 512, block_n: int = 64) -> torch.Tensor:
    """`decode_attention` over a `StaticWorkTable` filled for this step: a fixed grid, no allocation but the
    output, nothing read back to the host, so a CUDA graph can capture it. q (B, Hq, D), B = the bucket's rows.
    `programs` per kv head and launch: each strides over the items (sized for a GPU's ~100-150 SMs)."""
    B, Hq, D = q.shape
    G = Hq // k_cache.shape[1]
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    shared_m = tile_rows(static.rows_per_item * G, G)
    _launch(q, k_cache, v_cache, static.table, static.o_part, static.lse_part, out, scale, (programs, programs),
            shared_m, block_n)
    return out


def tile_rows(block_m: int, G: int) -> int:
    """The shared launch's tile height: a power of two holding at least one row's G query heads."""
    return triton.next_power_of_2(max(block_m, G))


def _launch(q, k_cache, v_cache, table: WorkTable, o_part, lse_part, out, scale: float, grids: tuple[int, int],
            shared_m: int, block_n: int) -> None:
    """Stage 1 over the shared items, then the private ones (grids: programs per kv head for each), then the merge."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "head dim must be contiguous"
    block_d = max(16, triton.next_power_of_2(D))
    interpreted = q.device.type != "cuda"  # CPU tensors run only under Triton's interpreter
    # float32 products stay float32 (not tf32), so the kernel matches the fp32 reference to 1e-4
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is the default; ignored for 16-bit inputs
    common = dict(G=G, HQ=Hq, D=D, BLOCK_D=block_d, BLOCK_N=block_n, PRECISION=precision, INTERPRETED=interpreted)
    args = (q, k_cache, v_cache)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1))
    counts = table.counts
    if grids[0]:
        _partial_kernel[(grids[0], Hkv)](*args, table.shared_items, counts[0:], table.rows, table.slots, o_part,
                                         lse_part, scale * LOG2E, *strides, BLOCK_M=shared_m, **common)
    if grids[1]:
        bm = max(16, triton.next_power_of_2(G))  # one row per private item
        _partial_kernel[(grids[1], Hkv)](*args, table.private_items, counts[1:], table.rows, table.slots, o_part,
                                         lse_part, scale * LOG2E, *strides, BLOCK_M=bm, **common)
    _merge_kernel[(B, Hq)](o_part, lse_part, table.part_ptr, table.part_ids, out, out.stride(0), out.stride(1),
                           HQ=Hq, D=D, BLOCK_D=block_d, INTERPRETED=interpreted)


# -------------------------------------------------------------------------------------------------
# Benchmark: python -m ttc.kernels.attention_triton (do_bench on CUDA; on CPU it times the reference)

def _bench():
    from ._timing import copy_bandwidth, floor_ms, time_ms
    from .attention import decode_attention as cascade, decode_attention_naive
    from .decode_plan import plan_decode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth() if device == "cuda" else None
    B, prefix, private, bs, Hq, Hkv, D = 64, 512, 32, 16, 9, 3, 64
    nb = prefix // bs
    tables = [list(range(nb)) + [nb + 2 * i, nb + 2 * i + 1] for i in range(B)]
    plan = plan_decode(tables, [prefix + private] * B, bs)
    print(f"{B} branches sharing a {prefix}-token prefix, {private} own tokens each; Hq={Hq} Hkv={Hkv} D={D}")
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator().manual_seed(0)
        S = (nb + 2 * B) * bs
        k, v = (torch.randn(S, Hkv, D, generator=g).to(dtype).to(device) for _ in range(2))
        q = torch.randn(B, Hq, D, generator=g).to(dtype).to(device)
        fns = {"cascade reference": lambda: cascade(q, k, v, plan, D ** -0.5),
               "naive reference": lambda: decode_attention_naive(q, k, v, plan, D ** -0.5)}
        if device == "cuda":
            fns["triton"] = lambda: decode_attention(q, k, v, plan, D ** -0.5)
        for name, fn in fns.items():
            print(f"{str(dtype):15s} {name:18s} {time_ms(fn, device):8.3f} ms")
        if bandwidth:
            kv_bytes = (prefix + B * private) * Hkv * D * 2 * k.element_size()  # every KV entry read once
            print(f"{str(dtype):15s} {'bandwidth floor':18s} {floor_ms(kv_bytes, bandwidth):8.3f} ms")


if __name__ == "__main__":
    _bench()
