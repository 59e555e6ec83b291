"""Tree searches: beam, DVTS, A* and the ETS selector.

Selection logic is checked exactly on a scripted proposer (children are letters, scores come from a
table). The invariants on the tiny random Llama and the slow runs on the embedded model:
tests/test_search_tree_models.py.
"""

from __future__ import annotations

import itertools
import math
import random
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

import ttc
from ttc.graph import Branch, Meter, Problem, Scored, Step
from ttc.search.astar import AStar, step_cost
from ttc.search.beam import Beam, TopK
from ttc.search.dvts import DVTS
from ttc.search.ets import ETS, ETSSelector, KeepProgram, cluster, keep_values, path_nodes

PROBLEM = Problem(id="p", prompt=[{"role": "user", "content": "What is 2 + 3?"}])


# -- a scripted proposer and table verifiers ---------------------------------------------------------


class FakeHandle:
    def __init__(self, path: str):
        self.path = path


class FakeProposer:
    """Children are letters: the i-th child ever drawn from a branch appends "abcd..."[i] to its path.

    A path in `ends` or of length `max_len` is finished. Every step costs `step_tokens` generated
    tokens (fewer if that is all the meter affords). `live` holds the handles not yet released.
    """

    def __init__(self, ends=(), max_len: int = 3, step_tokens: int = 10):
        self.ends, self.max_len, self.step_tokens = set(ends), max_len, step_tokens
        self.live: set[FakeHandle] = set()
        self.drawn: dict[int, int] = {}

    def start(self, problem, meter):
        meter.ledger.charge_prefill(5)
        h = FakeHandle("")
        self.live.add(h)
        return Branch(handle=h)

    def propose(self, branches, n, meter, to_end=False):
        live = [b for b in branches if not b.finished]
        share = meter.generation_share(len(live) * n)
        if not live or n < 1 or share < 1:
            return []
        tokens = min(self.step_tokens, share)
        out = []
        for b in live:
            for _ in range(n):
                i = self.drawn.get(b.id, 0)
                self.drawn[b.id] = i + 1
                label = "abcdefghijklmnopqrstuvwxyz"[i]
                h = FakeHandle(b.handle.path + label)
                self.live.add(h)
                meter.ledger.charge_generated(tokens)
                finished = h.path in self.ends or len(h.path) >= self.max_len
                out.append(b.child(h, Step(label, (ord(label),) * tokens, 0.0, "step"), 0, finished))
        return out

    def complete(self, branches, meter):
        if meter.generation_share(len(branches)) < 1:
            return list(branches)
        meter.ledger.charge_generated(len(branches))
        return [b if b.finished else b.child(b.handle, Step("!", (33,), 0.0, "eos"), 0, True) for b in branches]

    def release(self, branches):
        for b in branches:
            self.live.discard(b.handle)

    def answer(self, branch):
        return branch.text


class TableVerifier:
    """Scores a branch by its text (its path of letters); unknown paths score `default`."""

    def __init__(self, table: dict[str, float], default: float = 0.0):
        self.table, self.default = table, default
        self.released: set[int] = set()

    def score(self, branches, meter):
        return [self.table.get(b.text, self.default) for b in branches]

    def release(self, branches=()):
        self.released.update(b.id for b in branches)


def statuses(result) -> dict[str, str]:
    """Each node's status by its path (paths are unique in a FakeProposer's tree)."""
    return {path_of(result, n): n["status"] for n in result.tree["nodes"]}


def path_of(result, node) -> str:
    nodes = {n["id"]: n for n in result.tree["nodes"]}
    text = ""
    while node is not None:
        text = node["text"] + text
        node = nodes.get(node["parent"])
    return text


# -- beam search, by hand ------------------------------------------------------------------------------


