"""Cascade (shared-prefix) decode attention equals plain per-branch attention, on random inputs."""

from __future__ import annotations

import random

import pytest
import torch

from ttc.kernels import decode_attention, decode_attention_naive, merge_states, plan_decode, prefill_attention
from ttc.kernels.attention import GatherWorkspace, PrefillSeq


def _random_pool(num_blocks, block_size, hkv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks * block_size, hkv, d, generator=g).to(dtype)
    v = torch.randn(num_blocks * block_size, hkv, d, generator=g).to(dtype)
    return k, v


def _tree_tables(rng, block_size, n_rows, next_block):
    """Block tables of a random tree: rows share random-length prefixes of a common trunk."""
    trunk = [next_block() for _ in range(rng.randint(0, 4))]
    tables, lengths = [], []
    subtrees = {}
    for _ in range(n_rows):
        k = rng.randint(0, len(trunk))
        mid_key = rng.randint(0, 2)
        mid = subtrees.setdefault((k, mid_key), [next_block() for _ in range(rng.randint(0, 2))])
        own = [next_block() for _ in range(rng.randint(1, 3))]
        table = trunk[:k] + mid + own
        # the last block is the row's own and may be partial; shared ones are full
        lengths.append((len(table) - 1) * block_size + rng.randint(1, block_size))
        tables.append(table)
    return tables, lengths


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (8, 1)])
def test_cascade_attention_equals_per_branch_attention_on_random_trees(seed, hq, hkv):
    rng = random.Random(seed)
    block_size, d = rng.choice([4, 16]), 16
    counter = iter(range(10_000))
    tables, lengths = _tree_tables(rng, block_size, rng.randint(1, 9), lambda: next(counter))
    k, v = _random_pool(next(counter) + 1, block_size, hkv, d, seed=seed)
    q = torch.randn(len(tables), hq, d, generator=torch.Generator().manual_seed(seed + 100))
    plan = plan_decode(tables, lengths, block_size, min_shared_tokens=1)
    fast = decode_attention(q, k, v, plan, scale=d ** -0.5)
    slow = decode_attention_naive(q, k, v, plan, scale=d ** -0.5)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_plan_groups_a_shared_prompt_into_one_segment_for_all_rows():
    tables = [[0, 1, 2, 10 + i] for i in range(16)]
    plan = plan_decode(tables, [16 * 3 + 5] * 16, block_size=16)
    assert len(plan.segments) == 1 and plan.segments[0].rows is None
    assert plan.segments[0].slots.numel() == 48
    assert plan.private_slots.shape == (16, 5)  # each row gathers only its own five tokens


def test_plan_caps_segments_and_folds_the_rest_into_private_slots():
    tables = [[2 * i, 2 * i + 1, 100 + r] for i in range(12) for r in range(2)]
    lengths = [2 * 4 + 1] * len(tables)
    plan = plan_decode(tables, lengths, block_size=4, max_segments=3, min_shared_tokens=1)
    assert len(plan.segments) == 3
    k, v = _random_pool(200, 4, 2, 8)
    q = torch.randn(len(tables), 4, 8)
    torch.testing.assert_close(decode_attention(q, k, v, plan, 0.3), decode_attention_naive(q, k, v, plan, 0.3))


def test_merging_two_partial_softmax_states_equals_one_softmax_over_both():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 8, generator=g), torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    s = q @ k.T
    full = torch.softmax(s, -1) @ v
    parts = []
    for sl in (slice(0, 4), slice(4, 10)):
        lse = torch.logsumexp(s[:, sl], -1)
        parts.append((torch.softmax(s[:, sl], -1) @ v[sl], lse))
    merged, lse = merge_states(*parts[0], *parts[1])
    torch.testing.assert_close(merged, full)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))


def test_prefill_attention_is_causal_with_a_cached_prefix():
    k, v = _random_pool(4, 4, 2, 8)
    q = torch.randn(5, 4, 8)
    slots = torch.arange(9)  # 4 cached tokens, then 5 new ones
    out = prefill_attention(q, k, v, [PrefillSeq(0, 5, slots)], scale=0.35)
    for i in range(5):
        ctx = slots[: 4 + i + 1]
        kk, vv = k[ctx].repeat_interleave(2, 1), v[ctx].repeat_interleave(2, 1)  # (T, Hq, D)
        w = torch.softmax(torch.einsum("hd,thd->ht", q[i], kk) * 0.35, -1)
        torch.testing.assert_close(out[i], torch.einsum("ht,thd->hd", w, vv), rtol=1e-5, atol=1e-5)


