"""Monte Carlo tree search over solution steps, guided by a process verifier or by rollouts.

The search walks from the prompt to a finished solution one committed step (a "move") at a time. Each
move runs `simulations` simulations from the current root:
  1. selection: from the root, descend to the child with the highest PUCT (default) or UCT score until a
     node with no children (a leaf: never expanded, finished, or at `max_depth`);
  2. expansion: an open leaf gets `n` children in one batched `proposer.propose` (they fork its KV);
  3. evaluation: each new child's value is the verifier's process score of it (value="verifier"), or the
     verifier's score of one rollout from it to the end (value="rollout", one batched `propose(...,
     to_end=True)` over the new children; a child the budget gives no rollout keeps its process score).
     A finished or depth-capped leaf that is selected again is worth its own value once more (free);
  4. backup: each new child starts with one visit and its value; every node on the path gains one visit
     and the value per new child, so a node's mean value is the mean of every evaluation in its subtree.
Then the root's most visited child (ties: the higher mean value, then the first) becomes the new root
and its siblings' subtrees are pruned. The walk ends when the root is finished, at `max_depth`, or when
the budget cannot pay for another expansion (`meter.generation_share(n) < 1`, or the proposer returns no
child, or the verifier raises CannotAttempt while scoring).

Selection, for child c of node p with visit counts N and mean value Q:
  PUCT  Q(c) + c_puct * P(c) * sqrt(N(p)) / (1 + N(c))      (AlphaZero's rule)
  UCT   Q(c) + c_puct * sqrt(ln N(p) / N(c))                (UCB1; every child has N >= 1 from its expansion)
The prior P: softmax over the siblings of each step's mean token logprob (`Step.logprob` / its tokens). A
step's summed logprob grows with its length, so a softmax over sums would hand nearly all the prior to the
shortest step; the per-token mean is length-free, and the softmax makes the siblings' priors sum to one,
as PUCT assumes. Steps of equal mean logprob (or a backend that reports none) get a uniform prior.

KV: an expanded node is released as soon as its children are scored (they hold its blocks by reference
count, and a node is expanded at most once); a finished child or rollout is released once scored (its text
and score are all the answer needs); pruning a subtree releases its open leaves. So the pool holds only the
open leaves under the current root. Everything still held is released at the end.

Answer: answer="best" takes the best-scored finished leaf seen (rollouts included; ties: the first found),
answer="vote" the majority answer over them (self-consistency's vote). With none finished, the principal
variation (most visited children from the current root) is followed to its leaf, which is completed as far
as the budget allows and scored. n=1 with one simulation per move is a greedy step walk: every node's first
child, to the end.

Limits: one expansion per decode (no virtual loss to batch simulations); values are assumed to be on one
scale (a NaN score counts as 0); duplicate sibling steps are not merged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ttc.budget import CannotAttempt
from ttc.graph import Branch, Meter, Problem, Scored, softmax
from ttc.result import Result, Tree
from ttc.search.beam import Frontier, conclude, release
from ttc.search.common import bind_verifier, finish, score_or_zero, verifier_cost
from ttc.search.self_consistency import majority


@dataclass(eq=False)
class Node:
    """A tree node's search statistics. `branch` is the node's latest Branch (with its process score)."""

    branch: Branch
    prior: float = 1.0
    visits: int = 0
    total: float = 0.0  # sum of the values backed up through this node
    children: list[Node] = field(default_factory=list)

    @property
    def value(self) -> float:
        return self.total / self.visits if self.visits else 0.0


def priors(children: list[Branch]) -> list[float]:
    """Softmax over siblings of each latest step's mean token logprob (see the module docstring)."""
    means = [c.steps[-1].logprob / max(1, len(c.steps[-1].token_ids)) for c in children]
    means = [0.0 if math.isnan(m) else m for m in means]
    return softmax(means)


def _finite(score: float) -> float:
    return 0.0 if math.isnan(score) else score


