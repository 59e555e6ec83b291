"""The host's work per decode step before any kernel runs: the cascade plan and the Triton work table.

Why: on a GPU a decode step of a small model takes a few milliseconds, so what the host spends planning it is
a direct share of every step (a CUDA graph removes the launches, not the planning); on a CPU it is smaller
against a slower forward but still paid every step. Rows share a prompt of `prefix` tokens and hold `own`
tokens each, block size 16, as forked samples do.

    python benchmarks/step_planning.py [--before REV] [--reps 20]

--before REV also times `plan_decode` as it was at git revision REV (kernels/decode_plan.py of that commit, or
kernels/attention.py before the plan had a module of its own; imported from a temporary file), the peer this
script compares against: ratios are before / now (both planned cold). "groups kept": the same plan with a
GroupCache holding the last step's segments, as the engine plans a decode loop's next step (its whole step:
benchmarks/step_host.py).
Prints ms per call, the best of 3 runs of --reps calls each, one thread (torch.set_num_threads(1)).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import subprocess
import sys
import tempfile
import time

import torch

CASES = [(16, 128, 64), (64, 128, 64), (256, 128, 64), (64, 1024, 300), (256, 1024, 300), (256, 4096, 512)]


def _ms(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps * 1e3)
    return best


def _plan_at(rev: str):
    """plan_decode from kernels/decode_plan.py (or, before it existed, kernels/attention.py) at git revision `rev`
    (either imports only torch and numpy at run time)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    for name in ("decode_plan.py", "attention.py"):
        shown = subprocess.run(["git", "-C", str(root), "show", f"{rev}:kernels/{name}"], capture_output=True, text=True)
        if shown.returncode == 0:
            source = shown.stdout
            break
    else:
        raise SystemExit(f"no kernels/decode_plan.py or kernels/attention.py at {rev}: {shown.stderr.strip()}")
    path = pathlib.Path(tempfile.mkdtemp()) / "attention_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("attention_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.plan_decode


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None, help="a git revision whose plan_decode to time beside today's")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from ttc.kernels.decode_plan import GroupCache, plan_decode
    from ttc.kernels.bench_shared_prefix import forked_tables

    work_table = None
    try:  # the Triton work table's host part; Triton must import (no GPU needed: nothing is launched)
        from ttc.kernels.attention_triton import host_work_table as work_table
    except Exception as e:  # noqa: BLE001 - reported, the plan is still timed
        print(f"(no work table: {type(e).__name__}: {e})")
    before = _plan_at(args.before) if args.before else None
    header = ["rows", "context", "plan_decode ms", "groups kept ms"] + (["before ms", "before / now"] if before else [])
    header += ["work table ms"] if work_table else []
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for B, prefix, own in CASES:
        tables, lengths = forked_tables(B, prefix, own, 16)
        now = _ms(lambda: plan_decode(tables, lengths, 16, dtype=torch.bfloat16), args.reps)
        groups = GroupCache()  # the next step of the same rows: the last plan's segments handed back
        kept = _ms(lambda: plan_decode(tables, lengths, 16, dtype=torch.bfloat16, groups=groups), args.reps)
        row = [str(B), f"{prefix} shared + {own} own", f"{now:.2f}", f"{kept:.2f}"]
        if before:
            then = _ms(lambda: before(tables, lengths, 16, dtype=torch.bfloat16), args.reps)
            row += [f"{then:.2f}", f"{then / now:.1f}x"]
        if work_table:
            plan = plan_decode(tables, lengths, 16, dtype=torch.bfloat16)
            row.append(f"{_ms(lambda: work_table(plan, 16, 256), args.reps):.2f}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
