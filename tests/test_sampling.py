"""Sampling filters and seeds, on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from ttc.decoder.sampling import BranchRng, SamplingParams, child_seed, sample

LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def _draws(params, n=400, logits=LOGITS):
    rng = BranchRng(0)
    return [sample(logits, [params], [rng.uniform()])[0].item() for _ in range(n)]


def test_temperature_zero_is_argmax():
    tokens, lp = sample(torch.tensor([[0.1, 2.0, -1.0]]), [SamplingParams(temperature=0)], [0.99])
    assert tokens.tolist() == [1]
    assert math.isclose(lp.item(), torch.log_softmax(torch.tensor([0.1, 2.0, -1.0]), 0)[1].item(), rel_tol=1e-6)


def test_top_k_one_equals_greedy():
    assert set(_draws(SamplingParams(temperature=1.0, top_k=1))) == {0}


def test_top_k_two_keeps_the_two_most_likely_tokens():
    assert set(_draws(SamplingParams(temperature=1.0, top_k=2))) == {0, 1}


def test_top_p_keeps_the_smallest_nucleus_that_reaches_p():
    # 0.5 + 0.3 = 0.8 >= 0.7: tokens 0 and 1 survive, 2 and 3 never appear
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.7))) == {0, 1}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    # threshold 0.4 * 0.5 = 0.2: tokens 2 (0.15) and 3 (0.05) are dropped
    assert set(_draws(SamplingParams(temperature=1.0, min_p=0.4))) == {0, 1}


def test_unfiltered_sampling_follows_the_distribution():
    draws = _draws(SamplingParams(temperature=1.0), n=4000)
    freq = [draws.count(i) / len(draws) for i in range(4)]
    assert all(abs(f - p) < 0.03 for f, p in zip(freq, [0.5, 0.3, 0.15, 0.05]))


def test_rows_with_different_parameters_are_sampled_in_one_call():
    logits = LOGITS.repeat(3, 1)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0)]
    tokens, _ = sample(logits, params, [0.0, 0.5, 0.99])
    assert tokens.tolist() == [0, 0, 3]  # u = 0.99 lands in the last 5% of the mass


def test_reported_logprob_is_the_models_not_the_filtered_one():
    _, lp = sample(LOGITS, [SamplingParams(temperature=0.5, top_k=1)], [0.3])
    assert math.isclose(lp.item(), math.log(0.5), rel_tol=1e-5)


def test_child_seeds_are_distinct_and_stable():
    seeds = [child_seed(7, i) for i in range(100)]
    assert len(set(seeds)) == 100 and seeds == [child_seed(7, i) for i in range(100)]
    assert child_seed(7, 0) != child_seed(8, 0)


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


def test_a_rows_token_does_not_depend_on_the_other_rows_filters():
    """Found in review: an unfiltered row drew in sorted order whenever another row used top-p."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, generator=g)
    plain, nucleus = SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.5)
    for u in (0.1, 0.37, 0.8, 0.999):
        alone, _ = sample(logits[:1], [plain], [u])
        mixed, _ = sample(logits, [plain, nucleus], [u, u])
        assert alone[0] == mixed[0]