def test_beam_keeps_the_best_width_children_each_round_and_answers_with_the_best_finished():
    table = {"a": .9, "b": .2, "c": .8, "d": .5,
             "aa": .3, "ab": .6, "ca": .7, "cb": .1,
             "caa": .4, "cab": .95, "aba": .5, "abb": .2}
    proposer, verifier = FakeProposer(max_len=3), TableVerifier(table)
    result = Beam(n=2, expand=2, max_depth=5)(PROBLEM, proposer, verifier, Meter())
    assert result.answer == "cab" and result.score == .95
    status = statuses(result)
    assert {p: status[p] for p in ("a", "b", "c", "d")} == {"a": "kept", "b": "pruned", "c": "kept", "d": "pruned"}
    assert {p: status[p] for p in ("aa", "ab", "ca", "cb")} == {"aa": "pruned", "ab": "kept", "ca": "kept",
                                                                "cb": "pruned"}
    assert {p: status[p] for p in ("caa", "cab", "aba", "abb")} == {"caa": "pruned", "cab": "chosen",
                                                                    "aba": "final", "abb": "pruned"}
    assert sorted(c["answer"] for c in result.candidates) == ["aba", "cab"]
    assert [n["score"] for n in result.tree["nodes"] if path_of(result, n) == "ca"] == [.7]
    assert proposer.live == set()  # every pruned child, expanded parent and finished solution released


def test_a_finished_child_takes_its_slot_and_the_beam_narrows():
    # round 1: b finishes (kept, slot 1 of 2 filled); round 2: one slot left, so a asks for 1 * 2 children
    table = {"a": .8, "b": .9, "c": .1, "d": .1, "aa": .3, "ab": .7, "aba": .2, "abb": .6}
    proposer = FakeProposer(ends={"b"}, max_len=3)
    result = Beam(n=2, expand=2)(PROBLEM, proposer, TableVerifier(table), Meter())
    assert proposer.drawn[next(n["id"] for n in result.tree["nodes"] if path_of(result, n) == "a")] == 2
    assert result.answer == "b" and result.score == .9  # the best finished, found in round 1
    assert sorted(c["answer"] for c in result.candidates) == ["abb", "b"]
    assert proposer.live == set()


def test_beam_of_width_one_and_expand_one_follows_the_first_child_to_the_end():
    proposer = FakeProposer(max_len=4)
    result = Beam(n=1, expand=1)(PROBLEM, proposer, TableVerifier({}), Meter())
    assert result.answer == "aaaa"
    assert proposer.live == set()


def test_beam_completes_its_best_open_beam_when_nothing_finished():
    table = {"a": .2, "b": .7}
    proposer = FakeProposer(max_len=9)
    result = Beam(n=2, expand=1, max_depth=1)(PROBLEM, proposer, TableVerifier(table, default=.5), Meter())
    assert result.answer == "b!"  # b completed in place, then scored (default .5)
    assert result.score == .5
    assert proposer.live == set()


def test_beam_stops_when_the_budget_cannot_pay_for_another_round():
    proposer = FakeProposer(max_len=9, step_tokens=10)
    meter = Meter(ttc.Budget(tokens=5 + 4 * 10 + 4 * 5 + 3))  # prompt, round 1, round 2 at 5 tokens a step, 3
    result = Beam(n=2, expand=2, max_depth=9)(PROBLEM, proposer, TableVerifier({}), meter)
    steps = {path_of(result, n): n["tokens"] for n in result.tree["nodes"]}
    assert len(result.tree["history"]) == 2  # round 3 could give each of 4 children 3 // 4 = 0 tokens
    assert steps["a"] == 10 and steps["aa"] == 5  # round 2 shrank its steps to what was left
    assert result.answer == "aa!"  # the last 3 tokens complete the best open beam
    assert meter.ledger.total_tokens <= meter.budget.tokens
    assert proposer.live == set()


