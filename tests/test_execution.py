"""Selection by execution (verifier=execution) and plansearch, on scripted nodes and the tiny model.

The verifier's rules: shown tests first, CodeT's dual agreement on the policy's own tests next, neutral for
unfinished branches; it never runs a test the prompt did not show; the tests' writing is verifier work
within the budget. plansearch's structure: three stages of derived prompts, the budget never exceeded,
every branch released.
"""

from __future__ import annotations

import itertools
import json
import os

import pytest

from scripted import PathVerifier, ScriptedProposer
from ttc.budget import Budget
from ttc.graph import Branch, Meter, Problem, Step
from ttc.search.beam import Beam
from ttc.search.best_of_n import BestOfN
from ttc.search.plansearch import PlanSearch
from ttc.verifiers import execution, sandbox
from ttc.verifiers.code import doctest_asserts, example_asserts, extract_code, shown_tests
from ttc.verifiers.execution import ExecutionVerifier, parse_generated_tests

ADD = "def add(a, b):\n    return a + b\n"
TIMES = "def add(a, b):\n    return a * b\n"
ONE = "def add(a, b):\n    return 1\n"
SHOWN = ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]


def code_problem(shown=SHOWN, hidden="assert add(5, 5) == 10\n", metadata=None) -> Problem:
    content = "Write a function add(a, b) that adds two numbers."
    if shown:
        content += "\nYour code should pass these tests:\n\n" + "\n".join(shown)
    return Problem(id="add", prompt=[{"role": "user", "content": content}], tests=hidden,
                   metadata=metadata or {"entry_point": "add"})


@pytest.fixture(scope="module", autouse=True)
def boundary():
    try:
        sandbox.check_boundary()
    except sandbox.SandboxUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{e}; CI=true, so this is a failure, not a skip", pytrace=False)
        pytest.skip(str(e))


class CodeProposer:
    """A pure-Python proposer whose replies are given texts: to a prompt asking for tests, `test_replies`
    in turn; to any other, `replies` in turn. One step per reply (everything is to the end)."""

    def __init__(self, replies: list[str], test_replies: list[str] = (), tokens_per_reply: int = 5,
                 prompt_tokens: int = 10):
        self.backend = None
        self.replies, self.test_replies = itertools.cycle(replies), itertools.cycle(test_replies or [""])
        self.tokens_per_reply, self.prompt_tokens = tokens_per_reply, prompt_tokens
        self.started: list[Problem] = []
        self.live: set[int] = set()

    def start(self, problem, meter):
        meter.check(self.prompt_tokens)
        meter.ledger.charge_prefill(self.prompt_tokens)
        self.started.append(problem)
        root = Branch(handle=problem.id)
        self.live.add(root.id)
        return root

    def propose(self, branches, n, meter, to_end=False):
        out = []
        for b in branches:
            for _ in range(n):
                if meter.generation_share(1) < self.tokens_per_reply:
                    return out
                meter.ledger.charge_generated(self.tokens_per_reply)
                source = self.test_replies if b.handle.endswith("#tests") else self.replies
                child = b.child(b.handle, Step(next(source), (0,) * self.tokens_per_reply, -1.0, "eos"), 0, True)
                self.live.add(child.id)
                out.append(child)
        return out

    def release(self, branches):
        for b in branches:
            self.live.discard(b.id)

    def answer(self, branch):
        return extract_code(branch.text)

    def with_temperature(self, t):
        return self


def fenced(code: str) -> str:
    return f"```python\n{code}```"


# --- what the prompt shows ---------------------------------------------------------------------------

def test_shown_tests_are_the_prompts_asserts_and_examples():
    assert shown_tests(code_problem()) == SHOWN
    doc = ('def f(x):\n    """Double.\n    >>> f(2)\n    4\n    >>> y = 3\n    >>> f(y)\n    6\n    """\n'
           'def g(s):\n    """For example:\n    g("ab") ==> 2\n    g(n) -> g(n - 1) + 1\n    """\n')
    assert doctest_asserts(doc) == ["assert (f(2)) == (4)", "y = 3\nassert (f(y)) == (6)"]
    assert example_asserts(doc, "g") == ['assert (g("ab")) == (2)']  # the recurrence names n: prose, not a test


def test_generated_tests_are_distinct_parsable_asserts_about_the_entry_point():
    replies = [fenced("assert add(1, 1) == 2\nassert add(1, 1) == 2\nassert other(1) == 1\nassert add(\n"),
               "assert add(2, 2) == 4\nassert add(1, 2) == 3\nprint(add(3, 3))"]
    assert parse_generated_tests(replies, "add", 5, exclude=["assert add(1, 2) == 3"]) == \
        ["assert add(1, 1) == 2", "assert add(2, 2) == 4"]


# --- scoring rules -----------------------------------------------------------------------------------

