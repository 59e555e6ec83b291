"""CPU benchmark: cascade (shared-prefix) decode attention against plain per-branch attention.

Workloads, SmolLM2-135M attention shapes (9 query heads, 3 kv heads, head dim 64), one decode step of
one layer, in bfloat16 and float32:
- `tree` (default): 64 branches sharing a 512-token prefix, 32 own tokens each;
- `eval`: a batched sampling eval, 8 problems x 16 samples, each problem's 150-220-token prompt shared by
  its samples, each sample 1-384 tokens into its answer. Here the private parts differ in length, so the
  table adds the engine's cascade as it was before private parts were bucketed by length and gathered into
  kept buffers (one padded gather into fresh tensors).
The plan is built once per step and reused by every layer, so it is timed apart.

    python -m ttc.kernels.bench_shared_prefix [--workload tree|eval] [--reps 30] [--threads 1,2] [--record]

--record appends the table, with the date and the machine, to docs/benchmarks.md ("## Kernels (CPU)").
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .attention import GatherWorkspace, decode_attention, decode_attention_naive
from .decode_plan import plan_decode

BRANCHES, PREFIX, OWN, BLOCK, HQ, HKV, D = 64, 512, 32, 16, 9, 3, 64


def _times_ms(fn, reps: int) -> tuple[float, float]:
    """(best, median) of reps calls after a warm-up: on a shared machine the best is the cost, the
    median shows the contention."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return min(times), statistics.median(times)


def per_branch_sdpa(q, k_cache, v_cache, plan, scale):
    """Plain per-branch attention done well: gather each branch's whole context, one fused SDPA call."""
    k = k_cache[plan.all_slots].transpose(1, 2)  # (B, Hkv, T, D)
    v = v_cache[plan.all_slots].transpose(1, 2)
    mask = plan.all_bias == 0  # (B, 1, 1, T)
    o = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale,
                                                         enable_gqa=True)
    return o[:, :, 0]


def forked_tables(rows: int, prefix: int, own: int, block_size: int = BLOCK) -> tuple[list[list[int]], list[int]]:
    """Block tables and lengths of `rows` samples forked from one prompt: the prefix's blocks (0, 1, ...) shared
    by every row, then `own` tokens in blocks of each row's own (the benchmarks' shared-prefix workload)."""
    nb, pb = prefix // block_size, -(-own // block_size)
    return [list(range(nb)) + [nb + pb * i + j for j in range(pb)] for i in range(rows)], [prefix + own] * rows


def pool_slots(tables: list[list[int]], block_size: int = BLOCK) -> int:
    """Slots of the smallest pool holding every block the tables name (blocks are numbered from 0)."""
    return (1 + max(max(t) for t in tables)) * block_size


def _workload():
    tables, lengths = forked_tables(BRANCHES, PREFIX, OWN)
    return tables, lengths, pool_slots(tables)


EVAL_PROBLEMS, EVAL_SAMPLES, EVAL_PROMPT, EVAL_OWN = 8, 16, (150, 220), (1, 384)


