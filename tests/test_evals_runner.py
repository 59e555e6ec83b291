"""The eval runner end to end on a tiny random model: records, summary, resumption, the CLI, sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from decimal import Decimal, InvalidOperation
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from ttc.evals import runner
from ttc.evals.__main__ import config_dict
from ttc.evals.build import ConfigError, accepts, budget_factory, eval_split, instantiate, locate, train_split
from ttc.evals.datasets import extract_stated_answer
from ttc.evals.runner import ResumeError, run_eval

REPO = Path(__file__).resolve().parents[1]
CHAIN_SUM = ["dataset=reasoning_gym", "dataset.task=chain_sum", "dataset.size=3",
             "dataset.options={min_terms:2,max_terms:2}"]


def tiny_overrides(folder, strategy: tuple[str, ...] = ("strategy.n=2",)) -> list[str]:
    return [f"model.spec={folder}", "model.dtype=float32", "model.kv_cache_gb=0.05", *CHAIN_SUM, *strategy,
            "proposer.max_tokens=8", "progress=false"]


def eval_config(*overrides: str) -> dict:
    with initialize_config_module(config_module="ttc.configs", version_base="1.3"):
        return config_dict(compose("eval", overrides=list(overrides)))


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny_cfg(tiny_llama_dir):
    return lambda *more: eval_config(*tiny_overrides(tiny_llama_dir), *more)


def test_a_run_writes_one_graded_record_per_problem_and_a_summary(tiny_cfg, tmp_path):
    outcome = run_eval(tiny_cfg(), tmp_path)
    records = read_records(tmp_path)
    assert [r["id"] for r in records] == ["chain_sum-0-0", "chain_sum-0-1", "chain_sum-0-2"]
    for r in records:
        assert {"id", "prompt", "answer", "reference", "correct", "strategy", "candidates", "samples",
                "prefill_tokens", "reused_tokens", "generated_tokens", "verifier_tokens", "forward_passes", "flops",
                "peak_kv_bytes", "wall_s"} <= set(r)
        assert r["strategy"] == "self_consistency" and r["samples"] == 2
        assert all("correct" in c for c in r["candidates"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == json.loads(json.dumps(outcome.summary, default=str))
    assert summary["problems"] == 3 and summary["complete"] and not summary["interrupted"]
    assert summary["label"] == "self_consistency" and summary["n"] == 2
    assert summary["dataset"] == "reasoning_gym/chain_sum"
    assert summary["generated_tokens"] == sum(r["generated_tokens"] for r in records)
    assert set(summary["pass@k"]) == {"1", "2"}


def test_a_resumed_run_neither_repeats_nor_loses_records(tiny_cfg, tmp_path):
    run_eval(tiny_cfg("dataset.limit=2"), tmp_path)
    first = read_records(tmp_path)
    outcome = run_eval(tiny_cfg("dataset.limit=3"), tmp_path)
    records = read_records(tmp_path)
    assert [r["id"] for r in records] == ["chain_sum-0-0", "chain_sum-0-1", "chain_sum-0-2"]
    assert records[:2] == first  # the finished ones were not run again
    assert outcome.summary["problems"] == 3


def test_a_partially_written_last_record_is_dropped_with_a_warning_and_run_again(tiny_cfg, tmp_path, caplog):
    run_eval(tiny_cfg("dataset.limit=2"), tmp_path)
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"id": "chain_sum-0-2", "prompt": [{"ro')  # killed mid-write
    run_eval(tiny_cfg(), tmp_path)
    assert "dropping a partially written last record" in caplog.text
    assert [r["id"] for r in read_records(tmp_path)] == ["chain_sum-0-0", "chain_sum-0-1", "chain_sum-0-2"]


def test_a_corrupt_record_before_the_last_is_an_error_naming_its_line(tiny_cfg, tmp_path):
    run_eval(tiny_cfg(), tmp_path)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ResumeError, match=r"results.jsonl:2: not a complete JSON record"):
        run_eval(tiny_cfg(), tmp_path)


def test_resuming_a_folder_with_another_config_is_refused(tiny_cfg, tmp_path):
    run_eval(tiny_cfg("dataset.limit=1"), tmp_path)
    with pytest.raises(ResumeError, match=r"strategy.n: 2 -> 3"):
        run_eval(tiny_cfg("dataset.limit=1", "strategy.n=3"), tmp_path)


def test_ctrl_c_saves_what_is_done_and_the_same_command_finishes_the_run(tiny_cfg, tmp_path, monkeypatch):
    real, calls = runner.solve_one, []

    def interrupted_on_the_second_problem(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "solve_one", interrupted_on_the_second_problem)
    outcome = run_eval(tiny_cfg(), tmp_path)
    assert outcome.interrupted and not outcome.summary["complete"] and outcome.summary["problems"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"]
    monkeypatch.setattr(runner, "solve_one", real)
    outcome = run_eval(tiny_cfg(), tmp_path)
    assert not outcome.interrupted and outcome.summary["problems"] == 3
    assert len(read_records(tmp_path)) == 3


def test_a_problem_whose_prompt_exceeds_the_budget_is_recorded_as_failed(tiny_cfg, tmp_path):
    outcome = run_eval(tiny_cfg("dataset.limit=1", "budget.tokens=4"), tmp_path)
    (record,) = read_records(tmp_path)
    assert record["error"].startswith("BudgetExceeded") and record["correct"] is False
    assert record["generated_tokens"] == 0 and "wall_s" in record  # the ledger fields are always there
    assert outcome.summary["errors"] == 1 and outcome.summary["accuracy"] == 0.0


class BreaksOnce:
    """A verifier that raises the first time it scores (after the proposer has spent tokens), then scores 0.5."""

    cost_per_branch, cost_per_token = 0.0, 0.0
    calls = 0

    def score(self, branches, meter):
        BreaksOnce.calls += 1
        if BreaksOnce.calls == 1:
            raise RuntimeError("the verifier broke")
        return [0.5] * len(branches)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_problem_that_raises_stops_the_run_keeps_its_traceback_and_its_partial_work_is_counted_when_resumed(
        tiny_cfg, tmp_path, monkeypatch, concurrency):
    module = types.ModuleType("ttc.breaking_verifier_for_tests")
    module.BreaksOnce = BreaksOnce
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(BreaksOnce, "calls", 0)
    cfg = tiny_cfg("strategy=best_of_n", "strategy.n=2", f"concurrency={concurrency}")
    cfg["verifier"] = {"_target_": "ttc.breaking_verifier_for_tests.BreaksOnce"}
    with pytest.raises(RuntimeError, match="the verifier broke"):
        run_eval(cfg, tmp_path)
    (failure,) = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert failure["id"].startswith("chain_sum-0-") and failure["error"] == "RuntimeError: the verifier broke"
    assert failure["generated_tokens"] > 0 and failure["prefill_tokens"] > 0 and failure["time"]
    assert failure["traceback"].startswith("Traceback") and "in score" in failure["traceback"]
    assert failure["traceback"].endswith("RuntimeError: the verifier broke")
    outcome = run_eval(cfg, tmp_path)  # the same command: the failed problem is solved again
    records = read_records(tmp_path)
    assert sorted(r["id"] for r in records) == ["chain_sum-0-0", "chain_sum-0-1", "chain_sum-0-2"]
    failed = outcome.summary["failed_attempts"]
    assert failed["count"] == 1 and failed["ledger"]["generated_tokens"] == failure["generated_tokens"]
    assert failed["total_tokens"] == failure["prefill_tokens"] + failure["generated_tokens"]
    assert outcome.summary["generated_tokens"] == sum(r["generated_tokens"] for r in records)  # records: theirs only
    assert "failed attempts" in runner.summary_table(outcome.summary)


def test_the_cli_prints_the_summary_json_last_and_a_multirun_gives_each_job_a_folder(tiny_llama_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ttc.evals", "--multirun", *tiny_overrides(tiny_llama_dir), "strategy.n=1,2",
         f"hydra.sweep.dir={tmp_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["n"] == 2 and last["problems"] == 3
    assert "accuracy" in proc.stdout and "mean computed tokens" in proc.stdout  # the table
    for job, n in (("0", 1), ("1", 2)):
        summary = json.loads((tmp_path / job / "summary.json").read_text())
        assert summary["n"] == n and len(read_records(tmp_path / job)) == 3


def test_the_experiment_group_holds_saved_override_sets():
    cfg = eval_config("experiment=chain_sum_quick")
    assert cfg["dataset"]["_target_"].endswith("load_reasoning_gym") and cfg["dataset"]["task"] == "chain_sum"
    assert cfg["dataset"]["options"]["max_terms"] == 2 and cfg["strategy"]["n"] == 4
    assert cfg["proposer"]["max_tokens"] == 128
    assert cfg["budget"]["tokens"] == 2048


@pytest.mark.parametrize("experiment", ["archon_layers", "basic_arithmetic_sc", "chain_sum_greedy", "chain_sum_quick"])
def test_an_experiment_swapped_to_gsm8k_leaves_no_key_the_gsm8k_loader_cannot_take(experiment):
    dataset = eval_split(eval_config(f"experiment={experiment}", "dataset=gsm8k")["dataset"])
    target = locate(dataset.pop("_target_"))
    assert target.__name__ == "load_gsm8k"
    assert [key for key in dataset if not accepts(target, key)] == []


def test_the_scaling_experiments_keep_their_reported_problems_on_the_chain_sum_dataset_config():
    for experiment in ("scaling", "scaling_greedy"):
        dataset = eval_config(f"experiment={experiment}")["dataset"]
        assert (dataset["task"], dataset["seed"], dataset["size"], dataset["limit"]) == ("chain_sum", 2026, 100, None)
        assert dataset["options"] == {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}


def test_a_key_left_from_another_dataset_config_is_named_with_the_override_that_drops_it():
    node = {"_target_": "ttc.evals.datasets.load_gsm8k", "path": "unused.jsonl", "task": "chain_sum", "seed": 3}
    with pytest.raises(ConfigError) as error:
        instantiate(node, "dataset")
    assert str(error.value) == ("dataset (ttc.evals.datasets.load_gsm8k) takes no task, seed: a key meant for another "
                                "dataset config (an experiment's or an override's); drop it with ~dataset.task ~dataset.seed")


def test_a_strategy_sets_its_proposer_defaults_and_the_command_line_wins():
    greedy = eval_config("strategy=greedy")["proposer"]
    assert greedy["_target_"] == "ttc.backends.local.LocalProposer"
    assert (greedy["temperature"], greedy["max_tokens"]) == (0.0, 512)
    assert eval_config("strategy=self_consistency")["proposer"]["max_tokens"] == 512
    assert eval_config("strategy=beam")["proposer"]["max_tokens"] == 768
    assert eval_config("strategy=greedy", "proposer.max_tokens=64")["proposer"]["max_tokens"] == 64
    assert eval_config("experiment=chain_sum_greedy", "proposer.max_tokens=32")["proposer"]["max_tokens"] == 32


STRATEGIES = ["astar", "beam", "best_of_n", "dvts", "ets", "greedy", "particle_filter", "self_consistency"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_holds_only_its_own_fields_and_names_its_breadth_n(strategy):
    assert eval_config(f"strategy={strategy}", "strategy.n=1")["strategy"]["n"] == 1
    node = eval_config(f"strategy={strategy}")["strategy"]
    assert not set(node) & {"temperature", "top_p", "top_k", "min_p", "max_tokens", "max_step_tokens", "step_stop"}
    assert type(instantiate(node, "strategy")).__name__ == node["_target_"].rsplit(".", 1)[-1]


@pytest.mark.parametrize("group, choices", [
    ("strategy", ["greedy", "best_of_n", "self_consistency"]),
    ("dataset", ["gsm8k", "math500", "reasoning_gym", "humaneval", "mbpp", "aime"]),
    ("verifier", ["none"]), ("budget", ["default", "unlimited"]), ("model", ["smollm2-135m"]),
])
def test_every_shipped_config_composes_to_a_ttc_target(group, choices):
    for choice in choices:
        node = eval_config(f"{group}={choice}")[group]
        if node["_target_"] is not None:
            assert callable(locate(node["_target_"]))


def test_targets_outside_the_ttc_package_are_refused():
    with pytest.raises(ConfigError, match="inside the ttc package"):
        instantiate({"_target_": "os.system", "command": "true"})


def test_unknown_config_keys_and_missing_values_are_reported_by_name():
    with pytest.raises(ConfigError, match=r"strategy \(ttc.search.greedy.GreedyDecoding\)"):
        instantiate({"_target_": "ttc.search.greedy.GreedyDecoding", "width": 3}, "strategy")
    with pytest.raises(ConfigError, match=r"set dataset.path"):
        instantiate(eval_config("dataset=mbpp")["dataset"], "dataset")


def test_a_target_that_refuses_its_arguments_is_a_config_error_naming_the_group():
    with pytest.raises(ConfigError, match=r"^strategy \(ttc.search.dvts.DVTS\): ValueError: DVTS needs"):
        instantiate({"_target_": "ttc.search.dvts.DVTS", "n": 4, "subtrees": 8}, "strategy")
    with pytest.raises(ConfigError, match=r"^model \(ttc.load\): ModelNotFoundError: model '/no/such.gguf' not found"):
        instantiate({"_target_": "ttc.load", "spec": "/no/such.gguf"}, "model")


@pytest.mark.parametrize("limits", [{"tokens": -5}, {"tokens": 0}, {"wall_s": -1.0}])
def test_a_budget_of_nothing_is_refused_when_the_run_is_built(limits):
    with pytest.raises(ConfigError, match="a budget's limits are positive numbers or None"):
        budget_factory({"_target_": "ttc.budget.Budget", **limits})
    with pytest.raises(ValueError, match="positive numbers or None"):
        budget_factory(limits)


MISSING_MODEL = "ModelNotFoundError: model '/no/such.gguf' not found"


@pytest.mark.parametrize("command, message", [
    (["-m", "ttc.evals", "model.spec=/no/such.gguf", *CHAIN_SUM], MISSING_MODEL),
    (["-m", "ttc.evals.train_probe", "model.spec=/no/such.gguf", *CHAIN_SUM], MISSING_MODEL),
    (["-m", "ttc.serve.cli", "serve", "--model", "/no/such.gguf"], MISSING_MODEL),
    (["-m", "ttc.evals", "model.kv_cache_gb=0", *CHAIN_SUM], "kv_cache_gb sizes the KV pool and must be positive"),
    (["-m", "ttc.evals", "model.kv_cache_gb=0.00001", *CHAIN_SUM], "KV pool exhausted: "),
    (["-m", "ttc.evals", "strategy.n=0", *CHAIN_SUM], "strategy.n must be >= 1, not 0"),
    (["-m", "ttc.evals", "proposer.max_tokens=0", *CHAIN_SUM], "max_tokens must be at least 1"),
], ids=["ttc-eval", "train_probe", "ttc serve", "no KV pool", "a KV pool too small", "n=0", "no tokens"])
def test_every_entry_point_reports_bad_input_in_one_line(command, message, tmp_path):
    hydra = [f"hydra.run.dir={tmp_path}", "progress=false"] if "serve" not in command else []
    proc = subprocess.run([sys.executable, *command, *hydra], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


def test_the_model_is_injected_into_targets_that_take_it():
    module = types.ModuleType("ttc.fake_verifiers_for_tests")

    class NeedsModel:
        def __init__(self, model, weight: float = 1.0):
            self.model, self.weight = model, weight

    module.NeedsModel = NeedsModel
    sys.modules[module.__name__] = module
    try:
        built = instantiate({"_target_": "ttc.fake_verifiers_for_tests.NeedsModel", "weight": 2.0}, model="M")
        assert built.model == "M" and built.weight == 2.0
        assert instantiate({"_target_": "ttc.search.greedy.GreedyDecoding"}, model="M") is not None  # not taken
    finally:
        del sys.modules[module.__name__]


def test_training_splits_never_use_the_evaluated_problems():
    rg = eval_config(*CHAIN_SUM)["dataset"]
    assert train_split(rg)["seed"] == 1_000_000 and "train_seed" not in train_split(rg)
    assert train_split({**rg, "train_seed": 5})["seed"] == 5
    with pytest.raises(ConfigError, match="is the evaluated split"):
        train_split({**rg, "train_seed": 0})
    gsm8k = train_split(eval_config("dataset=gsm8k")["dataset"])
    assert gsm8k["path"].endswith("gsm8k/train.jsonl") and gsm8k["split"] == "train"
    with pytest.raises(ConfigError, match="no training split"):
        train_split(eval_config("dataset=math500")["dataset"])


class FakeProbe:
    """Stands in for ttc.verifiers.probe.ProbeVerifier: records what fit() was given."""

    fits: list[dict] = []

    def __init__(self, model, path=None, batch_size: int = 64):
        self.model, self.path = model, path
        self.metadata = {"ledger": {"prefill_tokens": 30, "generated_tokens": 70}}  # what its fit() cost
        self.cost_per_branch, self.cost_per_token = 0.0, 0.0

    @classmethod
    def fit(cls, model, problems, grade_fn, samples_per_problem, max_tokens, path, seed=0, progress=True, **options):
        cls.fits.append({"problems": problems, "grade_fn": grade_fn, "samples": samples_per_problem,
                         "max_tokens": max_tokens, "path": path, "options": options})
        Path(path).write_bytes(b"fake probe")
        return cls(model, path)

    def score(self, branches, meter):
        return [0.5] * len(branches)


def test_a_missing_probe_is_trained_on_another_seed_cached_and_reused(tiny_cfg, tmp_path, monkeypatch):
    module = types.ModuleType("ttc.fake_probe_for_tests")
    module.FakeProbe = FakeProbe
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    FakeProbe.fits.clear()
    cfg = tiny_cfg("strategy=best_of_n", "strategy.n=2", "proposer.max_tokens=8", "probe_training.problems=4",
                   "probe_training.samples_per_problem=2")
    cfg["verifier"] = {"_target_": "ttc.fake_probe_for_tests.FakeProbe", "path": "???", "batch_size": 8}
    outcome = run_eval(cfg, tmp_path / "run")
    (fit,) = FakeProbe.fits
    evaluated = {json.dumps(r["prompt"]) for r in read_records(tmp_path / "run")}
    assert len(fit["problems"]) == 4 and all("-1000000-" in p.id for p in fit["problems"])
    assert not evaluated & {json.dumps(p.prompt) for p in fit["problems"]}
    problem = fit["problems"][0]
    assert fit["grade_fn"](problem, f"The answer is {problem.answer}.") is True
    assert fit["samples"] == 2 and fit["max_tokens"] == 256
    assert fit["options"] == {"temperature": 0.8, "per_step": False}
    (cached,) = (tmp_path / "cache" / "ttc" / "probes").iterdir()
    assert cached.name.startswith(f"{Path(str(cfg['model']['spec'])).name}-chain_sum-") and cached.suffix == ".pt"
    assert outcome.summary["label"] == "best_of_n+fake_probe_for_tests"
    assert outcome.summary["training"]["probe"]["generated_tokens"] == 70
    assert outcome.summary["training"]["total_tokens"] == 100  # the probe's rollouts are the run's training cost
    assert "training tokens" in runner.summary_table(outcome.summary)
    assert all(c["score"] == 0.5 for r in read_records(tmp_path / "run") for c in r["candidates"])
    run_eval(cfg, tmp_path / "run2")
    assert len(FakeProbe.fits) == 1  # the cached probe was used


def test_greedy_runs_as_a_strategy_with_one_sample(tiny_llama_dir, tmp_path):
    outcome = run_eval(eval_config(*tiny_overrides(tiny_llama_dir, strategy=("strategy=greedy",))), tmp_path)
    records = read_records(tmp_path)
    assert all(r["strategy"] == "greedy" and r["samples"] == 1 and len(r["candidates"]) == 1 for r in records)
    assert outcome.summary["pass@k"] == {"1": outcome.summary["accuracy"]}


@pytest.mark.slow
def test_the_embedded_models_greedy_chain_sum_answers_are_graded_and_summed_exactly(tmp_path):
    cfg = eval_config("strategy=greedy", "proposer.max_tokens=64", "dataset=reasoning_gym", "dataset.task=chain_sum",
                      "dataset.size=2", "dataset.options={min_terms:2,max_terms:2,max_digits:1}", "progress=false")
    outcome = run_eval(cfg, tmp_path)
    records = read_records(tmp_path)
    assert len(records) == 2 and outcome.summary["complete"]
    for r in records:
        assert r["strategy"] == "greedy" and r["samples"] == 1 and r["generated_tokens"] > 0
        assert r["answer"] is not None and r["answer"] == extract_stated_answer(r["text"])
        assert r["correct"] == _is_the_number(r["answer"], r["reference"])  # graded here, not by the runner
    correct = sum(r["correct"] for r in records)
    summary = outcome.summary
    assert (summary["correct"], summary["accuracy"]) == (correct, correct / 2)
    for field in ("prefill_tokens", "generated_tokens", "verifier_tokens"):
        assert summary[field] == sum(r[field] for r in records)
    assert summary["mean_tokens"] == sum(r["prefill_tokens"] + r["generated_tokens"] + r["verifier_tokens"]
                                         for r in records) / 2


def _is_the_number(answer: str, reference: str) -> bool:
    """chain_sum's grade, written out: the answer is the reference number (commas, sign and zeros aside)."""
    try:
        return Decimal(answer.replace(",", "")) == Decimal(reference)
    except InvalidOperation:
        return False