def score(programs: list[str], problem: Problem = None, test_replies=(), branches=None, **settings):
    proposer = CodeProposer([fenced(p) for p in programs], test_replies)
    meter = Meter(Budget(tokens=10_000))
    bound = ExecutionVerifier(**{"generated_tests": 0, **settings}).for_problem(problem or code_problem(), proposer,
                                                                               meter)
    root = proposer.start(problem or code_problem(), meter)
    samples = branches or proposer.propose([root], len(programs), meter, to_end=True)
    return bound.score(samples, meter), bound, meter


def test_shown_tests_passed_order_the_programs():
    scores, _, _ = score([ADD, TIMES, ONE])  # add passes both, a * b passes add(0, 0), 1 passes neither
    assert scores == [1.0, pytest.approx(0.1 * 1 / 2), 0.0]  # failing a shown test: below any that passes all


def test_dual_agreement_ranks_programs_that_agree_on_the_policys_tests():
    tests = fenced("assert add(1, 1) == 2\nassert add(2, 2) == 4\nassert add(3, 1) == 4\n")
    problem = code_problem(shown=[])
    scores, bound, meter = score([ADD, ADD, TIMES, ADD], problem, [tests], generated_tests=8)
    # consensus sets: {add x3} passes 3 tests -> 9; {a * b} passes add(2, 2) only -> 1
    assert bound.generated == ["assert add(1, 1) == 2", "assert add(2, 2) == 4", "assert add(3, 1) == 4"]
    assert scores == [1.0, 1.0, pytest.approx(1 / 9), 1.0]


def test_a_shown_test_outranks_any_agreement():
    tests = fenced("assert add(2, 3) == 6\n")  # a wrong test of the policy's, which a * b passes
    problem = code_problem(shown=["assert add(0, 0) == 0", "assert add(1, 2) == 3"])
    # three copies of a * b agree on it (and pass add(0, 0) only); add passes both shown tests, not it
    scores, _, _ = score([TIMES, TIMES, TIMES, ADD, ONE], problem, [tests], generated_tests=4, agreement_weight=0.9)
    assert scores[3] == pytest.approx(1 / 1.9)  # every shown test, no agreement (its set passes no generated test)
    assert scores[0] == pytest.approx(0.1 * (1 + 0.9 * 1.0) / 2.9)  # k=1 of 2, the largest consensus set (d=1)
    assert scores[3] > scores[0] > scores[4] == 0.0


def test_unfinished_branches_are_neutral_and_finished_ones_without_code_score_zero():
    proposer = CodeProposer(["no code here"])
    meter = Meter(Budget(tokens=1000))
    bound = ExecutionVerifier(generated_tests=0, neutral=0.25).for_problem(code_problem(), proposer, meter)
    root = proposer.start(code_problem(), meter)
    unfinished = root.child("add", Step(fenced(ADD), (0,), -1.0, "step"), 0, False)
    finished = proposer.propose([root], 1, meter, to_end=True)[0]
    assert bound.score([unfinished, finished], meter) == [0.25, 0.0]


def test_an_unbound_verifier_says_how_to_bind_it():
    with pytest.raises(TypeError, match="for_problem"):
        ExecutionVerifier().score([], Meter())


# --- honesty -------------------------------------------------------------------------------------------

def test_the_verifier_never_runs_a_test_the_prompt_did_not_show(monkeypatch):
    ran: list[str] = []
    real = sandbox.run_cases

    def recording(code, cases, **kwargs):
        ran.extend(cases)
        return real(code, cases, **kwargs)

    monkeypatch.setattr(execution.sandbox, "run_cases", recording)
    hidden = "assert add(5, 5) == 11  # HIDDEN\n"  # contradicts the shown ones: running it would fail add
    problem = code_problem(shown=["assert add(1, 2) == 3"], hidden=hidden,
                           metadata={"entry_point": "add", "hidden_tests": 1})
    scores, bound, _ = score([ADD], problem, [fenced("assert add(2, 2) == 4\n")], generated_tests=4)
    assert scores == [1.0]
    assert ran and set(ran) == {"assert add(1, 2) == 3", "assert add(2, 2) == 4"}
    assert not any("HIDDEN" in case or "add(5, 5)" in case for case in ran)


def test_mbpp_shows_k_tests_and_grades_with_all(tmp_path):
    from ttc.evals.datasets import load_mbpp

    row = {"task_id": 7, "prompt": "Write a function to add two numbers.", "code": ADD,
           "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"],
           "test_imports": []}
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(row) + "\n")
    data = load_mbpp(str(path), shown_tests=1)
    (problem,) = data.problems
    assert problem.metadata == {"shown_tests": ["assert add(1, 2) == 3"], "hidden_tests": 2, "test_imports": []}
    assert "assert add(2, 2)" not in problem.prompt[0]["content"]
    assert shown_tests(problem) == ["assert add(1, 2) == 3"]
    assert data.grade(problem, ADD)
    assert not data.grade(problem, "def add(a, b):\n    return 3\n")  # passes the shown test, not the others


# --- budget and ledger ---------------------------------------------------------------------------------