def test_bfloat16_cascade_stays_within_twice_the_naive_bfloat16_error():
    """The STYLE tolerance rule: low-precision error at most about twice PyTorch's own."""
    tables = [[0, 1, 2, 3 + i] for i in range(8)]
    lengths = [3 * 16 + 7] * 8
    k32, v32 = _random_pool(16, 16, 3, 64)
    q32 = torch.randn(8, 9, 64)
    plan = plan_decode(tables, lengths, 16)
    exact = decode_attention_naive(q32.double(), k32.double(), v32.double(), plan, 0.125).float()
    k, v, q = k32.bfloat16(), v32.bfloat16(), q32.bfloat16()
    err_fast = (decode_attention(q, k, v, plan, 0.125).float() - exact).abs().max()
    err_ref = (decode_attention_naive(q, k, v, plan, 0.125).float() - exact).abs().max()
    assert err_fast <= 2 * err_ref + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unwritten_kv_slots_holding_nan_never_reach_a_decode_output(dtype):
    """The pool is torch.empty: a slot no token has written may hold NaN bits. Padding must not read one."""
    bs, hkv, d = 16, 2, 8
    g = torch.Generator().manual_seed(0)
    k = torch.full((8 * bs, hkv, d), float("nan"), dtype=dtype)
    v = k.clone()
    tables, lengths = [[1, 2], [1, 3], [4]], [20, 18, 5]  # block 1 shared; rows end inside their last block
    for table, n in zip(tables, lengths):
        for pos in range(n):
            slot = table[pos // bs] * bs + pos % bs
            k[slot], v[slot] = torch.randn(hkv, d, generator=g).to(dtype), torch.randn(hkv, d, generator=g).to(dtype)
    q = torch.randn(3, 4, d, generator=g).to(dtype)
    plan = plan_decode(tables, lengths, bs, min_shared_tokens=1, dtype=dtype)
    fast = decode_attention(q, k, v, plan, d ** -0.5)
    slow = decode_attention_naive(q, k, v, plan, d ** -0.5)
    assert torch.isfinite(fast).all() and torch.isfinite(slow).all()
    assert torch.allclose(fast.float(), slow.float(), atol=2e-2)


def _eval_shaped_tables(n_rows, block_size, seed):
    """Rows sharing a 3-block prompt, with private parts from 1 to 12 blocks long (as in a batched eval)."""
    rng = random.Random(seed)
    tables, lengths, next_block = [], [], 3
    for _ in range(n_rows):
        own = rng.randint(1, 12)
        tables.append([0, 1, 2] + list(range(next_block, next_block + own)))
        next_block += own
        lengths.append((2 + own) * block_size + rng.randint(1, block_size))
    return tables, lengths, next_block


def test_rows_of_very_different_private_lengths_are_bucketed_and_still_equal_the_naive_twin():
    tables, lengths, num_blocks = _eval_shaped_tables(64, 4, seed=1)
    k, v = _random_pool(num_blocks, 4, 3, 16)
    q = torch.randn(64, 9, 16, generator=torch.Generator().manual_seed(2))
    plan = plan_decode(tables, lengths, block_size=4)
    assert len(plan.private_buckets) == 8
    rows = torch.cat([b.rows for b in plan.private_buckets])
    assert sorted(rows.tolist()) == list(range(64))  # a partition of the rows
    assert sum(b.slots.numel() for b in plan.private_buckets) < 0.85 * plan.private_slots.numel()
    fast = decode_attention(q, k, v, plan, scale=0.25)
    torch.testing.assert_close(fast, decode_attention_naive(q, k, v, plan, scale=0.25), rtol=1e-5, atol=1e-5)


def test_rows_of_equal_private_length_stay_in_one_bucket():
    plan = plan_decode([[0, 1, 2, 10 + i] for i in range(64)], [16 * 3 + 5] * 64, block_size=16)
    assert len(plan.private_buckets) == 1 and plan.private_buckets[0].rows is None and plan.bucket_unsort is None


def test_a_gather_workspace_gives_the_same_output_and_keeps_its_buffers_across_steps():
    tables, lengths, num_blocks = _eval_shaped_tables(32, 4, seed=3)
    k, v = _random_pool(num_blocks, 4, 3, 16)
    q = torch.randn(32, 9, 16, generator=torch.Generator().manual_seed(4))
    workspace = GatherWorkspace()
    kept = plan_decode(tables, lengths, block_size=4, workspace=workspace)
    first = decode_attention(q, k, v, kept, scale=0.25)
    pointers = {key: buf.data_ptr() for key, buf in workspace._buffers.items()}
    shorter = plan_decode(tables, [n - 1 for n in lengths], block_size=4, workspace=workspace)  # fits the same buffers
    decode_attention(q, k, v, shorter, scale=0.25)
    assert {key: buf.data_ptr() for key, buf in workspace._buffers.items()} == pointers
    assert torch.equal(first, decode_attention(q, k, v, plan_decode(tables, lengths, block_size=4), scale=0.25))


def _prefill_batch(hq, hkv, d, dtype, seed):
    """Four sequences in one flattened batch: no cached prefix, 7 cached tokens, 1 new token after 30
    (a chunked prefill's tail), and 40 new after 33 (three tiles, the first partly cached), each on
    scattered KV slots."""
    g = torch.Generator().manual_seed(seed)
    k, v = _random_pool(24, 8, hkv, d, dtype, seed)
    free = torch.randperm(192, generator=g)
    seqs, start = [], 0
    for cached, new in ((0, 13), (7, 6), (30, 1), (33, 40)):
        slots, free = free[: cached + new], free[cached + new:]
        seqs.append(PrefillSeq(start, start + new, slots))
        start += new
    q = torch.randn(start, hq, d, generator=g).to(dtype)
    return q, k, v, seqs


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (8, 1)])
def test_flash_cpu_prefill_equals_the_masked_sdpa_reference_with_and_without_a_cached_prefix(seed, hq, hkv):
    from ttc.kernels.attention import prefill_attention as reference, prefill_attention_flash_cpu

    q, k, v, seqs = _prefill_batch(hq, hkv, 16, torch.float32, seed)
    torch.testing.assert_close(prefill_attention_flash_cpu(q, k, v, seqs, 0.25), reference(q, k, v, seqs, 0.25),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_flash_cpu_prefill_stays_within_twice_the_reference_bfloat16_error():
    from ttc.kernels.attention import prefill_attention as reference, prefill_attention_flash_cpu

    q, k, v, seqs = _prefill_batch(9, 3, 64, torch.float32, 5)
    exact = reference(q.double(), k.double(), v.double(), seqs, 0.125)
    low = [t.to(torch.bfloat16) for t in (q, k, v)]
    fast_err = (prefill_attention_flash_cpu(*low, seqs, 0.125).double() - exact).abs().max()
    ref_err = (reference(*low, seqs, 0.125).double() - exact).abs().max()
    assert fast_err <= 2 * ref_err


def test_prefill_dispatch_runs_flash_on_cpu_and_the_sdpa_reference_inside_kernels_reference():
    from ttc import kernels
    from ttc.kernels.attention import prefill_attention as reference, prefill_attention_flash_cpu

    q, k, v, seqs = _prefill_batch(9, 3, 16, torch.float32, 1)
    assert kernels.attention.flash_cpu_takes(q)
    assert torch.equal(kernels.prefill_attention(q, k, v, seqs, 0.25), prefill_attention_flash_cpu(q, k, v, seqs, 0.25))
    with kernels.reference():
        assert torch.equal(kernels.prefill_attention(q, k, v, seqs, 0.25), reference(q, k, v, seqs, 0.25))


@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4)])
def test_flash_cpu_prefill_rows_are_bitwise_the_same_with_or_without_a_cached_prefix(hq, hkv):
    """A prompt prefilled whole, after any cached prefix, or as a shorter prompt gives the same bits per row:
    the prefix cache must not move a seeded sample (rounding at a sampling boundary)."""
    from ttc.kernels.attention import prefill_attention_flash_cpu

    total = 100
    g = torch.Generator().manual_seed(3)
    k, v = _random_pool(total, 1, hkv, 64, torch.float32, 3)
    slots = torch.randperm(total, generator=g)
    q = torch.randn(total, hq, 64, generator=g)
    whole = prefill_attention_flash_cpu(q, k, v, [PrefillSeq(0, total, slots)], 0.125)
    for cached in (1, 2, 5, 31, 32, 33, 60, 97, 98, 99):
        part = prefill_attention_flash_cpu(q[cached:], k, v, [PrefillSeq(0, total - cached, slots)], 0.125)
        assert torch.equal(part, whole[cached:]), cached
    for shorter in (1, 3, 17, 32, 50, 99):
        prefix = prefill_attention_flash_cpu(q[:shorter], k, v, [PrefillSeq(0, shorter, slots[:shorter])], 0.125)
        assert torch.equal(prefix, whole[:shorter]), shorter


