"""Code problems: the code in a reply, the program it makes with its problem, and the tests the prompt shows.

What a prompt shows is read from the prompt's text only (never from `Problem.tests`, the grader's):
- asserts written out in it, one per line (MBPP shows its tests this way);
- docstring examples, `>>> expression` followed by its expected output (HumanEval), each turned
  into `assert (expression) == (expected)`, after the example statements before it in that docstring;
- examples of the problem's entry point written as `f(arguments) ==> expected` (or ==, =>, an arrow,
  "should return"), which many HumanEval docstrings use instead of `>>>`.
"""

from __future__ import annotations

import ast
import builtins
import re

from ttc.graph import Problem

__all__ = ["extract_code", "prompt_text", "shown_tests", "doctest_asserts", "example_asserts", "program_for",
           "entry_point"]

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)  # an unclosed block runs to the end


def extract_code(text: str) -> str | None:
    """The Python code in a reply: the first fenced Python block that defines something, else the
    first fenced Python block, else the reply itself when it looks like code."""
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in ("", "python", "py", "python3")]
    for body in blocks:
        if re.search(r"^\s*(?:def|class)\s", body, re.MULTILINE):
            return body.rstrip() or None
    if blocks:
        return blocks[0].rstrip() or None
    if re.search(r"^\s*(?:def |return\b|import |from \S+ import )", text, re.MULTILINE):
        return text.rstrip() or None
    return None


def prompt_text(problem: Problem) -> str:
    """The prompt as the model reads it, without chat formatting: its messages' contents, in order."""
    if isinstance(problem.prompt, str):
        return problem.prompt
    return "\n\n".join(str(m.get("content", "")) for m in problem.prompt if isinstance(m, dict))


def shown_tests(problem: Problem) -> list[str]:
    """The tests the prompt shows, one runnable case each: its written-out asserts, then its docstring
    examples. The problem's `test_imports` (MBPP: imports its asserts need, not tests) lead each case."""
    text = prompt_text(problem)
    lines = [line.strip() for line in text.splitlines()]
    asserts = [line for line in lines if line.startswith("assert ") and _parses(line)]
    name = problem.metadata.get("entry_point")
    examples = example_asserts(text, name) if isinstance(name, str) and name else []
    cases = list(dict.fromkeys(asserts + doctest_asserts(text) + examples))
    imports = [i for i in problem.metadata.get("test_imports") or [] if isinstance(i, str)]
    return ["\n".join([*imports, case]) for case in cases]


_PROMPT_LINE = re.compile(r"^(\s*)>>> ?(.*)$")


def doctest_asserts(text: str) -> list[str]:
    """Docstring examples as asserts. An example without output (`>>> x = f(1)`) is a statement the
    examples after it (until a line that closes the docstring) start with; output that is not a Python
    expression (`<object at 0x...>`, a traceback) leaves its example out."""
    lines = text.splitlines()
    cases, setup, i = [], [], 0
    while i < len(lines):
        match = _PROMPT_LINE.match(lines[i])
        if match is None:
            if '"""' in lines[i] or "'''" in lines[i]:
                setup = []  # a docstring ends (or starts): its statements do not carry over
            i += 1
            continue
        indent, source = match.group(1), [match.group(2)]
        i += 1
        while i < len(lines) and lines[i].startswith(indent + "..."):
            source.append(lines[i][len(indent) + 3:].removeprefix(" "))
            i += 1
        expected = []
        while i < len(lines) and lines[i].strip() and not _PROMPT_LINE.match(lines[i]) \
                and '"""' not in lines[i] and "'''" not in lines[i] and "```" not in lines[i]:
            expected.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].strip())
            i += 1
        statement = "\n".join(source)
        if not expected:
            if _parses(statement):
                setup.append(statement)
            continue
        want = "\n".join(expected).strip()
        if _parses(statement, "eval") and _parses(want, "eval"):
            cases.append("\n".join([*setup, _assert_equal(statement, want)]))
    return cases


_ARROW = r"(?:==>|=>|==|->|\u279e|\u2192|should return|returns?)"


def example_asserts(text: str, name: str) -> list[str]:
    """Examples written as `name(arguments) ==> expected` (also ==, =>, ->, a right arrow, "should return",
    "returns"), one per line, as asserts; the expected value is what follows the last ` = ` when the
    example shows its working (`f(5, 19) -> 19 - 5 = 14`). Examples that do not parse are left out."""
    pattern = re.compile(rf"(?<![\w.])({re.escape(name)}\s*\(.*?\))\s*{_ARROW}\s*(.+?)\s*\.?\s*$")
    cases = []
    for line in text.splitlines():
        match = pattern.search(line)
        if match is None or line.lstrip().startswith((">>>", "assert")):
            continue
        call, want = match.group(1), match.group(2)
        want = want.rsplit(" = ", 1)[-1].strip()
        if _literal_call(call, name) and _parses(want, "eval") and not _names(want):
            cases.append(_assert_equal(call, want))
    return cases


def _assert_equal(expression: str, expected: str) -> str:
    """`assert (expression) == (expected)`; on lines of their own when either holds a comment."""
    if "#" in expression or "#" in expected:
        return f"assert (\n{expression}\n) == (\n{expected}\n)"
    return f"assert ({expression}) == ({expected})"


def _literal_call(source: str, name: str) -> bool:
    """A call of `name` whose arguments name nothing (a prose example like `f(n) -> f(n-1) + 1` is not one)."""
    try:
        tree = ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == name \
        and not any(_names(ast.unparse(a)) for a in [*tree.args, *(k.value for k in tree.keywords)])


def _names(source: str) -> set[str]:
    """The names an expression reads (none for a literal)."""
    return {n.id for n in ast.walk(ast.parse(source, mode="eval")) if isinstance(n, ast.Name)}


def entry_point(problem: Problem) -> str | None:
    """The function the tests call: the problem's `entry_point`, else the first called in a shown assert."""
    name = problem.metadata.get("entry_point")
    if isinstance(name, str) and name:
        return name
    for case in shown_tests(problem):
        for called in re.findall(r"(?<![\w.])([A-Za-z_]\w*)\s*\(", case.splitlines()[-1]):
            if not hasattr(builtins, called):
                return called
    return None


def program_for(problem: Problem, code: str) -> str:
    """The program a reply's code makes, as graders run it: for a problem with a `code_prompt` (HumanEval),
    the prompt's code (its imports and helpers) first, then the reply (a bare body completes the prompt's
    function; a reply that defines the entry point replaces it)."""
    prefix = problem.metadata.get("code_prompt")
    if not isinstance(prefix, str):
        return code + "\n"
    name = problem.metadata.get("entry_point") or ""
    defines = re.search(rf"^\s*def\s+{re.escape(name)}\s*\(", code, re.MULTILINE)
    return prefix + ("\n" if defines else "") + code + "\n"


def _parses(source: str, mode: str = "exec") -> bool:
    try:
        ast.parse(source, mode=mode)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True
