"""The data that flows through a search, the three node protocols, and the backend capabilities.

Problem -> (Proposer) -> Branches -> (Verifier) -> Scored -> (Selector) -> kept Branches -> ... -> Result.

A Branch is an immutable handle on one partial solution. Its `handle` is the backend's own (the
engine's sequence, whose KV is shared with its ancestors, for the built-in decoder); search and
verifier code never look inside it: they talk to a Proposer and to the capabilities of its Backend
(below), so every strategy and verifier runs unchanged on any backend that has what it needs.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from ttc.budget import Budget, Ledger
from ttc.decoder.sampling import child_seed
from ttc.decoder.sequence import ConfidenceStop  # propose's stop_when (EARLY_STOP): plain data, re-exported here

_ids = itertools.count(1)


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: Any  # text, or chat messages [{"role", "content"}]
    answer: str | None = None  # reference answer (graders only: never shown to verifiers)
    tests: str | None = None  # for code problems
    metadata: dict = field(default_factory=dict)


def as_problem(problem) -> Problem:
    """A Problem from a Problem, a question string (asked as a user message) or a dict of Problem fields."""
    if isinstance(problem, Problem):
        return problem
    if isinstance(problem, str):
        return Problem(id="problem", prompt=[{"role": "user", "content": problem}])
    if isinstance(problem, dict):
        return Problem(**problem)
    raise TypeError("a problem is a ttc.Problem, a question string, or a dict of Problem fields")


@dataclass(frozen=True)
class Step:
    """What a proposer added to a branch: up to a stop pattern, a token limit, or end of sequence."""

    text: str
    token_ids: tuple[int, ...]
    logprob: float  # sum of the step's token logprobs
    # "step" (stop pattern), "eos" (the solution ended), "length", or "stopped" (a stop_when rule ended it
    # mid-generation: not a solution, and its KV is already released)
    finish_reason: str
    # each token's confidence (DeepConf's: minus the mean of the top-k logprobs where it was drawn), recorded
    # by a backend with TOKEN_CONFIDENCE; () elsewhere
    confidences: tuple[float, ...] = ()


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

    @property
    def confidences(self) -> tuple[float, ...]:
        """Every generated token's confidence, first step first (() where the backend records none)."""
        return tuple(c for s in self.steps for c in s.confidences)

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
        self.reserved = 0.0  # tokens held back for work already promised (see `reserving`)

    def affordable_tokens(self) -> float:
        if not self.budget.can_afford(self.ledger):
            return 0
        return max(0.0, self.budget.remaining_tokens(self.ledger) - self.reserved)

    @contextlib.contextmanager
    def reserving(self, tokens: float):
        """Hold `tokens` back from `affordable_tokens` (and so from generation shares) inside the block: a
        strategy that proposes in several calls keeps what the later calls' children will need."""
        self.reserved += tokens
        try:
            yield self
        finally:
            self.reserved -= tokens

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


def problem_seed(problem_id: str, seed: int) -> int:
    """A stable per-problem seed (Python's hash() is salted per process)."""
    return child_seed(seed, zlib.crc32(str(problem_id).encode()))


AnswerFn = Callable[[str], "str | None"]  # a solution's text -> its final answer (injected, per dataset)


@runtime_checkable
class Proposer(Protocol):
    """What every strategy may ask of the node that writes solutions. Nothing else.

    `backend` is the model behind it: verifiers and selectors that need more than text (logprobs of a
    continuation, hidden states) ask the backend for those capabilities (see `Backend`)."""

    backend: Any

    def start(self, problem: Problem, meter: Meter) -> Branch:
        """The root branch: the problem's prompt, prefilled (or found in the prefix cache)."""

    def propose(self, branches: list[Branch], n: int, meter: Meter, to_end: bool = False,
                stop_when: ConfidenceStop | None = None) -> list[Branch]:
        """Extend: n children per unfinished branch, each one step longer (with to_end: finished), all in
        one batched decode. Children a budget cannot pay for are not returned.

        stop_when (only on a backend with EARLY_STOP): a child whose last `window` token confidences average
        below the threshold is stopped inside the decode; it comes back finished, its step's finish_reason
        "stopped", its KV already released (release() on it is a no-op)."""

    def complete(self, branches: list[Branch], meter: Meter) -> list[Branch]:
        """Extend each unfinished branch in place (no fork) to the end of its solution."""

    def fork(self, branches: list[Branch], copies: list[int], meter: Meter) -> list[list[Branch]]:
        """Resampling: copies[i] more particles on branches[i], each the same node (id, seed, steps,
        scores) on its own handle, sharing the original's KV where the backend has KV to share."""

    def release(self, branches: list[Branch]) -> None:
        """Return the branches' KV to the pool (their descendants keep what they share)."""

    def answer(self, branch: Branch) -> str | None:
        """The final answer a finished branch states, by the injected answer extractor."""

    def with_temperature(self, temperature: float) -> "Proposer":
        """The same proposer (backend, seeds, settings) sampling at another temperature (0: greedy)."""


