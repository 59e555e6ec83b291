"""Best-of-N: sample N whole solutions, rank them with a verifier (outcome or process).

Plain: the highest-scored sample wins. Weighted: scores are summed over samples whose answers are
mathematically equivalent, and the best sample of the heaviest group wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from ttc.graph import Meter, Problem
from ttc.result import Result, Tree
from ttc.search.common import finish, score_or_zero, verifier_cost
from ttc.verifiers.vote import vote


@dataclass
class BestOfN:
    n: int = 8
    weighted: bool = False

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        tree = Tree()
        meter.verifier_cost = verifier_cost(verifier)
        root = proposer.start(problem, meter)
        tree.add(root, status="root")
        samples = proposer.propose([root], self.n, meter, to_end=True)
        proposer.release([root])
        try:
            scores = score_or_zero(verifier, samples, meter)
            answers = [proposer.answer(b) for b in samples]
            for b, s in zip(samples, scores):
                tree.add(b, score=s, status="final")
            if not samples:
                return finish("best_of_n", problem, proposer, meter, tree, None, None)
            if self.weighted:
                v = vote(answers, weights=scores)
                members = [i for i, g in enumerate(v.groups) if v.winner is not None and g == v.groups[v.winner]]
                best = max(members, key=lambda i: scores[i]) if members else max(range(len(samples)),
                                                                                    key=lambda i: scores[i])
            else:
                best = max(range(len(samples)), key=lambda i: scores[i])  # ties: the first sample
            candidates = [{"answer": a, "score": s} for a, s in zip(answers, scores)]
            return finish("best_of_n", problem, proposer, meter, tree, samples[best], scores[best], candidates)
        finally:
            proposer.release(samples)


STRATEGY = BestOfN
