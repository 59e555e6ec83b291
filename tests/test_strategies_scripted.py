"""Every strategy and allocator on a scripted, pure-Python proposer and verifier with no engine at all.

See tests/scripted.py for the script: verifier-guided strategies must find "7" (the all-[1] path),
self-consistency votes "3", and every branch handle any strategy creates must be released.
"""

from __future__ import annotations

import pytest

from scripted import STEP_TOKENS, PathVerifier, ScriptedProposer
from ttc.budget import Budget
from ttc.graph import Meter, MissingCapability, Problem
from ttc.search.allocation import AdaptiveStop, Difficulty, Pool, Uniform
from ttc.search.astar import AStar
from ttc.search.beam import Beam
from ttc.search.best_of_n import BestOfN
from ttc.search.dvts import DVTS
from ttc.search.ets import ETS, ETSSelector
from ttc.search.greedy import GreedyDecoding
from ttc.search.mcts import MCTS
from ttc.search.particle_filter import ParticleFilter
from ttc.search.rebase import Rebase
from ttc.search.self_consistency import SelfConsistency

PROBLEM = Problem(id="p0", prompt="scripted")

# (strategy, uses the verifier, the answer the script makes it choose)
CASES = {
    "greedy": (GreedyDecoding(), False, "3"),  # completes child [0] in place: [0][0]
    "self_consistency": (SelfConsistency(n=4), False, "3"),  # [0] [1] [2] [3] -> 3, 7, 3, 5
    "best_of_n": (BestOfN(n=4), True, "7"),
    "best_of_n_weighted": (BestOfN(n=4, weighted=True), True, "7"),
    "beam": (Beam(n=2, expand=2, max_depth=3), True, "7"),
    "dvts": (DVTS(n=4, subtrees=2, expand=2, max_depth=3), True, "7"),
    "astar": (AStar(n=2, max_expansions=8), True, "7"),
    "ets": (ETS(n=2, expand=2, max_depth=3, selector=ETSSelector(lambda_coverage=0.0)), True, "7"),
    "mcts": (MCTS(n=2, simulations=4, max_depth=3), True, "7"),
    "mcts_rollout": (MCTS(n=2, simulations=4, max_depth=3, value="rollout"), True, "7"),
    "rebase": (Rebase(n=4, max_depth=3), True, "7"),
    "particle_filter": (ParticleFilter(n=4, max_steps=3), True, "7"),
    # Particle Gibbs answers from its last sweep, whose reference is drawn by weight: its answer is the
    # resampling stream's, checked below by what the sweep conditioned on
    "particle_gibbs": (ParticleFilter(n=4, max_steps=3, gibbs_sweeps=1), True, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_strategy_makes_the_scripted_choice_and_releases_every_branch(name):
    strategy, guided, expected = CASES[name]
    proposer, verifier = ScriptedProposer(), PathVerifier()
    result = strategy(PROBLEM, proposer, verifier if guided else None, Meter(Budget(tokens=10_000)))
    assert expected is None or result.answer == expected
    assert proposer.handles and not proposer.live  # it made branches, and released every one
    assert (verifier.scored > 0) == guided


def test_a_gibbs_sweep_keeps_a_trajectory_of_the_sweep_before_as_its_reference():
    result = CASES["particle_gibbs"][0](PROBLEM, ScriptedProposer(), PathVerifier(), Meter(Budget(tokens=10_000)))
    first = [h for h in result.tree["history"] if h.get("sweep") == 0]
    second = [h for h in result.tree["history"] if h.get("sweep") == 1]
    assert len(first) == len(second) == 2
    # the reference slot (the last) holds, round by round, branches that sweep 0 had at that round
    assert all(h2["particles"][-1] in h1["particles"] for h1, h2 in zip(first, second))
    # and the other slots are new particles
    assert not {p for h in second for p in h["particles"][:-1]} & {p for h in first for p in h["particles"]}


def test_the_chosen_text_is_the_path_that_gives_the_answer():
    proposer = ScriptedProposer()
    result = Beam(n=2, expand=2, max_depth=3)(PROBLEM, proposer, PathVerifier(), Meter(Budget(tokens=10_000)))
    assert result.text == "[1][1]" and result.score == 1.0


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tokens", [10, 24, 41])
def test_no_strategy_spends_more_than_its_budget_and_all_is_released_when_it_runs_out(name, tokens):
    strategy, guided, _ = CASES[name]
    proposer = ScriptedProposer()
    meter = Meter(Budget(tokens=tokens))
    strategy(PROBLEM, proposer, PathVerifier() if guided else None, meter)
    assert meter.ledger.total_tokens <= tokens
    assert not proposer.live


def test_a_tight_budget_cuts_self_consistency_to_the_samples_it_can_pay_for():
    proposer = ScriptedProposer()
    meter = Meter(Budget(tokens=10 + 2 * STEP_TOKENS))  # the prompt and two steps
    SelfConsistency(n=4)(PROBLEM, proposer, None, meter)
    assert proposer.calls == ["start", "propose 1x4 to_end"]
    assert meter.ledger.generated_tokens == 0  # 4 x 5 tokens do not fit in 10: nothing is drawn


@pytest.mark.parametrize("allocator,expected", [(Uniform(), "3"), (AdaptiveStop(round_size=2, max_samples=4), "3"),
                                                (Difficulty(first_pass=2, max_samples=4), "3")])
def test_allocators_answer_through_the_strategies_and_release_every_branch(allocator, expected):
    proposer = ScriptedProposer()
    pool = Pool(total=400, problems=2)
    result, given = allocator.solve(PROBLEM, proposer, None, SelfConsistency(n=4), pool)
    assert result.answer == expected and 0 < given <= 400
    assert pool.spent == result.ledger.total_tokens <= given
    assert not proposer.live


def test_an_allocator_with_a_verifier_answers_by_best_of_n_choice():
    proposer = ScriptedProposer()
    allocator = AdaptiveStop(round_size=2, max_samples=4, weighted=True)
    result, _ = allocator.solve(PROBLEM, proposer, PathVerifier(), None, Pool(total=400, problems=1))
    assert result.answer == "7"
    assert [c["score"] for c in result.candidates] == [0.1, 1.0, 0.1, 0.1]  # best-of-n's candidates: one per sample


def test_ets_coverage_needs_hidden_states_and_says_so_in_one_line():
    with pytest.raises(MissingCapability, match=r"^strategy=ets \(its coverage embeddings\) needs hidden states, "
                                                r"which the scripted backend does not provide$"):
        ETS(n=2)(PROBLEM, ScriptedProposer(), PathVerifier(), Meter(Budget(tokens=1000)))


def test_model_verifiers_need_their_capabilities_and_say_so_in_one_line():
    from ttc.verifiers.probe import ProbeVerifier
    from ttc.verifiers.self_eval import SelfEvalVerifier

    backend = ScriptedProposer().backend
    with pytest.raises(MissingCapability, match="^verifier=self_eval needs logprobs of a continuation, which the "
                                                "scripted backend does not provide$"):
        SelfEvalVerifier(backend)
    with pytest.raises(MissingCapability, match="^verifier=probe needs hidden states"):
        ProbeVerifier(backend)


def test_self_eval_is_neutral_when_neither_answer_word_is_in_a_top_k_distribution():
    import torch

    from ttc.verifiers.self_eval import SelfEvalVerifier

    judge = SelfEvalVerifier.__new__(SelfEvalVerifier)  # only yes_probability: no backend needed
    judge.yes_ids, judge.no_ids = torch.tensor([1, 2]), torch.tensor([3])
    top_k_only = torch.full((5,), -float("inf"))
    top_k_only[0] = -0.1  # the server's top-1 is neither word
    assert judge.yes_probability(top_k_only) == 0.5
    top_k_only[3] = -2.0  # "no" made the top-k, "yes" did not
    assert judge.yes_probability(top_k_only) == 0.0
