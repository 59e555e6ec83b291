"""Best-of-N: sample N whole solutions, rank them with a verifier (outcome or process).

Plain: the highest-scored sample wins. Weighted: scores are summed over samples whose answers are
mathematically equivalent, and the best sample of the heaviest group wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from ttc.graph import Branch, Meter, Problem
from ttc.result import Result, Tree
from ttc.search.common import bind_verifier, finish, sample_solutions, score_or_zero, verifier_cost
from ttc.verifiers.vote import heaviest_group_best


def best_scored(name: str, problem: Problem, proposer, meter: Meter, tree: Tree, samples: list[Branch],
                answers: list[str | None], scores: list[float], weighted: bool) -> Result:
    """The Result of choosing among scored samples: the highest score (ties: the first sample), or with
    `weighted` the best sample of the answer group with the largest summed score. One candidate per
    sample. Allocators that draw their samples in rounds (ttc.search.allocation) answer through this too."""
    if not samples:
        return finish(name, problem, proposer, meter, tree, None, None)
    if weighted:
        best = heaviest_group_best(answers, scores)
        if best is None:  # no sample states an answer: the highest score (ties: the first sample)
            best = max(range(len(samples)), key=lambda i: scores[i])
    else:
        best = max(range(len(samples)), key=lambda i: scores[i])  # ties: the first sample
    candidates = [{"answer": a, "score": s} for a, s in zip(answers, scores)]
    return finish(name, problem, proposer, meter, tree, samples[best], scores[best], candidates)


def score_and_choose(name: str, problem: Problem, proposer, verifier, meter: Meter, tree: Tree,
                     samples: list[Branch], weighted: bool) -> Result:
    """Score finished samples, record them in the tree, and choose by `best_scored` (best-of-n's rule,
    shared with strategies that reach their samples another way: plansearch)."""
    scores = score_or_zero(verifier, samples, meter)
    answers = [proposer.answer(b) for b in samples]
    for b, s in zip(samples, scores):
        tree.add(b, score=s, status="final")
    return best_scored(name, problem, proposer, meter, tree, samples, answers, scores, weighted)


@dataclass
class BestOfN:
    n: int = 8
    weighted: bool = False

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"best-of-N chooses among at least one sample: strategy.n must be >= 1, not {self.n}")

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        tree = Tree()
        verifier = bind_verifier(verifier, problem, proposer, meter)
        meter.verifier_cost = verifier_cost(verifier)
        samples = sample_solutions(problem, proposer, meter, tree, self.n)
        try:
            return score_and_choose("best_of_n", problem, proposer, verifier, meter, tree, samples, self.weighted)
        finally:
            proposer.release(samples)


STRATEGY = BestOfN