@dataclass
class MCTS:
    """Monte Carlo tree search over steps (see the module docstring). `n` is the breadth: children per expansion."""

    n: int = 4  # children per expansion
    simulations: int = 8  # simulations per move (per committed step)
    max_depth: int = 12  # nodes at this depth are not expanded
    selection: str = "puct"  # or "uct"
    c_puct: float = 1.0  # the exploration constant (UCT's c too)
    value: str = "verifier"  # or "rollout": the verifier's score of one rollout to the end
    answer: str = "best"  # or "vote": the majority answer over the finished leaves
    name: ClassVar[str] = "mcts"

    def __post_init__(self):
        if self.n < 1 or self.simulations < 1 or self.max_depth < 1:
            raise ValueError("n, simulations and max_depth must be at least 1")
        if self.selection not in ("puct", "uct"):
            raise ValueError(f"selection must be 'puct' or 'uct', not {self.selection!r}")
        if self.value not in ("verifier", "rollout"):
            raise ValueError(f"value must be 'verifier' or 'rollout', not {self.value!r}")
        if self.answer not in ("best", "vote"):
            raise ValueError(f"answer must be 'best' or 'vote', not {self.answer!r}")
        if not self.c_puct >= 0:
            raise ValueError("c_puct must be at least 0")

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        tree = Tree()
        verifier = bind_verifier(verifier, problem, proposer, meter)
        meter.verifier_cost = verifier_cost(verifier)
        root = proposer.start(problem, meter)
        tree.add(root, status="root")
        search = _Search(self, proposer, verifier, meter, tree)
        chosen = None
        try:
            leaf = search.run(Node(root))
            search.record_stats()
            if self.answer == "vote" and search.finished:
                samples = [s.branch for s in search.finished]
                return majority(self.name, problem, proposer, meter, tree, samples,
                                [proposer.answer(b) for b in samples])
            # beam's rule: the best-scored finished leaf, else the principal variation's leaf completed
            open_ = [] if leaf.finished else [leaf]
            chosen, candidates = conclude([Frontier(open_, 0, search.finished)], proposer, verifier, meter, tree)
            if chosen is None:
                return finish(self.name, problem, proposer, meter, tree, None, None, candidates)
            return finish(self.name, problem, proposer, meter, tree, chosen.branch, chosen.score, candidates)
        finally:
            release(proposer, verifier, search.held(chosen.branch if chosen is not None else None))


