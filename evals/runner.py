"""The resumable eval loop: one strategy over one dataset, one JSONL record per problem.

    run_eval(cfg, out_dir) -> RunOutcome

`cfg` is a plain dict with the config groups `model`, `strategy`, `verifier`, `dataset`, `budget`
(each a `_target_` node, see `ttc.evals.build`), `seed`, `progress` and `probe_training`.

Records are appended to `out_dir/results.jsonl` and flushed as each problem finishes. Started again
on the same folder, a run reads that file, drops a partially written last line (a run killed while
writing) with a warning, and only solves the problems it does not yet hold: no record is repeated or
lost. The folder remembers the config it was started with (`run.json`); resuming it with a different
one is refused, since the records would mix two experiments. Ctrl-C (or SIGTERM) stops after the
problem in flight is saved, and the summary of what is done is still written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ttc.budget import Budget, BudgetExceeded, Ledger
from ttc.decoder import PromptTooLong
from ttc.evals import metrics
from ttc.evals.build import ConfigError, build_dataset, eval_split, instantiate, load_model, locate, split_strategy
from ttc.evals.datasets import Dataset
from ttc.graph import Problem
from ttc.proposer import LocalProposer
from ttc.result import Result
from ttc.solve import solve

__all__ = ["run_eval", "RunOutcome", "ResultsFile", "ResumeError", "summary_table", "RESULTS", "SUMMARY"]

log = logging.getLogger(__name__)

RESULTS, SUMMARY, RUN_INFO = "results.jsonl", "summary.json", "run.json"
# Keys that may change between a run and its resumption: how many problems, how to treat bad rows,
# the progress bar, CPU threads and the KV pool's size. Everything else must match.
RESUMABLE_CHANGES = ("dataset.limit", "dataset.on_error", "progress", "model.threads", "model.kv_cache_gb",
                     "concurrency")


class ResumeError(RuntimeError):
    """An output folder cannot be resumed: a corrupt record, or a different experiment's records."""


# --- the results file ---------------------------------------------------------------------------

