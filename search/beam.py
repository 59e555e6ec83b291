"""Step-level beam search against a process verifier, and the round machinery DVTS and ETS share.

A round: every open beam is forked and all children grow by one step in one batched decode
(`proposer.propose`), the verifier scores each child's latest step, and the selector keeps at most
as many children as the beam has free slots. Children hold their parent's KV blocks by reference
count, so the expanded parents and the pruned children are released at once: the pool only ever
holds the live frontier.

Slots: a beam of width n (`strategy.n`) wants n finished solutions. A kept child that is finished leaves the beam
for its finished pool and takes its slot with it. Each round asks for `slots * expand` children,
spread evenly over the open beams: normally `expand` per beam; when a selector keeps fewer beams
than slots (ETS pruning redundant branches) the survivors get more children each, so the work per
round stays the same while more of it shares KV. The root counts as `n` copies of itself: the
first round draws `n * expand` children from it.

The search stops when every slot holds a finished solution, after `max_depth` rounds, or when the
budget cannot pay for another round. The answer is the best-scored finished solution; if none
finished, the best open beam is completed (as far as the budget allows) and scored.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from ttc.graph import Branch, Meter, Problem, Scored, Selector
from ttc.result import Result, Tree
from ttc.search.common import bind_verifier, finish, score_or_zero, verifier_cost


@dataclass(frozen=True)
class TopK:
    """Keep the k highest-scored branches; ties go to the earlier branch, NaN scores rank last."""

    def select(self, scored: list[Scored], k: int, meter: Meter) -> list[Branch]:
        return [scored[i].branch for i in rank(scored)[: max(0, k)]]


def rank(scored: list[Scored]) -> list[int]:
    """Indices from best to worst score (stable, so ties keep their order; NaN last)."""
    return rank_scores([s.score for s in scored])


def rank_scores(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i] if not math.isnan(scores[i]) else math.inf)


def latest_score(branch: Branch) -> float:
    return branch.scores[-1] if branch.scores else -math.inf


@dataclass(eq=False)
class Frontier:
    """One beam: its open branches, the finished solutions it holds, and how many more it wants."""

    beams: list[Branch]
    slots: int
    finished: list[Scored] = field(default_factory=list)

    def fanout(self, expand: int) -> int:
        """Children per open beam this round (0 when the beam is done)."""
        if not self.beams or self.slots <= 0:
            return 0
        return max(1, self.slots * expand // len(self.beams))


def release(proposer, verifier, branches: list[Branch]) -> None:
    """Return branches' KV to the pool, and their verifier-side state where the verifier keeps some (a PRM)."""
    if not branches:
        return
    proposer.release(branches)
    drop = getattr(verifier, "release", None)
    if drop is not None:
        drop(branches)


def prepare(selector: Selector | None, proposer, verifier, meter: Meter) -> Selector:
    """The selector to use (top-k by default), bound to the proposer, with its cost reserved in the meter."""
    selector = selector if selector is not None else TopK()
    bind = getattr(selector, "bind", None)  # selectors that need the policy model (ETS's embeddings)
    if bind is not None:
        bound = bind(proposer)  # a copy for this search: per-search state never lives on the shared config
        if bound is None:
            raise TypeError(f"{type(selector).__name__}.bind(proposer) must return the selector for this search "
                            "(a copy holding its state), not None")
        selector = bound
    (vb, vt), (sb, st) = verifier_cost(verifier), verifier_cost(selector)
    meter.verifier_cost = (vb + sb, vt + st)
    return selector


