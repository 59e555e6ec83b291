"""A*-decoding: best-first search over partial solutions, guided by process scores.

After A*-decoding (Chatziveroglou, 2025), with our own cost model. Each step's process score p
(read as the probability that the solution is still on track, clamped to [1e-6, 1]) has the cost
c = -log p, so costs add like log-probabilities of independent steps. A partial solution s with
steps 1..t has
    g(s) = g_weight * mean(c_1 .. c_t)   the cost of the path so far; a mean, not a sum, so that a
                                         longer path is not dearer for being longer (with a sum and
                                         positive costs the search degenerates into breadth-first)
    h(s) = h_weight * c_t                the remaining cost, estimated from the latest score: a PRM's
                                         step score estimates the chance of still reaching a correct
                                         answer from here
and the frontier is a heap ordered by f = g + h (ties: the deeper branch, then the older one).

Pop the best; a finished branch popped is the answer; otherwise expand it into `n` children
(one batched decode), score them and push them. The search stops after `max_expansions` expansions
or when the budget cannot pay for another; then the best finished branch in the frontier is the
answer, or else the best open one, completed as far as the budget allows.

KV: an expanded branch is kept until none of its children is left in the frontier (it costs at most
its last, partial block; its full blocks are shared with the children) and released then; so a
selector may read a frontier branch's parent (ETS embeds the latest step on it). With
`max_frontier`, whenever the frontier grows past it the selector (default: top-k by -f) keeps
`max_frontier` of it and the rest are released, which bounds the KV the search holds.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

from ttc.graph import Branch, Meter, Problem, Scored, Selector
from ttc.result import Result, Tree
from ttc.search.beam import complete_open, latest_score, prepare, release
from ttc.search.common import bind_verifier, finish, score_or_zero

MIN_SCORE = 1e-6


def step_cost(score: float) -> float:
    """-log of a process score read as a probability (clamped, so a 0 or negative score is very dear)."""
    if math.isnan(score):
        return -math.log(MIN_SCORE)
    return -math.log(min(1.0, max(MIN_SCORE, score)))


@dataclass
class AStar:
    n: int = 16  # children per expansion (the one name for a strategy's breadth: `strategy.n`); A* stops at
    # the first finished solution it pops, and 4 a round spent a quarter of a 1650-token cap (docs/results.md)
    max_expansions: int = 32
    g_weight: float = 1.0
    h_weight: float = 1.0
    max_frontier: int | None = None
    selector: Selector | None = None

    def __post_init__(self):
        if self.n < 1 or self.max_expansions < 1:
            raise ValueError("n and max_expansions must be at least 1")
        if self.max_frontier is not None and self.max_frontier < 1:
            raise ValueError("max_frontier must be at least 1 (or None for no limit)")

    def priority(self, branch: Branch) -> float:
        """f = g + h of a scored branch (lower is better)."""
        costs = [step_cost(s) for s in branch.scores] or [0.0]
        return self.g_weight * sum(costs) / len(costs) + self.h_weight * costs[-1]

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        tree = Tree()
        verifier = bind_verifier(verifier, problem, proposer, meter)
        selector = prepare(self.selector, proposer, verifier, meter)
        search = _Search(self, proposer, verifier, selector, meter, tree)
        root = proposer.start(problem, meter)
        tree.add(root, status="root")
        chosen = None
        try:
            chosen = search.run(root)
            candidates = [{"answer": proposer.answer(chosen.branch), "score": chosen.score}] if chosen else []
            if chosen is None:
                return finish("astar", problem, proposer, meter, tree, None, None, candidates)
            return finish("astar", problem, proposer, meter, tree, chosen.branch, chosen.score, candidates)
        finally:
            search.release_all(root, chosen)


class _Search:
    """The state of one A* run: the frontier heap and the expanded branches it still depends on."""

    def __init__(self, config: AStar, proposer, verifier, selector: Selector, meter: Meter, tree: Tree):
        self.config, self.proposer, self.verifier, self.selector = config, proposer, verifier, selector
        self.meter, self.tree = meter, tree
        self.frontier: list[tuple[float, int, int, Branch]] = []  # (f, -depth, tick, branch)
        self.ticks = itertools.count()
        self.held: dict[int, list] = {}  # expanded branch id -> [branch, its children still in the frontier]
        self.expansions = 0

    def run(self, root: Branch) -> Scored | None:
        if not self.expand(root):
            return complete_open(root, self.proposer, self.verifier, self.meter, self.tree)
        while self.frontier:
            entry = heapq.heappop(self.frontier)
            node = entry[3]
            if node.finished:
                self.tree.add(node, status="final")
                self.leave(node)
                release(self.proposer, self.verifier, [node])
                return Scored(node, latest_score(node))
            if self.expansions >= self.config.max_expansions or not self.expand(node):
                heapq.heappush(self.frontier, entry)
                break
            self.leave(node)  # now held as a parent until its own children leave
        return self.fallback()

    def expand(self, node: Branch) -> bool:
        children = self.proposer.propose([node], self.config.n, self.meter)
        if not children:
            return False
        self.expansions += 1
        if node.depth:
            self.tree.add(node, status="kept")  # expanded
        self.held[node.id] = [node, 0]
        scores = score_or_zero(self.verifier, children, self.meter)
        for c, s in zip(children, scores):
            c = c.with_score(s)
            self.tree.add(c, score=s, status="open")
            heapq.heappush(self.frontier, (self.config.priority(c), -c.depth, next(self.ticks), c))
            self.held[node.id][1] += 1
        self.tree.history.append({"expanded": node.id, "f": self.config.priority(node) if node.scores else None,
                                  "frontier": len(self.frontier)})
        if self.config.max_frontier is not None and len(self.frontier) > self.config.max_frontier:
            self.prune()
        self.release_unheld(node)  # every child may have been pruned at once
        return True

    def prune(self) -> None:
        entries = sorted(self.frontier)
        kept = self.selector.select([Scored(e[3], -e[0]) for e in entries], self.config.max_frontier, self.meter)
        keep = {b.id for b in kept}
        self.frontier = [e for e in entries if e[3].id in keep]
        heapq.heapify(self.frontier)
        pruned = [e[3] for e in entries if e[3].id not in keep]
        self.tree.mark(pruned, "pruned")
        for b in pruned:
            self.leave(b)
        release(self.proposer, self.verifier, pruned)

    def leave(self, branch: Branch) -> None:
        """`branch` left the frontier: its parent may no longer be needed."""
        parent = branch.parent
        if parent is not None and parent.id in self.held:
            self.held[parent.id][1] -= 1
            self.release_unheld(parent)

    def release_unheld(self, branch: Branch) -> None:
        held = self.held.get(branch.id)
        if held is not None and held[1] <= 0:
            del self.held[branch.id]
            release(self.proposer, self.verifier, [held[0]])

    def fallback(self) -> Scored | None:
        """Out of expansions or budget: the best finished branch in the frontier, else the best open one."""
        if not self.frontier:
            return None
        entries = sorted(self.frontier)
        done = [e for e in entries if e[3].finished]
        best = (done or entries)[0][3]
        if best.finished:
            self.tree.add(best, status="final")
            return Scored(best, latest_score(best))
        return complete_open(best, self.proposer, self.verifier, self.meter, self.tree)

    def release_all(self, root: Branch, chosen: Scored | None) -> None:
        """Everything still held: the root, the frontier, the expanded branches, the chosen one."""
        rest = [root] + [e[3] for e in self.frontier] + [h[0] for h in self.held.values()]
        release(self.proposer, self.verifier, rest + ([chosen.branch] if chosen is not None else []))
        self.frontier.clear()
        self.held.clear()


STRATEGY = AStar
