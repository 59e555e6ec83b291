"""The selector panel: every selector's choice among one set of samples equals what that selector's own strategy
or verifier chooses on the same samples, the costs it reports are the ledger's, its records re-choose at fewer
samples, and the probe fitted from its saved features loads as verifier=probe."""

from __future__ import annotations

import json

import pytest
import torch

from ttc.backends.local import LocalProposer
from ttc.budget import Budget
from ttc.evals.fit_probe import main as fit_probe_main
from ttc.evals.panel_report import _picks, rescore_probe, selector_rows, wilson
from ttc.graph import Meter, Problem
from ttc.search.panel import Panel, choose, feature_file_name
from ttc.search.rpc import RPC
from ttc.verifiers.probe import FORMAT_VERSION, ProbeVerifier
from ttc.verifiers.vote import vote

PROBLEM = Problem(id="p/0", prompt=[{"role": "user", "content": "Pick a letter."}])


def _proposer(model, seed=11):
    model.engine.clear_prefix_cache()  # a cached prompt's logits differ in their last bits
    return LocalProposer(model, max_tokens=12, temperature=1.0, seed=seed,
                         answer_fn=lambda text: text.strip()[:1] or None)


def test_the_panels_votes_and_rpc_choose_what_the_selectors_alone_choose():
    answers = ["3", "4", "4", None, "3", "3"]
    probabilities = [0.9, 0.2, 0.25, 0.5, 0.8, 0.85]
    scores = {"confidence_mean": [1.0, 5.0, 6.0, 9.0, 1.0, 1.0]}
    scores.update({f"confidence_{f}": scores["confidence_mean"] for f in ("group", "lowest", "tail")})
    picks = choose(answers, probabilities, scores, keys=list(range(6)))
    assert answers[picks["self_consistency"]] == "3"  # three votes for 3, two for 4
    assert answers[picks["confidence_lowest"]] == "4"  # weights 11 for 4 against 3 for 3
    assert picks["confidence_lowest"] == 2  # the group's most confident member
    assert answers[picks["pc"]] == "3"
    assert vote(answers).winner == 0


def test_an_empty_trace_has_no_weight_in_a_confidence_vote():
    scores = {f"confidence_{f}": [float("-inf"), 1.0] for f in ("mean", "group", "lowest", "tail")}
    picks = choose(["7", "8"], [0.5, 0.5], scores, keys=[0, 1])
    assert picks["confidence_mean"] == 1


def test_the_panel_on_the_tiny_model_matches_rpc_and_charges_self_eval_and_the_probe(tiny_model, tmp_path):
    meter = Meter(Budget())
    panel = Panel(n=5, features_dir=str(tmp_path / "features"))
    result = panel(PROBLEM, _proposer(tiny_model), None, meter)
    rpc = RPC(n=5)(PROBLEM, _proposer(tiny_model), None, Meter(Budget()))
    chosen = [i for i, c in enumerate(result.candidates) if "rpc" in c["chosen_by"]]
    assert [result.candidates[i]["answer"] for i in chosen] == [rpc.answer] if rpc.answer else chosen == []
    own = result.details["selector_tokens"]
    assert own["self_eval"] > 0 and own["probe"] > 0
    assert meter.ledger.verifier_tokens == own["self_eval"] + own["probe"]
    assert sum(c["tokens"] for c in result.candidates) == meter.ledger.generated_tokens
    saved = torch.load(tmp_path / "features" / feature_file_name("p/0"), weights_only=True)
    assert saved["features"].shape == (5, 2 * tiny_model.backend.hidden_size)
    engine = tiny_model.engine
    assert engine.pool.num_free + engine.prefix.num_cached_blocks == engine.pool.num_blocks  # every branch released


