"""Math answers: pull the final answer out of a solution, and decide when two answers are equal.

Extraction is rule-based and ordered by how explicit the model was: the last `\\boxed{...}`, then
GSM8K's `#### 42`, then "the answer is ...", then (optionally) the last number in the text.

Equivalence has a fast path (identical normalized strings, or equal rationals written as plain
numbers or simple fractions) and falls back to `math-verify` (sympy) for everything else. math-verify
guards itself with `signal.alarm`, which only works in the main thread, so it is called with its
timeouts disabled; the limit we rely on instead is `_MAX_PARSE_CHARS` (long inputs are what make
sympy slow). Any exception inside math-verify counts as "not equivalent".
"""

from __future__ import annotations

import functools
import logging
import re
from fractions import Fraction


__all__ = ["extract_answer", "reference_answer", "is_equivalent", "canonical_key", "group_equivalent",
           "grade"]

_MAX_PARSE_CHARS = 512  # answers longer than this are compared as strings only


def _drop_timeout_disabled_warning(record: logging.LogRecord) -> bool:
    # math-verify warns once that its timeout is off; we turn it off on purpose (see above).
    return not record.getMessage().startswith("Timeout is disabled")


for _logger_name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_logger_name).addFilter(_drop_timeout_disabled_warning)

# A number as it appears in prose: "1,234.5", "-7", "3/4", ".5". Not preceded by a word character,
# so "x2" and the "5" of "3-5" as a minus sign are not read as negative numbers.
_NUMBER_IN_TEXT = re.compile(
    r"(?<![\w.])(?:-(?=\.?\d))?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:/\d+)?|\.\d+)")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?")  # exponent capped: 1e999999 is slow
_SIMPLE_FRACTION = re.compile(r"([-+]?\d+)/(\d+)")
_LATEX_FRACTION = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}")
# "18 dollars", "5\text{ cm}": a number followed only by words (of two letters or more) or a text unit.
_UNIT_SUFFIX = re.compile(
    r"(-?\d[\d,]*(?:\.\d+)?)\s*(?:\\(?:text|mbox|mathrm)\{[^{}]*\}|[A-Za-z]{2,}(?:\s+[A-Za-z]+)*)")
# Only the lead-ins: the answer is the rest of the line, and matching it here would hide a later
# lead-in on the same line ("Final Answer: The final answer is $5$").
_ANSWER_IS = re.compile(r"\b(?:final\s+)?answer\s*(?:is\b|:)\s*:?", re.IGNORECASE)
_GSM8K_MARKER = re.compile(r"####")
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_answer(text: str, fallback_last_number: bool = True) -> str | None:
    """The final answer in a model's solution, cleaned (see `_clean`); None if there is none."""
    boxed = _last_boxed(text)
    if boxed is not None and _clean(boxed) is not None:  # an empty box says nothing
        return _clean(boxed)
    for pattern in (_GSM8K_MARKER, _ANSWER_IS):
        for match in reversed(list(pattern.finditer(text))):
            answer = _clean(_first_sentence(text[match.end():].split("\n", 1)[0]))
            if answer is not None:
                return answer
    if fallback_last_number:
        numbers = _NUMBER_IN_TEXT.findall(text)
        if numbers:
            return _clean(numbers[-1])
    return None


def reference_answer(gsm8k_answer_field: str) -> str:
    """The reference answer of a GSM8K record: the text after its last `####`, cleaned."""
    marker = gsm8k_answer_field.rfind("####")
    if marker < 0:
        raise ValueError("a GSM8K answer field ends with '#### <answer>'; no '####' found")
    answer = _clean(gsm8k_answer_field[marker + 4:].strip().split("\n")[0])
    if answer is None:
        raise ValueError("the GSM8K answer field has nothing after '####'")
    return answer


def is_equivalent(a: str | None, b: str | None) -> bool:
    """Whether two answers are mathematically equal (None is never equal to anything)."""
    if a is None or b is None:
        return False
    clean_a, clean_b = _clean(a), _clean(b)
    if clean_a is None or clean_b is None:
        return False
    compact_a, compact_b = _compact(clean_a), _compact(clean_b)
    if compact_a == compact_b:
        return True
    rational_a, rational_b = _as_rational(compact_a), _as_rational(compact_b)
    if rational_a is not None and rational_a == rational_b:
        return True
    if _DECIMAL.fullmatch(compact_a) and _DECIMAL.fullmatch(compact_b):
        # Two written-out decimals that differ are different answers; math-verify would round both
        # to 6 places. Fractions still go to math-verify so that 1/3 matches 0.333333.
        return False
    return _math_verify_equal(clean_a, clean_b)


def canonical_key(answer: str | None) -> str | None:
    """A string that equivalent answers usually share: "1/2" for 0.5, \\frac{1}{2} and 2/4; "1000"
    for 1,000 and 1000.0; otherwise a whitespace- and LaTeX-spacing-free form. None for no answer."""
    if answer is None:
        return None
    clean = _clean(answer)
    if clean is None:
        return None
    compact = _compact(clean)
    rational = _as_rational(compact)
    return str(rational) if rational is not None else compact


def group_equivalent(answers: list[str | None]) -> list[int]:
    """A group index per answer (first seen, first numbered); -1 for a missing answer.

    Greedy: an answer whose canonical key was seen joins that key's group; otherwise it is compared
    with the first answer of each group by `is_equivalent`, and opens a new group if none matches.
    """
    representatives: list[str] = []
    group_of_key: dict[str, int] = {}
    groups = []
    for answer in answers:
        key = canonical_key(answer)
        if key is None:
            groups.append(-1)
            continue
        group = group_of_key.get(key)
        if group is None:
            group = next((i for i, rep in enumerate(representatives) if is_equivalent(answer, rep)), None)
            if group is None:
                group = len(representatives)
                representatives.append(answer)
            group_of_key[key] = group
        groups.append(group)
    return groups


