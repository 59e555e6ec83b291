"""Self-consistency: sample N solutions and take the majority answer, grouping answers by equivalence."""

from __future__ import annotations

from dataclasses import dataclass

from ttc.graph import Branch, Meter, Problem
from ttc.result import Result, Tree
from ttc.search.common import finish, sample_solutions
from ttc.verifiers.vote import vote


def majority(name: str, problem: Problem, proposer, meter: Meter, tree: Tree, samples: list[Branch],
             answers: list[str | None]) -> Result:
    """The Result of a majority vote over finished samples: the winning group's first sample, its share
    of the samples as the score, and one candidate per answer group with its votes. Allocators that
    draw their samples in rounds (ttc.search.allocation) answer through this too."""
    v = vote(answers)
    candidates = [{"answer": answers[v.groups.index(g)], "votes": c} for g, c in v.counts.items()]
    if v.winner is None:
        return finish(name, problem, proposer, meter, tree, samples[0] if samples else None, None, candidates)
    share = v.counts[v.groups[v.winner]] / len(samples)
    return finish(name, problem, proposer, meter, tree, samples[v.winner], share, candidates)


@dataclass
class SelfConsistency:
    n: int = 8

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"self-consistency votes over at least one sample: strategy.n must be >= 1, not {self.n}")

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        """The verifier is not used: the vote is the selector."""
        tree = Tree()
        samples = sample_solutions(problem, proposer, meter, tree, self.n)
        try:
            answers = [proposer.answer(b) for b in samples]
            for b in samples:
                tree.add(b, status="final")
            return majority("self_consistency", problem, proposer, meter, tree, samples, answers)
        finally:
            proposer.release(samples)


STRATEGY = SelfConsistency