def test_a_record_re_chooses_at_its_full_size_exactly_as_the_panel_chose():
    cands = [{"answer": a, "score": p, "tokens": 10, "text_key": str(i), "correct": a == "3",
              "scores": {f"confidence_{f}": [2.0, 1.0, 3.0][i] for f in ("mean", "group", "lowest", "tail")}}
             for i, (a, p) in enumerate([("3", 0.5), ("4", 0.6), ("3", 0.4)])]
    full = choose([c["answer"] for c in cands], [c["score"] for c in cands],
                  {k: [c["scores"][k] for c in cands] for k in cands[0]["scores"]}, ["0", "1", "2"])
    for i, c in enumerate(cands):
        c["chosen_by"] = sorted(k for k, j in full.items() if j == i)
    record = {"id": "q", "candidates": cands, "prefill_tokens": 7, "details": {"selectors": sorted(full)}}
    assert _picks(record, 3) == full
    assert _picks(record, 1)["self_consistency"] == 0
    rows = selector_rows([record], 2)
    assert rows["self_consistency"] == {"correct": 1, "problems": 1, "tokens": 27.0, "by_id": {"q": True}}


def test_the_wilson_interval_of_half_of_forty_is_symmetric_and_about_plus_minus_fifteen_points():
    lo, hi = wilson(20, 40)
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.352, abs=0.002)


def test_a_probe_fitted_from_panel_features_loads_and_scores_as_verifier_probe(tiny_model, tmp_path):
    run = tmp_path / "run"
    (run / "features").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    hidden = tiny_model.backend.hidden_size
    spec = ProbeVerifier(tiny_model).spec
    with (run / "results.jsonl").open("w") as f:
        for p in range(10):  # a feature that separates the labels, in every problem
            labels = [i % 2 == 0 for i in range(4)]
            sign = torch.tensor([[1.0] if y else [-1.0] for y in labels])
            x = torch.randn(4, 2 * hidden, generator=gen) + 2 * sign  # every feature leans with the label
            torch.save({"id": f"q{p}", "features": x.half(), "spec": spec}, run / "features" / f"q{p}.pt")
            f.write(json.dumps({"id": f"q{p}", "strategy": "panel", "prefill_tokens": 5, "generated_tokens": 8,
                                "details": {"selector_tokens": {"probe": 12, "self_eval": 99}},
                                "candidates": [{"answer": "a", "correct": y} for y in labels]}) + "\n")
    out = tmp_path / "probe.pt"
    assert fit_probe_main([str(run), "--out", str(out), "--model", tiny_model.name]) == 0
    verifier = ProbeVerifier(tiny_model, path=str(out))
    meta = verifier.metadata
    assert meta["metrics"]["held_out"]["auc"] == 1.0
    assert meta["ledger"]["verifier_tokens"] == 120 and meta["ledger"]["generated_tokens"] == 80  # not self_eval's
    proposer = _proposer(tiny_model)
    root = proposer.start(PROBLEM, Meter())
    branches = proposer.propose([root], 2, Meter(), to_end=True)
    scores = verifier.score(branches, Meter())
    proposer.release([root, *branches])
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)


def test_another_probe_rescores_a_panels_saved_features_and_its_picks_are_recomputed(tmp_path):
    spec = {"suffix_text": " Correct?", "suffix_ids": [1, 2], "use_mean": False, "hidden_size": 2}
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])  # the probe below reads the second feature only
    torch.save({"id": "q/1", "features": x.half(), "spec": spec}, tmp_path / feature_file_name("q/1"))
    probe = tmp_path / "other.pt"
    torch.save({"format": FORMAT_VERSION, "weights": torch.tensor([0.0, 1.0]), "bias": 0.0,
                "mean": torch.zeros(2), "std": torch.ones(2), "feature": spec, "model": "m"}, probe)
    record = {"id": "q/1", "prefill_tokens": 4, "details": {"selector_tokens": {"probe": 6}},
              "candidates": [{"answer": a, "score": 0.5, "tokens": 10, "text_key": str(i), "correct": a == "8",
                              "chosen_by": ["self_consistency"] if i == 0 else [],
                              "scores": {f"confidence_{f}": 1.0 for f in ("mean", "group", "lowest", "tail")}}
                             for i, a in enumerate(["7", "8", "8"])]}
    rescore_probe([record], "other", probe, tmp_path)
    assert [c["scores"]["other"] for c in record["candidates"]] == pytest.approx(
        torch.sigmoid(torch.tensor([0.0, 1.0, 3.0])).tolist())
    assert record["details"]["selector_tokens"]["other"] == 6  # the panel's probe suffix, the same tokens
    picks = _picks(record, 3)  # every pick recomputed: the recorded self_consistency mark was dropped
    assert picks["other"] == 2 and picks["other_vote"] == 2 and picks["self_consistency"] == 1
    spec_other = {**spec, "suffix_ids": [1, 2, 3]}
    torch.save({"format": FORMAT_VERSION, "weights": torch.zeros(2), "bias": 0.0, "mean": torch.zeros(2),
                "std": torch.ones(2), "feature": spec_other, "model": "m"}, probe)
    with pytest.raises(SystemExit, match="reads other features"):
        rescore_probe([record], "other", probe, tmp_path)
    (tmp_path / "notes.pt").write_text("not a probe")
    with pytest.raises(SystemExit, match="notes.pt is not a ttc probe"):
        rescore_probe([record], "other", tmp_path / "notes.pt", tmp_path)


