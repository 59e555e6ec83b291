"""REBASE: reward-balanced search (Wu et al. 2024, "Inference Scaling Laws: An Empirical Analysis of
Compute-Optimal Inference for Problem-Solving with Language Models").

A tree grown one depth at a time with a fixed total width n (`strategy.n`): the search wants n finished
solutions. Each depth, the open nodes of the last depth share the width still free, n minus the solutions
finished so far, in proportion to softmax(reward / temperature), the reward being each node's latest
process score. Node i gets W_i children (a largest-remainder rounding, so the W_i sum to the free width
exactly; ties go to the earlier node), and a node given none is pruned. Every child is kept and scored; a
finished one takes its slot out of the width for good. Unlike beam search nothing is cut to a top-k: a
weaker node keeps a smaller share of the exploration instead of losing all of it.

The round machinery is beam's (`ttc.search.beam`): each kept node is a one-beam Frontier whose slots are
its W_i, so `propose_round` draws W_i children of it (one batched decode per distinct W_i: the protocol's
`propose` takes one n), and `settle_round` scores them, moves the finished ones out, and releases the
expanded parents (children hold their KV by reference count). Pruned nodes and finished leaves are
released at once, so the pool holds only the open nodes of the current depth.

The search stops when n solutions have finished, after `max_depth` depths, or when the budget cannot pay
for one more step of every child the free width asks for. The answer is the best-scored finished solution,
or with `weighted` best-of-n's weighted vote (summed scores of equivalent answers); with none finished, the
best open node is completed as far as the budget allows. Width 1 is greedy step search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ttc.search.beam import (
    Frontier,
    conclude,
    latest_score,
    prepare,
    propose_round,
    release,
    release_frontiers,
    settle_round,
)
from ttc.search.best_of_n import best_scored
from ttc.search.common import bind_verifier, finish

from ttc.graph import Branch, Meter, Problem, Scored, softmax
from ttc.result import Result, Tree


def apportion(rewards: list[float], width: int, temperature: float) -> list[int]:
    """Children per node: `width` split by softmax(rewards / temperature), rounded by largest remainder
    (the counts sum to `width`; ties go to the earlier node). A NaN reward counts as the lowest (weight 0),
    unless every reward is NaN or -inf: then the split is even."""
    if not rewards or width <= 0:
        return [0] * len(rewards)
    clean = [-math.inf if math.isnan(r) else r for r in rewards]
    if all(r == -math.inf for r in clean):
        weights = [1.0 / len(clean)] * len(clean)
    else:
        weights = softmax(clean, temperature)
    shares = [w * width for w in weights]
    counts = [math.floor(s) for s in shares]
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[: width - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class Rebase:
    """Reward-balanced search (see the module docstring). n: the total width (finished solutions wanted)."""

    n: int = 8  # the total width: children per depth = n minus the solutions finished so far
    temperature: float = 0.1  # softmax temperature on rewards; lower gives the best nodes more children
    max_depth: int = 12
    weighted: bool = False  # true: the best solution of the answer group with the largest summed score
    name: ClassVar[str] = "rebase"

    def __post_init__(self):
        if self.n < 1 or self.max_depth < 1:
            raise ValueError("n (the width) and max_depth must be at least 1")
        if not self.temperature > 0:
            raise ValueError("temperature must be positive")

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        tree = Tree()
        verifier = bind_verifier(verifier, problem, proposer, meter)
        selector = prepare(None, proposer, verifier, meter)  # top-k with k = W_i: every child is kept
        root = proposer.start(problem, meter)
        tree.add(root, status="root")
        frontiers = [Frontier([root], self.n)]  # the root has the whole width
        done: list[Scored] = []
        chosen = None
        try:
            for depth in range(1, self.max_depth + 1):
                width = sum(f.slots for f in frontiers)
                if not width or meter.generation_share(width) < 1:
                    break
                children = propose_round(frontiers, 1, proposer, meter)
                if not any(children):
                    break
                settle_round(frontiers, children, proposer, verifier, selector, meter, tree)
                for f in frontiers:
                    done.extend(f.finished)
                    f.finished = []
                open_ = [b for f in frontiers for b in f.beams]
                frontiers = self._allocate(open_, self.n - len(done), proposer, verifier, tree)
                tree.history.append({"depth": depth, "finished": len(done),
                                     "open": [b.id for f in frontiers for b in f.beams],
                                     "children": [f.slots for f in frontiers],
                                     "rewards": [latest_score(b) for f in frontiers for b in f.beams]})
            if self.weighted and done:
                samples = [s.branch for s in done]
                return best_scored(self.name, problem, proposer, meter, tree, samples,
                                   [proposer.answer(b) for b in samples], [s.score for s in done], True)
            chosen, candidates = conclude(frontiers + [Frontier([], 0, done)], proposer, verifier, meter, tree)
            if chosen is None:
                return finish(self.name, problem, proposer, meter, tree, None, None, candidates)
            return finish(self.name, problem, proposer, meter, tree, chosen.branch, chosen.score, candidates)
        finally:
            release_frontiers(frontiers, proposer, verifier, chosen)

    def _allocate(self, open_: list[Branch], width: int, proposer, verifier, tree: Tree) -> list[Frontier]:
        """The next depth's frontiers: one per open node given children; the others pruned and released."""
        counts = apportion([latest_score(b) for b in open_], width, self.temperature)
        pruned = [b for b, k in zip(open_, counts) if k == 0]
        tree.mark(pruned, "pruned")
        release(proposer, verifier, pruned)
        return [Frontier([b], k) for b, k in zip(open_, counts) if k > 0]


STRATEGY = Rebase