class _Search:
    """The state of one MCTS run: the nodes, the finished leaves, and the branches whose KV it holds."""

    def __init__(self, config: MCTS, proposer, verifier, meter: Meter, tree: Tree):
        self.config, self.proposer, self.verifier, self.meter, self.tree = config, proposer, verifier, meter, tree
        self.finished: list[Scored] = []  # every finished leaf and rollout, in the order found (KV released)
        self.live: dict[int, Branch] = {}  # branch id -> open branch whose KV is held
        self.nodes: list[Node] = []
        self.stopped = False  # the budget cannot pay for another expansion

    # -- the walk ----------------------------------------------------------------------------------

    def run(self, root: Node) -> Branch:
        """Move by move until the root is finished, at max_depth, or out of budget; the PV's leaf branch."""
        self.live[root.branch.id] = root.branch
        self.nodes.append(root)
        for move in range(self.config.max_depth):
            if root.branch.finished or root.branch.depth >= self.config.max_depth:
                break
            done = 0
            while done < self.config.simulations and self.simulate(root):
                done += 1
            if not root.children:
                break
            best = max(root.children, key=lambda c: (c.visits, c.value))  # ties: the first child
            self.tree.history.append({"move": move, "root": root.branch.id, "simulations": done,
                                      "children": [c.branch.id for c in root.children],
                                      "visits": [c.visits for c in root.children],
                                      "values": [c.value for c in root.children],
                                      "priors": [c.prior for c in root.children],
                                      "chosen": None if self.stopped else best.branch.id})
            if self.stopped:
                break
            for other in root.children:
                if other is not best:
                    self.prune(other)
            root = best
        return self.principal_leaf(root)

    def simulate(self, root: Node) -> bool:
        """One selection, expansion, evaluation and backup; False when the budget stopped it."""
        path, node = [root], root
        while node.children:
            node = self.select(node)
            path.append(node)
        if node.branch.finished or node.branch.depth >= self.config.max_depth:
            values = [node.value]  # a leaf not expanded holds one evaluation: its own
        else:
            values = self.expand(node)
            if values is None:
                self.stopped = True
                return False
        for n in path:
            n.visits += len(values)
            n.total += sum(values)
        return True

    def select(self, node: Node) -> Node:
        c = self.config.c_puct
        if self.config.selection == "puct":
            root_n = math.sqrt(node.visits)
            return max(node.children, key=lambda ch: ch.value + c * ch.prior * root_n / (1 + ch.visits))
        log_n = math.log(max(1, node.visits))
        return max(node.children, key=lambda ch: ch.value + c * math.sqrt(log_n / max(1, ch.visits)))

    def expand(self, node: Node) -> list[float] | None:
        """Give `node` n scored children (each with one visit and its value) and release it; the values,
        or None when the budget cannot pay for the children or their scores."""
        if self.meter.generation_share(self.config.n) < 1:
            return None
        children = self.proposer.propose([node.branch], self.config.n, self.meter)
        if not children:
            return None
        try:
            scores = score_or_zero(self.verifier, children, self.meter)
        except CannotAttempt:  # the verifier cost more than it declared: stop with what is known
            release(self.proposer, self.verifier, children)
            return None
        children = [c.with_score(s) for c, s in zip(children, scores)]
        for c, s in zip(children, scores):
            self.tree.add(c, score=s, status="final" if c.finished else "open")
            if c.finished:
                self.finished.append(Scored(c, s))
            else:
                self.live[c.id] = c
        if node.branch.depth:
            self.tree.add(node.branch, status="kept")  # expanded
        # Finished children are never expanded, and the expanded node never again: their KV goes back now
        # (before any rollout: the open children hold the node's blocks by reference count).
        self.drop([c for c in children if c.finished] + [node.branch])
        values = [_finite(s) for s in scores]
        if self.config.value == "rollout":
            values = self.rollouts(children, values)
        for c, p, v in zip(children, priors(children), values):
            child = Node(c, prior=p, visits=1, total=v)
            node.children.append(child)
            self.nodes.append(child)
        return values

    def rollouts(self, children: list[Branch], values: list[float]) -> list[float]:
        """Each open child's value replaced by the score of one rollout from it to the end (released once
        scored; it is a finished leaf like any other). A child the budget gives no rollout keeps its value."""
        open_ = [c for c in children if not c.finished]
        outs = self.proposer.propose(open_, 1, self.meter, to_end=True) if open_ else []
        if not outs:
            return values
        try:
            scores = score_or_zero(self.verifier, outs, self.meter)
        except CannotAttempt:
            release(self.proposer, self.verifier, outs)
            return values
        by_parent = {}
        for out, s in zip(outs, scores):
            out = out.with_score(s)
            by_parent[out.parent.id] = _finite(s)
            self.tree.add(out, score=s, status="final")
            self.tree.nodes[out.id]["rollout"] = True
            self.finished.append(Scored(out, s))
        release(self.proposer, self.verifier, outs)
        return [by_parent.get(c.id, v) for c, v in zip(children, values)]

    # -- pruning, the answer's leaf, and bookkeeping -----------------------------------------------

    def prune(self, top: Node) -> None:
        """Mark a dropped subtree pruned (finished leaves stay final: they remain candidates), free its KV."""
        stack, open_ = [top], []
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if not node.branch.finished:
                open_.append(node.branch)
        self.tree.mark(open_, "pruned")
        self.drop(open_)

    def principal_leaf(self, root: Node) -> Branch:
        """The leaf reached by following the most visited child from `root` (what the search believes in)."""
        node = root
        while node.children:
            node = max(node.children, key=lambda c: (c.visits, c.value))
        return node.branch

    def drop(self, branches: list[Branch]) -> None:
        for b in branches:
            self.live.pop(b.id, None)
        release(self.proposer, self.verifier, branches)

    def held(self, chosen: Branch | None) -> list[Branch]:
        """Every branch still held, and the chosen one (it may have been completed in place)."""
        rest = dict(self.live)
        if chosen is not None:
            rest[chosen.id] = chosen
        self.live.clear()
        return list(rest.values())

    def record_stats(self) -> None:
        """Each node's visits, mean value and prior into its tree node (for the notebook's rendering)."""
        for node in self.nodes:
            entry = self.tree.nodes.get(node.branch.id)
            if entry is not None:
                entry.update(visits=node.visits, value=node.value, prior=node.prior)


STRATEGY = MCTS
