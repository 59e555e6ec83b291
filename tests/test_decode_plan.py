"""The decode plan's group cache: a plan built with the last step's groups equals one grouped afresh."""

import random

import pytest
import torch

from ttc.kernels.decode_plan import GroupCache, plan_decode


def _same_plan(a, b) -> bool:
    return (len(a.segments) == len(b.segments)
            and all((x.rows is None and y.rows is None or torch.equal(x.rows, y.rows)) and torch.equal(x.slots, y.slots)
                    for x, y in zip(a.segments, b.segments))
            and torch.equal(a.private_slots, b.private_slots) and torch.equal(a.private_bias, b.private_bias)
            and torch.equal(a.block_table, b.block_table) and torch.equal(a.lengths, b.lengths))


def _forked_rows(rng, block_size, next_block):
    """Rows sharing a 3-block trunk, some also a 2-block branch, each with its own partial block at its own phase."""
    trunk = [next_block() for _ in range(3)]
    branch = trunk + [next_block() for _ in range(2)]
    tables, lengths = [], []
    for i in range(10):
        base = branch if i % 2 else trunk
        tables.append(base + [next_block()])
        lengths.append(len(base) * block_size + rng.randint(1, block_size))
    return tables, lengths


@pytest.mark.parametrize("seed", range(6))
def test_a_decode_loop_planned_with_the_group_cache_equals_one_grouped_afresh_every_step(seed):
    """Rows fill blocks at different steps (each then takes a fresh block, as the engine's reserve does); the
    cache answers most steps and every plan equals the uncached one."""
    rng = random.Random(seed)
    block_size = 4
    counter = iter(range(100_000))
    tables, lengths = _forked_rows(rng, block_size, lambda: next(counter))
    cache = GroupCache()
    for step in range(3 * block_size):
        cached = plan_decode(tables, lengths, block_size, min_shared_tokens=1, groups=cache)
        assert _same_plan(cached, plan_decode(tables, lengths, block_size, min_shared_tokens=1)), step
        for table, i in zip(tables, range(len(lengths))):
            lengths[i] += 1
            if lengths[i] > len(table) * block_size:
                table.append(next(counter))
    assert cache.misses == 1 and cache.hits == 3 * block_size - 1


def test_the_group_cache_regroups_when_a_newly_full_block_is_held_by_another_row_too():
    """No engine makes such a table (a partial block is never shared), so it is checked, not assumed."""
    cache = GroupCache()
    tables, lengths = [[0, 1, 2], [0, 1, 3]], [10, 10]  # block size 4: blocks 0 and 1 full and shared
    first = plan_decode(tables, lengths, 4, min_shared_tokens=1, groups=cache)
    assert [s.slots.tolist() for s in first.segments] == [list(range(8))]
    tables, lengths = [[0, 1, 2, 5], [0, 1, 2, 6]], [13, 13]  # block 2 filled, and in both rows
    second = plan_decode(tables, lengths, 4, min_shared_tokens=1, groups=cache)
    assert _same_plan(second, plan_decode(tables, lengths, 4, min_shared_tokens=1))
    assert [s.slots.tolist() for s in second.segments] == [list(range(12))]
    assert cache.hits == 0 and cache.misses == 2


@pytest.mark.parametrize("change", ["fewer rows", "a row replaced", "a block released", "other caps"])
def test_the_group_cache_regroups_when_the_rows_change(change):
    cache = GroupCache()
    tables, lengths = [[0, 1, 2], [0, 1, 3], [0, 4, 5]], [10, 10, 10]
    caps = dict(min_shared_tokens=1)
    plan_decode(tables, lengths, 4, groups=cache, **caps)
    if change == "fewer rows":
        tables, lengths = tables[:2], lengths[:2]
    elif change == "a row replaced":
        tables = [tables[0], [0, 4, 6], tables[2]]
    elif change == "a block released":
        tables, lengths = [[0, 1, 2], [0, 1, 3], [0]], [10, 10, 3]
    else:
        caps = dict(min_shared_tokens=16)
    plan = plan_decode(tables, lengths, 4, groups=cache, **caps)
    assert _same_plan(plan, plan_decode(tables, lengths, 4, **caps))
    assert cache.misses == 2 and cache.hits == 0


def test_the_engine_reuses_its_groups_and_samples_the_same_tokens_as_when_it_regroups_every_step(tiny_model):
    """Forked samples keep their shared blocks: the engine groups them once, not every step."""
    from ttc.decoder.sampling import SamplingParams

    engine = tiny_model.engine

    def samples():
        engine.clear_prefix_cache()  # each run prefills the prompt alike (a cached prefix changes the GEMMs' rows)
        root = engine.new_sequence(list(range(3, 40)))
        kids = engine.fork(root, 6, seeds=list(range(6)))
        try:
            return [c.token_ids for c in engine.generate(kids, SamplingParams(temperature=1.0), 24, ignore_eos=True)]
        finally:
            engine.release(kids + [root])

    kept = engine.plan_groups
    try:
        engine.plan_groups = GroupCache()
        cached = samples()
        # 23 planned steps (the first token is drawn from the prompt's logits), grouped once: the blocks the rows
        # fill on the way (at 48 tokens) are each one row's own
        assert engine.plan_groups.misses == 1 and engine.plan_groups.hits == 22
        engine.plan_groups = None
        assert samples() == cached
    finally:
        engine.plan_groups = kept


def test_the_kept_block_table_follows_rows_that_grow_shrink_are_replaced_and_outgrow_its_width():
    cache = GroupCache()
    steps = [
        [[0, 1, 2], [0, 1, 3]],
        [[0, 1, 2, 4], [0, 1, 3]],  # a block appended
        [[0, 1, 2, 4], [5]],  # a row replaced by a shorter one
        [[0, 1, 2, 4] + list(range(10, 80)), [5, 6]],  # wider than the table was, and another append
        [[7], [5, 6]],  # the long row gone
        [[7], [5, 6], [8]],  # another row
    ]
    for tables in steps:
        expected = [t + [0] * (max(map(len, tables)) - len(t)) for t in tables]
        assert cache.table(tables).tolist() == expected
        previous = cache.table(tables)
        previous[:] = -1  # the caller's copy: writing it leaves the cache's table alone
        assert cache.table(tables).tolist() == expected
