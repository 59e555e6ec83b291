"""Sharded evals on the tiny random model: shards reproduce the unsharded run, resume, merge (and refuse to
merge what does not belong together), split a dataset budget exactly, and refuse shards that do not exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from ttc.evals import runner
from ttc.evals.__main__ import config_dict
from ttc.evals.build import ConfigError, build_allocation, build_dataset, eval_split
from ttc.evals.merge import MergeError, main as merge_main, merge
from ttc.evals.plot import main as plot_main
from ttc.evals.results import ResumeError
from ttc.evals.runner import run_eval
from ttc.evals.shard import Shard
from ttc.search.allocation import record_tokens

IDS = [f"chain_sum-0-{i}" for i in range(5)]
# Everything in a record but what depends on the prefix cache's history (each shard starts cold: the
# shared chat-template prefix is prefill there, reused in the unsharded run) and the clock.
HISTORY = ("prefill_tokens", "reused_tokens", "flops", "peak_kv_bytes", "wall_s")


def config(tiny_llama_dir, *more: str) -> dict:
    overrides = [f"model.spec={tiny_llama_dir}", "model.dtype=float32", "model.kv_cache_gb=0.05",
                 "dataset=reasoning_gym", "dataset.task=chain_sum", "dataset.size=5",
                 "dataset.options={min_terms:2,max_terms:2}", "strategy.n=2", "proposer.max_tokens=8", "progress=false",
                 *more]
    with initialize_config_module(config_module="ttc.configs", version_base="1.3"):
        return config_dict(compose("eval", overrides=overrides))


def shard(i: int, k: int) -> tuple[str, str]:
    return f"dataset.shard.index={i}", f"dataset.shard.count={k}"


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def without_history(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in HISTORY} for r in rows]


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """The unsharded run and its three shards, each in its own folder."""
    root = tmp_path_factory.mktemp("shards")
    run_eval(config(tiny_llama_dir), root / "whole")
    for i in range(3):
        run_eval(config(tiny_llama_dir, *shard(i, 3)), root / f"shard{i}")
    return root


def test_a_shard_holds_every_kth_problem_of_the_dataset_after_its_own_limit(tiny_llama_dir):
    whole = build_dataset(eval_split(config(tiny_llama_dir, "dataset.limit=4")["dataset"]))
    parts = [Shard(i, 3, len(whole)).select(whole) for i in range(3)]
    assert [[p.id for p in part.problems] for part in parts] == [IDS[0:4:3], IDS[1:4:3], IDS[2:4:3]]
    assert [len(part) for part in parts] == [2, 1, 1]  # the first size % count shards hold one more


def test_three_shards_merge_into_the_records_of_the_unsharded_run(tiny_llama_dir, runs, tmp_path, capsys):
    for i in range(3):
        assert [r["id"] for r in records(runs / f"shard{i}")] == IDS[i::3]
        summary = json.loads((runs / f"shard{i}" / "summary.json").read_text())
        assert summary["shard"] == {"index": i, "count": 3, "dataset_size": 5, "problems": IDS[i::3]}
        assert summary["complete"] and summary["problems"] == len(IDS[i::3])
    summary = merge([runs / f"shard{i}" for i in (2, 0, 1)], tmp_path / "merged")
    whole, merged = records(runs / "whole"), records(tmp_path / "merged")
    assert [r["id"] for r in merged] == IDS  # the unsharded order, whatever order the folders came in
    assert without_history(merged) == without_history(whole)  # answers, texts, candidates, grades, generated tokens
    reference = json.loads((runs / "whole" / "summary.json").read_text())
    for key in ("label", "dataset", "problems", "correct", "accuracy", "generated_tokens", "pass@k", "maj@k", "n"):
        assert summary[key] == reference[key], key
    assert summary["complete"] and "missing" not in summary
    assert json.loads((tmp_path / "merged" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    # the merged folder is a run folder like any other: plotted, tabled, and the unsharded run's to resume
    assert plot_main([str(tmp_path / "merged"), "--markdown", "--out", str(tmp_path / "plot.png")]) == 0
    assert "| self_consistency n=2 | " in capsys.readouterr().out
    outcome = run_eval(config(tiny_llama_dir), tmp_path / "merged")
    assert outcome.summary["problems"] == 5 and records(tmp_path / "merged") == merged  # nothing redone


def test_the_merge_cli_accepts_a_sweep_folder_and_prints_the_table_and_the_summary_last(runs, tmp_path, capsys):
    import shutil

    sweep = tmp_path / "sweep"
    for i in range(3):
        shutil.copytree(runs / f"shard{i}", sweep / str(i))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")  # what `sweep/*` also matches: skipped
    assert merge_main([str(sweep)] + [str(sweep / "multirun.yaml"), "--out", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["problems"] == 5 and any(line.startswith("merged shards  ") for line in out)


def test_a_shard_interrupted_half_way_resumes_without_redoing_or_losing_a_problem(tiny_llama_dir, runs, tmp_path,
                                                                                  monkeypatch):
    real, calls = runner.solve_one, []

    def interrupted_on_the_second_problem(*args, **kwargs):
        calls.append(args[0].id)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C, or SIGTERM from the cluster (sigterm_as_interrupt)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "solve_one", interrupted_on_the_second_problem)
    cfg = config(tiny_llama_dir, *shard(0, 3))
    outcome = run_eval(cfg, tmp_path / "shard0")
    assert outcome.interrupted and [r["id"] for r in records(tmp_path / "shard0")] == ["chain_sum-0-0"]
    first = records(tmp_path / "shard0")
    folders = [tmp_path / "shard0", runs / "shard1", runs / "shard2"]
    with pytest.raises(MergeError, match=r"incomplete: 1 of 5 problems have no record: shard 0/3 \(.*shard0\) lacks "
                                         r"1 of 2 \(chain_sum-0-3\)"):
        merge(folders, tmp_path / "merged")
    calls.clear()
    monkeypatch.setattr(runner, "solve_one", lambda *a, **k: (calls.append(a[0].id), real(*a, **k))[1])
    outcome = run_eval(cfg, tmp_path / "shard0")  # the same command
    assert calls == ["chain_sum-0-3"] and not outcome.interrupted  # only the problem left
    assert records(tmp_path / "shard0")[:1] == first and [r["id"] for r in records(tmp_path / "shard0")] == IDS[0::3]
    merge(folders, tmp_path / "merged")
    assert without_history(records(tmp_path / "merged")) == without_history(records(runs / "whole"))


def test_a_shards_folder_does_not_resume_another_shard(tiny_llama_dir, runs):
    with pytest.raises(ResumeError, match=r"dataset.shard.index: 0 -> 1"):
        run_eval(config(tiny_llama_dir, *shard(1, 3)), runs / "shard0")


def test_a_run_from_a_start_solves_the_whole_runs_later_problems_and_resumes_back_to_the_first(
        tiny_llama_dir, runs, tmp_path):
    run_eval(config(tiny_llama_dir, "dataset.start=3"), tmp_path / "tail")
    assert without_history(records(tmp_path / "tail")) == without_history(records(runs / "whole"))[3:]
    # dataset.start may change on resume (like limit): the folder keeps its records and adds the first three
    run_eval(config(tiny_llama_dir), tmp_path / "tail")
    assert [r["id"] for r in records(tmp_path / "tail")] == IDS[3:] + IDS[:3]


@pytest.mark.parametrize("start", ["-1", "true", "'3'"])
def test_a_start_that_is_not_a_count_of_problems_is_refused(tiny_llama_dir, tmp_path, start):
    with pytest.raises(ConfigError, match="dataset.start must be an integer >= 0"):
        run_eval(config(tiny_llama_dir, f"dataset.start={start}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_unsharded_run_keeps_the_fingerprint_of_folders_from_before_shards(tiny_llama_dir, tmp_path):
    from ttc.evals.results import check_resumable

    cfg = config(tiny_llama_dir)
    check_resumable(cfg, tmp_path / "now.json", has_records=False)
    check_resumable({**cfg, "dataset": {k: v for k, v in cfg["dataset"].items() if k != "shard"}},
                    tmp_path / "before.json", has_records=False)
    now, before = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("now", "before"))
    assert now == before


def test_the_merge_refuses_shards_of_different_experiments(tiny_llama_dir, runs, tmp_path, capsys):
    run_eval(config(tiny_llama_dir, *shard(1, 3), "strategy.n=3"), tmp_path / "other1")
    with pytest.raises(MergeError, match=r"other1 is a different experiment from .*shard0 \(strategy.n: 2 -> 3\)"):
        merge([runs / "shard0", tmp_path / "other1", runs / "shard2"], tmp_path / "merged")
    assert merge_main([str(runs / "shard0"), str(tmp_path / "other1"), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ttc.evals.merge: error: ") and "different experiment" in err[0]
    assert not (tmp_path / "merged" / "results.jsonl").exists()


def test_the_merge_refuses_a_problem_in_two_folders(runs, tmp_path):
    import shutil

    shutil.copytree(runs / "shard1", tmp_path / "shard1_again")
    with pytest.raises(MergeError, match=r"problem chain_sum-0-1 is in two folders: shard 1/3 \(.*shard1\) and "
                                         r"shard 1/3 \(.*shard1_again\)"):
        merge([runs / "shard0", runs / "shard1", tmp_path / "shard1_again", runs / "shard2"], tmp_path / "merged")
    with pytest.raises(MergeError, match=r"problem chain_sum-0-0 is in two folders: .*whole"):  # whole = shard 0/1
        merge([runs / "whole", runs / "shard0"], tmp_path / "merged")


def test_the_merge_refuses_a_missing_shard_unless_partial_which_names_the_missing(tiny_llama_dir, runs, tmp_path,
                                                                                   capsys, monkeypatch):
    folders = [str(runs / "shard0"), str(runs / "shard2")]
    with pytest.raises(MergeError, match=r"2 are in no folder given \(chain_sum-0-1, chain_sum-0-4; shard\(s\) 1 of 3"):
        merge(folders, tmp_path / "merged")
    assert merge_main([*folders, "--out", str(tmp_path / "merged"), "--partial"]) == 0
    out = capsys.readouterr().out
    assert "missing (2): chain_sum-0-1, chain_sum-0-4" in out and "(incomplete)" in out
    summary = json.loads((tmp_path / "merged" / "summary.json").read_text())
    assert summary["missing"] == ["chain_sum-0-1", "chain_sum-0-4"] and not summary["complete"]
    assert summary["problems"] == 3 and [r["id"] for r in records(tmp_path / "merged")] == IDS[0:3:2] + IDS[3:4]
    # the unsharded command on the merged folder solves only what is missing
    calls, real = [], runner.solve_one
    monkeypatch.setattr(runner, "solve_one", lambda *a, **k: (calls.append(a[0].id), real(*a, **k))[1])
    outcome = run_eval(config(tiny_llama_dir), tmp_path / "merged")
    assert calls == ["chain_sum-0-1", "chain_sum-0-4"] and outcome.summary["complete"]
    assert [r["id"] for r in records(tmp_path / "merged")] == IDS[0:3:2] + IDS[3:4] + ["chain_sum-0-1", "chain_sum-0-4"]


def test_the_merge_sums_the_shards_training_costs_and_failed_attempts(runs, tmp_path):
    import shutil

    for i in range(3):
        shutil.copytree(runs / f"shard{i}", tmp_path / f"shard{i}")
        (tmp_path / f"shard{i}" / "training.json").write_text(json.dumps(
            {"probe": {"generated_tokens": 10 * (i + 1), "prefill_tokens": 1}}))
        (tmp_path / f"shard{i}" / "failures.jsonl").write_text(json.dumps(
            {"id": IDS[i], "error": "RuntimeError: x", "time": "t", "generated_tokens": 100, "prefill_tokens": i})
            + "\n")
    summary = merge([tmp_path / f"shard{i}" for i in range(3)], tmp_path / "merged")
    assert summary["training"]["probe"]["generated_tokens"] == 60 and summary["training"]["total_tokens"] == 63
    assert summary["failed_attempts"]["count"] == 3 and summary["failed_attempts"]["total_tokens"] == 303
    assert "training tokens" in runner.summary_table(summary) and "failed attempts" in runner.summary_table(summary)


@pytest.mark.parametrize("index, count, message", [
    (3, 3, "dataset.shard.index must be in 0..2 (dataset.shard.count=3), got 3"),
    (-1, 2, "dataset.shard.index must be in 0..1 (dataset.shard.count=2), got -1"),
    (0, 0, "dataset.shard.count must be at least 1, got 0"),
])
def test_a_shard_that_does_not_exist_is_refused_before_anything_is_written(tiny_llama_dir, tmp_path, index, count,
                                                                           message):
    with pytest.raises(ConfigError) as e:
        run_eval(config(tiny_llama_dir, *shard(index, count)), tmp_path / "run")
    assert str(e.value) == message and not (tmp_path / "run").exists()


def test_the_cli_refuses_a_shard_index_past_the_count_with_one_line(tiny_llama_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ttc.evals", f"model.spec={tiny_llama_dir}", *shard(2, 2),
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "ttc-eval: error: dataset.shard.index must be in 0..1 (dataset.shard.count=2), got 2"]


# --- the budget split -------------------------------------------------------------------------

@pytest.mark.parametrize("total, size, count", [(1000, 5, 3), (7, 5, 3), (10, 2, 3), (8192 * 7, 7, 7), (999, 100, 8),
                                                (0, 4, 2), (5, 0, 2)])
def test_the_shards_budget_shares_sum_exactly_to_the_total_in_proportion_to_their_problems(total, size, count):
    shares = [Shard(i, count, size).share(total) for i in range(count)]
    assert sum(shares) == total
    for i, s in enumerate(shares):
        problems = len(Shard(i, count, size).positions())
        floor = total * problems // size if size else (total if i == 0 else 0)
        assert s - floor in (0, 1)  # the floor, plus one of the left-over tokens for the first shards
        assert s - floor == 0 or all(shares[j] - total * len(Shard(j, count, size).positions()) // size == 1
                                     for j in range(i))  # the left-over tokens go to the first shards


def test_a_per_problem_budget_gives_each_shard_exactly_its_problems_worth():
    assert [Shard(i, 3, 5).share(600 * 5) for i in range(3)] == [1200, 1200, 600]


@pytest.mark.parametrize("budget, total", [("allocation.total_tokens=1001", 1001), ("budget.tokens=300", 300 * 5)])
def test_each_shards_pool_holds_its_share_of_the_dataset_budget(tiny_llama_dir, budget, total):
    pools = []
    for i in range(3):
        cfg = config(tiny_llama_dir, "allocation=uniform", budget, *shard(i, 3))
        whole = build_dataset(eval_split(cfg["dataset"]))
        part = Shard(i, 3, len(whole))
        _, pool, _ = build_allocation(cfg, None, part.select(whole), {}, None, part)
        assert (pool.problems, pool.total) == (len(part.positions()), part.share(total))
        pools.append(pool.total)
    assert sum(pools) == total and pools == ([401, 400, 200] if total == 1001 else [600, 600, 300])


def test_a_shard_never_spends_more_than_its_share(tiny_llama_dir, tmp_path):
    total = 400  # tight: the uniform caps bind on the tiny model
    for i in range(2):
        run_eval(config(tiny_llama_dir, "allocation=uniform", f"allocation.total_tokens={total}", *shard(i, 2)),
                 tmp_path / f"shard{i}")
        rows = records(tmp_path / f"shard{i}")
        share = Shard(i, 2, 5).share(total)
        assert sum(record_tokens(r) for r in rows) <= share and sum(r["given_tokens"] for r in rows) <= share
    summary = merge([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged")
    assert summary["allocation"] == "uniform" and summary["computed_tokens"] <= total
