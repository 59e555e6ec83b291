"""Solving a list of problems, one at a time or several at once, and stopping cleanly.

    with sigterm_as_interrupt():
        solve_all(todo, make_solver, save, on_failure, engine=None, concurrency=1)

`make_solver()` returns a function `solve(problem, ledger) -> record` (one per worker thread, so
per-problem state is never shared); every attempt gets a fresh Ledger, which the solver charges.
`save(problem, record)` is called by the calling thread, in the order problems finish. An attempt
that raises is handed to `on_failure(problem, error, ledger)` with the work it did, then the
exception stops the run (the problem runs again on resume). Ctrl-C stops after saving what is done.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading
from typing import Callable

from ttc.budget import Ledger
from ttc.graph import Problem

__all__ = ["solve_all", "sigterm_as_interrupt", "Progress", "log_failure"]

log = logging.getLogger(__name__)

Solver = Callable[[Problem, Ledger], dict]


def solve_all(todo: list[Problem], make_solver: Callable[[], Solver], save, on_failure, engine=None,
              concurrency: int = 1) -> None:
    """Solve `todo`; with `engine` (a ConcurrentEngine) and concurrency > 1, in that many threads."""
    if engine is None or concurrency <= 1:
        _one_at_a_time(todo, make_solver(), save, on_failure)
    else:
        _concurrently(todo, make_solver, save, on_failure, engine, concurrency)


def _one_at_a_time(todo: list[Problem], solve: Solver, save, on_failure) -> None:
    for problem in todo:
        ledger = Ledger()
        try:
            record = solve(problem, ledger)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            on_failure(problem, e, ledger)
            raise
        save(problem, record)


def _concurrently(todo: list[Problem], make_solver, save, on_failure, engine, concurrency: int) -> None:
    """`concurrency` worker threads take problems in order; records are saved (by this thread) as they
    come. Ctrl-C or a failed problem cancels the engine: the problems in flight stop without a record
    (they run again on resume; their partial work is not logged) and the exception is raised here
    once the workers are gone."""
    from ttc.decoder.concurrent import Cancelled

    work: "queue.Queue[Problem]" = queue.Queue()
    for problem in todo:
        work.put(problem)
    outcomes: "queue.Queue[tuple]" = queue.Queue()  # (problem, record or None, error or None, ledger)

    def worker() -> None:
        solve = make_solver()
        while True:
            try:
                problem = work.get_nowait()
            except queue.Empty:
                return
            ledger = Ledger()
            try:
                outcomes.put((problem, solve(problem, ledger), None, ledger))
            except Cancelled:
                return
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                outcomes.put((problem, None, e, ledger))
                return

    threads = [threading.Thread(target=worker, name=f"ttc-eval-{i}", daemon=True)
               for i in range(min(concurrency, len(todo)))]
    for t in threads:
        t.start()
    failure: BaseException | None = None
    try:
        while any(t.is_alive() for t in threads) or not outcomes.empty():
            try:
                problem, record, error, ledger = outcomes.get(timeout=0.2)
            except queue.Empty:
                continue
            if error is not None:
                on_failure(problem, error, ledger)
                failure = failure or error
                engine.cancel(error)
                continue
            save(problem, record)
    except KeyboardInterrupt:
        engine.cancel()
        for t in threads:
            t.join()
        while not outcomes.empty():  # problems that finished while stopping are kept
            problem, record, error, _ = outcomes.get_nowait()
            if error is None:
                save(problem, record)
        raise
    if failure is not None:
        raise failure


@contextlib.contextmanager
def sigterm_as_interrupt():
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


def log_failure(problem: Problem, error: BaseException, saved: int, where, traceback_in=None) -> None:
    """One line; the traceback goes to `traceback_in` (failures.jsonl), not to the console."""
    log.error("problem %s failed (%s: %s)%s; %d records are saved in %s, and the run resumes after them",
              problem.id, type(error).__name__, error, f", traceback in {traceback_in}" if traceback_in else "",
              saved, where)


class Progress:
    """The tqdm bar (on stderr): problems finished of the dataset, the accuracy so far, the latest
    problem's computed tokens."""

    def __init__(self, total: int, done: list[dict], label: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self.finished, self.correct = len(done), sum(bool(r.get("correct")) for r in done)
        self.bar = tqdm(total=total, initial=self.finished, desc=label, unit="problem", disable=not enabled,
                        dynamic_ncols=True)

    def update(self, record: dict) -> None:
        self.finished += 1
        self.correct += bool(record["correct"])
        self.bar.update(1)
        self.bar.set_postfix(acc=f"{self.correct / self.finished:.3f}",
                             tokens=Ledger.from_record(record).total_tokens)

    def close(self) -> None:
        self.bar.close()
