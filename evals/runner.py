"""The resumable eval: one strategy over one dataset, one JSONL record per problem.

    run_eval(cfg, out_dir) -> RunOutcome

`cfg` is a plain dict with the config groups `model`, `proposer`, `strategy`, `verifier`, `dataset`,
`budget`, `allocation` (each a `_target_` node, built by `ttc.evals.build`), `seed`, `progress`,
`concurrency` and `probe_training`.

The output folder (`ttc.evals.results`) is what makes a run resumable: records are appended as each
problem finishes, and the same command on the same folder only solves what is missing. Ctrl-C (or
SIGTERM) stops after the problem in flight is saved, and the summary of what is done is still
written. A problem that raises (anything but ttc.budget.CannotAttempt, which is recorded as a failed
problem) stops the run; its partial work goes to failures.jsonl and counts in the summary.

`dataset.shard.index=i dataset.shard.count=k` solves one shard of the dataset (`ttc.evals.shard`, chosen
after the dataset is built), in its own folder; `python -m ttc.evals.merge` joins the shards' folders.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ttc.budget import CannotAttempt, Ledger
from ttc.evals import metrics
from ttc.evals.build import (Run, build_dataset, build_run, dataset_start, eval_split, from_start, locate, run_label,
                             run_names)
from ttc.evals.datasets import Dataset
from ttc.evals.driver import Progress, log_failure, sigterm_as_interrupt, solve_all
from ttc.evals.results import OutputFolder, ResumeError
from ttc.evals.shard import Shard, shard_settings
from ttc.graph import Problem, backend_of
from ttc.result import Result
from ttc.search.solve import solve

__all__ = ["run_eval", "RunOutcome", "ResumeError", "solve_one", "summary_table", "describe_run", "build_summary"]

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    summary: dict
    interrupted: bool
    out_dir: Path


def run_eval(cfg: dict, out_dir: str | os.PathLike, names: dict | None = None) -> RunOutcome:
    """Run (or resume) the eval described by `cfg` in `out_dir`; write records and summary.json.

    names: the config-group choices ({"strategy": "best_of_n", ...}) for labels; derived from the
    `_target_`s when not given.
    """
    started = time.perf_counter()
    shard_index, shard_count = shard_settings(cfg["dataset"])  # refused before the folder is touched
    start = dataset_start(cfg["dataset"])
    folder = OutputFolder(out_dir)
    names = run_names(cfg, names)
    done = folder.results.load()
    folder.check_resumable(cfg, has_records=bool(done))
    whole = from_start(build_dataset(eval_split(cfg["dataset"])), start)  # the shards split what is left
    shard = Shard(shard_index, shard_count, len(whole))
    dataset = shard.select(whole)  # everything: shard 0 of 1
    folder.note_run(shard=shard.info(whole), description=describe_run(cfg, names, dataset.name))
    todo = [p for p in dataset.problems if p.id not in done]
    log.info("%s: %d problems, %d already done, %d to run", dataset.name, len(dataset), len(dataset) - len(todo),
             len(todo))
    new: dict[str, dict] = {}
    interrupted = bool(todo) and _solve(cfg, dataset, todo, done, new, folder, names, shard)
    records = [done.get(p.id) or new[p.id] for p in dataset.problems if p.id in done or p.id in new]
    summary = _summary(cfg, names, dataset, records, interrupted, folder)
    if shard.count > 1:  # which problems are this shard's, for people (the merge reads run.json)
        summary["shard"] = {k: v for k, v in shard.info(whole).items() if k != "dataset_ids"}
    summary["run_wall_s"] = time.perf_counter() - started
    folder.write_summary(summary, dataset.skipped)
    return RunOutcome(summary, interrupted, folder.path)


def _solve(cfg: dict, dataset: Dataset, todo: list[Problem], done: dict, new: dict, folder: OutputFolder,
           names: dict, shard: Shard | None = None) -> bool:
    """Build the run, then solve `todo`, saving each record as it finishes (into `new` too); True if
    stopped by Ctrl-C / SIGTERM."""
    ids = {p.id for p in dataset.problems}
    progress = None
    try:
        with sigterm_as_interrupt():
            run = build_run(cfg, dataset, done, names, shard)  # may train a probe or fit a table first
            folder.write_training(run.training)
            progress = Progress(len(dataset), [r for r in done.values() if r["id"] in ids], run_label(names),
                                enabled=cfg.get("progress", True))

            def save(problem: Problem, record: dict) -> None:
                folder.results.append(record)
                new[problem.id] = record
                progress.update(record)

            def failed(problem: Problem, error: BaseException, ledger: Ledger) -> None:
                folder.failures.append(problem.id, error, ledger)
                log_failure(problem, error, len(done) + len(new), folder.results.path, folder.failures.path)

            solve_all(todo, lambda: _solver(run, dataset), save, failed, run.engine, run.concurrency)
    except KeyboardInterrupt:
        log.warning("interrupted: %d of %d problems are saved in %s; run the same command with "
                    "hydra.run.dir=%s to resume", len(done) + len(new), len(dataset), folder.results.path,
                    folder.path)
        return True
    finally:
        if progress is not None:
            progress.close()
    return False


def _solver(run: Run, dataset: Dataset):
    """One worker's solve(problem, ledger), with its own copy of the allocator (it keeps per-problem state).
    `solve_one` is looked up at each call, so a test can replace it."""
    own = replace(run, allocator=copy.copy(run.allocator)) if run.allocator is not None else run
    return lambda problem, ledger: solve_one(problem, dataset, own, ledger)


# --- one problem --------------------------------------------------------------------------------

def solve_one(problem: Problem, dataset: Dataset, run: Run, ledger: Ledger | None = None) -> dict:
    """Solve one problem and return its record (graded, with graded candidates), charging `ledger`.

    With an allocator (ttc.search.allocation), the problem's budget comes from the dataset-wide pool
    and the record also holds `allocation` (its name) and `given_tokens` (the cap it was given).
    A problem that cannot be attempted within its limits (CannotAttempt) is a record with an error."""
    ledger = Ledger() if ledger is None else ledger
    begin = getattr(backend_of(run.model), "begin_record", None)  # a remote backend: this record's own notes
    if begin is not None:
        begin()
    proposer, given = run.make_proposer(), None
    try:
        if run.allocator is None:
            result = solve(problem, run.strategy, verifier=run.verifier, budget=run.make_budget(), proposer=proposer,
                           ledger=ledger)
        else:
            result, given = run.allocator.solve(problem, proposer, run.verifier, run.strategy, run.pool, ledger=ledger)
        record = _record(problem, result, dataset)
        if run.record_trees:
            record["tree"] = graded_tree(result.tree, problem, dataset)
    except CannotAttempt as e:
        log.warning("problem %s: %s", problem.id, e)
        record = _record(problem, None, dataset, ledger=ledger, error=f"{type(e).__name__}: {e}")
        given = getattr(run.allocator, "last_given", None)
    if run.allocator is not None:
        record.update(allocation=run.allocator.name, given_tokens=given)
    notes = getattr(backend_of(run.model), "record_notes", None)  # a remote backend: where the ledger came from
    if notes is not None:
        record.update(notes())
    return record


def _record(problem: Problem, result: Result | None, dataset: Dataset, ledger: Ledger | None = None,
            error: str | None = None) -> dict:
    """A results.jsonl record: the problem, the answer and its grade, the graded candidates, the ledger."""
    record = {"id": problem.id, "prompt": problem.prompt, "reference": problem.answer}
    if result is None:
        record.update({"answer": None, "correct": False, "strategy": None, "score": None, "text": "",
                       "samples": 0, "candidates": [], "error": error})
    else:
        candidates = [{**c, "correct": dataset.grade(problem, c["answer"])} if "answer" in c else dict(c)
                      for c in result.candidates]
        record.update({"answer": result.answer, "correct": dataset.grade(problem, result.answer),
                       "strategy": result.strategy, "score": result.score, "text": result.text,
                       "samples": _finished_samples(result), "candidates": candidates})
        if result.details:
            record["details"] = result.details
        ledger = result.ledger
    if problem.metadata:
        record["metadata"] = problem.metadata
    record.update((ledger or Ledger()).as_dict())  # the work done, even by a problem that failed
    return record


def graded_tree(tree: dict, problem: Problem, dataset: Dataset) -> dict:
    """The search tree with every node that holds a whole solution given its `answer` and grade (`correct`), for
    ttc.evals.tree_report: which strategy found a right answer somewhere in its tree, and which picked it."""
    nodes = []
    for node in tree.get("nodes", []):
        if "solution" in node:
            answer = dataset.extract(node["solution"])
            node = {**node, "answer": answer, "correct": dataset.grade(problem, answer)}
        nodes.append(node)
    return {**tree, "nodes": nodes}


def _finished_samples(result: Result) -> int:
    """How many complete solutions the strategy produced (answered or not): its final tree nodes."""
    return sum(1 for node in result.tree.get("nodes", []) if node.get("status") in ("final", "chosen")
               and node.get("parent") is not None)


# --- the summary --------------------------------------------------------------------------------

def _summary(cfg: dict, names: dict, dataset: Dataset, records: list[dict], interrupted: bool,
             folder: OutputFolder) -> dict:
    """summary.json: what ran, the metrics of its records, and the work no record holds (training, failures)."""
    return build_summary(describe_run(cfg, names, dataset.name), records, len(dataset), folder, interrupted,
                         len(dataset.skipped))


def describe_run(cfg: dict, names: dict, dataset_name: str) -> dict:
    """What ran: the summary's fields that no record changes (run.json keeps them too, for ttc.evals.merge)."""
    description = {"label": run_label(names), "strategy": names.get("strategy"), "verifier": names.get("verifier"),
                   "experiment": names.get("experiment"), "dataset": dataset_name,
                   "model": str(cfg["model"].get("spec", names.get("model"))), "strategy_config": cfg["strategy"],
                   "proposer_config": cfg.get("proposer"), "budget_tokens": cfg["budget"].get("tokens"),
                   "seed": cfg.get("seed", 0)}
    if "n" in cfg["strategy"]:
        description["n"] = cfg["strategy"]["n"]
    if (cfg.get("allocation") or {}).get("_target_") is not None:
        description["allocation"] = (names.get("allocation")
                                     or getattr(locate(cfg["allocation"]["_target_"]), "name", None))
    return description


