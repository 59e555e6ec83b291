"""verifier=execution: score sampled programs by running them, in the sandbox, on tests the prompt shows
and on tests the policy writes itself (CodeT).

Per problem (`for_problem`, which every strategy calls through `ttc.search.common.bind_verifier`):
- shown tests: only what the prompt shows (`ttc.verifiers.code.shown_tests`: its asserts, its docstring
  examples). Never `Problem.tests`, the grader's: the verifier cannot run a test the model was not shown.
- generated tests: `generated_tests` asserts about the entry point, parsed from `test_samples` replies of
  the policy to a prompt asking for tests (through the Proposer protocol, on a side meter whose work is
  charged to the problem's ledger as verifier tokens; within the problem's budget, before any program
  is sampled).

Scoring a finished branch: its program (`ttc.verifiers.code.program_for` of the proposer's extracted code)
runs once, in one sandbox, against every test (`run_cases`); results are kept per program text. With
k of the S shown tests passed and a dual-agreement share d in [0, 1],

    every shown test passed (k = S > 0):  score = (1 + w * d) / (1 + w)      (1 without generated tests)
    some failed (k < S):                  score = partial * (k + w * d) / (S + w)   (partial * k / S)
    nothing shown (S = 0):                score = d                            (`neutral`)

w = agreement_weight < 1, so one more shown test passed always ranks higher; partial (0.1) keeps every
program that fails a shown test (a shown example is right, so it is almost surely wrong) below every
program that passes them all, also when best-of-n's weighted vote sums scores over equal answers.
d is CodeT's dual agreement over the generated tests: programs that pass exactly the same generated tests
form a consensus set, whose weight is (samples in the set) x (generated tests they pass); d is the set's
weight over the largest set's. Samples are counted over every branch scored so far for the problem,
so step strategies that finish branches over several rounds build one pool. An unfinished branch
scores `neutral`; a finished one without code 0.
"""

from __future__ import annotations

import ast
import collections
from concurrent.futures import ThreadPoolExecutor

from ttc.budget import Budget, CannotAttempt, Ledger
from ttc.graph import Branch, Meter, Problem
from ttc.verifiers import sandbox
from ttc.verifiers.code import entry_point, extract_code, program_for, prompt_text, shown_tests

__all__ = ["ExecutionVerifier", "ProblemExecution", "DEFAULT_TEST_PROMPT", "parse_generated_tests"]

DEFAULT_TEST_PROMPT = ("{task}\n\nDo not solve the task. Write {count} new test cases for `{entry_point}` instead: "
                       "one assert per line, each calling `{entry_point}` on new inputs and comparing the result "
                       "with the expected value, all in one ```python code block.")


class ExecutionVerifier:
    """The verifier's settings; `for_problem` makes the scorer of one problem.

    generated_tests: at most this many of the policy's own tests (0: shown tests only).
    test_samples: replies sampled from the policy to write them. agreement_weight, partial: w and partial above.
    neutral: the score of an unfinished branch. timeout_s, memory_mb: per program run (all its tests).
    workers: sandboxes run at once. isolation: the sandbox's ("bwrap"; "guards-only" is no boundary).
    """

    def __init__(self, generated_tests: int = 8, test_samples: int = 2, agreement_weight: float = 0.5,
                 partial: float = 0.1, neutral: float = 0.5, timeout_s: float = 5.0, memory_mb: int = 512,
                 workers: int = 2, isolation: str = "bwrap", test_prompt: str = DEFAULT_TEST_PROMPT):
        if not 0.0 <= agreement_weight < 1.0:
            raise ValueError(f"agreement_weight is in [0, 1), not {agreement_weight}")
        if not 0.0 <= partial * (1 + agreement_weight) < 1.0:
            raise ValueError(f"partial must keep a failing program below a passing one: {partial}")
        if isolation not in sandbox.ISOLATIONS:
            raise ValueError(f"isolation is one of {sandbox.ISOLATIONS}, not {isolation!r}")
        self.generated_tests, self.test_samples = generated_tests, test_samples
        self.agreement_weight, self.partial, self.neutral = agreement_weight, partial, neutral
        self.timeout_s, self.memory_mb, self.workers, self.isolation = timeout_s, memory_mb, workers, isolation
        self.test_prompt = test_prompt
        self.cost_per_branch, self.cost_per_token = 0.0, 0.0  # model tokens: the tests' generation, once

    def for_problem(self, problem: Problem, proposer, meter: Meter) -> "ProblemExecution":
        return ProblemExecution(self, problem, proposer, meter)

    def score(self, branches: list[Branch], meter: Meter) -> list[float]:
        raise TypeError("verifier=execution runs programs against their own problem's tests: score through "
                        "verifier.for_problem(problem, proposer, meter) (ttc.search.common.bind_verifier)")


