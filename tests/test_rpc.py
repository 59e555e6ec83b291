"""RPC (perplexity consistency with reasoning pruning): the rule on hand-made samples, against a slow twin
written as the paper's code computes it, and strategy=rpc on the scripted proposer and the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize

from scripted import ConfidentProposer
from ttc.backends.local import LocalProposer
from ttc.budget import Budget
from ttc.graph import Meter, Problem
from ttc.search.rpc import RPC
from ttc.verifiers.rpc import (fit_weibull_mixture, path_probability, perplexity_consistency, prune_low_probability,
                               rpc_select)

# ten paths of a crowd answer at low probability, two of another answer at high probability: the crowd's
# summed probability (2.0) beats the pair's (1.8), so perplexity consistency alone picks the crowd
LOW = [0.15, 0.17, 0.18, 0.19, 0.2, 0.2, 0.21, 0.22, 0.23, 0.25]
HIGH = [0.88, 0.92]
ANSWERS = ["12"] * len(LOW) + ["15"] * len(HIGH)


def paper_rule(answers, probabilities):
    """The paper's code (WNJXYK/RPC, compute_rpc.wpc_evaluator) as a slow twin: its own Weibull density, its
    likelihood, bounds and start, its pruning test, and a sum of the survivors' probabilities per answer
    (string-equal answers, distinct paths). Returns the winning answer."""
    x = np.asarray(probabilities, dtype=np.float64)

    def pdf(v, k, lam):
        return (k / lam) * (v / lam) ** (k - 1) * np.exp(-((v / lam) ** k))

    def nll(params):
        w, k1, l1, k2, l2 = params
        return -np.sum(np.log(w * pdf(x, k1, l1) + (1 - w) * pdf(x, k2, l2)))

    with np.errstate(all="ignore"):
        w, k1, l1, k2, l2 = minimize(nll, [0.5, 1.0, 1.0, 1.5, 2.0],
                                     bounds=[(0.2, 0.8), (0.01, None), (0.01, None), (0.01, None), (0.01, None)]).x
        if l1 * math.gamma(1 + 1 / k1) < l2 * math.gamma(1 + 1 / k2):
            k1, l1, k2, l2, w = k2, l2, k1, l1, 1 - w
        totals: dict[str, float] = {}
        for a, p in zip(answers, x):
            high, low = w * pdf(p, k1, l1), (1 - w) * pdf(p, k2, l2)
            if high / (high + low) < low / (high + low) and p < x.mean():
                continue
            totals[a] = totals.get(a, 0.0) + float(p)
    return max(totals, key=totals.get)


def test_pruning_drops_the_low_probability_component_and_keeps_the_high_one():
    keep, mixture = prune_low_probability(LOW + HIGH)
    assert keep == [False] * len(LOW) + [True] * len(HIGH)
    assert (mixture.high[1] * math.gamma(1 + 1 / mixture.high[0]) >
            mixture.low[1] * math.gamma(1 + 1 / mixture.low[0]))  # the high component has the larger mean
    assert np.all(mixture.posterior_high(HIGH) > 0.5) and np.all(mixture.posterior_high(LOW) < 0.5)


def test_rpc_picks_the_answer_whose_paths_survive_pruning_where_perplexity_consistency_alone_picks_the_crowd():
    pruned = rpc_select(ANSWERS, LOW + HIGH)
    plain = rpc_select(ANSWERS, LOW + HIGH, prune=False)
    assert ANSWERS[pruned.winner] == "15" and pruned.winner == len(LOW) + 1  # the pair's more probable path
    assert ANSWERS[plain.winner] == "12" and pruned.share == 1.0
    assert paper_rule(ANSWERS, LOW + HIGH) == "15"


@pytest.mark.parametrize("probabilities, answers", [
    ([0.3, 0.31, 0.35, 0.9, 0.85, 0.33, 0.32], ["1", "1", "1", "2", "3", "1", "2"]),
    ([0.6, 0.62, 0.58, 0.61, 0.2, 0.1], ["4", "5", "5", "4", "5", "5"]),
    ([0.05, 0.5, 0.55, 0.07, 0.6, 0.06, 0.52, 0.04], ["a", "b", "c", "a", "c", "a", "b", "a"]),
])
def test_rpc_chooses_what_the_papers_code_chooses(probabilities, answers):
    choice = rpc_select(answers, probabilities)
    assert answers[choice.winner] == paper_rule(answers, probabilities)


def test_a_path_sampled_twice_counts_once_in_perplexity_consistency():
    answers, probabilities = ["3", "3", "4"], [0.5, 0.5, 0.6]
    assert perplexity_consistency(answers, probabilities, keys=["x", "x", "y"]).winner == 2
    assert perplexity_consistency(answers, probabilities).winner == 0  # three distinct paths: "3" holds 1.0


@pytest.mark.parametrize("prune", [True, False])
def test_groups_computed_once_by_the_caller_choose_what_rpc_groups_itself(prune):
    answers, probabilities = ["1", "1", "1", "2", "3", "1", "2"], [0.3, 0.31, 0.35, 0.9, 0.85, 0.33, 0.32]
    renumbered = [7, 7, 7, 4, 9, 7, 4]  # the same partition as group_equivalent's [0, 0, 0, 1, 2, 0, 1]
    assert (rpc_select(answers, probabilities, prune=prune, groups=renumbered).winner
            == rpc_select(answers, probabilities, prune=prune).winner)


def test_answers_are_grouped_by_equivalence_and_the_groups_best_path_is_chosen():
    choice = rpc_select(["0.5", "1/2", "2"], [0.3, 0.35, 0.5], prune=False)
    assert choice.winner == 1 and choice.share == pytest.approx(0.65 / 1.15)


def test_nothing_is_pruned_without_two_distinct_probabilities():
    assert prune_low_probability([0.4, 0.4, 0.4]) == ([True] * 3, None)
    assert prune_low_probability([0.7]) == ([True], None)


def test_the_mixture_fit_refuses_non_positive_probabilities():
    with pytest.raises(ValueError, match="positive"):
        fit_weibull_mixture([0.0, 0.5])


def test_a_paths_probability_is_the_exp_of_its_mean_token_logprob():
    assert path_probability(-2.0, 4) == pytest.approx(math.exp(-0.5)) and path_probability(0.0, 0) == 1.0


# -- the strategy ------------------------------------------------------------------------------------------------

def test_rpc_on_the_script_finds_the_probable_path_and_releases_every_branch():
    proposer = ConfidentProposer()
    result = RPC(n=4)(Problem("p", "scripted"), proposer, None, Meter(Budget(tokens=10_000)))
    assert result.answer == "7" and result.text == "[1]"
    assert [c["answer"] for c in result.candidates] == ["3", "7", "3", "5"]
    assert proposer.handles and not proposer.live


@pytest.mark.parametrize("tokens", [10, 24, 41])
def test_rpc_never_spends_more_than_its_budget(tokens):
    proposer = ConfidentProposer()
    meter = Meter(Budget(tokens=tokens))
    RPC(n=4)(Problem("p", "scripted"), proposer, None, meter)
    assert meter.ledger.total_tokens <= tokens and not proposer.live


def test_rpc_reproduces_at_the_same_seed_on_the_tiny_model(tiny_model):
    problem = Problem(id="r0", prompt=[{"role": "user", "content": "Pick a letter."}])

    def run():  # a cold prefix cache each time: a cached prompt's logits differ in their last bits
        tiny_model.engine.clear_prefix_cache()
        proposer = LocalProposer(tiny_model, max_tokens=16, temperature=1.0, seed=11,
                                 answer_fn=lambda text: text.strip()[:1] or None)
        meter = Meter(Budget())
        return RPC(n=5)(problem, proposer, None, meter), meter

    (first, first_meter), (again, again_meter) = run(), run()
    assert (first.answer, first.text, first.candidates) == (again.answer, again.text, again.candidates)
    assert first.tree["history"] == again.tree["history"]
    assert first_meter.ledger.as_dict()["generated_tokens"] == again_meter.ledger.as_dict()["generated_tokens"]
    assert first_meter.ledger.verifier_tokens == 0  # choosing cost nothing


@pytest.mark.parametrize("shape, scale", [(0.5, 0.3), (1.0, 1.0), (2.7, 0.8), (12.0, 0.05)])
def test_the_written_out_weibull_log_density_equals_scipys(shape, scale):
    from scipy import stats

    from ttc.verifiers.rpc import _weibull_logpdf

    x = np.array([1e-4, 0.01, 0.2, 0.5, 0.9, 1.0, 3.0])
    np.testing.assert_allclose(_weibull_logpdf(x, shape, scale), stats.weibull_min.logpdf(x, shape, scale=scale),
                               rtol=1e-12, atol=1e-12)