class ResultsFile:
    """results.jsonl: append-only, one JSON object per line, flushed and synced per record."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, dict]:
        """Finished records by id. A last record cut short (a run killed while writing it) is dropped
        and cut from the file, with a warning; a bad line anywhere else means the file was edited or
        corrupted, and is an error."""
        if not self.path.is_file():
            return {}
        data = self.path.read_bytes()
        pieces = data.split(b"\n")
        lines, tail = pieces[:-1], pieces[-1]  # tail: what follows the last newline (empty if complete)
        last_line = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        records: dict[str, dict] = {}
        offset = 0  # byte offset of the current line
        for i, line in enumerate(lines):
            lineno = i + 1
            if line.strip():
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict) or "id" not in record:
                        raise ValueError("not an object with an id")
                except ValueError as e:
                    if i == last_line and not tail.strip():
                        self._drop(offset, lineno, f"not valid JSON: {e}")
                        return records
                    raise ResumeError(f"{self.path}:{lineno}: not a complete JSON record ({e}); the file was "
                                      "edited or corrupted: fix or remove that line to resume") from None
                if str(record["id"]) in records:
                    raise ResumeError(f"{self.path}:{lineno}: a second record for problem {record['id']!r}")
                records[str(record["id"])] = record
            offset += len(line) + 1
        if tail.strip():
            self._drop(offset, len(lines) + 1, "no newline at its end")
        return records

    def _drop(self, offset: int, lineno: int, why: str) -> None:
        log.warning("%s:%d: dropping a partially written last record (%s); that problem will run again",
                    self.path, lineno, why)
        with self.path.open("r+b") as f:
            f.truncate(offset)

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False, default=_json_default) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _json_default(value):
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    return str(value)


# --- one problem --------------------------------------------------------------------------------

def solve_one(problem: Problem, dataset: Dataset, model, strategy, proposer_kwargs: dict, verifier,
              budget_cfg: dict, seed: int, allocator=None, pool=None) -> dict:
    """Solve one problem and return its record (graded, with graded candidates).

    With an allocator (ttc.allocation), the problem's budget comes from the dataset-wide `pool`
    and the record also holds `allocation` (its name) and `given_tokens` (the cap it was given)."""
    proposer = LocalProposer(model, seed=seed, answer_fn=dataset.extract, **proposer_kwargs)
    if allocator is not None:
        ledger = Ledger()
        try:
            result, given = allocator.solve(problem, proposer, verifier, strategy, pool, ledger=ledger)
            record = _record(problem, result, dataset=dataset)
        except (BudgetExceeded, PromptTooLong) as e:
            log.warning("problem %s: %s", problem.id, e)
            given = allocator.last_given
            record = _record(problem, None, ledger=ledger, error=f"{type(e).__name__}: {e}")
        record.update(allocation=allocator.name, given_tokens=given)
        return record
    budget = instantiate(budget_cfg, "budget") if budget_cfg.get("_target_") else Budget(**budget_cfg)
    ledger = Ledger()
    try:
        result = solve(problem, strategy=strategy, verifier=verifier, budget=budget, proposer=proposer, ledger=ledger)
    except (BudgetExceeded, PromptTooLong) as e:  # this problem cannot be attempted within the limits
        log.warning("problem %s: %s", problem.id, e)
        return _record(problem, None, ledger=ledger, error=f"{type(e).__name__}: {e}")
    return _record(problem, result, dataset=dataset)


def _record(problem: Problem, result: Result | None, dataset: Dataset | None = None, ledger: Ledger | None = None,
            error: str | None = None) -> dict:
    """A results.jsonl record: the problem, the answer and its grade, the graded candidates, the ledger."""
    record = {"id": problem.id, "prompt": problem.prompt, "reference": problem.answer}
    if result is None:
        record.update({"answer": None, "correct": False, "strategy": None, "score": None, "text": "",
                       "samples": 0, "candidates": [], "error": error})
    else:
        candidates = []
        for c in result.candidates:
            c = dict(c)
            if "answer" in c:
                c["correct"] = dataset.grade(problem, c["answer"])
            candidates.append(c)
        record.update({"answer": result.answer, "correct": dataset.grade(problem, result.answer),
                       "strategy": result.strategy, "score": result.score, "text": result.text,
                       "samples": _finished_samples(result), "candidates": candidates})
        ledger = result.ledger
    if problem.metadata:
        record["metadata"] = problem.metadata
    record.update((ledger or Ledger()).as_dict())  # the work done, even by a problem that failed
    return record


def _finished_samples(result: Result) -> int:
    """How many complete solutions the strategy produced (answered or not): its final tree nodes."""
    return sum(1 for node in result.tree.get("nodes", []) if node.get("status") in ("final", "chosen")
               and node.get("parent") is not None)


# --- the run ------------------------------------------------------------------------------------

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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {**_names_from_targets(cfg), **{k: v for k, v in (names or {}).items() if v is not None}}
    results = ResultsFile(out_dir / RESULTS)
    done = results.load()
    _check_resumable(cfg, out_dir / RUN_INFO, has_records=bool(done))

    dataset = build_dataset(eval_split(cfg["dataset"]))
    todo = [p for p in dataset.problems if p.id not in done]
    log.info("%s: %d problems, %d already done, %d to run", dataset.name, len(dataset), len(dataset) - len(todo),
             len(todo))
    new: dict[str, dict] = {}
    interrupted = False
    if todo:
        interrupted = _solve_all(cfg, dataset, todo, done, new, results, names)
    records = [done.get(p.id) or new[p.id] for p in dataset.problems if p.id in done or p.id in new]

    summary = {"label": _label(names), "strategy": names.get("strategy"), "verifier": names.get("verifier"),
               "experiment": names.get("experiment"), "dataset": dataset.name,
               "model": str(cfg["model"].get("spec", names.get("model"))), "strategy_config": cfg["strategy"],
               "budget_tokens": cfg["budget"].get("tokens"), "seed": cfg.get("seed", 0),
               "complete": len(records) == len(dataset), "interrupted": interrupted,
               "skipped_rows": len(dataset.skipped), **metrics.summarize(records),
               "run_wall_s": time.perf_counter() - started, "out_dir": str(out_dir)}
    if "n" in cfg["strategy"]:
        summary["n"] = cfg["strategy"]["n"]
    if (cfg.get("allocation") or {}).get("_target_") is not None:
        summary["allocation"] = names.get("allocation") or getattr(locate(cfg["allocation"]["_target_"]), "name", None)
        summary["given_tokens"] = sum(int(r.get("given_tokens") or 0) for r in records)
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    if dataset.skipped:
        (out_dir / "skipped_rows.txt").write_text("\n".join(dataset.skipped) + "\n")
    return RunOutcome(summary, interrupted, out_dir)


def _solve_all(cfg: dict, dataset: Dataset, todo: list[Problem], done: dict, new: dict, results: ResultsFile,
               names: dict) -> bool:
    """Solve `todo`, appending each record as it finishes; True if stopped by Ctrl-C / SIGTERM.

    `concurrency` (default 1) problems are solved at once, each in its own thread, their generation
    batched together by a ConcurrentEngine (ttc.decoder.concurrent): same records, several times the
    throughput on one machine. Records are appended in the order problems finish."""
    from tqdm.auto import tqdm

    bar = None
    concurrency = max(1, int(cfg.get("concurrency") or 1))
    shared = None
    try:
        with _sigterm_as_interrupt():
            model = load_model(cfg["model"])
            if concurrency > 1:
                from ttc.decoder.concurrent import ConcurrentEngine, SharedModel

                shared = ConcurrentEngine(model.engine)
                model = SharedModel(model, shared)
            spec = split_strategy(cfg["strategy"])
            strategy = instantiate(spec.config, "strategy", model=model)
            verifier = build_verifier(cfg, model, names)  # may train a probe first
            if shared is not None:
                _share_verifier_engine(verifier, shared)
            allocator, pool = build_allocation(cfg, model, dataset, done, spec, verifier)
            seed = int(cfg.get("seed", 0))
            # Every run starts with a cold prefix cache, so that its compute does not depend on which
            # jobs of a sweep (or which probe training) ran before it in this process.
            clear = getattr(getattr(model, "engine", None), "clear_prefix_cache", None)
            if clear is not None:
                clear()
            ids = {p.id for p in dataset.problems}
            finished = sum(1 for r in done.values() if r["id"] in ids)
            correct = sum(bool(r.get("correct")) for r in done.values() if r["id"] in ids)
            bar = tqdm(total=len(dataset), initial=finished, desc=_label(names), unit="problem",
                       disable=not cfg.get("progress", True), dynamic_ncols=True)

            def solve(problem: Problem, allocator) -> dict:
                extra = {"allocator": allocator, "pool": pool} if allocator is not None else {}
                return solve_one(problem, dataset, model, strategy, spec.proposer, verifier, cfg["budget"], seed,
                                 **extra)

            def save(problem: Problem, record: dict) -> None:
                nonlocal finished, correct
                results.append(record)
                new[problem.id] = record
                finished += 1
                correct += bool(record["correct"])
                bar.update(1)
                bar.set_postfix(acc=f"{correct / finished:.3f}", tokens=record["prefill_tokens"]
                                + record["generated_tokens"] + record["verifier_tokens"])

            if shared is None:
                for problem in todo:
                    try:
                        record = solve(problem, allocator)
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:
                        _log_failure(problem, e, len(done) + len(new), results)
                        raise
                    save(problem, record)
            else:
                _solve_concurrently(todo, solve, save, shared, allocator, concurrency,
                                    lambda problem, e: _log_failure(problem, e, len(done) + len(new), results))
    except KeyboardInterrupt:
        log.warning("interrupted: %d of %d problems are saved in %s; run the same command with "
                    "hydra.run.dir=%s to resume", len(done) + len(new), len(dataset), results.path,
                    results.path.parent)
        return True
    finally:
        if bar is not None:
            bar.close()
    return False


def _log_failure(problem: Problem, error: BaseException, saved: int, results: ResultsFile) -> None:
    log.error("problem %s failed (%s: %s); %d records are saved in %s, and the run resumes after them",
              problem.id, type(error).__name__, error, saved, results.path)


def _share_verifier_engine(verifier, shared) -> None:
    """A verifier with an engine of its own (a PRM) gets it wrapped too: engines are not thread-safe."""
    from ttc.decoder.concurrent import ConcurrentEngine

    engine = getattr(verifier, "engine", None)
    if engine is not None and engine is not shared and not isinstance(engine, ConcurrentEngine):
        verifier.engine = ConcurrentEngine(engine)


def _solve_concurrently(todo: list[Problem], solve, save, shared, allocator, concurrency: int, on_failure) -> None:
    """`concurrency` worker threads take problems in order; records are saved (by the main thread) as
    they come. Ctrl-C or a failed problem cancels the engine: the problems in flight stop without a
    record (they run again on resume) and the exception is raised here once the workers are gone."""
    import copy
    import queue

    from ttc.decoder.concurrent import Cancelled

    work: "queue.Queue[Problem]" = queue.Queue()
    for problem in todo:
        work.put(problem)
    outcomes: "queue.Queue[tuple]" = queue.Queue()

    def worker() -> None:
        own = copy.copy(allocator) if allocator is not None else None  # allocators keep per-problem state
        while True:
            try:
                problem = work.get_nowait()
            except queue.Empty:
                return
            try:
                outcomes.put((problem, solve(problem, own), None))
            except Cancelled:
                return
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                outcomes.put((problem, None, e))
                return

    threads = [threading.Thread(target=worker, name=f"ttc-eval-{i}", daemon=True)
               for i in range(min(concurrency, len(todo)))]
    for t in threads:
        t.start()
    failure: BaseException | None = None
    try:
        while any(t.is_alive() for t in threads) or not outcomes.empty():
            try:
                problem, record, error = outcomes.get(timeout=0.2)
            except queue.Empty:
                continue
            if error is not None:
                on_failure(problem, error)
                failure = failure or error
                shared.cancel(error)
                continue
            save(problem, record)
    except KeyboardInterrupt:
        shared.cancel()
        for t in threads:
            t.join()
        while not outcomes.empty():  # problems that finished while stopping are kept
            problem, record, error = outcomes.get_nowait()
            if error is None:
                save(problem, record)
        raise
    if failure is not None:
        raise failure


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the run like Ctrl-C (after saving); only from the main thread, where handlers live."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- verifiers, with probe training on demand -------------------------------------------------

def build_verifier(cfg: dict, model, names: dict):
    """The verifier (None without a `_target_`), built with the policy model injected.

    A verifier class with a `fit` classmethod (the learned probe) whose `path` is unset or names no
    file is trained first on the dataset's training split, and cached: see `ttc.evals.probe_training`.
    """
    node = dict(cfg.get("verifier") or {})
    if node.get("_target_") is None:
        return None
    cls = locate(node["_target_"])
    if hasattr(cls, "fit") and "path" in node:
        path = node["path"]
        if path in (None, "???") or not Path(str(path)).expanduser().is_file():
            from ttc.evals.probe_training import ensure_probe

            node["path"] = str(ensure_probe(cfg, model, names, path=None if path in (None, "???") else path))
    return instantiate(node, "verifier", model=model)


def build_allocation(cfg: dict, model, dataset: Dataset, done: dict, spec, verifier):
    """(allocator, pool) for `allocation=<name>`, or (None, None) for `allocation=none`.

    The pool holds `allocation.total_tokens` (default: budget.tokens x problems) and is rebuilt from
    the finished records, so a resumed run goes on with what is left. A Difficulty allocator with
    `train` and no table fits its table first on the dataset's training split (never evaluated).
    """
    node = dict(cfg.get("allocation") or {})
    total = node.pop("total_tokens", None)
    if node.get("_target_") is None:
        return None, None
    allocator = instantiate(node, "allocation", model=model)
    if total is None:
        per_problem = (cfg.get("budget") or {}).get("tokens")
        if per_problem is None:
            raise ConfigError("an allocation needs a token total: set allocation.total_tokens or budget.tokens")
        total = int(per_problem) * len(dataset)
    from ttc.allocation import Pool

    ids = {p.id for p in dataset.problems}
    pool = Pool.from_records(int(total), len(dataset), (r for r in done.values() if r["id"] in ids))
    pool.concurrency = max(1, int(cfg.get("concurrency") or 1))
    train = getattr(allocator, "train", None)
    if train and not (cfg["allocation"].get("table")):
        from ttc.allocation import fit_table
        from ttc.evals.build import train_split

        train = dict(train)
        problems = build_dataset(train_split(cfg["dataset"]))
        proposer_factory = lambda: LocalProposer(model, seed=int(cfg.get("seed", 0)), answer_fn=problems.extract,  # noqa: E731
                                                 **spec.proposer)
        training = problems.problems[: int(train.get("problems", 16))]
        allocator.table = fit_table(training, proposer_factory,
                                    problems.grade, verifier=verifier,
                                    tokens_per_problem=int(train.get("tokens_per_problem") or pool.total // pool.problems),
                                    first_pass=allocator.first_pass, round_size=allocator.round_size,
                                    max_samples=allocator.max_samples, options=train.get("options"),
                                    objective=_objective(train.get("objective", "accuracy_per_token")),
                                    concurrency=pool.concurrency)
        log.info("difficulty table fitted on %d training problems: %s", len(training), allocator.table)
    return allocator, pool


def _objective(name: str):
    from ttc.allocation import OBJECTIVES

    if name not in OBJECTIVES:
        raise ConfigError(f"allocation.train.objective: {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


# --- resumption safety ------------------------------------------------------------------------

def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _check_resumable(cfg: dict, info_path: Path, has_records: bool) -> None:
    """Refuse to add records made with another config to a folder's records; remember this config."""
    if (cfg.get("allocation") or {}).get("_target_") is None:  # allocation=none: folders from before it existed
        cfg = {k: v for k, v in cfg.items() if k != "allocation"}
    fixed = {k: v for k, v in _flatten(cfg).items() if k not in RESUMABLE_CHANGES}
    fingerprint = hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()
    if info_path.is_file() and has_records:  # without records, a run that failed to start left it: replace it
        stored = json.loads(info_path.read_text())
        if stored.get("fingerprint") != fingerprint:
            before = stored.get("config", {})
            changed = sorted(k for k in set(before) | set(fixed) if before.get(k, "<unset>") != fixed.get(k, "<unset>"))
            detail = ", ".join(f"{k}: {before.get(k, '<unset>')!r} -> {fixed.get(k, '<unset>')!r}" for k in changed[:6])
            raise ResumeError(f"{info_path.parent} holds results of a different config ({detail}); choose another "
                              "output folder (hydra.run.dir=...) or delete this one")
        return
    info_path.write_text(json.dumps({"fingerprint": fingerprint, "config": fixed}, indent=2, default=str) + "\n")