class ProblemExecution:
    """The execution verifier bound to one problem (and the proposer whose answers are the code)."""

    def __init__(self, config: ExecutionVerifier, problem: Problem, proposer, meter: Meter):
        self.config, self.problem, self.proposer = config, problem, proposer
        self.cost_per_branch, self.cost_per_token = 0.0, 0.0
        self.shown = shown_tests(problem)
        self.entry_point = entry_point(problem)
        self.generated: list[str] = []
        if config.generated_tests > 0 and config.test_samples > 0 and self.entry_point:
            self.generated = self._generate_tests(meter)
        self.results: dict[str, tuple[bool, ...]] = {}  # program -> passed, per test (shown, then generated)
        self.samples: collections.Counter = collections.Counter()  # program -> finished branches scored
        self._counted: set[int] = set()

    @property
    def tests(self) -> list[str]:
        return self.shown + self.generated

    def score(self, branches: list[Branch], meter: Meter) -> list[float]:
        programs: list[str | None] = []
        for b in branches:
            code = self.proposer.answer(b) if b.finished else None
            programs.append(program_for(self.problem, code) if code else None)
            if b.finished and code and b.id not in self._counted:
                self._counted.add(b.id)
                self.samples[programs[-1]] += 1
        self._run([p for p in dict.fromkeys(programs) if p is not None and p not in self.results])
        agreement = self._agreement()
        scores = []
        for b, program in zip(branches, programs):
            if not b.finished:
                scores.append(self.config.neutral)
            elif program is None:
                scores.append(0.0)
            else:
                scores.append(self._score(program, agreement))
        return scores

    # -- running ------------------------------------------------------------------------------------

    def _run(self, programs: list[str]) -> None:
        if not programs:
            return
        tests = self.tests
        if not tests:
            self.results.update({p: () for p in programs})
            return

        def one(program: str) -> tuple[bool, ...]:
            result = sandbox.run_cases(program, tests, timeout_s=self.config.timeout_s,
                                       memory_mb=self.config.memory_mb, isolation=self.config.isolation)
            if len(result.cases) != len(tests):  # the run never reached its verdict: nothing passed
                return (False,) * len(tests)
            return tuple(c == "passed" for c in result.cases)

        with ThreadPoolExecutor(max_workers=max(1, self.config.workers)) as pool:
            for program, passed in zip(programs, pool.map(one, programs)):
                self.results[program] = passed

    # -- scoring ------------------------------------------------------------------------------------

    def _agreement(self) -> dict[tuple[bool, ...], float]:
        """Dual agreement per consensus set (its pass vector on the generated tests), over the samples."""
        shown = len(self.shown)
        weights: collections.Counter = collections.Counter()
        for program, count in self.samples.items():
            passed = self.results.get(program)
            if passed is None:
                continue
            on_generated = passed[shown:]
            weights[on_generated] += count
        scored = {vector: weights[vector] * sum(vector) for vector in weights}
        best = max(scored.values(), default=0)
        return {vector: (w / best if best > 0 else 0.0) for vector, w in scored.items()}

    def _score(self, program: str, agreement: dict[tuple[bool, ...], float]) -> float:
        passed = self.results.get(program, ())
        shown, w = len(self.shown), self.config.agreement_weight
        k = sum(passed[:shown])
        if not self.generated:
            return (1.0 if k == shown else self.config.partial * k / shown) if shown else self.config.neutral
        d = agreement.get(passed[shown:], 0.0)
        if not shown:
            return d
        if k == shown:
            return (1 + w * d) / (1 + w)
        return self.config.partial * (k + w * d) / (shown + w)

    # -- the policy's own tests (CodeT) ---------------------------------------------------------------

    def _generate_tests(self, meter: Meter) -> list[str]:
        """Sample the policy's tests on a side meter (what is left of the problem's budget) and charge the
        work to the problem's ledger as verifier tokens. Nothing when the budget cannot pay for the prompt."""
        prompt = self.config.test_prompt.format(task=prompt_text(self.problem), entry_point=self.entry_point,
                                                count=self.config.generated_tests)
        asking = Problem(id=f"{self.problem.id}#tests", prompt=[{"role": "user", "content": prompt}])
        side = Meter(_remaining(meter.budget, meter.ledger), Ledger())
        replies: list[Branch] = []
        try:
            root = self.proposer.start(asking, side)
            try:
                replies = self.proposer.propose([root], self.config.test_samples, side, to_end=True)
                texts = [b.text for b in replies]
            finally:
                self.proposer.release([root, *replies])
        except CannotAttempt:
            texts = []
        finally:
            _charge_as_verifier(meter.ledger, side.ledger)
        return parse_generated_tests(texts, self.entry_point, self.config.generated_tests, exclude=self.shown)


def parse_generated_tests(texts: list[str], name: str, limit: int, exclude: list[str] = ()) -> list[str]:
    """Distinct single-line asserts that call `name`, from the replies' code (or the replies themselves),
    in order, at most `limit`, leaving out those in `exclude` (the shown tests)."""
    found: list[str] = []
    for text in texts:
        code = extract_code(text) or text
        for line in code.splitlines():
            line = line.strip()
            if not line.startswith("assert ") or f"{name}(" not in line or line in exclude or line in found:
                continue
            try:
                ast.parse(line)
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                continue
            found.append(line)
            if len(found) >= limit:
                return found
    return found


def _remaining(budget: Budget, ledger: Ledger) -> Budget:
    """A budget holding what `budget` has left after `ledger` (same clock)."""
    def left(limit, spent):
        return None if limit is None else max(0, limit - spent)

    return Budget(tokens=left(budget.tokens, ledger.total_tokens), flops=left(budget.flops, ledger.flops),
                  forward_passes=left(budget.forward_passes, ledger.forward_passes), wall_s=budget.wall_s,
                  started=budget.started)


def _charge_as_verifier(ledger: Ledger, side: Ledger) -> None:
    """The side meter's work, as the problem's verifier work: every computed token a verifier token."""
    ledger.charge_verifier(side.computed_tokens)
    ledger.charge_reused(side.reused_tokens)
    ledger.charge_flops(side.flops)
    for _ in range(side.forward_passes):
        ledger.charge_forward(side.peak_kv_bytes)
