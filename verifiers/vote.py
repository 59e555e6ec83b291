"""Voting over answers grouped by mathematical equivalence (not string equality)."""

from __future__ import annotations

from dataclasses import dataclass

from ttc.verifiers.math import group_equivalent


@dataclass(frozen=True)
class Vote:
    winner: int | None  # index of the representative answer of the winning group (None: no answers)
    groups: list[int]  # group id per answer (-1 for no answer)
    totals: dict[int, float]  # group id -> total weight
    counts: dict[int, int]  # group id -> number of answers

    def margin(self) -> float:
        """Winning total minus the runner-up's (how settled the vote is)."""
        ranked = sorted(self.totals.values(), reverse=True)
        return ranked[0] - (ranked[1] if len(ranked) > 1 else 0.0) if ranked else 0.0


def vote(answers: list[str | None], weights: list[float] | None = None, groups: list[int] | None = None) -> Vote:
    """Majority (or weighted) vote; ties go to the group whose first member came first. groups: the answers'
    `group_equivalent`, when the caller votes on the same answers several times (it is the slow part)."""
    weights = weights if weights is not None else [1.0] * len(answers)
    groups = group_equivalent(answers) if groups is None else groups
    totals: dict[int, float] = {}
    counts: dict[int, int] = {}
    first: dict[int, int] = {}
    for i, (g, w) in enumerate(zip(groups, weights)):
        if g < 0:
            continue
        totals[g] = totals.get(g, 0.0) + w
        counts[g] = counts.get(g, 0) + 1
        first.setdefault(g, i)
    if not totals:
        return Vote(None, groups, totals, counts)
    best = max(totals, key=lambda g: (totals[g], -first[g]))
    return Vote(first[best], groups, totals, counts)


def heaviest_group_best(answers: list[str | None], weights: list[float],
                        groups: list[int] | None = None) -> int | None:
    """The highest-weighted member of the answer group with the largest summed weight (ties: the first); None
    when no answer is stated. A weighted best-of-n's choice (ttc.search.best_of_n, the selector panel).
    groups: as for `vote`."""
    v = vote(answers, weights, groups)
    if v.winner is None:
        return None
    members = [i for i, g in enumerate(v.groups) if g == v.groups[v.winner]]
    return max(members, key=lambda i: weights[i])
