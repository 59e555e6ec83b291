from concurrent.futures import ThreadPoolExecutor

import math_verify
import pytest

from ttc.verifiers.math import (canonical_key, extract_answer, grade, group_equivalent, is_equivalent,
                                reference_answer)


def test_boxed_answer_with_nested_braces_is_extracted():
    assert extract_answer(r"So $x = \boxed{\frac{1}{\sqrt{2}}}$.") == r"\frac{1}{\sqrt{2}}"


def test_last_boxed_answer_wins_and_fbox_counts():
    assert extract_answer(r"first \boxed{1}, then \fbox{2}") == "2"
    assert extract_answer(r"$\boxed 5$") == "5"


def test_unclosed_box_from_a_truncated_solution_is_skipped():
    assert extract_answer(r"\boxed{3} but wait, \boxed{\frac{1}{2") == "3"


def test_escaped_braces_inside_a_box_do_not_close_it():
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"


def test_boxed_answer_is_preferred_over_gsm8k_marker_and_answer_phrase():
    assert extract_answer("The answer is 4.\n#### 5\n\\boxed{6}") == "6"


def test_gsm8k_marker_answer_has_thousands_separators_removed():
    assert extract_answer("She earns 500 * 2 = 1000.\n#### 1,000") == "1000"


def test_the_answer_is_phrase_strips_period_dollars_and_bold():
    assert extract_answer("So the final answer is **$42$**.") == "42"
    assert extract_answer("The answer is: \\$18.50") == "18.50"
    assert extract_answer("The answer is 18 dollars. Let me check 19.") == "18"


def test_later_answer_phrase_on_the_same_line_wins():
    assert extract_answer("Final Answer: The final answer is $5$. I hope it is correct.") == "5"


def test_empty_box_falls_through_to_the_next_rule():
    assert extract_answer(r"\boxed{} so the answer is 1,000 dollars.") == "1000"


def test_answer_phrase_strips_a_variable_assignment():
    assert extract_answer("Therefore the answer is x = -3.") == "-3"


def test_last_number_is_the_fallback_and_can_be_disabled():
    text = "3 apples and 4 pears make 7 fruits, -2 of them 1,250 grams"
    assert extract_answer(text) == "1250"
    assert extract_answer(text, fallback_last_number=False) is None
    assert extract_answer("no numbers here") is None


def test_minus_between_numbers_is_not_a_negative_sign():
    assert extract_answer("the range is 3-5") == "5"


def test_reference_answer_reads_the_text_after_the_gsm8k_marker():
    assert reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert reference_answer("... \n#### 1,234") == "1234"


def test_reference_answer_without_marker_raises():
    with pytest.raises(ValueError):
        reference_answer("72")


def test_fraction_decimal_and_latex_forms_are_equivalent():
    assert is_equivalent("0.5", r"\frac{1}{2}")
    assert is_equivalent(r"\dfrac{3}{4}", "0.75")
    assert is_equivalent("1/3", "0.333333")


def test_thousands_separator_and_trailing_zeros_do_not_change_the_value():
    assert is_equivalent("1,000", "1000")
    assert is_equivalent("1000.0", "1000")
    assert is_equivalent("$1,000$", "1000")


def test_different_numbers_are_not_equivalent():
    assert not is_equivalent("3", "4")
    assert not is_equivalent("0.33", "0.333")
    assert not is_equivalent("12345678901234567890", "12345678901234567891")


def test_algebraic_expressions_are_compared_symbolically():
    assert is_equivalent("x^2+1", "1+x^2")
    assert is_equivalent(r"\sqrt{2}", "2^{1/2}")
    assert not is_equivalent("x^2+1", "x^2-1")


def test_none_or_empty_is_never_equivalent():
    assert not is_equivalent(None, "3")
    assert not is_equivalent("3", None)
    assert not is_equivalent(None, None)
    assert not is_equivalent("", "")


def test_unparseable_answers_are_not_equivalent_and_do_not_raise():
    assert not is_equivalent(r"\frac{", "}{")
    assert not is_equivalent("1" * 10_000, "2" * 10_000)
    assert not is_equivalent("(" * 600, "1")


def test_plain_numbers_are_decided_without_math_verify(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("math-verify called on plain numbers")
    monkeypatch.setattr(math_verify, "parse", fail)  # ttc imports it from the module when first needed
    monkeypatch.setattr(math_verify, "verify", fail)
    assert is_equivalent("1,000", "1000.00")
    assert is_equivalent("1/2", "0.5")
    assert not is_equivalent("2", "3")


def test_math_verify_exceptions_count_as_not_equivalent(monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("sympy blew up")
    monkeypatch.setattr(math_verify, "verify", explode)
    assert not is_equivalent("x^2+1", "1+x^2")


def test_is_equivalent_works_outside_the_main_thread():
    pairs = [("x^2+1", "1+x^2"), (r"\frac{2}{3}", "0.666667"), ("x+1", "x+2")] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda pair: is_equivalent(*pair), pairs))
    assert results == [True, True, False] * 4


def test_canonical_key_is_shared_by_forms_of_the_same_number():
    assert canonical_key("0.5") == canonical_key(r"\frac{1}{2}") == canonical_key("2/4") == "1/2"
    assert canonical_key("1,000") == canonical_key("1000.0") == canonical_key("$1000") == "1000"
    assert canonical_key(r"\dfrac 1 2") == "1/2"


def test_canonical_key_normalizes_spacing_but_keeps_commands_apart():
    assert canonical_key(r"\left( 1, 2 \right)") == "(1,2)"
    assert canonical_key(r"2 \pi r") == canonical_key(r"2\pi  r") == r"2\pi{}r"
    assert canonical_key(None) is None
    assert canonical_key("  ") is None


def test_group_equivalent_groups_by_value_and_gives_missing_answers_minus_one():
    answers = ["0.5", r"\frac{1}{2}", None, "3", "3.0", "x^2+1", "1+x^2", "", "1/2", "4"]
    assert group_equivalent(answers) == [0, 0, -1, 1, 1, 2, 2, -1, 0, 3]


def test_grade_extracts_the_answer_and_compares_with_the_reference():
    assert grade(r"Half of it: \boxed{0.5}", r"\frac{1}{2}")
    assert grade("She pays 3 * 6 = 18 dollars.\n#### 18", reference_answer("...\n#### 18"))
    assert not grade(r"\boxed{7}", "8")
    assert not grade("I don't know.", "8")
