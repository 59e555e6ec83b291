"""Metrics on hand-computed cases: pass@k (Chen et al.), maj@k, coverage, summaries."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest

from ttc.evals.metrics import (accuracy_vs_compute, k_values, maj_at_k, pass_at_k, sample_groups, summarize)


def test_pass_at_k_matches_the_combinatorial_formula():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    for n, c, k in [(16, 5, 4), (20, 1, 10), (7, 0, 3)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_is_one_when_too_few_samples_are_wrong_to_fill_k():
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(4, 4, 4) == 1.0


def test_pass_at_k_refuses_k_above_n():
    with pytest.raises(ValueError, match="at least 3 samples"):
        pass_at_k(2, 1, 3)


def test_maj_at_k_on_hand_computed_cases():
    # Three samples: two say the right answer, one a wrong one. k=1: 2/3. k=3: the majority is right.
    groups = [(2, True), (1, False)]
    assert maj_at_k(groups, 3, 1) == pytest.approx(2 / 3)
    assert maj_at_k(groups, 3, 3) == pytest.approx(1.0)
    # k=2 from {R, R, W}: pairs RR (right), RW, RW (ties, broken at random: half right) -> (1 + 0.5 + 0.5) / 3
    assert maj_at_k(groups, 3, 2) == pytest.approx(2 / 3)


def test_maj_at_k_counts_unanswered_samples_as_wrong_but_not_as_votes():
    # One right answer, two samples without an answer: any draw with the right one wins.
    assert maj_at_k([(1, True)], 3, 2) == pytest.approx(2 / 3)
    assert maj_at_k([(1, True)], 3, 3) == pytest.approx(1.0)


def _brute_force_maj(groups, n, k):
    labels = [g for g, (size, _) in enumerate(groups) for _ in range(size)]
    labels += [None] * (n - len(labels))
    total, draws = Fraction(0), 0
    for subset in itertools.combinations(range(n), k):
        draws += 1
        counts = {}
        for i in subset:
            if labels[i] is not None:
                counts[labels[i]] = counts.get(labels[i], 0) + 1
        if counts:
            top = [g for g, c in counts.items() if c == max(counts.values())]
            total += Fraction(sum(groups[g][1] for g in top), len(top))
    return float(total / draws)


def test_maj_at_k_equals_enumerating_every_draw():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 8)
        groups, left = [], n
        while left and rng.random() < 0.8:
            size = rng.randint(1, left)
            groups.append((size, rng.random() < 0.4))
            left -= size
        if not groups:
            continue
        k = rng.randint(1, n)
        assert maj_at_k(groups, n, k) == pytest.approx(_brute_force_maj(groups, n, k), abs=1e-12)


def test_sample_groups_merge_equivalent_answers_and_count_votes():
    record = {"samples": 5, "candidates": [
        {"answer": "0.5", "correct": True}, {"answer": "1/2", "correct": True},
        {"answer": "3", "votes": 2, "correct": False}, {"answer": None, "correct": False}]}
    n, groups = sample_groups(record)
    assert n == 5 and sorted(groups) == [(2, False), (2, True)]
    assert sample_groups({"candidates": [{"answer": "1", "score": 0.3}]}) is None  # not graded


def test_a_record_with_samples_but_no_answers_has_no_groups():
    assert sample_groups({"samples": 4, "candidates": []}) == (4, [])


def test_k_values_are_powers_of_two_and_n():
    assert k_values(1) == [1]
    assert k_values(8) == [1, 2, 4, 8]
    assert k_values(6) == [1, 2, 4, 6]
    assert k_values(0) == []


def _record(correct, candidates, samples, tokens):
    return {"id": str(random.random()), "correct": correct, "candidates": candidates, "samples": samples,
            "prefill_tokens": tokens, "generated_tokens": tokens, "verifier_tokens": 0, "reused_tokens": 10,
            "forward_passes": 1, "flops": 100.0, "peak_kv_bytes": tokens, "wall_s": 0.5}


def test_summarize_reports_accuracy_compute_coverage_pass_and_maj():
    records = [
        _record(True, [{"answer": "4", "votes": 2, "correct": True}], samples=2, tokens=10),
        _record(False, [{"answer": "1", "votes": 1, "correct": False}, {"answer": "2", "votes": 1, "correct": True}],
                samples=2, tokens=30),
    ]
    s = summarize(records)
    assert s["accuracy"] == 0.5 and s["problems"] == 2 and s["correct"] == 1
    assert s["mean_tokens"] == 40  # (10 + 10 + 30 + 30) / 2 computed tokens
    assert s["mean_reused_tokens"] == 10 and s["peak_kv_bytes"] == 30 and s["wall_s"] == 1.0
    assert s["coverage"] == 1.0
    assert s["pass@k"] == {"1": pytest.approx(0.75), "2": pytest.approx(1.0)}
    # maj@1 = pass@1; maj@2: problem 1 always right, problem 2 a 1-1 tie (half right)
    assert s["maj@k"] == {"1": pytest.approx(0.75), "2": pytest.approx(0.75)}


def test_summarize_leaves_out_pass_at_k_when_candidates_are_not_graded():
    s = summarize([_record(True, [{"answer": "4", "score": 1.0}], samples=1, tokens=5)])
    assert "pass@k" not in s and "coverage" not in s and s["accuracy"] == 1.0


def test_problems_that_failed_count_as_wrong_in_pass_at_k():
    ok = _record(True, [{"answer": "4", "correct": True}], samples=1, tokens=5)
    failed = {"id": "x", "correct": False, "candidates": [], "samples": 0, "error": "PromptTooLong: ..."}
    s = summarize([ok, failed])
    assert s["pass@k"] == {"1": 0.5} and s["errors"] == 1 and s["mean_tokens"] == 5


def test_accuracy_vs_compute_gives_one_sorted_line_per_label():
    summaries = [{"label": "sc", "mean_tokens": 400, "accuracy": 0.3},
                 {"label": "sc", "mean_tokens": 100, "accuracy": 0.1},
                 {"label": "greedy", "mean_tokens": 50, "accuracy": 0.05}]
    assert accuracy_vs_compute(summaries) == {"greedy": [(50.0, 0.05)], "sc": [(100.0, 0.1), (400.0, 0.3)]}