def test_a_panels_training_cost_is_its_probe_files_recorded_ledger(tmp_path):
    probe = tmp_path / "p.pt"
    torch.save({"format": FORMAT_VERSION, "metadata": {"ledger": {"prefill_tokens": 3, "generated_tokens": 40,
                                                                   "verifier_tokens": 8}}}, probe)
    cost = Panel(probe_path=str(probe)).training_cost("any")
    assert (cost.prefill_tokens, cost.generated_tokens, cost.verifier_tokens) == (3, 40, 8)
    assert Panel().training_cost("no-such-model") is None  # no shipped probe: nothing trained, nothing charged


@pytest.mark.parametrize("limits, shared, lengths", [
    ([10, 10, 10], 12, [4, 4, 4]),  # every step draws one token for each; 12 run out after four
    ([10, 10, 10], 13, [5, 4, 4]),  # the one token left goes to the first sequence
    ([2, 10, 10], 12, [2, 5, 5]),  # what the first did not draw (its limit is 2) the other two share
    ([3, 3, 3], 100, [3, 3, 3]),  # a pool larger than the limits changes nothing
])
def test_sequences_sharing_a_token_pool_draw_exactly_what_it_holds(tiny_model, limits, shared, lengths):
    from ttc.budget import Ledger
    from ttc.decoder.sampling import SamplingParams

    engine = tiny_model.engine
    ledger = Ledger()
    seqs = [engine.new_sequence([1, 2, 3, 4 + i], ledger, seed=i) for i in range(3)]
    outs = engine.generate(seqs, SamplingParams(temperature=1.0), limits, ignore_eos=True, shared_tokens=shared)
    engine.release(seqs)
    assert [len(o.token_ids) for o in outs] == lengths
    assert ledger.generated_tokens == sum(lengths)


def test_self_consistency_with_a_shared_budget_stays_within_it_and_releases_every_branch(tiny_model):
    from ttc.search.self_consistency import SelfConsistency

    proposer = _proposer(tiny_model)
    proposer.share_budget = True
    meter = Meter(Budget(tokens=60))
    SelfConsistency(n=4)(PROBLEM, proposer, None, meter)
    assert 0 < meter.ledger.total_tokens <= 60
    engine = tiny_model.engine
    assert engine.pool.num_free + engine.prefix.num_cached_blocks == engine.pool.num_blocks


def test_concurrent_problems_all_get_self_eval_from_one_panel(tiny_model):
    from concurrent.futures import ThreadPoolExecutor

    panel = Panel(n=2)
    backend = tiny_model.backend
    with ThreadPoolExecutor(8) as pool:
        built = list(pool.map(lambda _: panel._verifiers(backend), range(32)))
    assert all(b is built[0] for b in built) and built[0][1] is not None


def test_a_paired_difference_counts_only_shared_problems_and_is_zero_width_when_every_pair_agrees():
    from ttc.evals.panel_report import paired_difference

    assert paired_difference({"a": True, "b": True, "x": True}, {"a": False, "b": False}) == (1.0, 1.0, 1.0)
    mean, lo, hi = paired_difference({"a": True, "b": False}, {"a": False, "b": True})
    assert mean == 0.0 and lo == pytest.approx(-1.96) and hi == pytest.approx(1.96)
