"""The code sandbox's cost: start-up per run (bwrap, the interpreter, the harness) and runs in parallel.

Rows: the bare interpreter (`python -I -S -c pass`), bwrap around it, a whole `run_tests` without and with
the boundary, one run of 20 test cases, then `rounds` runs of a small program with its test spread over
1, 2, 4 and 8 worker threads (runs per second). Medians of `repeat` runs; a few seconds in all.

    python benchmarks/sandbox.py [--repeat 20] [--rounds 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from ttc.verifiers import sandbox, sandbox_bwrap

PROGRAM, TEST = "def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5\n"


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=64)
    args = parser.parse_args()
    sandbox.check_boundary()
    interpreter = sandbox_bwrap.runtime_view()[0]
    info_read, info_write = os.pipe()
    wrapped = sandbox_bwrap.command(info_write, sandbox_bwrap.run_uid())
    rows = [
        ("python -I -S -c pass",
         median_ms(lambda: subprocess.run([interpreter, "-I", "-S", "-c", "pass"]), args.repeat)),
        ("bwrap + python -I -S -c pass",
         median_ms(lambda: subprocess.run(wrapped + ["-I", "-S", "-c", "pass"], pass_fds=[info_write]), args.repeat)),
        ("run_tests, guards-only", median_ms(lambda: sandbox.run_tests(PROGRAM, TEST, isolation="guards-only"),
                                             args.repeat)),
        ("run_tests, bwrap", median_ms(lambda: sandbox.run_tests(PROGRAM, TEST), args.repeat)),
        ("run_cases, bwrap, 20 cases", median_ms(lambda: sandbox.run_cases(PROGRAM, [TEST] * 20), args.repeat)),
    ]
    os.close(info_read), os.close(info_write)
    print(f"{'per run':<32} {'ms':>8}")
    for name, ms in rows:
        print(f"{name:<32} {ms:8.1f}")
    print(f"\n{'workers':<8} {'runs/s':>8}   ({args.rounds} runs of run_tests, bwrap, on {os.cpu_count()} CPUs)")
    for workers in (1, 2, 4, 8):
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda _: sandbox.run_tests(PROGRAM, TEST), range(args.rounds)))
        assert all(r.passed for r in results)
        print(f"{workers:<8} {args.rounds / (time.perf_counter() - started):8.1f}")


if __name__ == "__main__":
    main()
