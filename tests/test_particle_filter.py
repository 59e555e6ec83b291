"""Particle filtering and Particle Gibbs: weights, ESS and resampling by hand; KV forks, budget, pool and seeds
on the tiny model; finished particles, statuses and the vote on a scripted proposer; one run on the embedded model.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

import ttc
from ttc.graph import Branch, Meter, Problem, Step
from ttc.backends.local import LocalProposer
from ttc.search.particle_filter import (Holds, ParticleFilter, Population, effective_sample_size, inverse_cdf,
                                        multinomial, normalize, systematic)
from ttc.verifiers.math import extract_answer

from conftest import require_data

PROBLEM = Problem(id="pf-1", prompt=[{"role": "user", "content": "What is 2+3?"}])


def _pool_is_whole(model) -> bool:
    engine = model.engine
    return engine.pool.num_free + engine.prefix.num_cached_blocks == engine.pool.num_blocks


class HashVerifier:
    """A deterministic process score in [0, 4): a hash of the new step's token ids."""

    def score(self, branches, meter):
        return [zlib.crc32(repr(b.steps[-1].token_ids).encode()) % 1000 / 250 for b in branches]


class ChargingVerifier(HashVerifier):
    """The hash score, charging 3 verifier tokens per branch, as a real process verifier would."""

    cost_per_branch = 3.0

    def score(self, branches, meter):
        meter.ledger.charge_verifier(3 * len(branches))
        return super().score(branches, meter)


class Spy(LocalProposer):
    """Remembers the branch a strategy asked the answer of (the chosen one)."""

    def answer(self, branch):
        self.chosen = branch
        return super().answer(branch)


def _proposer(model, cls=LocalProposer, **kwargs):
    return cls(model, **{"max_step_tokens": 6, "max_tokens": 18, "seed": 1, "answer_fn": extract_answer, **kwargs})


# -- weights, ESS and resampling by hand -----------------------------------------------------------


def test_resampling_weights_are_a_softmax_of_scores_and_sum_to_one():
    scores, t = [1.0, 2.0, 4.0], 0.5
    e = [math.exp(s / t) for s in scores]
    assert normalize(np.array(scores) / t).tolist() == pytest.approx([x / sum(e) for x in e])
    assert normalize([1000.0, 1001.0]).sum() == pytest.approx(1.0)  # large scores do not overflow
    assert normalize([3.0, 3.0, 3.0, 3.0]).tolist() == pytest.approx([0.25] * 4)


def test_effective_sample_size_is_one_over_the_sum_of_squared_weights():
    assert effective_sample_size([0.25] * 4) == pytest.approx(4.0)
    assert effective_sample_size([0.0, 1.0, 0.0]) == pytest.approx(1.0)
    assert effective_sample_size([0.5, 0.25, 0.25]) == pytest.approx(1 / 0.375)


def test_multinomial_resampling_maps_each_uniform_through_the_cumulative_weights():
    # cumulative weights 0.1, 0.3, 0.6, 1.0
    assert inverse_cdf([0.1, 0.2, 0.3, 0.4], [0.05, 0.5, 0.95, 0.62]) == [0, 2, 3, 3]
    assert inverse_cdf([0.0, 1.0, 0.0], [0.0, 0.3, 0.999]) == [1, 1, 1]  # zero weight is never drawn
    # default_rng(0).random(4) = 0.637, 0.270, 0.041, 0.017: sorted, all but the largest fall in the first half
    assert multinomial([0.5, 0.5], 4, np.random.default_rng(0)) == [0, 0, 0, 1]


def test_systematic_resampling_spreads_one_uniform_over_evenly_spaced_points():
    # default_rng(0).random() = 0.637: points 0.159, 0.409, 0.659, 0.909 over cumulative 0.1, 0.3, 0.6, 1.0
    assert systematic([0.1, 0.2, 0.3, 0.4], 4, np.random.default_rng(0)) == [1, 2, 3, 3]
    # three draws (Particle Gibbs draws N - 1): points 0.212, 0.546, 0.879
    assert systematic([0.1, 0.2, 0.3, 0.4], 3, np.random.default_rng(0)) == [1, 2, 3]
    # a particle of weight k/N is drawn exactly k times
    assert systematic([0.5, 0.25, 0.25], 4, np.random.default_rng(7)) == [0, 0, 1, 2]