def grade(prediction_text: str, reference: str) -> bool:
    """Whether the answer extracted from a model's solution equals the reference answer."""
    return is_equivalent(extract_answer(prediction_text), reference)


# --- extraction helpers -----------------------------------------------------------------------

def _last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`). A box whose
    braces never close (a truncated generation) is skipped in favour of an earlier one."""
    for match in reversed(list(_BOX_COMMAND.finditer(text))):
        start = match.end()
        rest = text[start:]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            content = _braced_group(text, start + len(rest) - len(stripped))
            if content is not None:
                return content
        elif stripped and rest[:1].isspace():
            return re.split(r"[\s$]", stripped, maxsplit=1)[0]
    return None


def _braced_group(text: str, open_index: int) -> str | None:
    """The text inside the `{...}` opening at `open_index`, or None if it never closes.
    `\\{` and `\\}` are literal braces in LaTeX and do not nest."""
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1:i]
        i += 1
    return None


def _first_sentence(text: str) -> str:
    """Cut "42. Let me check..." at the end of its first sentence; "3.5" has no space after its dot."""
    return re.split(r"\.\s", text, maxsplit=1)[0]


def _strip_wrapper(text: str, start: str, end: str) -> str:
    """`text` without `start ... end` around it, if those two belong together: "$a$ or $b$" and
    "\\text{a}+\\text{b}" are left alone."""
    if len(text) < len(start) + len(end) or not text.startswith(start) or not text.endswith(end):
        return text
    inner = text[len(start):len(text) - len(end)]
    if start.endswith("{"):
        if _braced_group(text, len(start) - 1) != inner:
            return text
    elif start in inner or end in inner:
        return text
    return inner.strip()


def _clean(answer: str) -> str | None:
    """Strip what surrounds an answer but is not part of it: math delimiters, bold, a currency
    sign, thousands separators, a trailing period, units after a number, and "x =" before one."""
    text = answer.strip().replace("\u2212", "-")
    previous = None
    while text != previous:  # wrappers nest in any order: "**$42$**", "$\text{42}$."
        previous = text
        text = text.strip().rstrip(".").rstrip()
        for start, end in (("**", "**"), ("__", "__"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"),
                           ("\\text{", "}"), ("\\textbf{", "}"), ("\\mathrm{", "}")):
            text = _strip_wrapper(text, start, end)
        text = re.sub(r"^(?:\\\$|\$)\s*(?=[-+]?\.?\d)", "", text)  # "$18", "\$18"
        text = re.sub(r"^[A-Za-z]\s*=\s*(?=[^=]+$)", "", text)  # "x = 5"
    text = text.replace("{,}", ",")
    unit = _UNIT_SUFFIX.fullmatch(text)
    if unit is not None:
        text = unit.group(1)
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    return text or None


# --- comparison helpers -----------------------------------------------------------------------

def _compact(clean: str) -> str:
    """A spacing-free LaTeX form: "\\dfrac 1 2" and "\\frac{1}{2}" both become "\\frac{1}{2}"."""
    text = re.sub(r"\\[dt]frac", r"\\frac", clean)
    text = re.sub(r"\\left|\\right|\\displaystyle|\\[!,;: ]|~|\^\{?\\circ\}?", "", text)
    text = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", r"\1{}", text)  # keep "\pi r" from becoming "\pir"
    return re.sub(r"\s+", "", text)


def _as_rational(compact: str) -> Fraction | None:
    """The exact value of a plain number or simple fraction ("0.5", "-3", "1/2", "\\frac{1}{2}")."""
    try:
        if _DECIMAL.fullmatch(compact):
            return Fraction(compact)
        match = _SIMPLE_FRACTION.fullmatch(compact)
        if match and int(match.group(2)) != 0:
            return Fraction(int(match.group(1)), int(match.group(2)))
        match = _LATEX_FRACTION.fullmatch(compact)
        if match and int(match.group(3)) != 0:
            sign = -1 if match.group(1) else 1
            return sign * Fraction(int(match.group(2)), int(match.group(3)))
    except (ValueError, ZeroDivisionError, OverflowError):  # int() refuses numbers over 4300 digits
        pass
    return None


@functools.lru_cache(maxsize=8192)
def _parsed(clean: str) -> tuple:
    """math-verify's parse of one answer, as a tuple (cached, so it must not be mutated)."""
    if len(clean) > _MAX_PARSE_CHARS:
        return ()
    from math_verify import parse  # imported on first use: `import ttc` needs no math-verify (a bare GPU machine's)

    latex = re.sub(r"(?<!\\)%", r"\\%", clean)  # a bare % starts a LaTeX comment
    try:
        return tuple(parse(f"${latex}$", parsing_timeout=None))
    except Exception:  # math-verify and sympy raise many kinds of errors on odd input
        return ()


def _math_verify_equal(clean_a: str, clean_b: str) -> bool:
    from math_verify import verify

    parsed_a, parsed_b = _parsed(clean_a), _parsed(clean_b)
    if not parsed_a or not parsed_b:
        return False
    try:
        # verify(gold, target) is not symmetric (e.g. percentages are only expanded on the gold
        # side), and callers of is_equivalent expect a symmetric relation.
        return (verify(list(parsed_a), list(parsed_b), timeout_seconds=None)
                or verify(list(parsed_b), list(parsed_a), timeout_seconds=None))
    except Exception:
        return False
