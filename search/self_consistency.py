"""Self-consistency: sample N solutions and take the majority answer, grouping answers by equivalence."""

from __future__ import annotations

from dataclasses import dataclass

from ttc.graph import Meter, Problem
from ttc.result import Result, Tree
from ttc.search.common import finish
from ttc.verifiers.vote import vote


@dataclass
class SelfConsistency:
    n: int = 8

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        """The verifier is not used: the vote is the selector."""
        tree = Tree()
        root = proposer.start(problem, meter)
        tree.add(root, status="root")
        samples = proposer.propose([root], self.n, meter, to_end=True)
        proposer.release([root])
        try:
            answers = [proposer.answer(b) for b in samples]
            v = vote(answers)
            for b in samples:
                tree.add(b, status="final")
            candidates = [{"answer": answers[v.groups.index(g)], "votes": c} for g, c in v.counts.items()]
            if v.winner is None:
                return finish("self_consistency", problem, proposer, meter, tree, samples[0] if samples else None,
                              None, candidates)
            share = v.counts[v.groups[v.winner]] / len(samples)
            return finish("self_consistency", problem, proposer, meter, tree, samples[v.winner], share, candidates)
        finally:
            proposer.release(samples)


STRATEGY = SelfConsistency
