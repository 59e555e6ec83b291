"""Pipelines of layers (ttc.search.pipeline, ttc.search.layers) on the scripted proposer, and on the tiny model.

The script (tests/scripted.py): every reply to a fresh root is "[0]", "[1]", ... in the order drawn; a
one-step solution's answer is "7" for [1], "5" for [3], "3" otherwise; PathVerifier scores [1] 1.0, the rest
0.1. IndexVerifier (below) scores "[k]" as k, so a ranking by it is easy to read.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from scripted import PROMPT_TOKENS, STEP_TOKENS, PathVerifier, ScriptedProposer
from ttc.budget import Budget, CannotAttempt
from ttc.evals.build import ConfigError, build_strategy, instantiate
from ttc.graph import Meter, Problem
from ttc.search.beam import Beam
from ttc.search.best_of_n import BestOfN
from ttc.search.layers import CRITIQUE_PROMPT, Critique, Fuse, Generate, Rank, Strategy, Verify, Vote
from ttc.search.pipeline import Candidate, Pipeline
from ttc.search.self_consistency import SelfConsistency

PROBLEM = Problem(id="p0", prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add."}])
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class IndexVerifier:
    """Scores a solution "[k]..." as k (its first step's draw index); counts what it scored."""

    def __init__(self):
        self.scored = 0

    def score(self, branches, meter):
        self.scored += len(branches)
        return [float(b.steps[0].text.strip("[]")) for b in branches]


class Recorder(ScriptedProposer):
    """The scripted proposer, keeping every problem a root was started on and the temperatures asked for."""

    def __init__(self, ratings: dict[str, str] | None = None):
        super().__init__()
        self.started: list[Problem] = []
        self.temperatures: list[float] = []
        self.ratings = ratings or {}  # a solution's text -> the reply a rating prompt showing it gets
        self._rating_roots: dict[int, str] = {}

    def start(self, problem, meter):
        root = super().start(problem, meter)
        self.started.append(problem)
        shown = [text for text in self.ratings if "#rate" in problem.id and f"solution:\n{text}\n" in
                 problem.prompt[-1]["content"]]
        if shown:
            self._rating_roots[root.id] = self.ratings[shown[0]]
        return root

    def _step(self, parent, handle, k, meter, to_end):
        child = super()._step(parent, handle, k, meter, to_end)
        reply = self._rating_roots.get(parent.id)
        if reply is None:
            return child
        return replace(child, steps=child.steps[:-1] + (replace(child.steps[-1], text=reply),))

    def with_temperature(self, temperature):
        self.temperatures.append(temperature)
        return self

    def prompts(self, stage: str) -> list[str]:
        """The user message of every root started for `stage` ("fuse", "critique", ...)."""
        return [p.prompt[-1]["content"] for p in self.started if f"#{stage}" in p.id]


class KeepAnswer:
    """A user's own layer (outside ttc): passes on the candidates whose answer is `answer`, or all of them."""

    def __init__(self, answer: str):
        self.answer_wanted = answer

    def __call__(self, ctx, candidates):
        return [c for c in candidates if c.answer == self.answer_wanted] or candidates


class Snapshot:
    """A layer that passes everything on and records what it saw, and which branch handles were live."""

    def __init__(self):
        self.seen: list[list[Candidate]] = []
        self.live: list[int] = []

    def __call__(self, ctx, candidates):
        self.seen.append(list(candidates))
        self.live.append(len(getattr(ctx.proposer, "live", ())))  # the scripted proposer's live handles
        return candidates


def run(layers, proposer=None, verifier=None, tokens=10_000, n=4):
    proposer = proposer or ScriptedProposer()
    meter = Meter(Budget(tokens=tokens))
    return Pipeline(layers, n=n)(PROBLEM, proposer, verifier, meter), proposer, meter


# --- built from config ------------------------------------------------------------------------------

def test_the_default_pipeline_yaml_builds_through_the_config_edge_and_is_self_consistency():
    node = yaml.safe_load((CONFIGS / "strategy" / "pipeline.yaml").read_text())
    pipeline = build_strategy({"strategy": {**node["strategy"], "n": 4}})
    assert [type(layer) for layer in pipeline.layers] == [Generate, Vote]
    result, proposer, _ = run(pipeline.layers)
    assert result.answer == "3" and result.score == 0.5 and not proposer.live


def test_the_archon_experiment_composes_with_hydra_and_its_layers_are_built_with_their_settings():
    from hydra import compose, initialize_config_module

    from ttc.evals.__main__ import config_dict

    with initialize_config_module(config_module="ttc.configs", version_base="1.3"):
        cfg = config_dict(compose("eval", overrides=["experiment=archon_layers", "dataset.limit=2"]))
    pipeline = build_strategy(cfg)
    assert [type(layer) for layer in pipeline.layers] == [Generate, Rank, Fuse, Verify]
    rank, fuse, verify = pipeline.layers[1:]
    assert (pipeline.n, rank.k, rank.by, fuse.keep_inputs, verify.threshold) == (8, 3, "model", True, 0.5)
    assert cfg["dataset"]["task"] == "chain_sum" and cfg["proposer"]["max_step_tokens"] == 16
    proposer = ScriptedProposer()
    result = pipeline(PROBLEM, proposer, None, Meter(Budget(tokens=cfg["budget"]["tokens"])))
    assert result.answer is not None and not proposer.live


# --- the layers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [10_000, 24, 41])
def test_generate_then_vote_is_self_consistency_to_the_token(tokens):
    ours, theirs = ScriptedProposer(), ScriptedProposer()
    mine, _, meter = run([Generate(), Vote()], ours, tokens=tokens)
    ref_meter = Meter(Budget(tokens=tokens))
    ref = SelfConsistency(n=4)(PROBLEM, theirs, None, ref_meter)
    assert (mine.answer, mine.text, mine.score, mine.candidates) == (ref.answer, ref.text, ref.score, ref.candidates)
    assert meter.ledger.as_dict() == ref_meter.ledger.as_dict() and ours.calls == theirs.calls
    nodes = [[(n["status"], n["text"], n["depth"]) for n in r.tree["nodes"]] for r in (mine, ref)]
    assert nodes[0] == nodes[1]


def test_rank_keeps_the_top_k_by_verifier_score_best_first_and_releases_the_rest_at_once():
    verifier, after = IndexVerifier(), Snapshot()
    result, proposer, _ = run([Generate(), Rank(k=2), after, Verify(threshold=0.0)], verifier=verifier)
    assert [(c.text, c.score) for c in after.seen[0]] == [("[3]", 3.0), ("[2]", 2.0)]
    assert after.live == [2]  # the two dropped samples were released when rank dropped them
    assert verifier.scored == 4  # verify reused rank's scores: every branch is scored (and paid for) once
    assert result.text == "[3]" and result.score == 3.0 and not proposer.live


def test_rank_by_the_model_rates_each_candidate_greedily_in_one_step():
    proposer = Recorder(ratings={"[3]": "9", "[1]": "Rating: 8/10", "[0]": "2", "[2]": "no idea"})
    after = Snapshot()
    _, _, meter = run([Generate(), Rank(k=2, by="model"), after], proposer)
    assert [(c.text, c.score) for c in after.seen[0]] == [("[3]", 0.9), ("[1]", 0.8)]
    prompts = proposer.prompts("rate")
    assert len(prompts) == 4 and all(p.startswith("Add.\n\nA proposed solution:\n[") for p in prompts)
    assert proposer.temperatures == [0.0] and "propose 4x1" in proposer.calls  # one batched step, greedy
    assert meter.ledger.total_tokens == PROMPT_TOKENS + 4 * STEP_TOKENS + 4 * (PROMPT_TOKENS + STEP_TOKENS)


def test_verify_drops_candidates_below_the_threshold_but_keeps_at_least_one():
    kept = Snapshot()
    run([Generate(), Verify(threshold=2.0), kept, Verify(threshold=10.0), kept], verifier=IndexVerifier())
    assert [c.text for c in kept.seen[0]] == ["[2]", "[3]"]
    assert [c.text for c in kept.seen[1]] == ["[3]"]  # nothing reaches 10: the best one stays


def test_fuse_lists_the_candidates_in_its_prompt_and_charges_its_tokens():
    proposer = Recorder()
    result, _, meter = run([Generate(n=3), Fuse(n=2)], proposer)
    (prompt,) = proposer.prompts("fuse")
    assert prompt.startswith("Add.\n\nHere are 3 candidate solutions")
    assert "Solution 1:\n[0]\n\nSolution 2:\n[1]\n\nSolution 3:\n[2]" in prompt
    assert proposer.started[-1].prompt[0] == {"role": "system", "content": "Be brief."}  # only the user turn changes
    fuse = result.tree["history"][1]
    assert fuse["kind"] == "Fuse" and fuse["tokens"] == PROMPT_TOKENS + 2 * STEP_TOKENS
    assert meter.ledger.total_tokens == 2 * PROMPT_TOKENS + 5 * STEP_TOKENS
    assert len(result.candidates) == 2 and not proposer.live  # the fused two replaced the three


def test_a_critique_rides_on_its_candidate_into_the_next_fuse_prompt():
    proposer = Recorder()
    run([Generate(n=2), Critique(), Fuse()], proposer)
    assert proposer.prompts("critique") == [CRITIQUE_PROMPT.format(task="Add.", solution=s) for s in ("[0]", "[1]")]
    (fuse,) = proposer.prompts("fuse")
    assert ("Solution 1:\n[0]\n\nCritique of solution 1:\n[0]\n\n"
            "Solution 2:\n[1]\n\nCritique of solution 2:\n[0]") in fuse
    assert not proposer.live


def test_in_the_tree_critiques_hold_no_solution_and_samples_and_fusions_do():
    result, _, _ = run([Generate(n=2), Critique(), Fuse()], Recorder())
    critiques = [n for n in result.tree["nodes"] if n["status"] == "critique"]
    assert len(critiques) == 2 and not any("solution" in n for n in critiques)
    # the 2 samples (pruned: the fusion replaced them) and the fused solution (chosen)
    assert [(n["status"], n["solution"]) for n in result.tree["nodes"] if "solution" in n] == [
        ("pruned", "[0]"), ("pruned", "[1]"), ("chosen", "[0]")]


def test_critique_with_revise_replaces_each_candidate_by_its_revision():
    proposer, after = Recorder(), Snapshot()
    run([Generate(n=2), Critique(revise=True), after], proposer)
    assert len(proposer.prompts("revise")) == 2
    assert "A proposed solution:\n[1]\n\nA critique of it:\n[0]\n\nWrite a corrected" in proposer.prompts("revise")[1]
    assert [(c.origin, c.critique) for c in after.seen[0]] == [("revision", "[0]")] * 2
    assert after.live == [2] and not proposer.live  # the originals were released when revised


def test_vote_in_the_middle_passes_on_the_winning_group():
    after = Snapshot()
    result, proposer, _ = run([Generate(), Vote(), after], verifier=None)
    assert [c.text for c in after.seen[0]] == ["[0]", "[2]"] and result.answer == "3" and not proposer.live


def test_a_strategy_used_as_a_layer_adds_its_chosen_solution():
    proposer = ScriptedProposer()
    layers = [Strategy(Beam(n=2, expand=2, max_depth=3)), Strategy(BestOfN(n=4), runs=2), Generate(n=1), Vote()]
    result, _, _ = run(layers, proposer, PathVerifier())
    assert result.answer == "7" and result.text == "[1][1]"  # the beam's solution: two steps
    assert result.candidates == [{"answer": "7", "votes": 3}, {"answer": "3", "votes": 1}]
    statuses = {node["status"] for node in result.tree["nodes"]}
    assert {"beam/chosen", "best_of_n/chosen", "final"} <= statuses  # the inner trees joined the pipeline's
    assert not proposer.live


# --- budget, release, the verifier ---------------------------------------------------------------------

PIPELINES = {
    "archon": lambda: [Generate(), Rank(k=3), Fuse(keep_inputs=True), Verify(threshold=0.5)],
    "model_judged": lambda: [Generate(), Rank(k=2, by="model"), Critique(revise=True), Fuse(n=2), Vote()],
    "critic_fuser": lambda: [Generate(), Critique(), Fuse(), Generate(n=2), Rank(k=1)],
    "strategy_first": lambda: [Strategy(Beam(n=2, expand=2, max_depth=3)), Generate(n=2), Fuse(), Vote()],
}


@pytest.mark.parametrize("name", list(PIPELINES))
@pytest.mark.parametrize("tokens", [9, 10, 24, 41, 77, 150, 400])
def test_no_pipeline_spends_more_than_its_budget_and_every_branch_is_released(name, tokens):
    proposer, meter = ScriptedProposer(), Meter(Budget(tokens=tokens))
    try:
        result = Pipeline(PIPELINES[name](), n=4)(PROBLEM, proposer, PathVerifier(), meter)
        assert tokens < 400 or result.answer is not None
    except CannotAttempt:
        assert tokens < PROMPT_TOKENS  # only when not even the first prompt fits
    assert meter.ledger.total_tokens <= tokens
    assert not proposer.live


def test_a_layer_the_budget_cuts_short_passes_on_what_it_has():
    after = Snapshot()
    # the prompt and 4 samples fit (30), then nothing more: the fuse root (10 more) cannot start
    result, proposer, meter = run([Generate(), Fuse(), after, Vote()], tokens=PROMPT_TOKENS + 4 * STEP_TOKENS + 5)
    assert [c.text for c in after.seen[0]] == ["[0]", "[1]", "[2]", "[3]"]
    assert result.answer == "3" and meter.ledger.total_tokens == 30 and not proposer.live


def test_a_pipeline_that_scores_with_the_verifier_refuses_to_start_without_one():
    proposer = ScriptedProposer()
    with pytest.raises(ValueError, match="^pipeline layers Rank, Verify score with the verifier"):
        Pipeline([Generate(), Rank(), Verify()])(PROBLEM, proposer, None, Meter(Budget(tokens=1000)))
    assert proposer.calls == []  # refused before any work


def test_a_layer_that_returns_no_candidates_list_is_refused_in_one_line():
    proposer = ScriptedProposer()
    with pytest.raises(TypeError, match=r"^pipeline layer 1 \(function\) returned something other than"):
        Pipeline([Generate(), lambda ctx, cands: [c.text for c in cands]])(PROBLEM, proposer, None, Meter())
    assert not proposer.live


# --- the allow-list -------------------------------------------------------------------------------------

USER_PIPELINE = {"_target_": "ttc.search.pipeline.Pipeline", "n": 4, "layers": [
    {"_target_": "ttc.search.layers.Generate"},
    {"_target_": f"{__name__}.KeepAnswer", "answer": "5"},  # this module: outside ttc
    {"_target_": "ttc.search.layers.Vote"},
]}


def test_a_user_layer_outside_ttc_is_refused_without_the_allow_list_and_works_with_it():
    with pytest.raises(ConfigError, match="list their package in the run config's allowed_targets"):
        build_strategy({"strategy": USER_PIPELINE})
    with pytest.raises(ConfigError, match="must name something inside the ttc package"):
        build_strategy({"strategy": USER_PIPELINE, "allowed_targets": [__name__[:-1]]})  # a prefix of the name: no
    pipeline = build_strategy({"strategy": USER_PIPELINE, "allowed_targets": [__name__]})
    proposer = ScriptedProposer()
    result = pipeline(PROBLEM, proposer, None, Meter(Budget(tokens=1000)))
    assert result.answer == "5" and not proposer.live  # the user layer kept the [3] sample only


def test_the_allow_list_only_names_packages_and_never_the_standard_library_or_ttc():
    for bad in (["os"], ["subprocess.run"], ["builtins"], ["ttc"], ["my lab"], [""], [3]):
        with pytest.raises(ConfigError, match="^allowed_targets: "):
            build_strategy({"strategy": USER_PIPELINE, "allowed_targets": bad})


def test_instantiate_without_an_allow_list_stays_inside_ttc():
    # what `ttc serve` builds a request's nodes with: no run config, no widening
    with pytest.raises(ConfigError, match="must name something inside the ttc package"):
        instantiate(USER_PIPELINE, "strategy")


# --- the tiny model -------------------------------------------------------------------------------------

def test_seeds_reproduce_on_the_tiny_model_and_every_block_returns_to_the_pool(tiny_model):
    from ttc.backends.local import LocalProposer
    from ttc.verifiers.math import extract_answer

    engine = tiny_model.engine

    def solve(seed):
        engine.clear_prefix_cache()
        seen = Snapshot()
        proposer = LocalProposer(tiny_model, seed=seed, answer_fn=extract_answer, max_tokens=6, max_step_tokens=3)
        meter = Meter(Budget(tokens=4000))
        layers = [Generate(n=2), seen, Generate(n=2), seen, Rank(k=2, by="model"), Critique(), Fuse(), Vote()]
        result = Pipeline(layers, n=2)(Problem(id="t0", prompt="What is 2 + 3?"), proposer, None, meter)
        assert engine.pool.num_free + engine.prefix.num_cached_blocks == engine.pool.num_blocks
        assert meter.ledger.total_tokens <= 4000
        samples = seen.seen[1]
        return result.text, meter.ledger.as_dict(), [c.text for c in samples], [c.branch.seed for c in samples]

    text, ledger, samples, seeds = solve(0)
    assert solve(0) == (text, ledger, samples, seeds)
    assert not set(seeds[:2]) & set(seeds[2:])  # a second generate layer draws new samples, not the first's again
    assert not set(solve(1)[3]) & set(seeds)
