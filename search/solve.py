"""`ttc.solve(...)`: run one strategy object on one problem, from a notebook or a script.

It takes objects only (a strategy, a verifier, a proposer or a model): names are resolved at the
config edge (`ttc.evals.build`), never here. It lives in the search layer because it is where the
default answer extractor (ttc.verifiers.math) may be injected into a local proposer.
"""

from __future__ import annotations

import time

from ttc.backends.local import LocalProposer
from ttc.budget import Budget, Ledger
from ttc.graph import AnswerFn, Meter, as_problem
from ttc.result import Result
from ttc.verifiers.math import extract_answer

__all__ = ["solve"]


def solve(problem, strategy, model=None, verifier=None, budget: Budget | int | None = None, proposer=None,
          seed: int = 0, ledger: Ledger | None = None, answer_fn: AnswerFn = extract_answer,
          **proposer_kwargs) -> Result:
    """Spend `budget` on `problem` with `strategy` and return a Result (answer, ledger, tree).

    strategy: a strategy object, e.g. ttc.search.beam.Beam(n=4). budget: a ttc.Budget, or an int
    meaning a token budget. proposer: defaults to a LocalProposer on `model` with `answer_fn` (math
    answers by default) and `proposer_kwargs` (temperature, max_tokens, ...).
    """
    if isinstance(strategy, str) or not callable(strategy):
        raise TypeError(f"solve takes a strategy object (e.g. ttc.search.beam.Beam(n=4)), not {strategy!r}")
    problem = as_problem(problem)
    if isinstance(budget, int):
        budget = Budget(tokens=budget)
    if proposer is None:
        if model is None:
            raise ValueError("solve needs a model (ttc.load(...)) or a proposer")
        proposer = LocalProposer(model, seed=seed, answer_fn=answer_fn, **proposer_kwargs)
    meter = Meter(budget, ledger)
    started = time.perf_counter()
    try:
        result = strategy(problem, proposer, verifier, meter)
    finally:
        meter.ledger.charge_wall(time.perf_counter() - started)
    if not isinstance(result, Result):  # a hand-written strategy returning its answer: say how to build one
        raise TypeError(f"strategy {getattr(strategy, '__name__', type(strategy).__name__)} returned "
                        f"{type(result).__name__}, not a ttc.Result: end it with ttc.search.common.finish(...)")
    return result
