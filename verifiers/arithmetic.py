"""A calculator check of a solution's own arithmetic: every equation it writes out is re-evaluated.

`check_equations` finds each `<lhs> = <rhs>` whose sides are arithmetic over plain numbers
(1,234  2.5  $15  −3), + - * / × ÷ and parentheses, evaluates both sides exactly (Fractions, a small
recursive-descent parser, never `eval`) and says whether they are equal. A chain `a = b = c` is
checked pairwise. A decimal written on its own counts as right when it is the other side rounded to
its places ("1 / 3 = 0.33"). A side that touches a variable ("x + 3 = 5", "2(3) = 6", "= 7km"), is
cut off ("23 - 60 ="), or an equation with no operator on either side ("5 = 5") is skipped.

`ArithmeticVerifier` turns that into a score in [0, 1]: low when an equation is false, middling
when nothing was checked, high when everything checked holds, highest when a finished solution's
final answer is also the value of one of its true equations. It never sees the reference answer and
runs no model.

Limits, stated plainly: it checks only arithmetic the solution writes out as equations. It cannot tell
whether the solution used the problem's numbers or set up the right equation; a solution whose
sums are all correct but answer a different question scores high. Words ("5 apples + 3 apples"),
LaTeX (\\frac, \\times), powers and percentages are not read. On tasks that are a single arithmetic
expression (reasoning-gym chain_sum), a solution that writes the problem's expression out correctly is
nearly always right, so there it is close to an oracle for such solutions: report results with it
as a calculator check, not as a learned verifier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from ttc.graph import Branch, Meter
from ttc.verifiers.math import extract_answer, is_equivalent

__all__ = ["ArithmeticVerifier", "Equation", "check_equations", "evaluate"]

_TOKEN = re.compile(
    r"(?P<num>(?:\\?\$)?(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+))"
    r"|(?P<op>[-+*/×÷−·⋅])|(?P<lp>\()|(?P<rp>\))|(?P<eq>=)|(?P<sp>[ \t]+)|(?P<other>.)", re.DOTALL)
_MINUS = ("-", "−")
_GLUED = "%^_!"  # next to an expression, these (and letters, digits) make it part of something else


@dataclass(frozen=True)
class _Tok:
    kind: str  # num | op | lp | rp | eq | sp | other
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Equation:
    lhs: str
    rhs: str
    holds: bool


def _follows(a: _Tok, b: _Tok) -> bool:
    """Whether token b may come right after token a inside an expression."""
    if a.kind in ("num", "rp"):
        return b.kind in ("op", "rp")
    return b.kind in ("num", "lp") or (b.kind == "op" and b.text in _MINUS)  # after op or "(": operand


_BINARY = ({"+": lambda a, b: a + b, "-": lambda a, b: a - b, "−": lambda a, b: a - b},  # sums, then products
           {**dict.fromkeys("*×·⋅", lambda a, b: a * b), **dict.fromkeys("/÷", lambda a, b: a / b if b else None)})


def _parse(toks: list[_Tok]) -> Fraction | None:
    """The exact value of a whole token list; None if it divides by zero. ValueError if it does not parse."""

    def level(pos: int, depth: int) -> tuple[Fraction | None, int]:  # (value, next position)
        if depth == len(_BINARY):
            return atom(pos)
        value, pos = level(pos, depth + 1)
        while pos < len(toks) and toks[pos].kind == "op" and toks[pos].text in _BINARY[depth]:
            right, after = level(pos + 1, depth + 1)
            value = None if value is None or right is None else _BINARY[depth][toks[pos].text](value, right)
            pos = after
        return value, pos

    def atom(pos: int) -> tuple[Fraction | None, int]:
        t = toks[pos] if pos < len(toks) else _Tok("end", "", -1, -1)
        if t.kind == "op" and t.text in _MINUS:
            value, pos = atom(pos + 1)
            return (None if value is None else -value), pos
        if t.kind == "num":
            return Fraction(t.text.lstrip("\\$").replace(",", "")), pos + 1
        if t.kind == "lp":
            value, pos = level(pos + 1, 0)
            if pos < len(toks) and toks[pos].kind == "rp":
                return value, pos + 1
        raise ValueError("not an arithmetic expression")

    value, pos = level(0, 0)
    if pos != len(toks):
        raise ValueError("trailing tokens")
    return value


def evaluate(expression: str) -> Fraction | None:
    """The exact value of an arithmetic expression; None if it divides by zero. ValueError if it does not parse."""
    return _parse([t for t in _tokens(expression) if t.kind != "sp"])


def _tokens(text: str) -> list[_Tok]:
    return [_Tok(m.lastgroup, m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def _side(toks: list[_Tok], i: int, step: int, text: str) -> list[_Tok] | None:
    """The longest expression next to the "=" at toks[i], on its left (step -1) or right (step +1).

    None when there is none, or it touches something that makes it a fragment of a larger,
    unreadable expression: a dropped dangling operator, a variable or an implicit product.
    """
    walked: list[_Tok] = []
    stop = None  # the token that ended the walk
    for t in (toks[:i][::-1] if step < 0 else toks[i + 1:]):
        if t.kind == "sp":
            continue
        if walked:
            fits = _follows(t, walked[-1]) if step < 0 else _follows(walked[-1], t)
        else:
            fits = t.kind in ("num", "rp") if step < 0 else _follows(toks[i], t)
        if t.kind in ("other", "eq") or not fits:
            stop = t
            break
        walked.append(t)
    if step < 0:
        walked.reverse()
    for k in range(len(walked)):  # longest first: a suffix of the left side, a prefix of the right
        side = walked[k:] if step < 0 else walked[:len(walked) - k]
        dropped = walked[:k] if step < 0 else walked[len(walked) - k:]
        try:
            _parse(side)
        except ValueError:
            continue
        if any(t.kind == "op" for t in dropped):
            return None
        if step < 0:
            edge = text[side[0].start - 1] if side[0].start else " "
            if edge == ")" or side[0].text in _MINUS and side[1].start > side[0].end:
                return None  # "1)1 + 5", "x - 3": a dangling minus
            if side[0].kind == "lp" and k == 0 and stop is not None and stop.kind == "num":
                return None  # "3 (4 + 5)": an implicit product
        else:
            edge = text[side[-1].end] if side[-1].end < len(text) else " "
            if edge == "(":
                return None
        return None if edge.isalnum() or edge in _GLUED else side
    return None


def _bare(side: list[_Tok]) -> bool:
    """A single number, maybe negated or in parentheses: an equation of two of these checks nothing."""
    return sum(t.kind == "num" for t in side) == 1 and all(t.kind != "op" or t.text in _MINUS for t in side)


def _places(side: list[_Tok]) -> int | None:
    """Decimal places of a side written as one decimal number, else None."""
    if not _bare(side):
        return None
    number = next(t.text for t in side if t.kind == "num")
    return len(number) - number.index(".") - 1 if "." in number else None


def _sides(text: str, complete: bool = True):
    """(lhs tokens, rhs tokens) of each checkable equation."""
    toks = _tokens(text)
    for i, t in enumerate(toks):
        if t.kind != "eq":
            continue
        lhs, rhs = _side(toks, i, -1, text), _side(toks, i, +1, text)
        if lhs is None or rhs is None or (_bare(lhs) and _bare(rhs)):
            continue
        if not complete and rhs[-1].end == len(text):  # may be cut mid-number: "= 2" of "= 28"
            continue
        yield lhs, rhs


def _holds(lhs: list[_Tok], rhs: list[_Tok]) -> bool:
    a, b = _parse(lhs), _parse(rhs)
    if a is None or b is None:
        return False
    tolerance = max((Fraction(1, 2 * 10 ** d) for d in (_places(lhs), _places(rhs)) if d is not None), default=0)
    return abs(a - b) <= tolerance


def _source(text: str, side: list[_Tok]) -> str:
    return text[side[0].start:side[-1].end]


def check_equations(text: str, complete: bool = True) -> list[Equation]:
    """Every arithmetic equation `text` states, in order, with whether it holds.

    complete=False (a solution still being written): an equation ending exactly at the end of the
    text is skipped, as its last number may be unfinished.
    """
    return [Equation(_source(text, lhs), _source(text, rhs), _holds(lhs, rhs)) for lhs, rhs in _sides(text, complete)]


class ArithmeticVerifier:
    """Scores a branch by whether the equations it writes out are arithmetically true.

    wrong > 0 false equations: wrong_max * right / (right + wrong). None checked: unchecked. All true:
    all_right, plus supported_bonus when the branch is finished and its final answer is the value of
    a side of one of its true equations.

    Cost: nothing. It runs no model and computes no tokens, so it charges nothing to the meter.
    model: ignored (the eval CLI passes the policy to any target that takes `model`).
    """

    cost_per_branch = 0.0
    cost_per_token = 0.0

    def __init__(self, model=None, wrong_max: float = 0.25, unchecked: float = 0.3, all_right: float = 0.6,
                 supported_bonus: float = 0.4):
        self.wrong_max, self.unchecked = wrong_max, unchecked
        self.all_right, self.supported_bonus = all_right, supported_bonus

    def score(self, branches: list[Branch], meter: Meter | None) -> list[float]:
        return [self.score_text(b.text, b.finished) for b in branches]

    def score_text(self, text: str, finished: bool) -> float:
        sides = list(_sides(text, complete=finished))
        holds = [_holds(lhs, rhs) for lhs, rhs in sides]
        wrong = holds.count(False)
        if wrong:
            return self.wrong_max * (len(holds) - wrong) / len(holds)
        if not holds:
            return self.unchecked
        if finished and _supported(extract_answer(text), text, sides):
            return self.all_right + self.supported_bonus
        return self.all_right


def _supported(answer: str | None, text: str, sides) -> bool:
    """Whether `answer` is the value of a side of one of these (true) equations."""
    if answer is None:
        return False
    candidates = set()
    for pair in sides:
        for side in pair:
            value = _parse(side)
            if value is not None:
                candidates.add(str(value))  # "6", "5/2"
            if _bare(side):
                candidates.add(_source(text, side))  # "0.33" as written, for a rounded answer
    return any(is_equivalent(answer, c) for c in sorted(candidates))
