"""A paged KV pool of fixed-size blocks with reference counts, and the per-sequence block table.

Layout: one K and one V tensor per pool, each (layers, num_blocks * block_size, kv_heads, head_dim).
Token t of a sequence lives in slot `block_table[t // block_size] * block_size + t % block_size`.
Full blocks are shared between sequences by reference count; a partial last block is never shared
(fork copies it), so a sequence only ever writes into blocks it owns alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class PoolExhausted(RuntimeError):
    """The KV pool cannot hold the requested tokens. The message says how many blocks were needed."""

    def __init__(self, needed_blocks: int, free_blocks: int, total_blocks: int, block_size: int):
        self.needed_blocks, self.free_blocks, self.total_blocks = needed_blocks, free_blocks, total_blocks
        super().__init__(
            f"KV pool exhausted: {needed_blocks} blocks of {block_size} tokens needed, {free_blocks} free of "
            f"{total_blocks}. Load the model with a larger kv_cache_gb (at least "
            f"{total_blocks - free_blocks + needed_blocks} blocks in all) or run fewer branches at a time."
        )


class KVPool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", scratch_blocks: int = 0):
        if num_blocks < 1:
            raise ValueError("a KV pool needs at least one block")
        self.num_blocks, self.block_size = num_blocks, block_size
        # scratch blocks sit past the last numbered block, never handed out: the padded rows of a captured
        # decode step (ttc/decoder/graphs.py) write their K/V there
        self.scratch_slot = num_blocks * block_size if scratch_blocks else None
        shape = (num_layers, (num_blocks + scratch_blocks) * block_size, num_kv_heads, head_dim)
        # torch.empty does not touch the pages: a large pool costs memory only as blocks get used.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * self.k.element_size()
        self.refcount = [0] * num_blocks
        # A stack popped from the end: block 0 is handed out first, which keeps tests' block ids exact.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def live_bytes(self) -> int:
        return (self.num_blocks - len(self._free)) * self.bytes_per_block

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(n, len(self._free), self.num_blocks, self.block_size)
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self.refcount[b] = 1
        return blocks

    def incref(self, blocks) -> None:
        for b in blocks:
            assert self.refcount[b] > 0, f"incref of free block {b}"
            self.refcount[b] += 1

    def decref(self, blocks) -> None:
        for b in blocks:
            assert self.refcount[b] > 0, f"double release of block {b}"
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self._free.append(b)

    def copy_block(self, src: int, dst: int, num_tokens: int) -> None:
        """Copy the first num_tokens slots of block src into block dst, all layers."""
        s, d = src * self.block_size, dst * self.block_size
        self.k[:, d:d + num_tokens] = self.k[:, s:s + num_tokens]
        self.v[:, d:d + num_tokens] = self.v[:, s:s + num_tokens]


@dataclass(eq=False)
class KVSequence:
    """The engine's handle on one branch's KV: its block table and how many tokens it holds."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0  # tokens whose K/V are written into the pool
    released: bool = False

    def slot(self, position: int, block_size: int) -> int:
        return self.blocks[position // block_size] * block_size + position % block_size

    def slots(self, start: int, stop: int, block_size: int) -> list[int]:
        return [self.blocks[p // block_size] * block_size + p % block_size for p in range(start, stop)]


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def blocks_short(pool: KVPool, seq: KVSequence, new_tokens: int) -> int:
    """Blocks seq lacks to hold new_tokens more tokens (0 where its blocks have room)."""
    return max(0, blocks_needed(seq.num_tokens + new_tokens, pool.block_size) - len(seq.blocks))


def reserve(pool: KVPool, seq: KVSequence, new_tokens: int) -> None:
    """Make sure seq owns blocks for new_tokens more tokens (its last block is private by construction)."""
    extra = blocks_short(pool, seq, new_tokens)
    if extra > 0:
        seq.blocks.extend(pool.allocate(extra))


def fork(pool: KVPool, parent: KVSequence) -> KVSequence:
    """A child sharing every full block of parent; the partial last block (if any) is copied."""
    full, partial = divmod(parent.num_tokens, pool.block_size)
    shared = parent.blocks[:full]
    pool.incref(shared)
    child = KVSequence(blocks=list(shared), num_tokens=parent.num_tokens)
    if partial:
        try:
            (own,) = pool.allocate(1)
        except PoolExhausted:
            pool.decref(shared)
            raise
        pool.copy_block(parent.blocks[full], own, partial)
        child.blocks.append(own)
    return child


def release(pool: KVPool, seq: KVSequence) -> None:
    if seq.released:
        return
    pool.decref(seq.blocks)
    seq.blocks = []
    seq.released = True