def test_invalid_options_are_refused():
    for bad in (dict(n=0), dict(resampling="stratified"), dict(ess_threshold=1.5), dict(final="max"),
                dict(temperature_weights=0.0), dict(gibbs_sweeps=1, n=1)):
        with pytest.raises(ValueError):
            ParticleFilter(**bad)


def test_the_config_names_the_class_and_its_defaults():
    path = Path(__file__).parents[1] / "configs" / "strategy" / "particle_filter.yaml"
    cfg = yaml.safe_load(path.read_text())["strategy"]  # the strategy's own fields (beside any proposer defaults)
    assert cfg.pop("_target_") == "ttc.search.particle_filter.ParticleFilter"
    assert ParticleFilter(**cfg) == ParticleFilter()


# -- on the tiny model -----------------------------------------------------------------------------


def test_one_particle_takes_the_same_steps_as_a_direct_step_loop(tiny_model):
    """With N = 1 every resampling keeps the only particle, so the run is one branch stepped to its end.

    Not propose([root], 1, to_end=True): a step-wise branch draws each step from a fresh child seed, a
    whole-solution sample from one stream. The same step loop, seed for seed, gives the same tokens.
    """
    spy = _proposer(tiny_model, Spy)
    res = ParticleFilter(n=1, max_steps=50)(PROBLEM, spy, HashVerifier(), Meter())
    proposer, meter = _proposer(tiny_model), Meter()
    branch = proposer.start(PROBLEM, meter)
    steps = [branch]
    while not branch.finished:
        (branch,) = proposer.propose([branch], 1, meter)
        steps.append(branch)
    proposer.release(steps)
    assert [s.token_ids for s in spy.chosen.steps] == [s.token_ids for s in branch.steps]
    assert spy.chosen.handle.token_ids == branch.handle.token_ids
    assert res.text == branch.text and len(res.tree["history"]) == branch.depth
    assert all(h["ancestors"] == [0] and h["ess"] == 1.0 for h in res.tree["history"])
    assert _pool_is_whole(tiny_model)


def test_the_same_seed_gives_the_same_result(tiny_model):
    def run(seed, **kwargs):
        spy = _proposer(tiny_model, Spy, seed=seed)
        res = ParticleFilter(n=3, max_steps=8, **kwargs)(PROBLEM, spy, HashVerifier(), Meter())
        rounds = [{k: v for k, v in h.items() if k != "particles"} for h in res.tree["history"]]  # ids are global
        return spy.chosen.handle.token_ids, rounds, res.ledger.generated_tokens

    first = run(1, resampling="systematic")
    assert run(1, resampling="systematic") == first
    assert run(2, resampling="systematic") != first
    assert _pool_is_whole(tiny_model)


def test_the_budget_is_never_exceeded_for_several_budgets(tiny_model):
    prompt = len(tiny_model.tokenizer.encode_prompt(PROBLEM.prompt))
    options = [dict(), dict(ess_threshold=0.5), dict(gibbs_sweeps=2)]
    for budget in (prompt, prompt + 7, prompt + 40, prompt + 90):
        for kwargs in options:
            tiny_model.engine.clear_prefix_cache()  # the prompt is computed, and counted, every time
            meter = Meter(ttc.Budget(tokens=budget))
            res = ParticleFilter(n=3, max_steps=10, **kwargs)(PROBLEM, _proposer(tiny_model),
                                                                      ChargingVerifier(), meter)
            assert res.ledger.total_tokens <= budget, (budget, kwargs)
            assert res.ledger.prefill_tokens == prompt  # the prompt is paid for, once, out of the same budget
            assert res.ledger.verifier_tokens == 3 * sum(1 for n in res.tree["nodes"] if n["depth"] > 0)
            if budget - prompt < 3 * (1 + 3):  # not one token and its 3 verifier tokens for each of 3 particles
                assert res.tree["history"] == [] and res.ledger.generated_tokens == 0 and res.answer is None
            else:  # the budget is held by doing the work it pays for, not by doing nothing
                assert res.tree["history"] and res.ledger.generated_tokens > 0
            assert _pool_is_whole(tiny_model)


def test_the_pool_is_back_to_its_free_count_after_every_kind_of_run(tiny_model):
    engine = tiny_model.engine
    # a first run caches the prompt's blocks in the prefix cache; every later run must give back all it took
    ParticleFilter(n=2, max_steps=2)(PROBLEM, _proposer(tiny_model), HashVerifier(), Meter())
    free = engine.pool.num_free
    for kwargs in (dict(), dict(resampling="systematic", ess_threshold=0.9), dict(gibbs_sweeps=1, final="vote")):
        res = ParticleFilter(n=3, max_steps=6, **kwargs)(PROBLEM, _proposer(tiny_model), HashVerifier(),
                                                                 Meter())
        assert engine.pool.num_free == free, kwargs
        json.dumps(res.tree)  # plain data
        assert "ESS" in res._repr_html_()


