"""CUDA graphs of the decode step's forward, one per batch-size bucket, captured on first use.

Why: a decode step of a small model is ~10 kernels a layer of a few microseconds each; launched one by one
from Python the GPU waits on the host (a 24-layer model: ~250 launches, several ms a step). A graph replays
the whole forward as one launch.

What a replay reads lives in fixed buffers, refilled in place before each replay:
- `tokens`, `positions`, `slots`: (bucket,) rows; a step of B rows is padded up to the next bucket with
  token 0 at position 0, writing its K/V into the pool's scratch slot (`KVPool.scratch_slot`), which no
  sequence owns;
- the decode-attention work table (`ttc.kernels.static_work_table`): the cascade plan's items, slots and
  parts; its kernels loop over the items it names, so one fixed grid serves every plan that fits;
- the logits come out in the graph's own (bucket, V) buffer and are copied out for the step's B rows
  (a sequence keeps its row past the next replay).

A step runs eager instead (the engine's plain forward: same kernels, same plan) when B is beyond the largest
bucket or its plan beyond the table's capacity; and every step does once a capture has failed (a driver or an
op that refuses capture: logged once as a warning, the reason kept in `disabled`), so a run loses its speed-up,
not its results. Twin: the same fixed-buffer forward without capture
(`capture=False`), which runs on any device (the tests run it on the CPU through Triton's interpreter), and
the eager forward. Limits: greedy tokens may differ from eager ones only where a GPU's kernels round
differently at a different row count (the padded bucket); prefill and scoring forwards are never captured.
"""

from __future__ import annotations

import logging

import torch

from ttc import kernels
from ttc.kernels import DecodePlan

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class DecodeGraphs:
    def __init__(self, model, pool, capture: bool = True, buckets: tuple[int, ...] = BUCKETS,
                 part_capacity: int | None = None):
        if pool.scratch_slot is None:
            raise ValueError("CUDA graphs need a KV pool with a scratch block (KVPool(scratch_blocks=1))")
        cfg, dev = model.cfg, model.device
        self.model, self.pool, self.capture, self.buckets = model, pool, capture, tuple(sorted(buckets))
        max_rows = self.buckets[-1]
        # (3, rows): tokens, positions, slots; refilled from a pinned host twin in one copy per step
        self.inputs = torch.zeros(3, max_rows, dtype=torch.long, device=dev)
        self.staging = torch.zeros(3, max_rows, dtype=torch.long, pin_memory=dev.type == "cuda")
        # every plan of up to max_rows rows fits the table's items and parts (sized for the longest context the
        # pool can hold); its slots, at most the rows' contexts, are capped at twice the pool's: a step beyond
        # that (rows whose private parts repeat the same blocks) runs eager
        max_context = min(cfg.max_position, pool.num_blocks * pool.block_size)
        slot_capacity = min(max_rows * max_context, 2 * pool.num_blocks * pool.block_size)
        self.table = kernels.static_work_table(max_rows, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, dev,
                                               max_context, slot_capacity, part_capacity=part_capacity)
        # the host staging buffers are rewritten only once the previous step's copies out of them are done
        self.copied = torch.cuda.Event() if dev.type == "cuda" else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.memory_pool = None  # one pool for every bucket's graph: outputs are copied out right after a replay
        self.replays = self.eager_steps = 0  # how often each path ran (tests, benchmarks)
        self.disabled: str | None = None  # why a capture failed here; from then on every step runs eager

    def run(self, tokens: list[int], positions: list[int], slots: list[int], plan: DecodePlan) -> torch.Tensor | None:
        """Logits (B, V) float32 of one decode step (a new tensor), or None where the step must run eager.
        `plan`: the step's host-side DecodePlan."""
        B = len(tokens)
        bucket = next((b for b in self.buckets if b >= B), None)
        if self.copied is not None:
            self.copied.synchronize()  # the last step's copies out of the staging buffers have landed
        if self.disabled or bucket is None or not self.table.fill(plan):
            self.eager_steps += 1
            return None
        self.staging[:, :B] = torch.tensor([tokens, positions, slots])
        self.staging[:2, B:bucket] = 0
        self.staging[2, B:bucket] = self.pool.scratch_slot
        self.inputs.copy_(self.staging, non_blocking=True)  # all of it (6 KB at 256 rows): one contiguous copy
        if self.copied is not None:
            self.copied.record()
        if not self.capture:
            logits = self._forward(bucket)
        else:
            try:
                graph, logits = self.graphs.get(bucket) or self._capture(bucket)
            except Exception as e:  # noqa: BLE001 - whatever refused the capture, the eager step still runs
                self.disabled = f"{type(e).__name__}: {e}".splitlines()[0]
                log.warning("could not capture a CUDA graph of the decode step (%s); decode steps run eagerly",
                            self.disabled)
                self.eager_steps += 1
                return None
            graph.replay()
        self.replays += 1
        return logits[:B].clone()

    def _forward(self, bucket: int) -> torch.Tensor:
        tokens, positions, slots = self.inputs[:, :bucket]
        logits, _ = self.model(tokens, positions, self.pool.k, self.pool.v, slots, self.table)
        return logits

    def _capture(self, bucket: int):
        """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels: neither may happen inside a
        capture), then capture the bucket's forward. The warm-up computes the step itself: it writes the same
        K/V into the same slots the replay then writes again."""
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(bucket)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a thread of a concurrent eval or `ttc serve` touching CUDA meanwhile (its own stream's
        # work) does not invalidate this capture; engine calls themselves are serialized
        with torch.cuda.graph(graph, pool=self.memory_pool, capture_error_mode="thread_local"):
            logits = self._forward(bucket)
        self.memory_pool = graph.pool()
        self.graphs[bucket] = (graph, logits)
        log.info("captured a CUDA graph of the decode step for %d rows", bucket)
        return self.graphs[bucket]
