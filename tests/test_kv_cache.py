"""The paged KV pool and the radix prefix tree: exact block ids, reference counts, eviction order."""

from __future__ import annotations

import random

import pytest
import torch

from ttc.decoder import cache
from ttc.decoder.cache import KVPool, KVSequence, PoolExhausted
from ttc.decoder.prefix import PrefixCache


def _pool(num_blocks=8, block_size=4):
    pool = KVPool(num_layers=2, num_kv_heads=1, head_dim=2, num_blocks=num_blocks, block_size=block_size)
    pool.k.normal_()
    pool.v.normal_()
    return pool


def _seq(pool, n_tokens):
    seq = KVSequence()
    cache.reserve(pool, seq, n_tokens)
    seq.num_tokens = n_tokens
    return seq


def test_blocks_are_handed_out_lowest_id_first():
    pool = _pool()
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.num_free == 5


def test_fork_shares_full_blocks_and_copies_only_the_partial_one():
    pool = _pool()
    parent = _seq(pool, 10)  # blocks 0, 1 full; block 2 holds 2 tokens
    assert parent.blocks == [0, 1, 2]
    child = cache.fork(pool, parent)
    assert child.blocks == [0, 1, 3]
    assert pool.refcount[:4] == [2, 2, 1, 1]
    assert torch.equal(pool.k[:, 12:14], pool.k[:, 8:10])  # the partial block's two tokens were copied


def test_fork_of_a_block_aligned_sequence_copies_nothing():
    pool = _pool()
    parent = _seq(pool, 8)
    child = cache.fork(pool, parent)
    assert child.blocks == [0, 1] and pool.num_free == 6


def test_any_sequence_of_fork_extend_release_returns_the_pool_to_its_free_count():
    rng = random.Random(0)
    pool = _pool(num_blocks=64)
    for trial in range(50):
        live = [_seq(pool, rng.randint(1, 9))]
        for _ in range(30):
            op = rng.choice(["fork", "extend", "release"])
            try:
                if op == "fork" and live:
                    live.append(cache.fork(pool, rng.choice(live)))
                elif op == "extend" and live:
                    s = rng.choice(live)
                    k = rng.randint(1, 6)
                    cache.reserve(pool, s, k)
                    s.num_tokens += k
                elif op == "release" and live:
                    cache.release(pool, live.pop(rng.randrange(len(live))))
            except PoolExhausted:
                pass
        for s in live:
            cache.release(pool, s)
        assert pool.num_free == 64 and all(c == 0 for c in pool.refcount)


def test_exhausted_pool_says_how_many_blocks_were_needed():
    pool = _pool(num_blocks=2)
    with pytest.raises(PoolExhausted, match="3 blocks of 4 tokens needed, 2 free of 2"):
        pool.allocate(3)


def test_prefix_tree_hits_on_a_repeated_prompt():
    pool = _pool(num_blocks=16)
    tree = PrefixCache(pool)
    tokens = list(range(11))
    seq = _seq(pool, 11)
    tree.insert(tokens, seq.blocks)
    assert tree.num_cached_blocks == 2  # only full blocks are cached
    assert tree.match(tokens) == seq.blocks[:2]
    assert tree.match(tokens[:7]) == seq.blocks[:1]
    assert tree.match([99] + tokens[1:]) == []
    cache.release(pool, seq)
    assert pool.num_free == 16 - 2  # the tree keeps its two blocks alive
    tree.clear()
    assert pool.num_free == 16


def test_prefix_eviction_frees_the_least_recently_used_leaf_first():
    pool = _pool(num_blocks=16)
    tree = PrefixCache(pool)
    a, b = [1] * 8, [2] * 8
    for tokens in (a, b):
        seq = _seq(pool, 8)
        tree.insert(tokens, seq.blocks)
        cache.release(pool, seq)
    tree.match(a)  # a is now more recent than b
    assert tree.evictable_blocks() == 4
    assert tree.evict(1) == 1
    assert tree.match(b) == [2]  # b lost its leaf (block 3), kept its root block
    assert tree.match(a) == [0, 1]


def test_blocks_still_used_by_a_sequence_are_not_evicted():
    pool = _pool(num_blocks=16)
    tree = PrefixCache(pool)
    seq = _seq(pool, 8)
    tree.insert([5] * 8, seq.blocks)
    assert tree.evictable_blocks() == 0 and tree.evict(2) == 0
