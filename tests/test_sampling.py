"""Sampling filters and seeds, on hand-made logits; the engine's sampler is the kernels' reference."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ttc import kernels
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


def test_a_draw_walks_the_vocabulary_in_order_not_the_sorted_distribution():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    plain, top2 = SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=2)
    assert sample(logits, [plain], [0.01])[0].item() == 0  # token 0 holds [0, 0.05) of the mass
    assert sample(logits, [plain], [0.6])[0].item() == 2  # [0.55, 0.7)
    assert sample(logits, [top2], [0.0])[0].item() == 1  # kept: tokens 1 and 3, in that order
    assert sample(logits, [top2], [0.7])[0].item() == 3  # 0.7 * 0.8 = 0.56 > 0.5
    assert sample(logits, [top2], [1 - 1e-12])[0].item() == 3  # u rounds to 1.0: the last kept token


def test_top_k_above_the_vocabulary_keeps_every_token():
    draws = _draws(SamplingParams(temperature=1.0, top_k=100), n=400)
    assert set(draws) == {0, 1, 2, 3}


def _random_batch(rng: random.Random, g: torch.Generator):
    B, V = rng.choice([1, 3, 8, 17]), rng.choice([2, 7, 50, 257, 1000])
    logits = torch.randn(B, V, generator=g) * rng.choice([0.3, 1.0, 3.0, 10.0])
    if rng.random() < 0.2:
        logits = (logits * 2).round() / 2  # ties
    if rng.random() < 0.2 and V > 2:
        logits[:, : V // 2] = float("-inf")  # masked tokens
    only = rng.choice(["top_k", "top_p", "min_p", None, None])  # one filter alone, or a mix
    params = []
    for _ in range(B):
        t = rng.choice([0.0, 0.0, 1e-3, 0.6, 1.0, 1.7])
        k = rng.choice([0, 0, 1, 2, 40, V]) if only in ("top_k", None) else 0
        p = rng.choice([1.0, 1.0, 0.999, 0.9, 0.3]) if only in ("top_p", None) else 1.0
        m = rng.choice([0.0, 0.0, 0.02, 0.3]) if only in ("min_p", None) else 0.0
        params.append(SamplingParams(t, p, k, m))
    uniforms = [rng.choice([rng.random(), rng.random(), 0.0, 0.5, 1 - 1e-12]) for _ in range(B)]
    return logits, params, uniforms


def test_the_engine_sampler_and_the_kernel_reference_draw_the_same_tokens():
    """Mixed, greedy and sampled rows, each filter alone and together, ties, masked logits, a uniform
    that rounds up to 1.0: the engine's adapter and the reference agree bit for bit."""
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    f64 = torch.float64
    for _ in range(150):
        logits, params, uniforms = _random_batch(rng, g)
        tokens, logprobs = sample(logits, params, uniforms)
        ref_tokens, ref_logprobs = kernels.sample_reference(
            logits, torch.tensor([p.temperature for p in params], dtype=f64), torch.tensor([p.top_k for p in params]),
            torch.tensor([p.top_p for p in params], dtype=f64), torch.tensor([p.min_p for p in params], dtype=f64),
            torch.tensor(uniforms, dtype=f64))
        assert torch.equal(tokens, ref_tokens) and torch.equal(logprobs, ref_logprobs)
        assert torch.equal(logprobs, logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, -1))
        for row, p in enumerate(params):
            if p.temperature == 0:
                assert tokens[row] == logits[row].argmax()  # the first maximal logit
            if p.top_k == 1:  # a maximal logit (torch.topk picks among ties)
                assert logits[row, tokens[row]] == logits[row].max()


def test_the_engine_draws_the_tokens_it_drew_before_the_sampler_moved_to_the_kernels():
    """Recorded with the engine's own sampler before `ttc.kernels.sample` took it over: fixed-seed runs
    keep their tokens. A batch of mixed rows, one of unfiltered rows, one of top-k-only rows."""
    P = SamplingParams
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(3, 10, 500, generator=g) * 3
    batches = [
        [P(0.0), P(1.0), P(0.7, top_p=0.9), P(1.3, top_k=5), P(0.8, min_p=0.05), P(1.0, 0.95, 40, 0.02),
         P(0.0, top_k=3), P(0.5, top_p=0.5), P(2.0), P(1.0, top_k=1)],
        [P(1.0)] * 5 + [P(0.6)] * 5,
        [P(1.0, top_k=k) for k in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89)],
    ]
    recorded = [[227, 67, 497, 236, 483, 205, 418, 361, 161, 345], [54, 283, 172, 476, 438, 496, 268, 184, 36, 140],
                [3, 151, 199, 203, 125, 416, 10, 361, 12, 324]]
    for i, params in enumerate(batches):
        uniforms = [BranchRng(100 * i + j).uniform() for j in range(10)]
        assert sample(logits[i], params, uniforms)[0].tolist() == recorded[i]
