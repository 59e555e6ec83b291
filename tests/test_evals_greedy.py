"""The greedy baseline strategy (search/greedy.py): one temperature-0 solution, whatever the proposer's temperature."""

from __future__ import annotations

import pytest

import ttc
from ttc.backends.local import LocalProposer
from ttc.graph import Problem
from ttc.search.greedy import GreedyDecoding

PROBLEM = Problem(id="p", prompt=[{"role": "user", "content": "What is 2 + 2?"}])


def test_greedy_decoding_is_the_temperature_zero_completion_even_from_a_sampling_proposer(tiny_model):
    result = ttc.solve(PROBLEM, model=tiny_model, strategy=GreedyDecoding(), max_tokens=12, temperature=0.8)
    expected = tiny_model.generate(PROBLEM.prompt, n=1, max_new_tokens=12, temperature=0.0)[0]
    assert result.text == expected.text
    assert result.strategy == "greedy" and len(result.candidates) == 1
    assert result.ledger.generated_tokens == len(expected.token_ids)


def test_greedy_decoding_returns_every_kv_block(tiny_model):
    engine = tiny_model.engine
    before = engine.free_blocks()
    ttc.solve(PROBLEM, model=tiny_model, strategy=GreedyDecoding(), max_tokens=12)
    assert engine.free_blocks() == before


def test_the_temperature_zero_view_leaves_the_original_proposer_alone(tiny_model):
    proposer = LocalProposer(tiny_model, temperature=0.7)
    greedy = proposer.with_temperature(0.0)
    assert greedy.params.temperature == 0.0 and proposer.params.temperature == 0.7
    assert greedy.engine is proposer.engine
    already = LocalProposer(tiny_model, temperature=0.0)
    assert already.with_temperature(0.0) is already


def test_greedy_decoding_refuses_a_breadth_other_than_one():
    assert GreedyDecoding(n=1) == GreedyDecoding()
    with pytest.raises(ValueError, match="strategy.n must be 1"):
        GreedyDecoding(n=2)