# --- naming and the table -----------------------------------------------------------------------

def _names_from_targets(cfg: dict) -> dict:
    """Names like the CLI's group choices: a target's module (search/<name>.py, verifiers/<name>.py),
    a dataset loader's name without `load_`."""
    names = {}
    for group in ("strategy", "verifier", "dataset"):
        target = (cfg.get(group) or {}).get("_target_")
        parts = target.split(".") if target else []
        if group == "dataset":
            names[group] = parts[-1].removeprefix("load_") if parts else None
        else:
            names[group] = parts[-2] if len(parts) >= 2 else None
    return names


def _label(names: dict) -> str:
    """strategy(+verifier); with an allocator, its name instead of the strategy's (adaptive_stop and
    difficulty run their own sampling; uniform runs the strategy: "uniform/self_consistency")."""
    verifier, allocation = names.get("verifier"), names.get("allocation")
    base = str(names.get("strategy"))
    if allocation not in (None, "none"):
        base = f"uniform/{base}" if allocation == "uniform" else str(allocation)
    return f"{base}+{verifier}" if verifier not in (None, "none") else base


def summary_table(summary: dict) -> str:
    """The summary as an aligned two-column table (for people; the JSON line is for programs)."""
    rows = [("run", summary.get("label")), ("dataset", summary.get("dataset")), ("model", summary.get("model")),
            ("problems", f"{summary['problems']}" + ("" if summary.get("complete") else " (incomplete)")),
            ("accuracy", f"{summary['accuracy']:.4f} ({summary['correct']}/{summary['problems']})"),
            ("mean computed tokens", f"{summary['mean_tokens']:.1f}"),
            ("mean reused tokens", f"{summary['mean_reused_tokens']:.1f}"),
            ("mean FLOPs", f"{summary['mean_flops']:.3e}"),
            ("wall time", f"{summary['run_wall_s']:.1f} s (solving {summary['wall_s']:.1f} s)")]
    if "coverage" in summary:
        rows.append(("coverage", f"{summary['coverage']:.4f}"))
    for metric in ("pass@k", "maj@k"):
        for k, value in summary.get(metric, {}).items():
            rows.append((metric.replace("k", k), f"{value:.4f}"))
    if summary.get("errors"):
        rows.append(("problems failed", str(summary["errors"])))
    if summary.get("skipped_rows"):
        rows.append(("malformed rows skipped", str(summary["skipped_rows"])))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
