"""Tree searches on models: the invariants (budget, seeds, greedy equivalence, KV pool, ETS's embedding cost)
on the tiny random Llama, and one slow end-to-end run per strategy on the embedded model with GSM8K problems.
The selection logic, by hand on a scripted proposer: tests/test_search_tree.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import ttc
from ttc.graph import Meter, Problem
from ttc.search.astar import AStar
from ttc.search.best_of_n import BestOfN
from ttc.search.greedy import GreedyDecoding
from ttc.search.self_consistency import SelfConsistency
from ttc.search.beam import Beam
from ttc.search.dvts import DVTS
from ttc.search.ets import ETS, ETSSelector, cluster
from ttc.verifiers.math import extract_answer

from conftest import require_data

PROBLEM = Problem(id="p", prompt=[{"role": "user", "content": "What is 2 + 3?"}])
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


# -- the tiny model: invariants ------------------------------------------------------------------------------


class StepHashVerifier:
    """A deterministic process score in [0, 1) from the latest step's token ids (free)."""

    def score(self, branches, meter):
        return [((sum(b.steps[-1].token_ids) * 2654435761) % 1000) / 1000 if b.steps else 0.0 for b in branches]


class AskingVerifier(StepHashVerifier):
    """Like StepHashVerifier but pays for 4 tokens of "question" per branch, run on the branch's KV."""

    cost_per_branch = 4.0

    def __init__(self, engine):
        self.engine = engine

    def score(self, branches, meter):
        self.engine.score([(b.handle, [28, 29, 30, 31]) for b in branches], ledger=meter.ledger)
        return super().score(branches, meter)


def strategies():
    return {
        "beam": Beam(n=2, expand=2, max_depth=4),
        "dvts": DVTS(n=4, subtrees=2, expand=1, max_depth=4),
        "astar": AStar(n=3, max_expansions=6),
        "ets": ETS(n=2, expand=2, max_depth=4),
        "dvts+ets": DVTS(n=4, subtrees=2, expand=2, max_depth=3, selector=ETSSelector(lambda_kv=0.2)),
        "astar+ets": AStar(n=3, max_expansions=6, max_frontier=3, selector=ETSSelector(lambda_kv=0.2)),
    }


def run(model, strategy, budget=None, verifier=None, **proposer_kwargs):
    from ttc.backends.local import LocalProposer

    model.engine.clear_prefix_cache()
    kwargs = dict(max_step_tokens=6, max_tokens=24, seed=0) | proposer_kwargs
    proposer = LocalProposer(model, answer_fn=extract_answer, **kwargs)
    meter = Meter(ttc.Budget(tokens=budget))
    result = strategy(PROBLEM, proposer, verifier or StepHashVerifier(), meter)
    return result, meter


def pool_is_back(engine) -> bool:
    return engine.pool.num_free + engine.prefix.num_cached_blocks == engine.pool.num_blocks


@pytest.mark.parametrize("name", list(strategies()))
def test_every_search_holds_its_budget_and_returns_the_kv_pool(tiny_model, name):
    prompt = len(tiny_model.tokenizer.encode_prompt(PROBLEM.prompt))
    for extra in (20, 60, 150):
        for verifier in (None, AskingVerifier(tiny_model.engine)):
            result, meter = run(tiny_model, strategies()[name], budget=prompt + extra, verifier=verifier)
            assert meter.ledger.total_tokens <= prompt + extra, (extra, meter.ledger)
            assert pool_is_back(tiny_model.engine)
            assert result.text and result.tree["nodes"]


@pytest.mark.parametrize("name", list(strategies()))
def test_the_same_seed_gives_the_same_search(tiny_model, name):
    first, _ = run(tiny_model, strategies()[name], budget=250)
    second, _ = run(tiny_model, strategies()[name], budget=250)
    assert (first.text, first.score, first.ledger.as_dict() | {"wall_s": 0}) == \
        (second.text, second.score, second.ledger.as_dict() | {"wall_s": 0})
    strip = lambda tree: [(n["depth"], n["text"], n["score"], n["status"]) for n in tree["nodes"]]  # noqa: E731
    assert strip(first.tree) == strip(second.tree)
    assert pool_is_back(tiny_model.engine)


def test_beam_of_width_one_equals_greedy_step_search(tiny_model):
    from ttc.backends.local import LocalProposer

    result, _ = run(tiny_model, Beam(n=1, expand=1, max_depth=50), temperature=0.0)
    tiny_model.engine.clear_prefix_cache()
    proposer = LocalProposer(tiny_model, answer_fn=extract_answer, max_step_tokens=6, max_tokens=24, temperature=0.0, seed=123)
    meter = Meter()
    branch = proposer.start(PROBLEM, meter)
    while not branch.finished:
        (child,) = proposer.propose([branch], 1, meter)
        proposer.release([branch])
        branch = child
    proposer.release([branch])
    assert result.text == branch.text and len(branch.steps) >= 2
    assert pool_is_back(tiny_model.engine)


def test_ets_hidden_embeddings_cost_a_verifier_token_per_step_token_and_equal_steps_share_a_cluster(tiny_model):
    from ttc.backends.local import LocalProposer

    tiny_model.engine.clear_prefix_cache()
    proposer = LocalProposer(tiny_model, answer_fn=extract_answer, max_step_tokens=5, max_tokens=24, temperature=0.0)
    meter = Meter()
    root = proposer.start(PROBLEM, meter)
    children = proposer.propose([root], 3, meter)  # greedy: three equal steps
    selector = ETSSelector(lambda_kv=0.0, lambda_coverage=1.0).bind(proposer)
    before = meter.ledger.verifier_tokens
    vectors = selector.embed(children, meter)
    assert meter.ledger.verifier_tokens - before == sum(len(c.steps[-1].token_ids) for c in children)
    assert vectors[0].shape == (tiny_model.config.hidden_size,)
    assert cluster(vectors, 0.05) == [0, 0, 0]
    assert selector.cost_per_token == 1.0 and ETSSelector(lambda_coverage=0.0).cost_per_token == 0.0
    proposer.release(children + [root])
    assert pool_is_back(tiny_model.engine)


