"""MCTS and REBASE: their rules on the scripted proposer (tests/scripted.py), their invariants (budget,
release, seeds, greedy equivalence) there and on the tiny random Llama's KV pool, and their configs.

The script: a branch's k-th child takes the step "[k]"; solutions are two steps long (three with
ScriptedProposer(depth=3)); the all-[1] path answers "7" and is the one PathVerifier scores 1.0.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from scripted import STEP_TOKENS, PathVerifier, ScriptedProposer
from ttc.search.beam import Beam
from ttc.search.greedy import GreedyDecoding
from ttc.search.mcts import MCTS, Node, _Search, priors
from ttc.search.rebase import Rebase, apportion

from ttc.budget import Budget, BudgetExceeded
from ttc.graph import Branch, Meter, Problem, Step

PROBLEM = Problem(id="p0", prompt="scripted")

GUIDED = {
    "mcts_puct": MCTS(n=2, simulations=4, max_depth=3),
    "mcts_uct": MCTS(n=2, simulations=4, max_depth=3, selection="uct"),
    "mcts_rollout": MCTS(n=2, simulations=4, max_depth=3, value="rollout"),
    "rebase": Rebase(n=4, max_depth=3),
    "rebase_weighted": Rebase(n=4, max_depth=3, temperature=1.0, weighted=True),
}
EVERY = GUIDED | {"mcts_vote": MCTS(n=3, simulations=3, answer="vote"),
                  "mcts_deep": MCTS(n=2, simulations=2, max_depth=2, value="rollout")}


def run(strategy, tokens=10_000, depth=2, verifier=None):
    proposer, meter = ScriptedProposer(depth=depth), Meter(Budget(tokens=tokens))
    result = strategy(PROBLEM, proposer, verifier if verifier is not None else PathVerifier(), meter)
    return result, proposer, meter


# -- the scripted choice, budget, release, seeds -------------------------------------------------------


@pytest.mark.parametrize("name", list(GUIDED))
def test_each_verifier_guided_setting_finds_the_path_the_verifier_likes(name):
    result, proposer, _ = run(GUIDED[name])
    assert (result.answer, result.text, result.score) == ("7", "[1][1]", 1.0)
    assert proposer.handles and not proposer.live


@pytest.mark.parametrize("name", list(EVERY))
def test_no_setting_spends_more_than_a_tight_budget_and_every_branch_is_released(name):
    for tokens in range(10, 70, 3):
        result, proposer, meter = run(EVERY[name], tokens=tokens, depth=3)
        assert meter.ledger.total_tokens <= tokens, tokens
        assert not proposer.live, tokens
        if tokens >= 10 + 4 * STEP_TOKENS:  # the budget pays for an expansion: the search did work
            assert meter.ledger.generated_tokens > 0 and len(result.tree["nodes"]) > 1


@pytest.mark.parametrize("name", list(EVERY))
def test_the_same_settings_give_the_same_search_twice(name):
    first, _, _ = run(EVERY[name], depth=3)
    second, _, _ = run(EVERY[name], depth=3)
    strip = lambda tree: [{k: v for k, v in n.items() if k not in ("id", "parent")} for n in tree["nodes"]]
    assert (first.answer, first.text, first.score, first.candidates) == \
        (second.answer, second.text, second.score, second.candidates)
    assert strip(first.tree) == strip(second.tree)
    assert first.ledger.total_tokens == second.ledger.total_tokens
    json.dumps(first.tree)  # plain data for the notebook
    assert "mcts" in first._repr_html_() or "rebase" in first._repr_html_()


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("strategy", [MCTS(n=1, simulations=1), Rebase(n=1)], ids=["mcts", "rebase"])
def test_width_one_with_one_simulation_per_move_is_greedy_decoding(strategy, depth):
    greedy, _, _ = run(GreedyDecoding(), depth=depth)
    result, proposer, _ = run(strategy, depth=depth)
    assert (result.answer, result.text) == (greedy.answer, greedy.text) == ("3", "[0]" * depth)
    assert not proposer.live


class Releasing(PathVerifier):
    """PathVerifier with verifier-side state (a PRM's): records what it scored and what it was told to drop."""

    def __init__(self):
        super().__init__()
        self.seen, self.released = set(), set()

    def score(self, branches, meter):
        self.seen.update(b.id for b in branches)
        return super().score(branches, meter)

    def release(self, branches=()):
        self.released.update(b.id for b in branches)


@pytest.mark.parametrize("name", list(EVERY))
def test_the_verifier_state_of_every_scored_branch_is_released(name):
    verifier = Releasing()
    run(EVERY[name], depth=3, verifier=verifier)
    assert verifier.seen and verifier.seen <= verifier.released


class Watching(ScriptedProposer):
    """Records, at every proposal, the live branches a search has no more use for: finished ones already
    scored, and ones whose step children were already scored (expanded and settled; a rollout does not
    settle the branch it was drawn from)."""

    def __init__(self, depth: int = 3):
        super().__init__(depth)
        self.branch_of, self.scored, self.settled, self.rollouts, self.held_needlessly = {}, set(), set(), set(), []

    def start(self, problem, meter):
        return self._watch([super().start(problem, meter)])[0]

    def propose(self, branches, n, meter, to_end=False):
        for h in self.live:
            b = self.branch_of[h]
            if (b.finished and b.id in self.scored) or b.id in self.settled:
                self.held_needlessly.append(b.text)
        children = super().propose(branches, n, meter, to_end)
        if to_end:
            self.rollouts.update(c.id for c in children)
        return self._watch(children)

    def _watch(self, branches):
        self.branch_of.update((b.handle, b) for b in branches)
        return branches


class Reporting(PathVerifier):
    """PathVerifier telling a Watching proposer what it scored."""

    def __init__(self, proposer: Watching):
        super().__init__()
        self.proposer = proposer

    def score(self, branches, meter):
        self.proposer.scored.update(b.id for b in branches)
        self.proposer.settled.update(b.parent.id for b in branches if b.id not in self.proposer.rollouts)
        return super().score(branches, meter)


@pytest.mark.parametrize("strategy", [MCTS(n=2, simulations=4), MCTS(n=3, simulations=2, selection="uct"),
                                      MCTS(n=2, simulations=3, value="rollout"), Rebase(n=2),
                                      Rebase(n=5, temperature=1.0)])
def test_a_search_holds_only_the_open_branches_it_may_still_expand(strategy):
    proposer = Watching()
    strategy(PROBLEM, proposer, Reporting(proposer), Meter(Budget(tokens=10_000)))
    assert len(proposer.branch_of) > 6 and proposer.held_needlessly == []
    assert not proposer.live


def test_pruning_a_subtree_releases_its_open_leaves_and_marks_them_pruned():
    from ttc.result import Tree

    proposer, meter, tree = ScriptedProposer(depth=3), Meter(), Tree()
    search = _Search(MCTS(n=2), proposer, PathVerifier(), meter, tree)
    root = Node(proposer.start(PROBLEM, meter))
    search.live[root.branch.id] = root.branch
    search.expand(root)
    dropped, kept = root.children
    search.expand(dropped)
    assert len(proposer.live) == 3  # [1], [0][0], [0][1]: the expanded root and [0] went back at once
    search.prune(dropped)
    assert proposer.live == [kept.branch.handle] and list(search.live) == [kept.branch.id]
    assert [n["status"] for n in tree.nodes.values() if n["text"] and n["id"] != kept.branch.id] == ["pruned"] * 3


# -- MCTS's rules ---------------------------------------------------------------------------------------


def test_puct_follows_the_prior_where_uct_follows_the_visit_counts():
    parent = Node(Branch(handle=None), visits=10, total=5.0)
    rare = Node(Branch(handle=None), prior=0.1, visits=1, total=0.5)
    favoured = Node(Branch(handle=None), prior=0.9, visits=2, total=1.0)
    parent.children = [rare, favoured]
    # PUCT: 0.5 + 0.1 * sqrt(10) / 2 = 0.66 < 0.5 + 0.9 * sqrt(10) / 3 = 1.45
    assert _Search(MCTS(selection="puct"), None, None, None, None).select(parent) is favoured
    # UCT: 0.5 + sqrt(ln 10 / 1) = 2.02 > 0.5 + sqrt(ln 10 / 2) = 1.57
    assert _Search(MCTS(selection="uct"), None, None, None, None).select(parent) is rare


def test_priors_are_a_softmax_over_siblings_of_the_mean_token_logprob():
    root = Branch(handle=None)
    short = root.child(None, Step("a", (1,), -0.5, "step"), 0, False)
    long = root.child(None, Step("b" * 8, (1,) * 8, -4.0, "step"), 0, False)  # same -0.5 per token
    likely = root.child(None, Step("c", (1, 2), -0.2, "step"), 0, False)  # -0.1 per token
    p = priors([short, long, likely])
    assert p[0] == pytest.approx(p[1]) and sum(p) == pytest.approx(1.0)
    assert p[2] / p[0] == pytest.approx(math.exp(0.4))


def test_rollout_values_replace_the_process_scores_of_the_new_children():
    by_verifier, _, _ = run(MCTS(n=2, simulations=1, value="verifier"))
    by_rollout, proposer, _ = run(MCTS(n=2, simulations=1, value="rollout"))
    # the root's children [0] and [1] score 0.1 and 1.0; their rollouts [0][0] and [1][0] both 0.1
    assert by_verifier.tree["history"][0]["values"] == [0.1, 1.0]
    assert by_rollout.tree["history"][0]["values"] == [0.1, 0.1]
    rollouts = [n for n in by_rollout.tree["nodes"] if n.get("rollout")]
    assert [n["text"] for n in rollouts[:2]] == ["[0]", "[0]"] and all(n["score"] == 0.1 for n in rollouts)
    assert {c["answer"] for c in by_rollout.candidates} >= {"3"}  # rollouts are finished leaves: candidates
    assert not proposer.live


def test_a_move_commits_to_the_most_visited_child_and_prunes_its_siblings():
    result, _, _ = run(MCTS(n=2, simulations=4, max_depth=3))
    first = result.tree["history"][0]
    assert first["visits"] == [1, 5] and first["chosen"] == first["children"][1]
    nodes = {n["id"]: n for n in result.tree["nodes"]}
    assert nodes[first["children"][0]]["status"] == "pruned"
    assert nodes[first["children"][1]]["visits"] >= 5  # statistics reach the tree for the notebook


def test_mcts_vote_answers_the_majority_of_its_finished_leaves():
    result, proposer, _ = run(MCTS(n=3, simulations=3, answer="vote"), verifier=None)
    finished = [n for n in result.tree["nodes"] if n["status"] in ("final", "chosen") and n["depth"] > 0]
    votes = {c["answer"]: c["votes"] for c in result.candidates}
    assert sum(votes.values()) == len(finished) > 2
    assert votes[result.answer] == max(votes.values())
    assert result.score == votes[result.answer] / len(finished)
    assert not proposer.live


class Exhausting(PathVerifier):
    """Scores `calls` times, then raises BudgetExceeded (a verifier dearer than it declared)."""

    def __init__(self, calls: int):
        super().__init__()
        self.calls = calls

    def score(self, branches, meter):
        self.calls -= 1
        if self.calls < 0:
            raise BudgetExceeded("scoring ran past the budget")
        return super().score(branches, meter)


def test_mcts_stops_when_its_verifier_cannot_pay_and_answers_from_the_leaves_it_finished():
    # scored: the root's children, then [1]'s ([1][0] and [1][1], finished); exploring [0] cannot be scored
    result, proposer, _ = run(MCTS(n=2, simulations=4, c_puct=4.0), verifier=Exhausting(calls=2))
    assert result.tree["history"][0]["chosen"] is None  # stopped inside the first move
    assert (result.answer, result.text) == ("7", "[1][1]")
    assert not proposer.live


def test_mcts_refuses_settings_it_does_not_know():
    for bad in ({"selection": "ucb"}, {"value": "mc"}, {"answer": "mean"}, {"n": 0}, {"simulations": 0}):
        with pytest.raises(ValueError):
            MCTS(**bad)


# -- REBASE's rules -------------------------------------------------------------------------------------


def test_the_width_is_split_by_the_softmax_of_rewards_and_rounded_to_its_total():
    assert apportion([0.1, 1.0, 0.1, 0.1], 4, temperature=1.0) == [1, 2, 1, 0]
    assert apportion([0.1, 1.0, 0.1, 0.1], 4, temperature=0.1) == [0, 4, 0, 0]
    assert apportion([0.5, 0.5, 0.5], 2, temperature=1.0) == [1, 1, 0]  # ties: the earlier node
    assert apportion([math.nan, 0.2], 3, temperature=1.0) == [0, 3]
    assert apportion([math.nan, math.nan], 4, temperature=1.0) == [2, 2]
    rng = random.Random(0)
    for _ in range(200):
        rewards = [rng.random() for _ in range(rng.randint(1, 7))]
        width = rng.randint(0, 12)
        counts = apportion(rewards, width, temperature=rng.choice([0.05, 0.3, 2.0]))
        assert sum(counts) == width and min(counts) >= 0
        best = max(range(len(rewards)), key=lambda i: rewards[i])
        assert width == 0 or counts[best] == max(counts)


def test_rebase_gives_each_node_its_share_of_children_and_prunes_those_given_none():
    result, proposer, _ = run(Rebase(n=4, temperature=1.0, max_depth=3))
    first = result.tree["history"][0]
    nodes = {n["id"]: n for n in result.tree["nodes"]}
    assert first["children"] == [2, 1, 1] and [nodes[i]["text"] for i in first["open"]] == ["[1]", "[0]", "[2]"]
    assert [n["text"] for n in result.tree["nodes"] if n["status"] == "pruned"] == ["[3]"]
    assert result.tree["history"][-1]["finished"] == 4  # the width: n finished solutions
    assert not proposer.live


class GreedyForShares(ScriptedProposer):
    """Takes every token a proposal's share allows (as the engine's limits do), one step per child."""

    def propose(self, branches, n, meter, to_end=False):
        live = [b for b in branches if not b.finished]
        share = meter.generation_share(len(live) * n)
        children = super().propose(branches, n, meter, to_end)
        meter.ledger.charge_generated((share - STEP_TOKENS) * len(children))
        return children


def test_uneven_fan_outs_leave_room_to_score_every_child_of_the_round():
    from ttc.search.beam import Frontier, propose_round

    proposer, meter = GreedyForShares(depth=3), Meter(Budget(tokens=1000))
    meter.verifier_cost = (25.0, 0.0)  # a probe's question per scored child
    roots = [proposer.start(PROBLEM, meter) for _ in range(3)]
    frontiers = [Frontier([roots[0]], 5), Frontier([roots[1]], 2), Frontier([roots[2]], 1)]  # REBASE's shares
    children = propose_round(frontiers, 1, proposer, meter)
    assert [len(c) for c in children] == [5, 2, 1]
    assert meter.can_afford(25 * 8)  # before the fix the 5-child call took the scoring of the other 3
    assert meter.reserved == 0


def test_rebase_answers_by_weighted_vote_when_asked():
    # three children of [0] ([0][0..2], answer "3", 0.1 each) against one "7" scored 1.0: 0.3 < 1.0
    result, _, _ = run(Rebase(n=4, temperature=1.0, max_depth=3, weighted=True))
    assert result.answer == "7" and len(result.candidates) == 4


# -- configs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cls", [("mcts", MCTS), ("rebase", Rebase)])
def test_each_config_builds_the_strategy_with_its_default_settings(name, cls):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    file = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "strategy" / f"{name}.yaml")
    assert "proposer" not in file  # a step strategy keeps configs/proposer/local.yaml's defaults
    assert instantiate(file.strategy) == cls()