def _eval_workload(seed: int = 0):
    """Block tables of a batched sampling eval: each problem's full prompt blocks shared by its samples."""
    rng = random.Random(seed)
    tables, lengths, next_block = [], [], 0
    for _ in range(EVAL_PROBLEMS):
        prompt = rng.randint(*EVAL_PROMPT)
        shared = list(range(next_block, next_block + prompt // BLOCK))
        next_block += len(shared)
        for _ in range(EVAL_SAMPLES):
            total = prompt + rng.randint(*EVAL_OWN)
            own = -(-total // BLOCK) - len(shared)
            tables.append(shared + list(range(next_block, next_block + own)))
            next_block += own
            lengths.append(total)
    return tables, lengths, next_block * BLOCK


def run(reps: int, threads: list[int], workload: str = "tree") -> list[str]:
    tables, lengths, slots = _eval_workload() if workload == "eval" else _workload()
    plan = plan_decode(tables, lengths, BLOCK, workspace=GatherWorkspace())
    # the cascade before bucketing and kept buffers: one gather padded to the longest private part
    unbucketed = dataclasses.replace(plan, private_buckets=(), bucket_unsort=None, workspace=None)
    both = workload == "eval"
    rows = ["| dtype | threads | cascade reference | " + ("unbucketed cascade | " if both else "")
            + "per-branch naive twin | per-branch SDPA | " + ("unbucketed / cascade | " if both else "")
            + "naive / cascade | SDPA / cascade |", "|" + " --- |" * (9 if both else 7)]
    plans = []
    g = torch.Generator().manual_seed(0)
    for n in threads:
        torch.set_num_threads(n)
        plans.append((n, _times_ms(lambda: plan_decode(tables, lengths, BLOCK), reps)))
        for dtype in (torch.bfloat16, torch.float32):
            k = torch.randn(slots, HKV, D, generator=g).to(dtype)
            v = torch.randn(slots, HKV, D, generator=g).to(dtype)
            q = torch.randn(len(tables), HQ, D, generator=g).to(dtype)
            fast = _times_ms(lambda: decode_attention(q, k, v, plan, D ** -0.5), reps)
            old = _times_ms(lambda: decode_attention(q, k, v, unbucketed, D ** -0.5), reps) if both else None
            slow = _times_ms(lambda: decode_attention_naive(q, k, v, plan, D ** -0.5), reps)
            sdpa = _times_ms(lambda: per_branch_sdpa(q, k, v, plan, D ** -0.5), reps)
            name = str(dtype).removeprefix("torch.")
            rows.append(f"| {name} | {n} | {fast[0]:.2f} / {fast[1]:.2f} | "
                        + (f"{old[0]:.2f} / {old[1]:.2f} | " if both else "")
                        + f"{slow[0]:.2f} / {slow[1]:.2f} | {sdpa[0]:.2f} / {sdpa[1]:.2f} | "
                        + (f"{old[0] / fast[0]:.1f}x | " if both else "")
                        + f"{slow[0] / fast[0]:.0f}x | {sdpa[0] / fast[0]:.1f}x |")
    rows.append("\nplan_decode (once per step, shared by every layer), best / median: "
                + ", ".join(f"{t[0]:.2f} / {t[1]:.2f} ms ({n} threads)" for n, t in plans))
    return rows


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        model = platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0))
    return f"{model}, {cores} cores, torch {torch.__version__}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["tree", "eval"], default="tree")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", default="", help="comma-separated torch thread counts, e.g. 1,2 (default: torch's)")
    ap.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    args = ap.parse_args(argv)
    threads = [int(n) for n in args.threads.split(",") if n] or [torch.get_num_threads()]
    rows = run(args.reps, threads, args.workload)
    shape = (f"{EVAL_PROBLEMS} problems x {EVAL_SAMPLES} samples, prompts of {EVAL_PROMPT[0]}-{EVAL_PROMPT[1]} "
             f"tokens shared by each problem's samples, {EVAL_OWN[0]}-{EVAL_OWN[1]} own tokens each"
             if args.workload == "eval" else
             f"{BRANCHES} branches sharing a {PREFIX}-token prefix, {OWN} own tokens each")
    header = (f"{shape}; Hq={HQ}, Hkv={HKV}, "
              f"D={D}; one layer, one decode step; ms per call, best / median of {args.reps} calls; "
              f"ratios of the best; load average after the run {_load()} (the cores are shared)")
    print(header)
    print("\n".join(rows))
    if args.record:
        doc = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        doc.parent.mkdir(exist_ok=True)
        new = not doc.exists()
        with doc.open("a") as f:
            if new:
                f.write("# Benchmarks\n")
            flags = argv if argv is not None else sys.argv[1:]
            command = " ".join(["python -m ttc.kernels.bench_shared_prefix", *flags])
            f.write(f"\n## Kernels (CPU)\n\n`{command}`, "
                    f"{datetime.date.today().isoformat()}, {_machine()}.\n{header}.\n\n")
            f.write("\n".join(rows) + "\n")
        print(f"appended to {doc}")


if __name__ == "__main__":
    main()