def test_writing_tests_is_verifier_work_within_the_budget():
    proposer = CodeProposer([fenced(ADD)], [fenced("assert add(1, 1) == 2\n")])
    meter = Meter(Budget(tokens=1000))
    ExecutionVerifier(generated_tests=4, test_samples=2).for_problem(code_problem(), proposer, meter)
    assert (meter.ledger.verifier_tokens, meter.ledger.prefill_tokens, meter.ledger.generated_tokens) == (20, 0, 0)
    assert proposer.started[0].id == "add#tests" and not proposer.live
    tight = Meter(Budget(tokens=12))  # the prompt (10) and no reply (5 each)
    bound = ExecutionVerifier(generated_tests=4, test_samples=2).for_problem(code_problem(), proposer, tight)
    assert bound.generated == [] and tight.ledger.total_tokens == 10
    broke = Meter(Budget(tokens=5))  # not even the prompt: shown tests only, nothing spent
    assert ExecutionVerifier(generated_tests=4).for_problem(code_problem(), proposer, broke).generated == []
    assert broke.ledger.total_tokens == 0


# --- with strategies -----------------------------------------------------------------------------------

class CodeScripted(ScriptedProposer):
    """The scripted proposer (tests/scripted.py) whose all-[1] path answers with the right program."""

    def answer(self, branch):
        if not branch.finished:
            return None
        return ADD if all(s.text == "[1]" for s in branch.steps) else TIMES


@pytest.mark.parametrize("weighted", [False, True])
def test_best_of_n_chooses_the_program_that_passes(weighted):
    proposer = CodeScripted()
    result = BestOfN(n=4, weighted=weighted)(code_problem(), proposer, ExecutionVerifier(generated_tests=0),
                                             Meter(Budget(tokens=10_000)))
    assert result.answer == ADD and result.score == 1.0
    assert not proposer.live


def test_a_step_strategy_scores_finished_branches_by_execution():
    proposer = CodeScripted(depth=2)
    result = Beam(n=2, expand=2, max_depth=3)(code_problem(), proposer, ExecutionVerifier(generated_tests=0),
                                              Meter(Budget(tokens=10_000)))
    assert result.answer == ADD and result.score == 1.0
    assert not proposer.live


# --- plansearch --------------------------------------------------------------------------------------

def test_plansearch_writes_observations_then_plans_then_code_and_picks_with_the_verifier():
    proposer = ScriptedProposer()
    calls = []
    start = proposer.start
    proposer.start = lambda problem, meter: calls.append(problem) or start(problem, meter)
    result = PlanSearch(n=6, observations=2, plans=3)(code_problem(), proposer, PathVerifier(),
                                                       Meter(Budget(tokens=10_000)))
    assert [p.id for p in calls] == ["add#observations0", "add#plan0", "add#plan1", "add#code0", "add#code1",
                                     "add#code2"]
    assert "Write a function add" in calls[-1].prompt[0]["content"] and "Follow this plan:\n[" in \
        calls[-1].prompt[0]["content"]
    assert "Observations:\n[0]" in calls[1].prompt[0]["content"]
    assert len(result.candidates) == 6 and result.answer == "7"
    assert not proposer.live


@pytest.mark.parametrize("tokens", [9, 10, 24, 41, 77, 150])
def test_plansearch_never_exceeds_its_budget_and_releases_every_branch(tokens):
    from ttc.budget import CannotAttempt

    proposer = ScriptedProposer()
    meter = Meter(Budget(tokens=tokens))
    try:
        PlanSearch(n=4, observations=2, plans=2)(code_problem(), proposer, PathVerifier(), meter)
    except CannotAttempt:
        assert tokens < 10  # only when not even the first prompt fits
    assert meter.ledger.total_tokens <= tokens
    assert not proposer.live


def test_plansearch_with_execution_picks_the_passing_program():
    proposer = CodeProposer(["one observation", "a plan", fenced(TIMES), fenced(ADD)])
    result = PlanSearch(n=2, observations=1, plans=1)(code_problem(), proposer, ExecutionVerifier(generated_tests=0),
                                                       Meter(Budget(tokens=10_000)))
    assert result.answer.strip() == ADD.strip() and result.score == 1.0
    assert not proposer.live


# --- the real backend ----------------------------------------------------------------------------------

def test_execution_on_the_tiny_model_charges_its_tests_and_returns_the_pool(tiny_model):
    from ttc.backends.local import LocalProposer

    engine = tiny_model.engine
    proposer = LocalProposer(tiny_model, answer_fn=extract_code, max_tokens=24)
    meter = Meter(Budget(tokens=2000))
    result = BestOfN(n=2)(code_problem(), proposer, ExecutionVerifier(generated_tests=2, test_samples=2), meter)
    assert meter.ledger.verifier_tokens > 0 and meter.ledger.total_tokens <= 2000
    assert len(result.candidates) == 2 and all(0.0 <= c["score"] <= 1.0 for c in result.candidates)
    assert engine.pool.num_free + engine.prefix.num_cached_blocks == engine.pool.num_blocks