def test_resampling_forks_kv_and_prefills_nothing(tiny_model):
    proposer, meter = _proposer(tiny_model), Meter()
    holds = Holds(proposer)
    root = proposer.start(PROBLEM, meter)
    holds.hold([root])
    pop = Population(proposer, meter, holds, keep_paths=False)
    pop.start(proposer.propose([root], 3, meter))
    before = ttc.Ledger(**meter.ledger.as_dict())
    parent = pop.branches[1]
    pop.resample([1, 1, 1])  # particle 1 drawn three times: kept once, forked twice; 0 and 2 released
    assert meter.ledger.prefill_tokens == before.prefill_tokens
    assert meter.ledger.generated_tokens == before.generated_tokens
    assert meter.ledger.reused_tokens == before.reused_tokens + 2 * len(parent.handle.token_ids)
    copies = pop.branches
    assert copies[0] is parent and len({id(b.handle) for b in copies}) == 3
    assert all(b.handle.token_ids == parent.handle.token_ids and b.id == parent.id for b in copies)
    full = len(parent.handle.token_ids) // tiny_model.engine.pool.block_size
    assert all(b.handle.kv.blocks[:full] == parent.handle.kv.blocks[:full] for b in copies)  # shared, not copied
    children = proposer.propose(copies, 1, meter)  # the copies are independent from their next token on
    assert len({c.steps[-1].token_ids for c in children}) == 3
    assert meter.ledger.prefill_tokens == before.prefill_tokens
    proposer.release(children)
    pop.close()
    holds.drop_all()
    assert _pool_is_whole(tiny_model)


@pytest.fixture(scope="module")
def plain_run(tiny_model):
    """One run from a cold prefix cache: 4 particles, resampled every round, weights at temperature 0.7."""
    tiny_model.engine.clear_prefix_cache()
    pf = ParticleFilter(n=4, max_steps=8, temperature_weights=0.7)
    return pf(PROBLEM, _proposer(tiny_model), HashVerifier(), Meter())


def test_a_whole_run_prefills_only_the_prompt_however_often_particles_are_duplicated(tiny_model, plain_run):
    history = plain_run.tree["history"]
    duplicated = sum(len(h["ancestors"]) - len(set(h["ancestors"])) for h in history if h["resampled"])
    assert duplicated > 0
    assert plain_run.ledger.prefill_tokens == len(tiny_model.tokenizer.encode_prompt(PROBLEM.prompt))
    assert plain_run.ledger.reused_tokens > 0
    assert _pool_is_whole(tiny_model)


def test_each_round_after_a_resampling_weighs_particles_by_a_softmax_of_their_scores(plain_run):
    for h in plain_run.tree["history"]:  # every round before resampled: weights never carry over
        assert h["weights"] == pytest.approx(normalize(np.array(h["scores"]) / 0.7).tolist())
        assert sum(h["weights"]) == pytest.approx(1.0)
        assert h["ess"] == pytest.approx(effective_sample_size(h["weights"]))


class OldestFirst:
    """Scores steps by how early they were made: a reference trajectory (from a sweep before) outweighs the
    particles of its sweep, so they fork off its prefix."""

    def score(self, branches, meter):
        return [-float(b.id) for b in branches]


def test_particle_gibbs_keeps_the_reference_trajectory_in_every_sweep(tiny_model):
    res = ParticleFilter(n=3, max_steps=6, gibbs_sweeps=2)(PROBLEM, _proposer(tiny_model), OldestFirst(),
                                                                   Meter())
    parent = {n["id"]: n["parent"] for n in res.tree["nodes"]}
    score = {n["id"]: n["score"] for n in res.tree["nodes"]}
    (root,) = [n["id"] for n in res.tree["nodes"] if n["status"] == "root"]
    sweeps = [[h for h in res.tree["history"] if h["sweep"] == s] for s in range(3)]
    assert all(sweeps) and all(h["reference"] is None for h in sweeps[0])
    forked_off_reference = 0
    for before, rounds in zip(sweeps, sweeps[1:]):
        assert all(h["reference"] == 2 for h in rounds)
        trajectory = [h["particles"][2] for h in rounds]
        assert parent[trajectory[0]] == root
        for a, b in zip(trajectory, trajectory[1:]):
            assert b == a or parent[b] == a  # one step further, or finished and staying
        assert trajectory[-1] in before[-1]["particles"]  # a particle of the run before
        for h in rounds:  # its step scores come from its own run, not from scoring it again
            assert h["scores"][2] == pytest.approx(score[h["particles"][2]])
        for h, nxt in zip(rounds, rounds[1:]):  # free particles forking off the reference's prefix
            for j, a in enumerate(h["ancestors"][:2]):
                if a == 2 and nxt["particles"][j] != h["particles"][2]:
                    assert parent[nxt["particles"][j]] == h["particles"][2]
                    forked_off_reference += 1
    assert forked_off_reference > 0
    assert _pool_is_whole(tiny_model)