@pytest.mark.parametrize("seed", range(20))
def test_private_slots_planned_per_block_are_each_rows_unshared_tokens_in_order(seed):
    """The plan finds private tokens per block; the twin here walks every token of every row."""
    rng = random.Random(seed)
    block_size = rng.choice([4, 16])
    counter = iter(range(10_000))
    tables, lengths = _tree_tables(rng, block_size, rng.randint(1, 12), lambda: next(counter))
    plan = plan_decode(tables, lengths, block_size, max_segments=rng.choice([1, 8]), min_shared_tokens=rng.choice([1, 16]))
    shared = {int(s) for seg in plan.segments for s in seg.slots}
    for row, (table, n) in enumerate(zip(tables, lengths)):
        context = [table[p // block_size] * block_size + p % block_size for p in range(n)]
        own = [s for s in context if s not in shared]
        valid = plan.private_bias[row, 0, 0] == 0
        assert plan.private_slots[row][valid].tolist() == own
        assert plan.private_slots[row][~valid].tolist() == [context[0]] * int((~valid).sum())  # written, finite
        assert plan.all_slots[row, :n].tolist() == context and bool((plan.all_bias[row, 0, 0, :n] == 0).all())


def test_forked_tables_share_the_prompt_blocks_and_pool_slots_hold_every_block_they_name():
    from ttc.kernels.bench_shared_prefix import forked_tables, pool_slots

    tables, lengths = forked_tables(3, 32, 20, 16)  # 2 shared blocks, then 2 own blocks per row (20 tokens)
    assert tables == [[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 6, 7]]
    assert lengths == [52, 52, 52]
    assert pool_slots(tables, 16) == 8 * 16


def _same_groups(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(ra, rb) and torch.equal(ba, bb) for (ra, ba), (rb, bb) in zip(a, b))


def _shuffled_tree(seed: int, n_rows: int):
    """A random tree whose block ids are shuffled, so first appearance and id order differ."""
    rng = random.Random(seed)
    block_size = rng.choice([4, 16])
    ids = list(range(5_000))
    rng.shuffle(ids)
    counter = iter(ids)
    tables, lengths = _tree_tables(rng, block_size, n_rows, lambda: next(counter))
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return rng, block_size, tables, lengths, table


@pytest.mark.parametrize("seed", range(30))
def test_vectorized_block_grouping_equals_the_python_loop_on_random_trees_of_up_to_100_rows(seed):
    """Rows beyond 32 and 64 take several signature words; order, ties and the caps are the loop's exactly."""
    from ttc.kernels.decode_plan import shared_groups, shared_groups_loop

    rng, block_size, tables, lengths, table = _shuffled_tree(seed, random.Random(seed).choice([2, 9, 33, 70, 100]))
    caps = dict(max_segments=rng.choice([1, 3, 8]), min_shared_tokens=rng.choice([1, 16, 40]))
    fast = shared_groups(table, torch.tensor(lengths), block_size, **caps)
    assert _same_groups(fast, shared_groups_loop(tables, lengths, block_size, **caps))


def test_a_row_that_lists_a_block_twice_is_grouped_as_the_loop_groups_it():
    from ttc.kernels.decode_plan import shared_groups, shared_groups_loop

    tables = [[0, 1, 2, 2], [0, 1, 3, 4], [5, 1, 3, 6]]  # row 0 lists block 2 twice: its bits would carry
    lengths = [4 * 4] * 3
    fast = shared_groups(torch.tensor(tables), torch.tensor(lengths), 4, min_shared_tokens=1)
    loop = shared_groups_loop(tables, lengths, 4, min_shared_tokens=1)
    assert _same_groups(fast, loop) and [r.tolist() for r, _ in loop] == [[0, 1, 2], [0, 1], [0, 0], [1, 2]]


def test_a_plan_large_enough_to_group_blocks_with_tensor_ops_equals_the_loops_plan(monkeypatch):
    from ttc.kernels import decode_plan

    rng = random.Random(7)
    counter = iter(range(100_000))
    tables, lengths = _tree_tables(rng, 4, 300, lambda: next(counter))
    tables = [t + [next(counter) for _ in range(20)] for t in tables]  # long own parts: many full blocks
    lengths = [n + 20 * 4 for n in lengths]
    assert sum(min(len(t), n // 4) for t, n in zip(tables, lengths)) >= decode_plan.VECTORIZE_FROM
    fast = plan_decode(tables, lengths, 4, min_shared_tokens=1)
    monkeypatch.setattr(decode_plan, "VECTORIZE_FROM", 10 ** 9)
    loop = plan_decode(tables, lengths, 4, min_shared_tokens=1)
    assert len(fast.segments) == len(loop.segments) > 1
    for a, b in zip(fast.segments, loop.segments):
        assert (a.rows is None and b.rows is None or torch.equal(a.rows, b.rows)) and torch.equal(a.slots, b.slots)
    assert torch.equal(fast.private_slots, loop.private_slots) and torch.equal(fast.private_bias, loop.private_bias)


def _prefill_case(seed: int, n_seqs: int, hq: int, hkv: int, d: int = 16):
    """Sequences with cached prefixes of random length (0 for a fresh prompt) and 1-40 new tokens each, their
    contexts on scattered pool slots; every unwritten slot holds NaN, as torch.empty may."""
    from ttc.kernels.attention import PrefillBatch

    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    pool = 4_000
    k = torch.full((pool, hkv, d), float("nan"))
    v = torch.full((pool, hkv, d), float("nan"))
    free = list(range(pool))
    rng.shuffle(free)
    seqs, row = PrefillBatch(), 0
    for _ in range(n_seqs):
        cached, new = rng.choice([0, 0, rng.randint(1, 60), rng.randint(100, 300)]), rng.randint(1, 40)
        slots = torch.tensor([free.pop() for _ in range(cached + new)])
        k[slots], v[slots] = torch.randn(len(slots), hkv, d, generator=gen), torch.randn(len(slots), hkv, d, generator=gen)
        seqs.append(PrefillSeq(row, row + new, slots))
        row += new
    return torch.randn(row, hq, d, generator=gen), k, v, seqs


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
def test_batched_prefill_equals_one_sdpa_call_per_sequence(seed, hq, hkv):
    from ttc.kernels.attention import prefill_attention as reference, prefill_attention_batched

    q, k, v, seqs = _prefill_case(seed, random.Random(seed).choice([1, 3, 17]), hq, hkv)
    fast = prefill_attention_batched(q, k, v, seqs, 0.25)
    assert torch.isfinite(fast).all()  # padding reads written slots only: the NaN in the rest never enters
    torch.testing.assert_close(fast, reference(q, k, v, seqs, 0.25), rtol=1e-5, atol=1e-5)


def test_batched_prefill_groups_sequences_by_length_and_keeps_the_groups_for_every_layer():
    """A 300-token context beside 1-token ones would pad them 300x: they go to another call."""
    from ttc.kernels.attention import PrefillBatch, prefill_attention_batched

    d = 8
    k, v = torch.randn(1_000, 2, d), torch.randn(1_000, 2, d)
    seqs = PrefillBatch([PrefillSeq(0, 300, torch.arange(300))]
                        + [PrefillSeq(300 + i, 301 + i, torch.arange(400 + 10 * i, 410 + 10 * i)) for i in range(20)])
    q = torch.randn(320, 4, d)
    first = prefill_attention_batched(q, k, v, seqs, 0.3)
    groups = seqs.groups[1]
    # the long one takes at most one short one along (2x its own area, the waste allowed); the rest share a call
    shapes = [tuple(g.q_index.shape) for g in groups]
    assert len(shapes) == 2 and shapes[0] in ((1, 300), (2, 300)) and shapes[1] == (21 - shapes[0][0], 1)
    assert torch.equal(prefill_attention_batched(q, k, v, seqs, 0.3), first) and seqs.groups[1] is groups


def test_batched_prefill_keeps_each_group_s_scores_within_the_budget_a_sequence_alone_may_exceed():
    """Sixteen 100-token prompts pad nothing, but 4 heads x 16 x 100 x 100 scores exceed a budget of 50,000: the
    groups split, each within it; a single sequence over the budget is still a group of its own."""
    from ttc.kernels.attention import prefill_groups

    seqs = [PrefillSeq(100 * i, 100 * (i + 1), torch.arange(100 * i, 100 * (i + 1))) for i in range(16)]
    groups = prefill_groups(seqs, torch.device("cpu"), heads=4, max_scores=50_000)
    assert [g.q_index.shape[0] for g in groups] == [1] * 16  # 4 x 100 x 100 = 40,000 each; two would be 80,000
    groups = prefill_groups(seqs, torch.device("cpu"), heads=4, max_scores=200_000)
    assert [g.q_index.shape[0] for g in groups] == [5, 5, 5, 1]
    assert len(prefill_groups(seqs[:1], torch.device("cpu"), heads=4, max_scores=10)) == 1
