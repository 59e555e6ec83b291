"""Grade a finished run's answers again, and say where the grades differ from the recorded ones.

    python -m ttc.evals.regrade runs/he/bo8 runs/he/greedy [--workers 4]

Why: a code grader runs programs in the sandbox with a CPU-time limit and a wall-clock backstop at 3x it, and
a run that solves many problems at once loads the machine while it grades; a grade the load flipped (a slowdown
past 3x, a timeout that would not happen on a quiet machine) should be found, not silently averaged in. This
rebuilds each run's dataset from its run.json (the same loader and grader), grades every record's answer and
graded candidates again on an otherwise quiet machine, and prints for each run: accuracy, coverage (pass@n) and
pass@k as recorded and as regraded, and every record whose grade changed. Nothing in the run folder is rewritten.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ttc.evals import metrics
from ttc.evals.build import build_dataset, eval_split
from ttc.evals.datasets import Dataset
from ttc.evals.results import RUN_INFO, OutputFolder

__all__ = ["regrade_run", "run_dataset", "main"]


def regrade_run(path: str | Path, workers: int = 2) -> dict:
    """{"recorded": metrics, "regraded": metrics, "changed": [(id, what, recorded, regraded), ...]}."""
    folder = OutputFolder(path)
    dataset = run_dataset(path)
    problems = {p.id: p for p in dataset.problems}
    records = list(folder.results.load(repair=False).values())

    def grade(record: dict) -> dict:
        problem = problems[record["id"]]
        new = dict(record, correct=dataset.grade(problem, record.get("answer")))
        new["candidates"] = [dict(c, correct=dataset.grade(problem, c["answer"])) if "answer" in c else dict(c)
                             for c in record.get("candidates") or []]
        return new

    with ThreadPoolExecutor(max_workers=workers) as pool:
        regraded = list(pool.map(grade, records))
    changed = []
    for old, new in zip(records, regraded):
        if bool(old.get("correct")) != new["correct"]:
            changed.append((old["id"], "answer", bool(old.get("correct")), new["correct"]))
        for i, (a, b) in enumerate(zip(old.get("candidates") or [], new["candidates"])):
            if "correct" in a and bool(a["correct"]) != b["correct"]:
                changed.append((old["id"], f"candidate {i}", bool(a["correct"]), b["correct"]))
    return {"recorded": _metrics(records), "regraded": _metrics(regraded), "changed": changed}


def run_dataset(path: str | Path) -> Dataset:
    """The dataset a run was made on, rebuilt from its run.json (the same loader, extraction and grader)."""
    info = json.loads((Path(path) / RUN_INFO).read_text())
    return build_dataset(eval_split(_node(info["config"], "dataset")))


def _node(flat: dict, name: str) -> dict:
    """run.json keeps the config flattened ("dataset.options.min_terms": 2): one node of it, nested again."""
    node: dict = {}
    for key, value in flat.items():
        if key.startswith(name + "."):
            *parents, leaf = key[len(name) + 1:].split(".")
            target = node
            for part in parents:
                target = target.setdefault(part, {})
            target[leaf] = value
    return node


def _metrics(records: list[dict]) -> dict:
    summary = metrics.summarize(records)
    return {k: summary.get(k) for k in ("problems", "correct", "accuracy", "coverage", "pass@k")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with run.json and results.jsonl)")
    parser.add_argument("--workers", type=int, default=2, help="programs graded at once")
    args = parser.parse_args(argv)
    for run in args.runs:
        out = regrade_run(run, args.workers)
        print(f"{run}: {len(out['changed'])} grades changed")
        for when in ("recorded", "regraded"):
            print(f"  {when:9s} {json.dumps(out[when])}")
        for problem_id, what, before, after in out["changed"]:
            print(f"  {problem_id} {what}: {before} -> {after}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