def test_the_train_probe_command_and_the_runner_agree_on_the_cache_path():
    from ttc.evals.probe_training import probe_cache_path

    overrides = [*CHAIN_SUM, "probe_training.problems=8"]
    with initialize_config_module(config_module="ttc.configs", version_base="1.3"):
        command = config_dict(compose("train_probe", overrides=overrides))
    evaluation = eval_config(*overrides, "verifier=probe")
    paths = {probe_cache_path(c["model"], c["dataset"], c["probe_training"], c["verifier"])
             for c in (command, evaluation)}
    assert len(paths) == 1 and next(iter(paths)).name.startswith("smollm2-135m-chain_sum-")
    other = eval_config(*CHAIN_SUM, "probe_training.problems=9", "verifier=probe")
    assert probe_cache_path(other["model"], other["dataset"], other["probe_training"], other["verifier"]) not in paths


def test_a_folder_whose_run_failed_to_start_takes_the_corrected_config(tiny_cfg, tmp_path):
    from ttc.evals.datasets import DatasetError

    with pytest.raises(DatasetError, match="did you mean chain_sum"):
        run_eval(tiny_cfg("dataset.task=chain_sums"), tmp_path)
    assert run_eval(tiny_cfg("dataset.limit=1"), tmp_path).summary["problems"] == 1


