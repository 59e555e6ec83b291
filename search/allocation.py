"""Allocation: how a dataset-wide token budget is split across problems. Allocators are strategies over
strategies: Uniform runs the configured strategy under its share; AdaptiveStop and Difficulty draw whole
solutions in rounds and answer through self-consistency's vote (`majority`) or best-of-n's choice
(`best_scored`), never a vote of their own.

    pool = Pool(total=8192 * len(problems), problems=len(problems))
    allocator = AdaptiveStop(round_size=2, max_samples=16)
    for problem in problems:
        result, given = allocator.solve(problem, proposer, verifier, strategy, pool)

A `Pool` holds the dataset's tokens. Every allocator asks it for a per-problem cap (never more than
what is left), runs the problem under `Budget(tokens=cap)` (so the problem's ledger never exceeds
the cap), and charges the pool what the ledger shows as spent. Hence the sum of the per-problem
ledgers' `total_tokens` never exceeds `pool.total`. The pool's state is a pure function of the
finished records (`Pool.from_records`), so a resumed run continues where it stopped.

Allocators (plain objects; also Hydra `_target_`s in configs/allocation/):
- `Uniform`: total / problems for every problem; what a problem leaves unspent is not passed on
  (the fixed-budget baseline), and the configured strategy runs under that budget.
- `AdaptiveStop`: samples whole solutions in rounds and stops once the vote is decided; what it
  leaves unspent returns to the pool, so later problems' fair share grows.
- `Difficulty`: a cheap first pass estimates difficulty (vote agreement, and verifier scores when
  there is a verifier) and a small table says, per band, how to continue and how much to allow;
  `fit_table` learns that table on training problems.

Every `solve(problem, proposer, verifier, strategy, pool, ledger=None)` returns `(Result, given_tokens)`
and charges the pool (also when the problem fails: the ledger's work is charged all the same);
`last_given` holds the cap of the latest problem, for the records of failed problems.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ttc.budget import Budget, CannotAttempt, Ledger
from ttc.graph import Meter, Problem
from ttc.result import Result, Tree
from ttc.search.best_of_n import best_scored
from ttc.search.common import bind_verifier, score_or_zero, verifier_cost
from ttc.search.self_consistency import majority
from ttc.verifiers.vote import vote

__all__ = ["Pool", "PoolOverdrawn", "Uniform", "AdaptiveStop", "Difficulty", "DEFAULT_TABLE", "fit_table", "OBJECTIVES",
           "record_tokens", "BANDS"]

class PoolOverdrawn(RuntimeError):
    """A problem spent more than the pool held (a bug: every problem runs under a cap the pool can pay)."""


def record_tokens(record: dict) -> int:
    """The computed tokens a results.jsonl record spent (its ledger's total_tokens)."""
    return int(Ledger.from_record(record).total_tokens)


@dataclass
class Pool:
    """A dataset-wide token budget: `total` tokens for `problems` problems; `spent` and `done` so far.

    Problems solved at the same time (the eval runner's `concurrency`) each open a ticket: a grant
    made under a ticket is held (not available to the others) until the problem is charged, so
    concurrent caps can never add up to more than the pool. Without tickets (one problem at a time)
    grants hold nothing. Thread-safe."""

    total: int
    problems: int
    spent: int = 0
    done: int = 0
    # Every problem after this one keeps at least this fraction of the uniform share, so generous
    # early problems cannot starve the last ones (found on the tiny model with cap_factor 3).
    reserve_fraction: float = 0.25
    concurrency: int = 1  # problems solved at once (the eval runner's `concurrency`)
    held: int = field(default=0, init=False)  # caps granted to problems in flight, not yet charged
    _holds: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # ticket -> cap held
    _next_ticket: int = field(default=0, init=False, repr=False, compare=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.total is None or self.total < 0:
            raise ValueError(f"a pool needs a non-negative total of tokens, got {self.total!r}")
        if self.problems < 1:
            raise ValueError(f"a pool is for at least one problem, got {self.problems!r}")

    @property
    def remaining(self) -> int:
        """Tokens neither spent nor held by a problem in flight."""
        return max(0, self.total - self.spent - self.held)

    @property
    def left(self) -> int:
        """Problems neither charged nor in flight."""
        return max(0, self.problems - self.done - len(self._holds))

    def open(self) -> int:
        """A ticket for a problem about to start (pass it to fair_share, grant and charge)."""
        with self._lock:
            self._next_ticket += 1
            self._holds[self._next_ticket] = 0
            return self._next_ticket

    def fair_share(self, ticket: int | None = None) -> int:
        """What is left, split evenly over the problems left, this one included (grows when earlier
        problems spent less)."""
        with self._lock:
            own = self._holds.get(ticket, 0)
            return (self.remaining + own) // max(1, self.left + (ticket in self._holds))

    def grant(self, tokens: float, ticket: int | None = None) -> int:
        """A cap of `tokens`, cut to what is left after reserving the later problems' minimum shares:
        an allocation never exceeds the pool and never eats into what the problems after it need.
        Under a ticket, the problem's hold becomes the larger of its previous hold and this cap."""
        with self._lock:
            floor_share = int(self.reserve_fraction * self.total / self.problems)
            own = self._holds.get(ticket, 0)
            later = self.left if ticket in self._holds else max(0, self.left - 1)
            # with other problems in flight, take at most an equal split of what is free (one at a
            # time, the split is everything), so the first to ask cannot starve the others
            in_flight_others = len(self._holds) - (ticket in self._holds)
            split = max(1 + in_flight_others, min(self.concurrency, self.problems - self.done))
            free = (self.remaining - later * floor_share) // split
            cap = int(max(0, min(int(tokens), free + own)))
            if ticket in self._holds and cap > own:
                self._holds[ticket] = cap
                self.held += cap - own
            return cap

    def charge(self, tokens: int, ticket: int | None = None) -> None:
        """One problem finished having spent `tokens` (its ledger's total_tokens); its hold is released."""
        tokens = int(tokens)
        with self._lock:
            own = self._holds.get(ticket, 0)
            if tokens > self.remaining + own:
                raise PoolOverdrawn(f"a problem spent {tokens} tokens with only {self.remaining + own} of "
                                    f"{self.total} left")
            if ticket in self._holds:
                del self._holds[ticket]
                self.held -= own
            self.spent += tokens
            self.done += 1

    @classmethod
    def from_records(cls, total: int, problems: int, records: Iterable[dict]) -> "Pool":
        """The pool as it stands after the finished `records` (results.jsonl records with ledger fields)."""
        pool = cls(total=int(total), problems=int(problems))
        for record in records:
            pool.charge(record_tokens(record))
        return pool


# --- shared machinery --------------------------------------------------------------------------

class _Allocator:
    name = "allocator"
    last_given: int = 0

    def _run(self, problem: Problem, pool: Pool, ledger: Ledger | None, cap: int, body,
             ticket: int | None = None) -> tuple[Result, int]:
        """Run `body(meter)` under `Budget(tokens=cap)`; charge the pool what the ledger spent, always."""
        self.last_given = cap
        meter = Meter(Budget(tokens=cap), ledger)
        started = time.perf_counter()
        try:
            result = body(meter)
        finally:
            meter.ledger.charge_wall(time.perf_counter() - started)
            self.last_given = int(meter.budget.tokens)  # body may raise the cap (Difficulty)
            pool.charge(meter.ledger.total_tokens, ticket)
        return result, self.last_given


@dataclass
class _Draws:
    """The whole solutions a problem has drawn so far, in order, with their answers and verifier scores (None
    where unscored), each also a final node of `tree`."""

    tree: Tree
    samples: list = field(default_factory=list)
    answers: list = field(default_factory=list)
    scores: list = field(default_factory=list)

    def add(self, proposer, new: list, scores: list) -> None:
        for b, s in zip(new, scores):
            self.tree.add(b, score=s, status="final")
        self.samples.extend(new)
        self.answers.extend(proposer.answer(b) for b in new)
        self.scores.extend(scores)


@dataclass(frozen=True)
class _Rounds:
    """When drawing rounds stops (`_sample_rounds`): `round_size` samples a round, at most `max_samples`; the
    leader's share reaching `confidence` (after 2 rounds, if set); a score reaching `verified` (if set)."""

    round_size: int
    max_samples: int
    confidence: float | None = None
    verified: float | None = None


def _sample_rounds(proposer, root, meter: Meter, verifier, draws: _Draws, rule: _Rounds, rounds_done: int = 0) -> str:
    """Draw rounds of `rule.round_size` whole solutions from `root` into `draws`, voting after each, until the
    vote is decided, the leader's share reaches `rule.confidence` (after at least 2 rounds), a sample's verifier
    score reaches `rule.verified` (if set), `rule.max_samples` are drawn, or the meter cannot pay another round.
    Returns why it stopped."""
    if verifier is not None:
        meter.verifier_cost = verifier_cost(verifier)
    cost_per_sample = _cost_per_sample(draws.tree)
    rounds = rounds_done
    samples, answers, scores = draws.samples, draws.answers, draws.scores
    while True:
        if samples:
            if rule.verified is not None and any(x is not None and x >= rule.verified for x in scores):
                return "verified"
            v = vote(answers)
            ranked = sorted(v.counts.values(), reverse=True)
            leader, runner_up = (ranked + [0, 0])[:2]
            left = rule.max_samples - len(samples)
            if leader - runner_up > left:
                return "decided"
            if rule.confidence is not None and rounds >= 2 and leader / len(samples) >= rule.confidence:
                return "confident"
            if left <= 0:
                return "max_samples"
        n = min(rule.round_size, rule.max_samples - len(samples))
        if n < 1:
            return "max_samples"
        if cost_per_sample and meter.affordable_tokens() < n * cost_per_sample:
            return "cap"
        before = meter.ledger.total_tokens
        new = proposer.propose([root], n, meter, to_end=True)
        if not new:
            return "cap"
        new_scores = score_or_zero(verifier, new, meter) if verifier is not None else [None] * len(new)
        rounds += 1
        spent = meter.ledger.total_tokens - before
        cost_per_sample = max(cost_per_sample, math.ceil(spent / len(new)))
        draws.add(proposer, new, new_scores)
        draws.tree.history.append({"round": rounds, "samples": len(samples), "tokens": meter.ledger.total_tokens,
                                   "cost_per_sample": cost_per_sample,
                                   "votes": sorted(vote(answers).counts.values(), reverse=True)})
        if len(new) < n:  # the budget could pay only part of the round
            return "cap"


def _cost_per_sample(tree: Tree) -> int:
    return max((h.get("cost_per_sample", 0) for h in tree.history), default=0)


def _decide(name: str, problem: Problem, proposer, meter: Meter, draws: _Draws, by_score: bool = False,
            weighted: bool = False) -> Result:
    """Answer from the samples drawn: best-of-n's choice (by_score: the highest verifier score; weighted:
    the score-weighted vote) when every sample was scored, else self-consistency's majority vote."""
    samples, answers, scores, tree = draws.samples, draws.answers, draws.scores, draws.tree
    if (by_score or weighted) and samples and all(x is not None for x in scores):
        return best_scored(name, problem, proposer, meter, tree, samples, answers, scores, weighted=not by_score)
    return majority(name, problem, proposer, meter, tree, samples, answers)


# --- the allocators ----------------------------------------------------------------------------

@dataclass
class Uniform(_Allocator):
    """The fixed-budget baseline: every problem gets total / problems tokens and runs the configured
    strategy under that budget; tokens a problem leaves unspent are not given to later problems."""

    name = "uniform"

    def share(self, pool: Pool) -> int:
        return pool.total // pool.problems

    def solve(self, problem: Problem, proposer, verifier, strategy, pool: Pool,
              ledger: Ledger | None = None) -> tuple[Result, int]:
        ticket = pool.open()
        return self._run(problem, pool, ledger, pool.grant(self.share(pool), ticket),
                         lambda meter: strategy(problem, proposer, verifier, meter), ticket)


@dataclass
class AdaptiveStop(_Allocator):
    """Sample whole solutions `round_size` at a time from one root (its prompt prefilled once) and vote
    after each round; stop once the leader cannot be overtaken by the samples still allowed
    (leader - runner-up > max_samples - drawn), or the leader's share reaches `confidence` (if set)
    after at least 2 rounds, or the problem's cap, min(fair share x cap_factor, what is left), cannot
    pay another round. What is left unspent returns to the pool. The strategy argument is not used.
    With a verifier: `verified` also stops once a sample's score reaches it, and `weighted` answers by
    the score-weighted vote (best-of-n's) instead of the plain one."""

    round_size: int = 2
    max_samples: int = 16
    confidence: float | None = None
    cap_factor: float = 4.0
    verified: float | None = None
    weighted: bool = False
    name = "adaptive_stop"

    def solve(self, problem: Problem, proposer, verifier, strategy, pool: Pool,
              ledger: Ledger | None = None) -> tuple[Result, int]:
        ticket = pool.open()
        cap = pool.grant(pool.fair_share(ticket) * self.cap_factor, ticket)

        def body(meter: Meter) -> Result:
            draws = _Draws(Tree())
            bound = bind_verifier(verifier, problem, proposer, meter)
            root = proposer.start(problem, meter)
            draws.tree.add(root, status="root")
            rule = _Rounds(self.round_size, self.max_samples, self.confidence,
                           verified=self.verified if bound is not None else None)
            try:
                why = _sample_rounds(proposer, root, meter, bound, draws, rule)
                draws.tree.history.append({"stopped": why})
                return _decide(self.name, problem, proposer, meter, draws, weighted=self.weighted)
            finally:
                proposer.release([root, *draws.samples])

        return self._run(problem, pool, ledger, cap, body, ticket)


BANDS = ("easy", "medium", "hopeless")

# The default table (not fitted; a reasonable prior): easy and hopeless problems answer after the first
# pass and return the rest of their share to the pool; medium problems continue by adaptive stopping
# with twice AdaptiveStop's default cap. Replace it with `fit_table(...)` on training problems.
DEFAULT_TABLE: dict[str, dict] = {
    "easy": {"strategy": "self_consistency", "cap_factor": 0.0},
    "medium": {"strategy": "self_consistency", "cap_factor": 8.0},
    "hopeless": {"strategy": "self_consistency", "cap_factor": 0.0},
}
STRATEGIES = ("self_consistency", "best_of_n")


@dataclass
class Difficulty(_Allocator):
    """Difficulty-aware allocation (after "Scaling LLM Test-Time Compute Optimally").

    A first pass of `first_pass` whole solutions, under the fair share, gives the band:
      - hopeless: no extractable answer, or every answer different while the verifier's best score is
        below `hopeless_score` (without a verifier, all-different counts as hopeless);
      - easy: every sample answers and all answers agree (and, with a verifier, their mean score is at
        least `easy_score`);
      - medium: the rest.
    The band's table entry {"strategy", "cap_factor"} says how to go on: the cap becomes
    min(fair share x cap_factor, what is left) (0: answer now), and rounds of `round_size` samples
    continue with adaptive stopping; "self_consistency" answers by the vote, "best_of_n" by the
    verifier's best score (the vote without a verifier); with `weighted` and a verifier, "self_consistency"
    answers by the score-weighted vote instead (AdaptiveStop's `weighted`). `table` defaults to DEFAULT_TABLE;
    `train` ({"problems": 16, "tokens_per_problem": null}) asks the eval runner to fit the table on the
    dataset's training split (never the evaluated problems) with `fit_table` before the run.
    """

    first_pass: int = 4
    table: dict | None = None
    round_size: int = 2
    max_samples: int = 16
    confidence: float | None = None
    easy_score: float = 0.5
    hopeless_score: float = 0.3
    weighted: bool = False
    train: dict | None = None
    name = "difficulty"
    last_band: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        table = {**DEFAULT_TABLE, **(self.table or {})}
        for band, entry in table.items():
            if band not in BANDS or entry.get("strategy") not in STRATEGIES or float(entry.get("cap_factor", -1)) < 0:
                raise ValueError(f"difficulty table entry {band}: {entry!r}; bands are {BANDS}, strategies "
                                 f"{STRATEGIES}, cap_factor >= 0")
        self.table = {b: {"strategy": e["strategy"], "cap_factor": float(e["cap_factor"])} for b, e in table.items()}

    def band(self, answers: list[str | None], scores: list[float | None] | None = None) -> str:
        """easy / medium / hopeless from the first pass's answers (and verifier scores, if any)."""
        v = vote(answers)
        scored = [s for s in (scores or []) if s is not None]
        if v.winner is None:
            return "hopeless"
        if len(v.counts) == 1 and all(g >= 0 for g in v.groups):
            if not scored or sum(scored) / len(scored) >= self.easy_score:
                return "easy"
            return "medium"
        if len(answers) > 1 and all(c == 1 for c in v.counts.values()) and len(v.counts) == len(answers):
            if not scored or max(scored) < self.hopeless_score:
                return "hopeless"
        return "medium"

    def solve(self, problem: Problem, proposer, verifier, strategy, pool: Pool,
              ledger: Ledger | None = None) -> tuple[Result, int]:
        ticket = pool.open()
        share = pool.fair_share(ticket)
        first_cap = pool.grant(share, ticket)

        def body(meter: Meter) -> Result:
            draws = _Draws(Tree())
            bound = bind_verifier(verifier, problem, proposer, meter)
            if bound is not None:
                meter.verifier_cost = verifier_cost(bound)
            root = proposer.start(problem, meter)
            draws.tree.add(root, status="root")
            try:
                before = meter.ledger.total_tokens
                first = proposer.propose([root], self.first_pass, meter, to_end=True)
                scores = score_or_zero(bound, first, meter) if bound is not None else [None] * len(first)
                draws.add(proposer, first, scores)
                band = self.last_band = self.band(draws.answers, draws.scores)
                entry = self.table[band]
                cost = math.ceil((meter.ledger.total_tokens - before) / len(first)) if first else 0
                draws.tree.history.append({"round": 1, "band": band, "samples": len(first), "cost_per_sample": cost,
                                           "tokens": meter.ledger.total_tokens, **entry})
                cap = pool.grant(share * entry["cap_factor"], ticket)
                if cap > meter.budget.tokens:
                    meter.budget = Budget(tokens=cap)
                why = "answered"
                if entry["cap_factor"] > 0 and first:
                    why = _sample_rounds(proposer, root, meter, bound, draws,
                                         _Rounds(self.round_size, self.max_samples, self.confidence), rounds_done=1)
                draws.tree.history.append({"stopped": why})
                by_score = entry["strategy"] == "best_of_n" and bound is not None
                return _decide(self.name, problem, proposer, meter, draws, by_score=by_score,
                               weighted=self.weighted and not by_score)
            finally:
                proposer.release([root, *draws.samples])

        self.last_band = None
        return self._run(problem, pool, ledger, first_cap, body, ticket)


# --- learning the table ------------------------------------------------------------------------

DEFAULT_OPTIONS = tuple({"strategy": s, "cap_factor": f} for s in STRATEGIES for f in (0.0, 2.0, 4.0, 8.0))


def accuracy_per_token(accuracy: float, mean_tokens: float) -> float:
    """The cheapest way to be right: favours answering after the first pass unless more samples pay off
    in proportion to what they cost."""
    return accuracy / max(1.0, mean_tokens)


def accuracy_only(accuracy: float, mean_tokens: float) -> float:
    """The most accurate option (fit_table breaks ties by the cheaper): for a budget that is there to
    be spent where it changes answers."""
    return accuracy


OBJECTIVES = {"accuracy_per_token": accuracy_per_token, "accuracy": accuracy_only}


def fit_table(problems: list[Problem], proposer, grade_fn: Callable[[Problem, str | None], bool], verifier=None,
              tokens_per_problem: int = 4096, options: Iterable[dict] | None = None,
              objective: Callable[[float, float], float] = accuracy_per_token, concurrency: int = 1,
              **difficulty_kwargs) -> dict:
    """Learn Difficulty's table on TRAINING problems (never the evaluated ones).

    Every option ({"strategy", "cap_factor"}; default: both strategies x cap factors 0, 2, 4, 8, and
    best_of_n only with a verifier) is tried on every problem, as if the problem were early in a run
    whose fair share is `tokens_per_problem`; each band keeps the option with the best
    `objective(accuracy, mean computed tokens)` over that band's problems (default: accuracy per
    token; ties: the more accurate, then the cheaper). Bands no training problem fell in keep
    DEFAULT_TABLE's entry. proposer: a proposer, or a callable returning a fresh one per problem.
    grade_fn(problem, answer) -> bool. Returns the table; `fit_table.last_stats` holds the trials and
    `fit_table.last_ledger` their summed ledger: the fitting's cost, which a run reports as its own.
    concurrency > 1 tries that many problems at once in threads (the proposer factory's model should
    then be a ttc.backends.local.SharedModel, one batched backend for the threads); the table does not
    depend on it.
    """
    options = [dict(o) for o in (options or DEFAULT_OPTIONS)
               if verifier is not None or o["strategy"] != "best_of_n"]
    horizon = int(math.ceil(max(o["cap_factor"] for o in options))) + 1
    make = proposer if not hasattr(proposer, "start") else (lambda: proposer)
    spent: list[Ledger] = []  # every trial's ledger (list.append is atomic under threads)

    def trials(problem: Problem) -> list[tuple[str, int, bool, int]]:
        """(band, option index, correct, tokens) of every option on one problem."""
        out = []
        for i, option in enumerate(options):
            allocator = Difficulty(table={b: option for b in BANDS}, **difficulty_kwargs)
            pool = Pool(total=tokens_per_problem * horizon, problems=horizon)
            ledger = Ledger()
            try:
                result, _ = allocator.solve(problem, make(), verifier, None, pool, ledger=ledger)
                correct = bool(grade_fn(problem, result.answer))
            except CannotAttempt:  # the option cannot attempt this problem
                correct = False
            spent.append(ledger)
            out.append((allocator.last_band or "hopeless", i, correct, ledger.total_tokens))
        return out

    if concurrency > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=concurrency) as workers:
            per_problem = list(workers.map(trials, problems))
    else:
        per_problem = [trials(problem) for problem in problems]
    stats: dict[str, dict[int, list[tuple[bool, int]]]] = {b: {} for b in BANDS}
    for rows in per_problem:  # in problem order, whatever the concurrency
        for band, i, correct, tokens in rows:
            stats[band].setdefault(i, []).append((correct, tokens))
    table = {b: dict(e) for b, e in DEFAULT_TABLE.items()}
    for band, by_option in stats.items():
        if not by_option:
            continue

        def key(i):
            trials = by_option[i]
            acc = sum(c for c, _ in trials) / len(trials)
            tokens = sum(t for _, t in trials) / len(trials)
            return (objective(acc, tokens), acc, -tokens)

        table[band] = dict(options[max(by_option, key=key)])
    fit_table.last_stats = {b: {options[i]["strategy"] + f"x{options[i]['cap_factor']:g}": v for i, v in d.items()}
                            for b, d in stats.items()}
    fit_table.last_ledger = Ledger.sum(spent)
    return table