def build_summary(description: dict, records: list[dict], problems: int, folder: OutputFolder,
                  interrupted: bool = False, skipped_rows: int = 0) -> dict:
    """summary.json from `describe_run`'s description, the records of `problems` problems, and the work no
    record holds, read from `folder` (training.json, failures.jsonl). The runner's, and ttc.evals.merge's."""
    training = folder.training()
    summary = {**description, "complete": len(records) == problems, "interrupted": interrupted,
               "skipped_rows": skipped_rows, **metrics.summarize(records),
               "training": {**{k: v.as_dict() for k, v in training.items()},
                            "total_tokens": Ledger.sum(training.values()).total_tokens},
               "failed_attempts": folder.failures.summary(), "out_dir": str(folder.path)}
    if "allocation" in description:
        summary["given_tokens"] = sum(int(r.get("given_tokens") or 0) for r in records)
    return summary


def summary_table(summary: dict) -> str:
    """The summary as an aligned two-column table (for people; the JSON line is for programs)."""
    rows = [("run", summary.get("label")), ("dataset", summary.get("dataset")), ("model", summary.get("model")),
            ("problems", f"{summary['problems']}" + ("" if summary.get("complete") else " (incomplete)")),
            ("accuracy", f"{summary['accuracy']:.4f} ({summary['correct']}/{summary['problems']})"),
            ("mean computed tokens", f"{summary['mean_tokens']:.1f}"),
            ("mean reused tokens", f"{summary['mean_reused_tokens']:.1f}"),
            ("mean FLOPs", f"{summary['mean_flops']:.3e}"),
            ("wall time", f"{summary['run_wall_s']:.1f} s (solving {summary['wall_s']:.1f} s)")]
    training, failed = summary.get("training") or {}, summary.get("failed_attempts") or {}
    if training.get("total_tokens"):
        parts = ", ".join(f"{k.replace('_', ' ')} {Ledger.from_record(v).total_tokens}" for k, v in training.items()
                          if isinstance(v, dict))
        rows.append(("training tokens", f"{training['total_tokens']} ({parts})"))
    if failed.get("count"):
        rows.append(("failed attempts", f"{failed['count']} ({failed['total_tokens']} tokens, redone)"))
    if "coverage" in summary:
        rows.append(("coverage", f"{summary['coverage']:.4f}"))
    for metric in ("pass@k", "maj@k"):
        for k, value in summary.get(metric, {}).items():
            rows.append((metric.replace("k", k), f"{value:.4f}"))
    if summary.get("errors"):
        rows.append(("problems failed", str(summary["errors"])))
    if summary.get("skipped_rows"):
        rows.append(("malformed rows skipped", str(summary["skipped_rows"])))
    if summary.get("shard"):
        shard = summary["shard"]
        rows.append(("shard", f"{shard['index']} of {shard['count']} ({len(shard['problems'])} of "
                              f"{shard['dataset_size']} problems)"))
    if summary.get("shards"):
        rows.append(("merged shards", str(len(summary["shards"]["merged"]))))
    if summary.get("missing"):
        rows.append(("missing problems", str(len(summary["missing"]))))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