def load_parity_dataset(seed: int = 0, size: int = 4, limit: int | None = None):
    """A test dataset whose grade (even answer length) gives a random model both correct and wrong samples."""
    from ttc.evals.datasets import Dataset
    from ttc.graph import Problem

    count = size if limit is None else min(size, limit)
    problems = [Problem(id=f"parity-{seed}-{i}", prompt=[{"role": "user", "content": f"Say something ({seed}, {i})."}],
                        answer="even") for i in range(count)]
    return Dataset("parity", problems, lambda text: text, lambda problem, answer: len(answer) % 2 == 0)


def test_the_real_probe_verifier_is_trained_saved_and_loaded_by_the_runner(tiny_llama_dir, tmp_path, monkeypatch):
    module = types.ModuleType("ttc.parity_dataset_for_tests")
    module.load = load_parity_dataset
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = eval_config(*tiny_overrides(tiny_llama_dir), "strategy=best_of_n", "verifier=probe",
                      "probe_training.problems=6", "probe_training.samples_per_problem=2",
                      "probe_training.max_tokens=8")
    cfg["dataset"] = {"_target_": "ttc.parity_dataset_for_tests.load", "seed": 0, "size": 2}
    outcome = run_eval(cfg, tmp_path / "run")
    (probe_file,) = (tmp_path / "cache" / "ttc" / "probes").glob("*.pt")
    assert probe_file.name.startswith(f"{Path(str(tiny_llama_dir)).name}-load-")
    records = read_records(tmp_path / "run")
    assert len(records) == 2 and outcome.summary["verifier"] == "probe"
    assert all(0.0 < c["score"] < 1.0 for r in records for c in r["candidates"])
    assert all(r["verifier_tokens"] > 0 for r in records)  # the probe's suffix was computed
    probe = outcome.summary["training"]["probe"]  # its training rollouts: a cost no record holds
    assert probe["generated_tokens"] > 0 and outcome.summary["training"]["total_tokens"] >= probe["generated_tokens"]