def test_beam_warns_when_its_first_round_affords_only_stubs_of_steps():
    proposer = FakeProposer(max_len=2, step_tokens=10)
    # 5 prompt tokens, then 16 children: (5 + 16 * 3) // 16 = 3 tokens each
    with pytest.warns(RuntimeWarning, match=r"^the first round's 16 children can draw only 3 token\(s\) each "
                                            r"within the budget \(58 tokens\): lower the width"):
        Beam(n=4, expand=4)(PROBLEM, proposer, TableVerifier({}), Meter(ttc.Budget(tokens=5 + 16 * 3 + 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a round that affords whole steps says nothing
        Beam(n=4, expand=4)(PROBLEM, FakeProposer(max_len=2), TableVerifier({}), Meter(ttc.Budget(tokens=5000)))


def test_a_selector_that_keeps_fewer_beams_gives_the_survivors_more_children():
    class KeepOne:
        def select(self, scored, k, meter):
            return [scored[0].branch]

    proposer = FakeProposer(max_len=2)
    result = Beam(n=3, expand=2, selector=KeepOne())(PROBLEM, proposer, TableVerifier({}), Meter())
    a = next(n for n in result.tree["nodes"] if path_of(result, n) == "a")
    assert proposer.drawn[a["id"]] == 6  # all 3 slots * 2 children go to the one survivor
    assert proposer.live == set()


# -- DVTS, by hand -----------------------------------------------------------------------------------


def test_dvts_selects_within_each_subtree_so_a_weak_subtree_survives():
    table = {"a": .9, "b": .8, "c": .7, "d": .6, "e": .1, "f": .2, "g": .3, "h": .05}
    proposer = FakeProposer(max_len=9)
    dvts = DVTS(n=4, subtrees=2, expand=2, max_depth=1)(PROBLEM, proposer, TableVerifier(table), Meter())
    kept = sorted(path_of(dvts, n) for n in dvts.tree["nodes"] if n["status"] in ("kept", "chosen")
                  and n["depth"] == 1)
    assert kept == ["a", "b", "f", "g"]  # a-d went to subtree 1, e-h to subtree 2
    assert dvts.answer == "a!" and proposer.live == set()

    proposer = FakeProposer(max_len=9)
    beam = Beam(n=4, expand=2, max_depth=1)(PROBLEM, proposer, TableVerifier(table), Meter())
    kept = sorted(path_of(beam, n) for n in beam.tree["nodes"] if n["status"] in ("kept", "chosen")
                  and n["depth"] == 1)
    assert kept == ["a", "b", "c", "d"]


def test_weighted_dvts_answers_with_the_heaviest_group_of_equal_answers():
    class Answers(FakeProposer):
        def answer(self, branch):
            return {"a": "1", "b": "2", "c": "2"}.get(branch.text)

    proposer = Answers(ends={"a", "b", "c"})
    table = {"a": .9, "b": .5, "c": .6}
    plain = DVTS(n=3, subtrees=3, expand=1)(PROBLEM, proposer, TableVerifier(table), Meter())
    proposer = Answers(ends={"a", "b", "c"})
    weighted = DVTS(n=3, subtrees=3, expand=1, weighted=True)(PROBLEM, proposer, TableVerifier(table), Meter())
    assert plain.answer == "1"
    assert weighted.answer == "2" and weighted.score == .6  # 0.5 + 0.6 outweigh 0.9; c is its best member


def test_dvts_releases_the_verifier_state_of_every_branch_it_drops():
    table = {"a": .9, "b": .8, "c": .7, "d": .6}
    verifier = TableVerifier(table)
    result = DVTS(n=2, subtrees=2, expand=2, max_depth=1)(PROBLEM, FakeProposer(), verifier, Meter())
    assert statuses(result) == {"": "root", "a": "kept", "b": "pruned", "c": "kept", "d": "pruned", "a!": "chosen"}
    assert {n["id"] for n in result.tree["nodes"]} == verifier.released


# -- A*, by hand -----------------------------------------------------------------------------------------


def test_astar_pops_the_lowest_f_and_answers_with_the_first_finished_branch_popped():
    table = {"a": .9, "b": .5, "aa": .2, "ab": .6, "aba": .9, "abb": .1}
    proposer = FakeProposer(max_len=3)
    result = AStar(n=2)(PROBLEM, proposer, TableVerifier(table), Meter())
    assert result.answer == "aba" and result.score == .9
    expanded = [path_of(result, next(n for n in result.tree["nodes"] if n["id"] == h["expanded"]))
                for h in result.tree["history"]]
    assert expanded == ["", "a", "ab"]  # f(ab) = .31 + .51 < f(b) = 1.39 < f(aa) = 2.47
    assert {p: s for p, s in statuses(result).items() if p} == {"a": "kept", "b": "open", "aa": "open", "ab": "kept",
                                                               "aba": "chosen", "abb": "open"}
    assert proposer.live == set()


def test_astar_priority_is_mean_step_cost_plus_latest_step_cost():
    b = Branch(handle=None, scores=(.5, .25))
    assert AStar(g_weight=2.0, h_weight=3.0).priority(b) == pytest.approx(
        2.0 * (math.log(2) + math.log(4)) / 2 + 3.0 * math.log(4))
    assert step_cost(0.0) == step_cost(-1.0) == pytest.approx(-math.log(1e-6))


def test_astar_with_a_bounded_frontier_releases_what_it_prunes():
    table = {"a": .9, "b": .8, "c": .1, "aa": .9, "ab": .2, "aaa": .9}
    proposer = FakeProposer(max_len=3)
    result = AStar(n=3, max_frontier=2)(PROBLEM, proposer, TableVerifier(table, default=.3), Meter())
    status = statuses(result)
    assert status["c"] == "pruned" and result.answer == "aaa"
    assert proposer.live == set()


def test_astar_falls_back_to_the_best_open_branch_completed_when_out_of_expansions():
    table = {"a": .9, "b": .5}
    proposer = FakeProposer(max_len=9)
    result = AStar(n=2, max_expansions=1)(PROBLEM, proposer, TableVerifier(table), Meter())
    assert result.answer == "a!"
    assert proposer.live == set()


# -- ETS ---------------------------------------------------------------------------------------------------


def fake_tree(rng: random.Random, n: int) -> list[Branch]:
    """n candidates hanging off a random tree of depth up to 3 under one root."""
    root = Branch(handle=None)
    nodes = [root]
    step = Step("s", (1,), 0.0, "step")
    for _ in range(rng.randint(1, 5)):
        parent = rng.choice(nodes)
        if parent.depth < 2:
            nodes.append(parent.child(None, step, 0, False))
    return [rng.choice(nodes).child(None, step, 0, False) for _ in range(n)]


def brute_force(program: KeepProgram) -> float:
    n = len(program.values)
    return max(program.objective(keep) for size in range(1, min(program.k, n) + 1)
               for keep in itertools.combinations(range(n), size))


def test_ets_integer_program_matches_brute_force_on_random_instances():
    rng = random.Random(0)
    for trial in range(40):
        n = rng.randint(1, 8)
        branches = fake_tree(rng, n)
        scores = [rng.choice([rng.random(), 0.5]) for _ in range(n)]
        centres = [rng.randrange(3) for _ in range(n)]
        program = KeepProgram(values=tuple(keep_values(scores, rng.choice([0.2, 1.0]))),
                              paths=tuple(path_nodes(b) for b in branches), clusters=tuple(centres),
                              k=rng.randint(1, n), lambda_kv=rng.choice([0.0, 0.1, 0.5, 1.5]),
                              lambda_coverage=rng.choice([0.0, 0.5, 2.0]))
        keep = program.solve()
        assert 1 <= len(keep) <= program.k
        assert program.objective(keep) == pytest.approx(brute_force(program), abs=1e-7), trial


def test_ets_with_both_lambdas_zero_keeps_exactly_the_top_k():
    rng = random.Random(1)
    for _ in range(30):
        n = rng.randint(1, 10)
        branches = fake_tree(rng, n)
        scores = [rng.choice([0.0, 0.5, 1.0, rng.random(), -3.0]) for _ in range(n)]
        scored = [Scored(b, s) for b, s in zip(branches, scores)]
        k = rng.randint(1, n + 1)
        top = TopK().select(scored, k, Meter())
        program = KeepProgram(values=tuple(keep_values(scores, 0.2)), paths=tuple(path_nodes(b) for b in branches),
                              clusters=tuple(range(n)), k=k, lambda_kv=0.0, lambda_coverage=0.0)
        assert [branches[i] for i in program.solve()] == top
        assert ETSSelector(lambda_kv=0.0, lambda_coverage=0.0).select(scored, k, Meter()) == top


def test_ets_prefers_siblings_when_kv_is_dear():
    root = Branch(handle=None)
    step = Step("s", (1,), 0.0, "step")
    a, b = root.child(None, step, 0, False), root.child(None, step, 0, False)
    a1, a2, b1 = a.child(None, step, 0, False), a.child(None, step, 0, False), b.child(None, step, 0, False)
    scored = [Scored(a1, .5), Scored(a2, .5), Scored(b1, .52)]
    assert ETSSelector(lambda_kv=0.0, lambda_coverage=0.0).select(scored, 2, Meter()) == [b1, a1]
    # {a1, a2}: 2 * 0.966 - 3 nodes * 0.3 = 1.03 beats {b1, a1}: 1.068 + 0.966 - 4 * 0.3 = 0.83
    assert set(ETSSelector(lambda_kv=0.3, lambda_coverage=0.0).select(scored, 2, Meter())) == {a1, a2}


def test_ets_covers_a_second_cluster_when_coverage_is_worth_it():
    root = Branch(handle=None)
    step = Step("s", (1,), 0.0, "step")
    a1, a2, b1 = (root.child(None, step, 0, False) for _ in range(3))
    vectors = {a1.id: [1.0, 0.0], a2.id: [1.0, 0.01], b1.id: [0.0, 1.0]}
    embed = lambda branches, meter: [vectors[b.id] for b in branches]  # noqa: E731
    scored = [Scored(a1, .6), Scored(a2, .59), Scored(b1, .3)]
    assert ETSSelector(lambda_kv=0.0, lambda_coverage=0.0, embed_fn=embed).select(scored, 2, Meter()) == [a1, a2]
    assert ETSSelector(lambda_kv=0.0, lambda_coverage=2.0, embed_fn=embed).select(scored, 2, Meter()) == [a1, b1]


def test_ets_bind_gives_each_search_its_own_embedding_cache_and_leaves_the_configured_selector_alone():
    """An eval's worker threads share one configured selector; one shared cache let a search evict another's
    embeddings mid-round (a KeyError at concurrency 8)."""
    root = Branch(handle=None)
    step = Step("s", (1,), 0.0, "step")
    a1, a2, b1 = (root.child(None, step, 0, False) for _ in range(3))
    calls = []

    def embed(branches, meter):
        calls.append([b.id for b in branches])
        return [[1.0, float(b.id)] for b in branches]

    configured = ETSSelector(embed_fn=embed)
    policy = types.SimpleNamespace(backend=object())
    search_a, search_b = configured.bind(policy), configured.bind(policy)
    assert search_a is not configured and search_a is not search_b and search_a._backend is policy.backend
    first = search_a.embed([a1, a2], Meter())
    search_b.embed([b1], Meter())  # the other search's round: it forgets only its own branches
    again = search_a.embed([a1, a2], Meter())
    assert calls == [[a1.id, a2.id], [b1.id]] and all(np.array_equal(x, y) for x, y in zip(first, again))
    assert configured._cache == {} and configured._backend is None


def test_a_selector_whose_bind_returns_nothing_is_refused_in_one_line():
    class BindsInPlace:
        def bind(self, proposer):
            self.bound_to = proposer

        def select(self, scored, k, meter):
            return [s.branch for s in scored[:k]]

    with pytest.raises(TypeError, match=r"^BindsInPlace.bind\(proposer\) must return the selector for this search"):
        Beam(n=2, expand=2, selector=BindsInPlace())(PROBLEM, FakeProposer(), TableVerifier({}), Meter())


def test_clusters_group_close_directions_and_leave_missing_embeddings_alone():
    labels = cluster([np.array([1.0, 0.0]), np.array([2.0, 0.01]), None, np.array([0.0, 1.0]), np.zeros(2)], 0.05)
    assert labels[0] == labels[1] and len({labels[0], labels[2], labels[3], labels[4]}) == 4


# -- configs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cls", [("beam", Beam), ("dvts", DVTS), ("astar", AStar), ("ets", ETS)])
def test_each_strategy_config_builds_its_class_without_the_proposer_keys(name, cls):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    file = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "strategy" / f"{name}.yaml")
    assert "proposer" not in file  # a step strategy keeps configs/proposer/local.yaml's defaults (768 tokens)
    cfg = file.strategy
    assert cfg._target_.startswith("ttc.")
    strategy = instantiate(cfg)
    assert type(strategy) is cls
    assert strategy == cls() if name != "ets" else strategy.selector == ETSSelector()


@pytest.mark.parametrize("strategy", ["SelfConsistency", "BestOfN"])
def test_a_sampling_strategy_of_no_samples_is_refused_when_made(strategy):
    from ttc.search.best_of_n import BestOfN
    from ttc.search.self_consistency import SelfConsistency

    with pytest.raises(ValueError, match="strategy.n must be >= 1, not 0"):
        {"SelfConsistency": SelfConsistency, "BestOfN": BestOfN}[strategy](n=0)


def test_a_proposer_of_no_tokens_is_refused_when_made():
    from ttc.backends.steps import StepProposer

    with pytest.raises(ValueError, match="must be at least 1, not 256 and 0"):
        StepProposer(max_tokens=0)