def propose_round(frontiers: list[Frontier], expand: int, proposer, meter: Meter) -> list[list[Branch]]:
    """Each frontier's children: one batched proposal for all frontiers that ask the same fan-out."""
    wants = [f.fanout(expand) for f in frontiers]
    out: list[list[Branch]] = [[] for _ in frontiers]
    groups = sorted({w for w in wants if w}, reverse=True)
    members = {n: [i for i, w in enumerate(wants) if w == n] for n in groups}
    counts = {n: n * sum(len(frontiers[i].beams) for i in members[n]) for n in groups}
    # One call per fan-out: each call's share is computed for its own children only, so every call holds back
    # the scoring of the children already drawn and the equal part (generation and scoring) of the calls
    # after it; otherwise the first calls spend what the round needs and a later child cannot be scored
    # (REBASE's uneven fan-outs ran out so: BudgetExceeded).
    share = meter.generation_share(sum(counts.values()))
    fixed, per_token = meter.verifier_cost
    drawn_scoring = 0.0
    for g, n in enumerate(groups):
        later = sum(counts[m] for m in groups[g + 1:]) * (fixed + share * (1.0 + per_token))
        with meter.reserving(0 if share >= 1 << 30 else later + drawn_scoring):
            children = proposer.propose([b for i in members[n] for b in frontiers[i].beams], n, meter)
        drawn_scoring += sum(fixed + per_token * len(c.steps[-1].token_ids) for c in children)
        # A parent may stand in several frontiers (DVTS's root): its children are dealt out n at a time.
        by_parent: dict[int, list[Branch]] = {}
        for c in children:
            by_parent.setdefault(c.parent.id, []).append(c)
        for i in members[n]:
            for b in frontiers[i].beams:
                mine = by_parent.get(b.id, [])
                out[i].extend(mine[:n])
                del mine[:n]
    return out


def settle_round(frontiers: list[Frontier], children: list[list[Branch]], proposer, verifier, selector: Selector,
                 meter: Meter, tree: Tree) -> None:
    """Score the children, keep each frontier's best, release the pruned children and the expanded parents."""
    flat = [c for cs in children for c in cs]
    scores = iter(score_or_zero(verifier, flat, meter))
    expanded: dict[int, Branch] = {}
    try:
        for front, kids in zip(frontiers, children):
            if not kids:  # the budget gave this frontier nothing: it keeps its beams
                continue
            scored = []
            for c in kids:
                s = next(scores)
                scored.append(Scored(c.with_score(s), s))
                tree.add(scored[-1].branch, score=s, status="open")
            kept = selector.select(scored, front.slots, meter)
            by_id = {s.branch.id: s for s in scored}
            if len(kept) > front.slots or any(b.id not in by_id for b in kept):
                release(proposer, verifier, flat)  # idempotent: kept ones are released again at the end
                raise ValueError(f"selector {selector!r} must return at most k of the branches it was given")
            keep_ids = {b.id for b in kept}
            done = [by_id[b.id] for b in kept if b.finished]
            for s in done:
                tree.add(s.branch, status="final")
            pruned = [s.branch for s in scored if s.branch.id not in keep_ids]
            tree.mark(pruned, "pruned")
            for b in front.beams:
                expanded[b.id] = b
            front.beams = [b for b in kept if not b.finished]
            tree.mark(front.beams, "kept")
            front.finished.extend(done)
            front.slots -= len(done)
            # A finished solution needs only its text and score from here on; its KV goes back now.
            release(proposer, verifier, pruned + [s.branch for s in done])
    finally:
        # Parents go last: selectors may read them (ETS embeds each child's step on its parent's KV).
        release(proposer, verifier, list(expanded.values()))


# A first round that affords fewer tokens than this per child spends the budget on stubs of steps: a RuntimeWarning
# (Python's filter shows each distinct message once, so an eval of like problems says it once).
STARVED_STEP_TOKENS = 8