# -- backend capabilities ---------------------------------------------------------------------------

LOGPROBS = "logprobs"  # logprobs of given continuation tokens, and the next-token distribution after them
HIDDEN_STATES = "hidden_states"  # final hidden states at the tokens of a continuation / a branch's latest step
SHARED_KV = "shared_kv"  # fork shares KV blocks (resampling and scratch forks cost no recomputation)
TOKEN_CONFIDENCE = "token_confidence"  # every generated Step carries its tokens' confidences (Step.confidences)
EARLY_STOP = "early_stop"  # propose(..., stop_when=ConfidenceStop) stops a sample mid-generation and frees its KV

CAPABILITY_WORDS = {LOGPROBS: "logprobs of a continuation", HIDDEN_STATES: "hidden states",
                    SHARED_KV: "shared KV", TOKEN_CONFIDENCE: "per-token confidences of its samples",
                    EARLY_STOP: "stopping a sample mid-generation"}


class MissingCapability(RuntimeError):
    """A verifier or strategy needs something its backend does not provide (one line, says which)."""


@dataclass(frozen=True)
class ContinuationScore:
    """What a backend reports for given tokens appended to a branch (nothing is sampled)."""

    logprobs: Any  # (n,) float tensor: each given token's logprob (None when only hidden states were asked)
    last_logprobs: Any  # (V,) float tensor: the next-token log-distribution after the last given token (or None)
    hidden: Any = None  # (n, H) float tensor, with HIDDEN_STATES, when asked for


@runtime_checkable
class Backend(Protocol):
    """A model a proposer runs on: the built-in engine (ttc.backends.local) or a server.

    name: the model's name; tokenizer: ttc's Tokenizer (encode, decode, encode_prompt, hf);
    capabilities: which of LOGPROBS, HIDDEN_STATES, SHARED_KV, TOKEN_CONFIDENCE, EARLY_STOP it has."""

    name: str
    capabilities: frozenset

    def score_continuations(self, items: Sequence[tuple[Branch, Sequence[int]]], meter: Meter,
                            hidden: bool = False, batch_size: int = 64,
                            logprobs: bool = True) -> list[ContinuationScore]:
        """Logprobs (and hidden states) of each item's tokens appended to its branch, charged to the
        meter's ledger as verifier tokens; the branches themselves are unchanged. `logprobs=False` with
        `hidden=True`: hidden states only (a probe's need; a backend may then skip the vocabulary head)."""

    def holds_context(self, branch: Branch) -> bool:
        """Whether a continuation can still be scored after this branch (its KV was not released)."""

    def prompt_ids(self, branch: Branch) -> list[int]:
        """The token ids of the rendered prompt the branch grew from."""


def backend_of(model) -> Any:
    """The backend of a ttc Model (its `.backend`), or the object itself if it is a backend already."""
    return getattr(model, "backend", model)


def require(backend, capability: str, who: str) -> None:
    """Fail with one clear line unless `backend` has `capability`; `who` is e.g. "verifier=probe"."""
    if capability not in getattr(backend, "capabilities", frozenset()):
        kind = getattr(backend, "kind", type(backend).__name__)
        raise MissingCapability(f"{who} needs {CAPABILITY_WORDS.get(capability, capability)}, which the {kind} "
                                "backend does not provide")


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
