from types import SimpleNamespace

import pytest

from ttc.budget import Budget, Ledger
from ttc.graph import Meter, Verifier
from ttc.verifiers.arithmetic import ArithmeticVerifier, Equation, check_equations, evaluate


def score(text: str, finished: bool = False) -> float:
    return ArithmeticVerifier().score([SimpleNamespace(text=text, finished=finished)], None)[0]


def test_a_false_subtraction_is_found_false():
    assert check_equations("So 15 - 43 = 13.") == [Equation("15 - 43", "13", False)]


def test_a_true_subtraction_with_a_negative_result_holds():
    assert check_equations("15 - 43 = -28") == [Equation("15 - 43", "-28", True)]
    assert check_equations("15 − 43 = −28") == [Equation("15 − 43", "−28", True)]


def test_a_list_number_is_not_glued_into_the_left_side():
    assert check_equations("1. 1 + 5 = 6.\n") == [Equation("1 + 5", "6", True)]
    assert check_equations("Step 2: 3 + 4 = 7") == [Equation("3 + 4", "7", True)]


def test_a_chain_is_checked_pair_by_pair():
    assert check_equations("2 + 3 = 5 + 1 = 6") == [Equation("2 + 3", "5 + 1", False), Equation("5 + 1", "6", True)]


def test_thousands_commas_and_dollar_signs_are_read_as_numbers():
    assert check_equations("1,200 + 34 = 1,234") == [Equation("1,200 + 34", "1,234", True)]
    assert check_equations("$5 × 3 = $15") == [Equation("$5 × 3", "$15", True)]


def test_division_is_exact_and_a_rounded_decimal_counts_as_right():
    assert check_equations("10 / 4 = 2.5") == [Equation("10 / 4", "2.5", True)]
    assert check_equations("1 / 3 = 0.33") == [Equation("1 / 3", "0.33", True)]
    assert check_equations("1 / 3 = 0.34") == [Equation("1 / 3", "0.34", False)]
    assert check_equations("10 / 4 = 2") == [Equation("10 / 4", "2", False)]


def test_division_by_zero_makes_an_equation_false():
    assert check_equations("5 / 0 = 1") == [Equation("5 / 0", "1", False)]
    assert evaluate("5 / (2 - 2)") is None


def test_variables_cut_off_sides_and_operator_free_equations_are_skipped():
    for text in ("x = 5", "23 - 60 =", "x + 3 = 7", "2x + 3 = 7", "7 = 3 + x", "2(3 + 4) = 14", "3 (4 + 5) = 27", "5 = 5",
                 "3 + 4 = 7km", "a <= 3 + 4"):
        assert check_equations(text) == [], text


def test_parentheses_are_evaluated():
    assert check_equations("(23 - 60) + 23 = 21") == [Equation("(23 - 60) + 23", "21", False)]
    assert check_equations("(so 23 - 60 = -37)") == [Equation("23 - 60", "-37", True)]


def test_an_unfinished_equation_at_the_end_of_a_partial_solution_is_not_judged():
    assert check_equations("15 - 43 = -2", complete=False) == []
    assert score("15 - 43 = -2") == pytest.approx(0.3)


def test_a_false_subtraction_scores_below_an_unchecked_solution():
    assert score("15 - 43 = 13\n\n") == 0.0
    assert score("15 - 43 = 13 and 1 + 5 = 6.\n\n") == pytest.approx(0.125)
    assert score("15 - 43 = 13\n\n") < score("Let me think.\n\n")


def test_a_solution_with_no_equations_scores_the_unchecked_constant():
    assert score("Let me think about it.", finished=True) == pytest.approx(0.3)


def test_a_finished_solution_whose_answer_its_arithmetic_supports_scores_one():
    assert score("1 + 5 = 6\nThe answer is 6.", finished=True) == pytest.approx(1.0)


def test_a_finished_solution_with_true_arithmetic_but_an_unsupported_answer_scores_all_right_only():
    assert score("1 + 5 = 6\nThe answer is 7.", finished=True) == pytest.approx(0.6)
    assert score("1 + 5 = 6\n\n") == pytest.approx(0.6)


def test_the_constants_are_constructor_arguments():
    verifier = ArithmeticVerifier(model=object(), wrong_max=0.5, unchecked=0.1, all_right=0.7, supported_bonus=0.2)
    branches = [SimpleNamespace(text=t, finished=True) for t in ("1 + 1 = 3, 1 + 1 = 2", "hi", "2 + 2 = 4 so 4")]
    assert verifier.score(branches, None) == pytest.approx([0.25, 0.1, 0.9])


def test_the_verifier_charges_nothing_to_the_meter():
    meter = Meter(Budget(tokens=10))
    verifier = ArithmeticVerifier()
    assert isinstance(verifier, Verifier)
    verifier.score([SimpleNamespace(text="1 + 5 = 6\nThe answer is 6.", finished=True)], meter)
    assert meter.ledger == Ledger()
    assert (verifier.cost_per_branch, verifier.cost_per_token) == (0.0, 0.0)
