"""Diverse verifier tree search (DVTS; Beeching et al., "Scaling test-time compute with open models").

The root is split into `subtrees` independent subtrees, each a beam of `n // subtrees` (the
remainder goes to the first subtrees). Selection happens inside a subtree only, so one dominant line
of reasoning cannot take over the whole width (n) the way it can in plain beam search. All subtrees
still grow in one batched decode per round and share the prompt's KV. The machinery is beam.py's:
each subtree is a `Frontier`.

Answer: the best-scored finished solution over all subtrees, or with `weighted=True` a vote over
the finished solutions' answers (grouped by equivalence) weighted by their scores, represented by
the best-scored member of the winning group. Scores should be nonnegative for a weighted vote.
"""

from __future__ import annotations

from dataclasses import dataclass

from ttc.graph import Meter, Problem, Selector
from ttc.result import Result, Tree
from ttc.search.beam import Frontier, conclude, prepare, rank, release_frontiers, run_rounds
from ttc.search.common import bind_verifier, finish
from ttc.verifiers.vote import vote


@dataclass
class DVTS:
    n: int = 4  # the total width over all subtrees: one beam per subtree, expanded to 4 children, 16 a round as
    # in the paper (N=16, M=4) and as beam's defaults (n=16 here was 64 a round: a few tokens a child per problem)
    subtrees: int = 4
    expand: int = 4
    max_depth: int = 12
    selector: Selector | None = None
    weighted: bool = False

    def __post_init__(self):
        if self.subtrees < 1 or self.n < self.subtrees:
            raise ValueError("DVTS needs at least one subtree and n (the width) of at least one beam per subtree")
        if self.expand < 1 or self.max_depth < 1:
            raise ValueError("expand and max_depth must be at least 1")

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        tree = Tree()
        verifier = bind_verifier(verifier, problem, proposer, meter)
        selector = prepare(self.selector, proposer, verifier, meter)
        root = proposer.start(problem, meter)
        tree.add(root, status="root")
        base, extra = divmod(self.n, self.subtrees)
        frontiers = [Frontier([root], base + (i < extra)) for i in range(self.subtrees)]
        chosen = None
        try:
            run_rounds(frontiers, self.expand, self.max_depth, proposer, verifier, selector, meter, tree)
            tree.history.append({"subtrees": [[s.branch.id for s in f.finished] + [b.id for b in f.beams]
                                              for f in frontiers]})
            finished = [s for f in frontiers for s in f.finished]
            if self.weighted and finished:
                answers = [proposer.answer(s.branch) for s in finished]
                v = vote(answers, weights=[s.score for s in finished])
                if v.winner is not None:
                    group = v.groups[v.winner]
                    members = [s for s, g in zip(finished, v.groups) if g == group]
                    chosen = members[rank(members)[0]]
                    candidates = [{"answer": a, "score": s.score} for a, s in zip(answers, finished)]
                    return finish("dvts", problem, proposer, meter, tree, chosen.branch, chosen.score, candidates)
            chosen, candidates = conclude(frontiers, proposer, verifier, meter, tree)
            if chosen is None:
                return finish("dvts", problem, proposer, meter, tree, None, None, candidates)
            return finish("dvts", problem, proposer, meter, tree, chosen.branch, chosen.score, candidates)
        finally:
            release_frontiers(frontiers, proposer, verifier, chosen)


STRATEGY = DVTS