# -- on a scripted proposer --------------------------------------------------------------------------


class ScriptedProposer:
    """Steps from a script: the k-th child of the branch whose last step is `p` has step text `p/k`, and is
    finished when the script says so. No engine, so duplicates share their branch. Counts releases."""

    seed = 0

    def __init__(self, finished=()):
        self.finished = set(finished)
        self.created, self.released = [], []

    def _branch(self, parent, text):
        child = parent.child(object(), Step(text, (len(self.created),), 0.0, "step"), seed=0,
                             finished=text in self.finished)
        self.created.append(child.handle)
        return child

    def start(self, problem, meter):
        root = Branch(handle=object())
        self.created.append(root.handle)
        return root

    def propose(self, branches, n, meter):
        return [self._branch(b, f"{b.steps[-1].text if b.steps else ''}/{k}")
                for b in branches if not b.finished for k in range(n)]

    def fork(self, branches, copies, meter):
        return [[b] * k for b, k in zip(branches, copies)]  # no KV to share: copies are the branch itself

    def release(self, branches):
        self.released.extend(b.handle for b in branches)

    def answer(self, branch):
        last = branch.steps[-1].text
        return last.split("=")[-1] if "=" in last else None


class TableVerifier:
    def __init__(self, table):
        self.table = table

    def score(self, branches, meter):
        return [self.table[b.steps[-1].text] for b in branches]


def test_finished_particles_stay_with_their_last_score_and_everything_is_released_once():
    proposer = ScriptedProposer(finished={"/0", "/1/0", "/2/0/0"})
    verifier = TableVerifier({"/0": 2.0, "/1": 1.0, "/2": 0.0, "/1/0": 0.5, "/2/0": 1.5, "/2/0/0": 0.25})
    # ESS never falls below 0.01 * N: no resampling, so weights accumulate score after score
    res = ParticleFilter(n=3, max_steps=5, ess_threshold=0.01)(PROBLEM, proposer, verifier, Meter())
    h1, h2, h3 = res.tree["history"]
    assert h1["scores"] == [2.0, 1.0, 0.0] and h1["finished"] == [True, False, False]
    assert h2["scores"] == [2.0, 0.5, 1.5]  # the finished particle keeps its last score
    assert h2["weights"] == pytest.approx(normalize([4.0, 1.5, 1.5]).tolist())
    assert h3["scores"] == [2.0, 0.5, 0.25] and h3["weights"] == pytest.approx(normalize([6.0, 2.0, 1.75]).tolist())
    assert res.text == "/0" and res.score == 2.0
    assert sorted(map(id, proposer.released)) == sorted(map(id, proposer.created))  # each exactly once
    status = {n["text"]: n["status"] for n in res.tree["nodes"]}
    assert status["/0"] == "chosen" and status["/1/0"] == "final" and status["/2/0/0"] == "final"
    assert status["/1"] == "kept" and status["/2/0"] == "kept"


def test_resampling_prunes_undrawn_particles_and_releases_them():
    proposer = ScriptedProposer(finished={"/0/0", "/1/0", "/2/0", "/0/0/0"})
    # particle 2 holds essentially all the weight: every draw picks it, the others are pruned
    verifier = TableVerifier({"/0": 0.0, "/1": 0.0, "/2": 50.0, "/2/0": 1.0, "/0/0": 0.0, "/1/0": 0.0})
    res = ParticleFilter(n=3, max_steps=5)(PROBLEM, proposer, verifier, Meter())
    h1, h2 = res.tree["history"]
    assert h1["ancestors"] == [2, 2, 2] and h1["resampled"]
    parent = {n["id"]: n["parent"] for n in res.tree["nodes"]}
    assert [parent[i] for i in h2["particles"]] == [h1["particles"][2]] * 3  # three copies of one step went on
    status = {n["text"]: n["status"] for n in res.tree["nodes"] if n["text"] != "/2/0"}
    assert status["/0"] == status["/1"] == "pruned" and status["/2"] == "kept"
    assert sorted(n["status"] for n in res.tree["nodes"] if n["text"] == "/2/0") == ["chosen", "final", "final"]
    assert sorted(map(id, proposer.released)) == sorted(map(id, proposer.created))


