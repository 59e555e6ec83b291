"""Greedy decoding: one temperature-0 solution to the end. The baseline every search is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from ttc.graph import Meter, Problem
from ttc.result import Result, Tree
from ttc.search.common import bind_verifier, finish, score_or_zero, verifier_cost


@dataclass
class GreedyDecoding:
    """The verifier, if any, only scores the one solution (its score is recorded, not used).

    n: the number of solutions, always 1 (the key exists so that a sweep over `strategy.n` names it
    for every strategy; anything else is refused)."""

    n: int = 1

    def __post_init__(self):
        if self.n != 1:
            raise ValueError(f"greedy decoding writes one solution: strategy.n must be 1, got {self.n}")

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        proposer = proposer.with_temperature(0.0)
        tree = Tree()
        verifier = bind_verifier(verifier, problem, proposer, meter)
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
