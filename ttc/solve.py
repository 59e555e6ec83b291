"""`ttc.solve(...)`: run one strategy on one problem, from a notebook or a script."""

from __future__ import annotations

import importlib
import time

from ttc.budget import Budget, Ledger
from ttc.graph import Meter, Problem
from ttc.result import Result


def as_problem(problem) -> Problem:
    if isinstance(problem, Problem):
        return problem
    if isinstance(problem, str):
        return Problem(id="problem", prompt=[{"role": "user", "content": problem}])
    if isinstance(problem, dict):
        return Problem(**problem)
    raise TypeError("a problem is a ttc.Problem, a question string, or a dict of Problem fields")


def strategy_by_name(name: str, **kwargs):
    """`"beam"` -> ttc.search.beam.STRATEGY(**kwargs): the file name is the registry (as in Hydra configs)."""
    try:
        module = importlib.import_module(f"ttc.search.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"no strategy named {name!r} in ttc.search") from e
    return module.STRATEGY(**kwargs)


def solve(problem, model=None, strategy="self_consistency", verifier=None, budget: Budget | int | None = None,
          proposer=None, seed: int = 0, ledger: Ledger | None = None, **proposer_kwargs) -> Result:
    """Spend `budget` on `problem` with `strategy` and return a Result (answer, ledger, tree).

    strategy: a strategy object (e.g. ttc.search.beam.Beam(width=4)) or a file name in search/.
    budget: a ttc.Budget, or an int meaning a token budget. proposer: defaults to the local decoder.
    """
    problem = as_problem(problem)
    if isinstance(strategy, str):
        strategy = strategy_by_name(strategy)
    if isinstance(budget, int):
        budget = Budget(tokens=budget)
    if proposer is None:
        if model is None:
            raise ValueError("solve needs a model (ttc.load(...)) or a proposer")
        from ttc.proposer import LocalProposer

        proposer = LocalProposer(model, seed=seed, **proposer_kwargs)
    meter = Meter(budget, ledger)
    started = time.perf_counter()
    try:
        return strategy(problem, proposer, verifier, meter)
    finally:
        meter.ledger.wall_s += time.perf_counter() - started
