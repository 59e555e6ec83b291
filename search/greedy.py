"""Greedy decoding: one temperature-0 solution to the end. The baseline every search is compared with."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from ttc.graph import Meter, Problem
from ttc.result import Result, Tree
from ttc.search.common import finish, score_or_zero, verifier_cost


def at_temperature_zero(proposer):
    """The proposer itself if it already decodes greedily (or has no sampling parameters, as a remote
    one may not), else a shallow copy sampling at temperature 0 (same engine, same seeds)."""
    params = getattr(proposer, "params", None)
    if params is None or params.temperature == 0:
        return proposer
    greedy = copy.copy(proposer)
    greedy.params = dataclasses.replace(params, temperature=0.0)
    return greedy


@dataclass
class GreedyDecoding:
    """The verifier, if any, only scores the one solution (its score is recorded, not used)."""

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        proposer = at_temperature_zero(proposer)
        tree = Tree()
        meter.verifier_cost = verifier_cost(verifier)
        root = proposer.start(problem, meter)
        tree.add(root, status="root")
        # The root is extended in place (no fork): its handle becomes the solution's.
        solution = proposer.complete([root], meter)[0]
        try:
            if solution is root:  # the budget could not pay for a single token
                return finish("greedy", problem, proposer, meter, tree, None, None)
            score = score_or_zero(verifier, [solution], meter)[0]
            tree.add(solution, score=score, status="final")
            answer = proposer.answer(solution)
            return finish("greedy", problem, proposer, meter, tree, solution, score,
                          [{"answer": answer, "score": score}])
        finally:
            proposer.release([solution])


STRATEGY = GreedyDecoding
