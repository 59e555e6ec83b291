"""Eval throughput: problems one at a time against `concurrency=K` (their decoding batched together).

Runs the same ttc-eval jobs (the embedded model, reasoning-gym chain_sum, 2 terms, 1-2 digits) in one
process, once with concurrency 1 and once with K, and prints wall time, problems per minute, generated
tokens per second and accuracy. The model is loaded once, before anything is timed.

    python benchmarks/eval_concurrency.py [--problems 16] [--concurrency 8] [--record]

Accuracy can differ between the two in bfloat16: a matrix product's rounding depends on the batch
shape beyond ~32 rows, so near-tied tokens can flip (see ttc/decoder/concurrent.py).
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from ttc.evals.__main__ import config_dict
from ttc.evals.build import load_model
from ttc.evals.runner import run_eval

JOBS = {"greedy": ["strategy=greedy"], "self_consistency n=8": ["strategy=self_consistency", "strategy.n=8"]}


def config(problems: int, concurrency: int, job: list[str]) -> dict:
    overrides = ["dataset=reasoning_gym", "dataset.task=chain_sum",
                 "dataset.options={min_terms:2,max_terms:2,min_digits:1,max_digits:2}", f"dataset.size={problems}",
                 "proposer.max_tokens=128", "budget.tokens=4096", "progress=false", f"concurrency={concurrency}", *job]
    with initialize_config_module(config_module="ttc.configs", version_base="1.3"):
        return config_dict(compose("eval", overrides=overrides))


def main() -> None:
    from decode import machine  # benchmarks/decode.py, beside this file

    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    args = ap.parse_args()
    load_model(config(1, 1, JOBS["greedy"])["model"])  # loaded once, shared by every job below
    rows = ["| job | concurrency | wall s | problems / min | generated tok/s | accuracy | speedup |",
            "|---|---|---|---|---|---|---|"]
    for name, job in JOBS.items():
        base = None
        for k in (1, args.concurrency):
            with tempfile.TemporaryDirectory() as out:
                started = time.perf_counter()
                summary = run_eval(config(args.problems, k, job), Path(out)).summary
                wall = time.perf_counter() - started
            base = base or wall
            rows.append(f"| {name} | {k} | {wall:.1f} | {60 * args.problems / wall:.1f} | "
                        f"{summary['generated_tokens'] / wall:.0f} | {summary['accuracy']:.2f} | {base / wall:.1f}x |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.record:
        doc = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        with doc.open("a") as f:
            f.write(f"\n## Eval throughput with concurrent problems ({datetime.date.today()})\n\n{machine()}; "
                    f"{args.problems} chain_sum problems; `python benchmarks/eval_concurrency.py`\n\n{table}\n")


if __name__ == "__main__":
    main()