def run_rounds(frontiers: list[Frontier], expand: int, max_depth: int, proposer, verifier, selector: Selector,
               meter: Meter, tree: Tree) -> None:
    for depth in range(1, max_depth + 1):
        live = [f for f in frontiers if f.fanout(expand)]
        wanted = sum(f.fanout(expand) * len(f.beams) for f in live)
        share = meter.generation_share(wanted)
        if not live or share < 1:
            return
        if depth == 1 and share < STARVED_STEP_TOKENS:
            warnings.warn(f"the first round's {wanted} children can draw only {share} token(s) each within the "
                          f"budget ({meter.budget.tokens} tokens): lower the width (n) or expand, or raise the budget",
                          RuntimeWarning, stacklevel=3)
        children = propose_round(live, expand, proposer, meter)
        if not any(children):
            return
        settle_round(live, children, proposer, verifier, selector, meter, tree)
        tree.history.append({"depth": depth, "beams": [len(f.beams) for f in frontiers],
                             "finished": [len(f.finished) for f in frontiers],
                             "best": max((latest_score(b) for c in children for b in c), default=None)})


def complete_open(best: Branch, proposer, verifier, meter: Meter, tree: Tree) -> Scored:
    """Finish an open branch as far as the budget allows (in place) and score what it became."""
    done = proposer.complete([best], meter)[0]
    if done is best:  # nothing affordable: the branch as it stands
        return Scored(best, latest_score(best) if best.scores else 0.0)
    score = score_or_zero(verifier, [done], meter)[0]
    done = done.with_score(score)
    tree.add(done, score=score, status="final")
    return Scored(done, score)


def conclude(frontiers: list[Frontier], proposer, verifier, meter: Meter, tree: Tree) -> tuple[Scored | None, list]:
    """The best-scored finished solution, else the best open beam completed; and the candidates."""
    finished = [s for f in frontiers for s in f.finished]
    candidates = [{"answer": proposer.answer(s.branch), "score": s.score} for s in finished]
    if finished:
        return finished[rank(finished)[0]], candidates
    open_ = [b for f in frontiers for b in f.beams]
    if not open_:
        return None, candidates
    best = max(open_, key=latest_score)  # ties: the first
    chosen = complete_open(best, proposer, verifier, meter, tree)
    return chosen, [{"answer": proposer.answer(chosen.branch), "score": chosen.score}]


def release_frontiers(frontiers: list[Frontier], proposer, verifier, chosen: Scored | None = None) -> None:
    """Release the open beams (and the chosen branch, which may have been completed in place)."""
    live = {b.id: b for f in frontiers for b in f.beams}
    if chosen is not None:
        live[chosen.branch.id] = chosen.branch
    release(proposer, verifier, list(live.values()))


@dataclass
class Beam:
    """Keep the `n` best steps each round (n: the beam's width); every kept beam proposes `expand` children.

    selector: any object with `select(scored, k, meter)` (default: top-k by the verifier's score),
    e.g. ttc.search.ets.ETSSelector. n=1, expand=1 is greedy step search.
    """

    n: int = 4  # the width: beams kept per round and finished solutions wanted
    expand: int = 4
    max_depth: int = 12
    selector: Selector | None = None
    name: ClassVar[str] = "beam"

    def __post_init__(self):
        if self.n < 1 or self.expand < 1 or self.max_depth < 1:
            raise ValueError("n (the width), expand and max_depth must be at least 1")

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        tree = Tree()
        verifier = bind_verifier(verifier, problem, proposer, meter)
        selector = prepare(self.selector, proposer, verifier, meter)
        root = proposer.start(problem, meter)
        tree.add(root, status="root")
        frontier = Frontier([root], self.n)
        chosen = None
        try:
            run_rounds([frontier], self.expand, self.max_depth, proposer, verifier, selector, meter, tree)
            chosen, candidates = conclude([frontier], proposer, verifier, meter, tree)
            if chosen is None:
                return finish(self.name, problem, proposer, meter, tree, None, None, candidates)
            return finish(self.name, problem, proposer, meter, tree, chosen.branch, chosen.score, candidates)
        finally:
            release_frontiers([frontier], proposer, verifier, chosen)


STRATEGY = Beam