# -- the tiny model: the KV pool ------------------------------------------------------------------------


class StepHash:
    """A deterministic process score in [0, 1) from the latest step's token ids (free)."""

    def score(self, branches, meter):
        return [((sum(b.steps[-1].token_ids) * 2654435761) % 1000) / 1000 if b.steps else 0.0 for b in branches]


def test_mcts_and_rebase_hold_their_budget_and_return_the_kv_pool_on_the_tiny_model(tiny_model):
    from ttc.verifiers.math import extract_answer

    from ttc.backends.local import LocalProposer

    engine = tiny_model.engine
    problem = Problem(id="p", prompt=[{"role": "user", "content": "What is 2 + 3?"}])
    prompt = len(tiny_model.tokenizer.encode_prompt(problem.prompt))

    def search(strategy, tokens=None):
        engine.clear_prefix_cache()
        proposer = LocalProposer(tiny_model, answer_fn=extract_answer, max_step_tokens=6, max_tokens=24, seed=0)
        meter = Meter(Budget(tokens=tokens))
        result = strategy(problem, proposer, StepHash(), meter)
        assert engine.pool.num_free + engine.prefix.num_cached_blocks == engine.pool.num_blocks, strategy
        return result, meter

    for strategy in (MCTS(n=3, simulations=2, max_depth=3), MCTS(n=2, simulations=2, max_depth=3, value="rollout"),
                     Rebase(n=4, max_depth=3, temperature=0.5)):
        tight, _ = search(strategy, prompt + 20)  # the budget runs out in the middle of the search
        assert tight.ledger.total_tokens <= prompt + 20 and tight.text
        first, _ = search(strategy, prompt + 100)
        second, _ = search(strategy, prompt + 100)
        assert first.ledger.total_tokens <= prompt + 100 and len(first.tree["nodes"]) > 4
        assert (first.text, first.score) == (second.text, second.score)  # seeds reproduce
    # width one follows every node's first child, like beam search of width one
    beam, _ = search(Beam(n=1, expand=1, max_depth=50))
    assert search(MCTS(n=1, simulations=1, max_depth=50))[0].text == beam.text
