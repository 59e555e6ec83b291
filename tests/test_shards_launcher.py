"""A real Hydra launcher: three shards of an eval on the embedded model, run as separate processes by
submitit's local launcher (what `hydra/launcher=submitit_slurm` does on a cluster, without SLURM), merge
into the records of the unsharded run at the same seed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from ttc.evals.merge import merge

EVAL = ["strategy=greedy", "dataset=reasoning_gym", "dataset.task=chain_sum", "dataset.size=4",
        "dataset.options={min_terms:2,max_terms:2,max_digits:1}", "proposer.max_tokens=48", "model.dtype=float32",
        "model.threads=1", "progress=false", "seed=0"]
# What a record holds beyond the prefix cache's history (each shard starts cold) and the clock.
HISTORY = ("prefill_tokens", "reused_tokens", "flops", "peak_kv_bytes", "wall_s")


def require_launcher(module: str) -> None:
    """Skip without the `cluster` extra; under CI (CI=true) fail instead, so a missing install cannot pass."""
    if importlib.util.find_spec(module) is not None:
        return
    message = f"{module} is not installed (pip install -e '.[cluster]')"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(message)


def ttc_eval(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ttc.evals", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def records(folder) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in HISTORY} for r in rows]


@pytest.mark.slow
def test_three_shards_through_submitit_local_merge_into_the_unsharded_runs_records(tmp_path):
    require_launcher("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    proc = ttc_eval("--multirun", *EVAL, "dataset.shard.count=3", "dataset.shard.index=range(0,3)",
                    "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15", f"hydra.sweep.dir={sweep}",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr
    for job in "012":  # each shard ran as a submitit job, in its own folder
        assert "hydra/launcher: submitit_local" in (sweep / job / ".hydra" / "hydra.yaml").read_text()
    proc = ttc_eval(*EVAL, f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = merge([sweep], tmp_path / "merged")
    whole, merged = records(tmp_path / "whole"), records(tmp_path / "merged")
    assert [r["id"] for r in merged] == [f"chain_sum-0-{i}" for i in range(4)]
    for ours, theirs in zip(merged, whole):
        assert (ours["id"], ours["answer"], ours["correct"], ours["text"]) == \
               (theirs["id"], theirs["answer"], theirs["correct"], theirs["text"])
        assert ours["generated_tokens"] > 0
    assert merged == whole  # every other field too: candidates, scores, generated tokens, forward passes
    reference = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert (summary["correct"], summary["problems"], summary["complete"]) == (reference["correct"], 4, True)
    assert len(summary["shards"]["merged"]) == 3
