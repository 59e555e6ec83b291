"""Behaviour is unchanged by the round-2 layering refactor: fixed-seed evals at concurrency=1 write the
same records, for every strategy and every allocator, as the code before it did.

tests/golden/*.json were written by commit 42ceb53 (before the refactor) with the old config shape
(`strategy.max_tokens`, `strategy.width`, `strategy.particles`, A*'s `strategy.expand`); the overrides
below are the same runs in today's shape. Everything in a record is compared except `wall_s`:
answers, texts, candidates, grades, and every ledger count (prefill, reused, generated, verifier
tokens, forward passes, FLOPs, peak KV bytes). float32, so oneDNN's bf16 blocking cannot differ; and two
torch threads, as the golden runs had: a float32 CPU matmul's reduction order depends on the thread count,
which moves the verifiers' scores in their last bits (other test modules set one thread for the process).
It also depends on the CPU's vector width: on an AVX2 machine the golden runs' self_eval scores (written on
AVX-512) differ by ~1e-5, so verifier scores and vote weights (`score`, `weight`) are compared to a relative
1e-4; every other field, texts and answers included, must be equal.

One known difference is not covered here: an allocator that answers by a verifier's scores (AdaptiveStop
with weighted=true, Difficulty's best_of_n band) now lists best-of-n's candidates (one per sample) instead
of one per answer group; its answer and text are unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from ttc.evals.__main__ import config_dict
from ttc.evals.runner import run_eval

GOLDEN = Path(__file__).parent / "golden"
BASE = ["dataset=reasoning_gym", "dataset.task=chain_sum", "dataset.size=2",
        "dataset.options={min_terms:2,max_terms:2,min_digits:1,max_digits:2}", "model.dtype=float32",
        "model.kv_cache_gb=0.5", "progress=false", "seed=3", "budget.tokens=1500", "proposer.max_tokens=64"]
RUNS = {
    "greedy": ["strategy=greedy"],
    "self_consistency": ["strategy=self_consistency", "strategy.n=4"],
    "best_of_n_self_eval": ["strategy=best_of_n", "strategy.n=4", "strategy.weighted=true", "verifier=self_eval"],
    "beam_self_eval": ["strategy=beam", "strategy.n=2", "strategy.expand=2", "strategy.max_depth=3",
                       "verifier=self_eval"],
    "dvts_calculator": ["strategy=dvts", "strategy.n=4", "strategy.subtrees=2", "strategy.expand=2",
                        "strategy.max_depth=3", "verifier=calculator"],
    "astar_self_eval": ["strategy=astar", "strategy.n=2", "strategy.max_expansions=4", "verifier=self_eval"],
    "ets_self_eval": ["strategy=ets", "strategy.n=2", "strategy.expand=2", "strategy.max_depth=3",
                      "verifier=self_eval"],
    "particle_filter_self_eval": ["strategy=particle_filter", "strategy.n=3", "strategy.max_steps=3",
                                  "strategy.gibbs_sweeps=1", "verifier=self_eval"],
    "uniform": ["strategy=self_consistency", "strategy.n=3", "allocation=uniform", "budget.tokens=600"],
    "adaptive_stop": ["strategy=self_consistency", "allocation=adaptive_stop", "allocation.max_samples=6",
                      "budget.tokens=600"],
    "difficulty_calculator": ["strategy=self_consistency", "allocation=difficulty", "allocation.first_pass=2",
                              "allocation.max_samples=6", "verifier=calculator", "budget.tokens=600"],
}


@pytest.fixture
def golden_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def records_of(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("wall_s")
    return json.loads(json.dumps(rows, sort_keys=True))  # the golden files' own normal form


SCORES = ("score", "weight")  # a verifier's floats: compared to a relative 1e-4 (the docstring says why)


def mismatches(got, want, path: str = "") -> list[str]:
    """Where two records' normal forms differ: exactly, but for float scores under SCORES within 1e-4."""
    if isinstance(got, dict) and isinstance(want, dict) and got.keys() == want.keys():
        return [m for k in got for m in mismatches(got[k], want[k], f"{path}.{k}")]
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return [m for i, (g, w) in enumerate(zip(got, want)) for m in mismatches(g, w, f"{path}[{i}]")]
    if (path.rsplit(".", 1)[-1] in SCORES and isinstance(got, float) and isinstance(want, float)
            and math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-7)):
        return []
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def test_records_may_differ_only_in_the_last_digits_of_verifier_scores():
    want = [{"answer": "3", "score": 0.5651502, "candidates": [{"weight": 0.25, "answer": "3"}], "flops": 61344.0}]
    assert mismatches([{"answer": "3", "score": 0.5651474, "candidates": [{"weight": 0.2500001, "answer": "3"}],
                        "flops": 61344.0}], want) == []
    assert mismatches([{**want[0], "flops": 61344.5}], want) == ["[0].flops: 61344.5 != 61344.0"]
    assert mismatches([{**want[0], "score": 0.57}], want) == ["[0].score: 0.57 != 0.5651502"]
    assert mismatches([{**want[0], "answer": "4"}], want) == ["[0].answer: '4' != '3'"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_a_fixed_seed_eval_writes_the_records_the_code_before_the_refactor_wrote(name, tmp_path, golden_threads):
    with initialize_config_module(config_module="ttc.configs", version_base="1.3"):
        cfg = config_dict(compose("eval", overrides=BASE + RUNS[name]))
    run_eval(cfg, tmp_path)
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    assert mismatches(records_of(tmp_path), golden) == []