# -- the embedded model on GSM8K (slow) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    import torch

    threads = torch.get_num_threads()
    yield ttc.load("smollm2-135m", threads=2)  # both cores: the CI machine runs nothing else
    torch.set_num_threads(threads)


class MeanLogprobVerifier:
    """exp(mean token logprob) of the latest step: the step's geometric-mean token probability (free)."""

    def score(self, branches, meter):
        return [math.exp(b.steps[-1].logprob / max(1, len(b.steps[-1].token_ids))) if b.steps else 0.0
                for b in branches]


def _solve_gsm8k(embedded, strategy, **proposer_kwargs):
    """Yield (problem, meter, result) for the first GSM8K test problem under a 1500-token budget (one problem:
    the eight tests below take ~4 minutes of CI on a 2-core AVX2 CPU in float32 even so)."""
    from ttc.backends.local import LocalProposer

    require_data(GSM8K)
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:1]]
    for i, row in enumerate(rows):
        embedded.engine.clear_prefix_cache()
        problem = Problem(id=f"gsm8k-{i}", prompt=[{"role": "user", "content": row["question"]}])
        proposer = LocalProposer(embedded, answer_fn=extract_answer, seed=0, **proposer_kwargs)
        meter = Meter(ttc.Budget(tokens=1500))
        yield problem, meter, strategy(problem, proposer, MeanLogprobVerifier(), meter)


def _path_text(tree: dict, node_id: int) -> str:
    """A branch's text from the tree alone: the texts of its steps, from the root down to node `node_id`."""
    nodes = {n["id"]: n for n in tree["nodes"]}
    texts = []
    while node_id is not None:
        texts.append(nodes[node_id]["text"])
        node_id = nodes[node_id]["parent"]
    return "".join(reversed(texts))


def _check_the_chosen_solution(meter, result) -> dict:
    """What every strategy's result must say on GSM8K: one chosen node, whose path in the tree is the result's
    text, whose extracted answer is the result's answer; every generated token in exactly one node of the tree.
    Returns the chosen node."""
    (chosen,) = [n for n in result.tree["nodes"] if n["status"] == "chosen"]
    assert result.text and _path_text(result.tree, chosen["id"]) == result.text
    assert result.answer == extract_answer(result.text)
    assert meter.ledger.generated_tokens == sum(n["tokens"] for n in result.tree["nodes"])
    return chosen


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [Beam(n=4, expand=4), DVTS(n=8, subtrees=4, expand=2),
                                      AStar(n=8), ETS(n=4, expand=4)], ids=["beam", "dvts", "astar", "ets"])
def test_each_search_solves_a_gsm8k_problem_on_the_embedded_model_within_budget(embedded, strategy):
    for problem, meter, result in _solve_gsm8k(embedded, strategy, max_step_tokens=64, max_tokens=200):
        assert meter.ledger.total_tokens <= 1500
        assert pool_is_back(embedded.engine)
        assert result.score is not None and 0.0 <= result.score <= 1.0
        assert result.strategy == {Beam: "beam", DVTS: "dvts", AStar: "astar", ETS: "ets"}[type(strategy)]
        chosen = _check_the_chosen_solution(meter, result)
        # the chosen solution is the best-scored candidate, with the score the verifier gave its last step
        assert chosen["score"] == result.score == max(c["score"] for c in result.candidates)
        statuses = {n["status"] for n in result.tree["nodes"]}
        # beams keep a few children of each round and prune the rest; A* without max_frontier prunes nothing
        assert ("pruned" in statuses) == (not isinstance(strategy, AStar))
        assert result.as_record()["id"] == problem.id


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [BestOfN(n=4), BestOfN(n=4, weighted=True), SelfConsistency(n=4),
                                      GreedyDecoding()], ids=["best_of_n", "weighted_best_of_n",
                                                              "self_consistency", "greedy"])
def test_each_sampling_strategy_solves_a_gsm8k_problem_on_the_embedded_model_within_budget(embedded, strategy):
    for problem, meter, result in _solve_gsm8k(embedded, strategy, max_tokens=160):
        assert meter.ledger.total_tokens <= 1500
        assert meter.ledger.prefill_tokens == len(embedded.tokenizer.encode_prompt(problem.prompt))  # prompt once
        assert pool_is_back(embedded.engine)
        assert result.as_record()["id"] == problem.id
        chosen = _check_the_chosen_solution(meter, result)
        samples = [n for n in result.tree["nodes"] if n["parent"] is not None]
        assert len(samples) == getattr(strategy, "n", 1)  # the budget pays for every sample in full
        assert all(n["status"] == "final" for n in samples if n is not chosen)
        if isinstance(strategy, SelfConsistency):  # the most voted answer (the first of equals), and its share
            if result.candidates:
                top = max(result.candidates, key=lambda c: c["votes"])
                assert (result.answer, result.score) == (top["answer"], top["votes"] / len(samples))
            else:  # no sample stated an answer
                assert result.answer is None and result.score is None
        else:  # the verifier's score of the chosen sample; plain best-of-n chooses the best-scored one
            assert chosen["score"] == result.score
            if isinstance(strategy, BestOfN) and not strategy.weighted:
                assert result.score == max(c["score"] for c in result.candidates)
