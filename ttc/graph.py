"""The data that flows through a search and the three node protocols.

Problem -> (Proposer) -> Branches -> (Verifier) -> Scored -> (Selector) -> kept Branches -> ... -> Result.

A Branch is an immutable handle on one partial solution. Its `handle` is the engine's sequence, whose
KV is shared with its ancestors; search code manipulates branches, never block tables or strings.
Text appears only at the edges (prompting and answer extraction).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from ttc.budget import Budget, Ledger

_ids = itertools.count(1)


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: Any  # text, or chat messages [{"role", "content"}]
    answer: str | None = None  # reference answer (graders only: never shown to verifiers)
    tests: str | None = None  # for code problems
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """What a proposer added to a branch: up to a stop pattern, a token limit, or end of sequence."""

    text: str
    token_ids: tuple[int, ...]
    logprob: float  # sum of the step's token logprobs
    finish_reason: str  # "step" (stop pattern), "eos" (the solution ended) or "length"


@dataclass(frozen=True, eq=False)
class Branch:
    """One partial solution. `handle` is backend-specific (the engine's Sequence for the built-in decoder)."""

    handle: Any
    steps: tuple[Step, ...] = ()
    parent: "Branch | None" = None
    scores: tuple[float, ...] = ()  # one process score per step, when a verifier gave them
    finished: bool = False
    seed: int = 0
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def depth(self) -> int:
        return len(self.steps)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)

    @property
    def logprob(self) -> float:
        return sum(s.logprob for s in self.steps)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.steps)

    def child(self, handle, step: Step, seed: int, finished: bool) -> "Branch":
        return Branch(handle=handle, steps=self.steps + (step,), parent=self, scores=self.scores,
                      finished=finished, seed=seed)

    def with_score(self, score: float) -> "Branch":
        """The same branch with its latest step's process score recorded."""
        return replace(self, scores=self.scores[: self.depth - 1] + (score,), id=self.id)


@dataclass(frozen=True)
class Scored:
    branch: Branch
    score: float  # the verifier's score of the branch as it stands (outcome or latest step)


class Meter:
    """A budget and the ledger charged against it, passed to every node.

    Nodes charge the ledger through the engine (every sequence carries it). `affordable_tokens`
    tells a node how many more computed tokens it may spend, so it can shrink its request and the
    budget is never exceeded.
    """

    def __init__(self, budget: Budget | None = None, ledger: Ledger | None = None):
        self.budget = budget or Budget()
        self.ledger = ledger if ledger is not None else Ledger()
        # What scoring one new branch will cost: fixed tokens per branch plus tokens per generated
        # token. Strategies set it from their verifier so proposals leave room for the scoring.
        self.verifier_cost: tuple[float, float] = (0.0, 0.0)

    def affordable_tokens(self) -> float:
        if not self.budget.can_afford(self.ledger):
            return 0
        return self.budget.remaining_tokens(self.ledger)

    def generation_share(self, children: int) -> int:
        """Tokens each of `children` new branches may generate, leaving room to verify them all."""
        if children < 1:
            return 0
        fixed, per_token = self.verifier_cost
        free = self.affordable_tokens() - fixed * children
        if free == float("inf"):
            return 1 << 30
        return max(0, int(free // (children * (1.0 + per_token))))

    def check(self, tokens: int) -> None:
        """Raise BudgetExceeded unless `tokens` more computed tokens fit in the budget."""
        self.budget.check(self.ledger, tokens)

    def can_afford(self, tokens: int) -> bool:
        return self.budget.can_afford(self.ledger, tokens=tokens)

    @property
    def fraction_spent(self) -> float:
        if self.budget.tokens is None:
            return 0.0
        return min(1.0, self.ledger.total_tokens / max(1, self.budget.tokens))


@runtime_checkable
class Proposer(Protocol):
    def start(self, problem: Problem, meter: Meter) -> Branch:
        """The root branch: the problem's prompt, prefilled (or found in the prefix cache)."""

    def propose(self, branches: list[Branch], n: int, meter: Meter) -> list[Branch]:
        """n children per branch, each extended by one step, all in one batched decode."""

    def complete(self, branches: list[Branch], meter: Meter) -> list[Branch]:
        """Extend each branch to the end of its solution (no step stops)."""

    def release(self, branches: list[Branch]) -> None:
        """Return the branches' KV to the pool (their descendants keep what they share)."""

    def answer(self, branch: Branch) -> str | None:
        """The final answer a finished branch states, extracted from its text."""


@runtime_checkable
class Verifier(Protocol):
    def score(self, branches: list[Branch], meter: Meter) -> list[float]:
        """One score per branch, higher is better; process verifiers score the latest step."""


@runtime_checkable
class Selector(Protocol):
    def select(self, scored: list[Scored], k: int, meter: Meter) -> list[Branch]:
        """The branches to keep (at most k); the caller releases the rest."""


def softmax(xs: list[float], temperature: float = 1.0) -> list[float]:
    if not xs:
        return []
    t = max(temperature, 1e-8)
    m = max(xs)
    e = [math.exp((x - m) / t) for x in xs]
    s = sum(e)
    return [v / s for v in e]
