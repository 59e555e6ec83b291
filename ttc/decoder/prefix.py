"""A radix tree over token ids, one edge per full KV block, so a prompt seen before is not prefilled again.

Granularity is the block: only full blocks are ever shared, so a tree keyed by block-sized token tuples
is exact and needs no splitting of edges. The tree holds one reference on each cached block; a block
whose only reference is the tree's can be evicted (least recently used leaf first) when the pool runs dry.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .cache import KVPool


@dataclass(eq=False)
class _Node:
    block: int
    parent: "_Node | None"
    key: tuple[int, ...]
    children: dict[tuple[int, ...], "_Node"] = field(default_factory=dict)
    last_used: int = 0


class PrefixCache:
    def __init__(self, pool: KVPool):
        self.pool = pool
        self.root = _Node(block=-1, parent=None, key=())
        self._clock = itertools.count(1)
        self.num_cached_blocks = 0
        self.hits = 0  # blocks served from the tree, over its lifetime

    def _chunks(self, token_ids, max_tokens: int):
        bs = self.pool.block_size
        for start in range(0, (min(len(token_ids), max_tokens) // bs) * bs, bs):
            yield tuple(token_ids[start:start + bs])

    def match(self, token_ids, max_tokens: int | None = None) -> list[int]:
        """Block ids caching the longest full-block prefix of token_ids (at most max_tokens tokens).

        The caller takes its own reference on the returned blocks (pool.incref) before using them.
        """
        node, blocks, now = self.root, [], next(self._clock)
        for key in self._chunks(token_ids, len(token_ids) if max_tokens is None else max_tokens):
            child = node.children.get(key)
            if child is None:
                break
            child.last_used = now
            blocks.append(child.block)
            node = child
        self.hits += len(blocks)
        return blocks

    def insert(self, token_ids, blocks: list[int]) -> None:
        """Remember the full blocks of a sequence whose KV for token_ids lives in `blocks`."""
        node, now = self.root, next(self._clock)
        for key, block in zip(self._chunks(token_ids, len(token_ids)), blocks):
            child = node.children.get(key)
            if child is None:
                child = _Node(block=block, parent=node, key=key)
                node.children[key] = child
                self.pool.incref([block])
                self.num_cached_blocks += 1
            child.last_used = now
            node = child

    def evict(self, num_blocks: int) -> int:
        """Free up to num_blocks blocks held only by the tree, least recently used leaves first."""
        freed = 0
        while freed < num_blocks:
            leaves = [n for n in self._nodes() if not n.children and self.pool.refcount[n.block] == 1]
            if not leaves:
                break
            leaves.sort(key=lambda n: n.last_used)
            for leaf in leaves[: num_blocks - freed]:
                self._drop(leaf)
                freed += 1
        return freed

    def evictable_blocks(self) -> int:
        """Blocks that eviction could free now (tree-only references, counted bottom-up)."""
        def count(node: _Node) -> tuple[int, bool]:
            total, all_free = 0, True
            for child in node.children.values():
                c, f = count(child)
                total += c
                all_free &= f
            if node is self.root:
                return total, all_free
            mine = all_free and self.pool.refcount[node.block] == 1
            return total + int(mine), mine
        return count(self.root)[0]

    def clear(self) -> None:
        """Drop every cached block (the tree's references only; live sequences keep theirs)."""
        for node in list(self._nodes()):
            self.pool.decref([node.block])
        self.root.children.clear()
        self.num_cached_blocks = 0

    def _drop(self, leaf: _Node) -> None:
        del leaf.parent.children[leaf.key]
        self.pool.decref([leaf.block])
        self.num_cached_blocks -= 1

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
