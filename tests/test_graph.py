"""The graph core: solve(), the Meter, the proposer's budget shares, Result as plain data and HTML."""

from __future__ import annotations

import json
import zlib

import pytest

import ttc
from ttc.verifiers.math import extract_answer
from ttc.graph import Meter
from ttc.backends.local import LocalProposer
from ttc.search.best_of_n import BestOfN
from ttc.search.self_consistency import SelfConsistency
from ttc.search.common import finish
from ttc.result import Tree


def _pool_is_whole(model) -> bool:
    engine = model.engine
    return engine.pool.num_free + engine.prefix.num_cached_blocks == engine.pool.num_blocks


class LengthVerifier:
    """A toy outcome verifier: longer solutions score higher (ties broken by nothing)."""

    cost_per_branch = 0.0
    cost_per_token = 0.0

    def score(self, branches, meter):
        return [float(b.num_tokens) for b in branches]


class TokenHashVerifier:
    """A toy outcome verifier whose scores tell samples apart (a hash of each sample's tokens, in [0, 1)).
    It remembers every (text, score) it gave, so a test can find the best sample without the strategy's records."""

    cost_per_branch = 0.0
    cost_per_token = 0.0

    def __init__(self):
        self.given: list[tuple[str, float]] = []

    def score(self, branches, meter):
        scores = [zlib.crc32(repr([s.token_ids for s in b.steps]).encode()) / 2**32 for b in branches]
        self.given.extend(zip([b.text for b in branches], scores))
        return scores


@pytest.mark.parametrize("budget", [120, 300, 900])
def test_sampling_strategies_never_exceed_their_budget(tiny_model, budget):
    for strategy in (SelfConsistency(n=6), BestOfN(n=6)):
        res = ttc.solve("What is 2+2?", model=tiny_model, strategy=strategy, verifier=LengthVerifier(),
                        budget=budget, max_tokens=80)
        assert res.ledger.total_tokens <= budget
        assert _pool_is_whole(tiny_model)


def test_a_budget_smaller_than_the_prompt_is_refused_and_loses_nothing(tiny_model):
    tiny_model.engine.clear_prefix_cache()
    with pytest.raises(ttc.BudgetExceeded):
        ttc.solve("What is 2+2?", model=tiny_model, strategy=SelfConsistency(n=4), budget=5)
    assert _pool_is_whole(tiny_model)


def test_best_of_n_picks_the_highest_scored_sample(tiny_model):
    verifier = TokenHashVerifier()
    res = ttc.solve("Count to ten.", model=tiny_model, strategy=BestOfN(n=5), verifier=verifier, max_tokens=40,
                    seed=3)
    scores = [s for _, s in verifier.given]
    assert len(scores) == 5 and len(set(scores)) == 5  # every sample scored once, no ties: a wrong pick shows
    best_text, best_score = max(verifier.given, key=lambda given: given[1])
    assert (res.text, res.score) == (best_text, best_score)
    assert _pool_is_whole(tiny_model)


def test_solve_is_reproducible_with_a_seed(tiny_model):
    a = ttc.solve("Say hi.", model=tiny_model, strategy=SelfConsistency(n=4), max_tokens=30, seed=7)
    b = ttc.solve("Say hi.", model=tiny_model, strategy=SelfConsistency(n=4), max_tokens=30, seed=7)
    assert a.text == b.text and a.ledger.generated_tokens == b.ledger.generated_tokens


def test_solve_takes_a_strategy_object_and_refuses_a_name(tiny_model):
    res = ttc.solve("Say hi.", model=tiny_model, strategy=BestOfN(n=2), max_tokens=10)
    assert res.strategy == "best_of_n"
    with pytest.raises(TypeError, match="solve takes a strategy object"):
        ttc.solve("Say hi.", model=tiny_model, strategy="best_of_n")


def test_result_is_plain_data_and_renders_as_html(tiny_model):
    res = ttc.solve("Say hi.", model=tiny_model, strategy=SelfConsistency(n=3), budget=400, max_tokens=20)
    json.dumps(res.as_record())
    json.dumps(res.tree)
    page = res._repr_html_()
    assert "self_consistency" in page and "tokens computed" in page and "<svg" in page


def test_proposer_shares_leave_room_for_the_verifier(tiny_model):
    meter = Meter(ttc.Budget(tokens=1000))
    meter.verifier_cost = (10.0, 1.0)  # 10 tokens per branch plus one per generated token
    # 4 children: (1000 - 40) / (4 * 2) = 120 tokens each
    assert meter.generation_share(4) == 120
    proposer = LocalProposer(tiny_model, answer_fn=extract_answer, max_tokens=500, max_step_tokens=500)
    root = proposer.start(ttc.Problem(id="p", prompt="Hello"), meter)
    kids = proposer.propose([root], 4, meter, to_end=True)
    assert all(k.num_tokens <= (1000 - meter.ledger.prefill_tokens - 40) // 8 for k in kids)
    proposer.release(kids + [root])
    assert _pool_is_whole(tiny_model)


def test_steps_end_at_the_stop_pattern_and_keep_it_in_the_branch_text(tiny_model):
    meter = Meter()
    proposer = LocalProposer(tiny_model, answer_fn=extract_answer, step_stop=(" ",), max_step_tokens=30, max_tokens=200)
    root = proposer.start(ttc.Problem(id="p", prompt="a b c d"), meter)
    (child,) = proposer.propose([root], 1, meter)
    step = child.steps[-1]
    if step.finish_reason == "step":
        assert step.text.endswith(" ") and not child.finished
    assert child.parent is root and child.depth == 1
    proposer.release([child, root])


def test_the_readme_composition_runs_through_solve_returns_a_result_and_returns_the_pool(tiny_model):
    """The README's few-line strategy, verbatim: compose nodes without touching ttc's code."""

    def two_of_four(problem, proposer, verifier, meter):
        root = proposer.start(problem, meter)
        firsts = proposer.propose([root], 4, meter)                 # 4 children share the prompt's KV
        scores = verifier.score(firsts, meter)
        ranked = [b for _, b in sorted(zip(scores, firsts), key=lambda p: -p[0])]
        done = proposer.complete(ranked[:2], meter)
        proposer.release([root] + ranked[2:] + done)
        return finish("two_of_four", problem, proposer, meter, Tree(), done[0] if done else None, None)

    tiny_model.engine.clear_prefix_cache()
    res = ttc.solve("What is 1+1?", model=tiny_model, strategy=two_of_four, verifier=LengthVerifier(), budget=2000,
                    max_tokens=60)
    assert isinstance(res, ttc.Result) and res.strategy == "two_of_four" and res.text
    assert res.ledger.total_tokens <= 2000 and res.ledger.generated_tokens > 0
    tiny_model.engine.clear_prefix_cache()
    assert tiny_model.engine.pool.num_free == tiny_model.engine.pool.num_blocks


def test_solve_names_a_strategy_that_returns_no_result_in_one_line(tiny_model):
    def answer_only(problem, proposer, verifier, meter):
        return "2"

    with pytest.raises(TypeError, match=r"^strategy answer_only returned str, not a ttc.Result: end it with "):
        ttc.solve("What is 1+1?", model=tiny_model, strategy=answer_only)