def test_the_vote_sums_weight_over_equivalent_answers():
    finished = {"/0=4", "/1=4.0", "/2=5"}

    class Answers(ScriptedProposer):
        def propose(self, branches, n, meter):
            return [self._branch(b, f"/{k}=" + ["4", "4.0", "5"][k]) for b in branches for k in range(n)]

    verifier = TableVerifier({"/0=4": 1.0, "/1=4.0": 1.0, "/2=5": 1.5})
    top = ParticleFilter(n=3, final="argmax")(PROBLEM, Answers(finished), verifier, Meter())
    assert top.answer == "5"
    voted = ParticleFilter(n=3, final="vote")(PROBLEM, Answers(finished), verifier, Meter())
    assert voted.answer == "4"  # 2e^1 outweighs e^1.5
    assert voted.score == pytest.approx(2 * math.e / (2 * math.e + math.e ** 1.5))
    assert [c["answer"] for c in voted.candidates] == ["4", "4.0", "5"]


# -- on the embedded model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm():
    return ttc.load("smollm2-135m")


class MeanLogprobVerifier:
    """A toy process verifier: the mean token logprob of the new step (the policy's own confidence)."""

    def score(self, branches, meter):
        return [b.steps[-1].logprob / max(1, len(b.steps[-1].token_ids)) for b in branches]


@pytest.mark.slow
def test_particle_filter_on_gsm8k_holds_its_budget_and_answers_with_its_heaviest_particle(smollm):
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
    require_data(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()[:1]]
    for i, row in enumerate(rows):
        problem = Problem(id=f"gsm8k-{i}", prompt=[{"role": "user", "content": row["question"]}])
        proposer = LocalProposer(smollm, answer_fn=extract_answer, max_tokens=200, max_step_tokens=64, temperature=0.8, seed=0)
        meter = Meter(ttc.Budget(tokens=1500))
        res = ParticleFilter(n=4, max_steps=8)(problem, proposer, MeanLogprobVerifier(), meter)
        history, nodes = res.tree["history"], {n["id"]: n for n in res.tree["nodes"]}
        assert res.ledger.total_tokens <= 1500
        assert res.ledger.generated_tokens == sum(n["tokens"] for n in nodes.values())  # each token in one step
        assert res.strategy == "particle_filter" and res.tree["kind"] == "particles" and history
        assert all(len(h["particles"]) == 4 and sum(h["weights"]) == pytest.approx(1.0) for h in history)
        # the candidates are the finished particles the run ended with (all of them if none finished): those of
        # the last round, or, if it resampled and only finished particles were drawn, the drawn copies ...
        last = history[-1]
        assert last["resampled"] or last["ancestors"] == [0, 1, 2, 3]
        finished = [last["finished"][a] for a in last["ancestors"]]
        assert not last["resampled"] or all(finished)  # a resampled round is last only if nobody can move on
        assert len(res.candidates) == (sum(finished) or 4)
        assert sum(c["weight"] for c in res.candidates) == pytest.approx(1.0)
        # ... and the answer is the heaviest one's (the first of equals), stated in the text of its path
        best = max(res.candidates, key=lambda c: c["weight"])
        assert (res.answer, res.score) == (best["answer"], best["score"])
        (chosen,) = [n for n in nodes.values() if n["status"] == "chosen"]
        assert _path_text(nodes, chosen["id"]) == res.text and res.text
        assert res.answer == extract_answer(res.text)
        assert smollm.engine.pool.num_free + smollm.engine.prefix.num_cached_blocks == smollm.engine.pool.num_blocks


def _path_text(nodes: dict, node_id: int) -> str:
    """A branch's text from the tree alone: the texts of its steps, from the root down to node `node_id`."""
    texts = []
    while node_id is not None:
        texts.append(nodes[node_id]["text"])
        node_id = nodes[node_id]["parent"]
    return "".join(reversed(texts))
