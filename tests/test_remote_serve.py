"""Local equals remote: the remote backend over `ttc serve` on 127.0.0.1 writes what the local backend writes.

The server runs in this process (uvicorn on a loopback socket, in a thread) on its own float32 copy of
the tiny model; the client talks HTTP to it at concurrency 1. Every strategy in search/ must give the
local answers, texts and trees at the same seeds (see test_remote_strategies.SETTINGS on why sampling has a top-k
cut here), a continuation's logprobs must match the local engine's, and `ttc-eval model=remote` must
write the local run's records. One slow test does the same on the embedded model with self_eval.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest
import torch

import ttc
from test_remote_strategies import (MODEL, PROBLEM, SETTINGS, STRATEGIES, assert_remote_writes_the_local_texts,
                                    outcome, remote_eval_config)
from ttc.backends.local import LocalProposer
from ttc.backends.remote import RemoteBackend, RemoteProposer
from ttc.graph import Meter
from ttc.search.solve import solve

pytest.importorskip("ttc.serve.app")


@contextlib.contextmanager
def ttc_serve(model, name: str = MODEL):
    """`ttc serve` on `model` at a free loopback port; yields its base URL."""
    import uvicorn

    from ttc.serve.app import create_app
    from ttc.serve.runtime import Settings

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(model, Settings(model_name=name)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("ttc serve did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def serve_url(tiny_llama_dir):
    served = ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.05)  # the server's own engine
    with ttc_serve(served) as url:
        yield url


@pytest.fixture(scope="module")
def served(serve_url, tiny_llama_dir):
    backend = RemoteBackend(serve_url, MODEL, tokenizer=str(tiny_llama_dir), max_concurrency=1)
    yield backend
    backend.close()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_over_ttc_serve_writes_the_local_texts_at_the_same_seeds(name, tiny_model, served):
    assert_remote_writes_the_local_texts(name, tiny_model, served)


def test_completing_a_branch_that_has_sampled_continues_its_stream_on_ttc_serve(tiny_model, served):
    # max_depth=1: no beam finishes, so the best open one is completed in place, drawing on from its own
    # stream; ttc serve skips the draws the branch made (ttc_skip_draws), so even this is the local text
    from ttc.search.beam import Beam
    from test_remote_strategies import HashVerifier

    assert served.features.skip_draws  # learned in the handshake (/models: owned_by ttc)
    strategy = Beam(n=2, expand=2, max_depth=1)
    local = solve(PROBLEM, strategy, verifier=HashVerifier(), proposer=LocalProposer(tiny_model, **SETTINGS))
    far = solve(PROBLEM, strategy, verifier=HashVerifier(), proposer=RemoteProposer(served, **SETTINGS))
    assert outcome(far) == outcome(local)


def test_ttc_serve_reports_its_prefix_cache_and_siblings_find_their_prompt_there(served):
    far = solve(PROBLEM, STRATEGIES["self_consistency"][0], proposer=RemoteProposer(served, **SETTINGS))
    assert served.record_notes() == {"ledger_source": "server usage", "token_source": "server token ids"}
    prompt = len(served.tokenizer.encode_prompt(PROBLEM.prompt))
    # three requests on one prompt: at least the full cache blocks of the later two are reused
    assert far.ledger.reused_tokens >= 2 * (prompt // 16 * 16)
    assert far.ledger.prefill_tokens + far.ledger.reused_tokens == 3 * prompt


@pytest.mark.parametrize("mode", ["echo", "prompt_logprobs"])
def test_continuation_logprobs_over_ttc_serve_are_the_local_engines(mode, tiny_model, serve_url, tiny_llama_dir):
    backend = RemoteBackend(serve_url, MODEL, tokenizer=str(tiny_llama_dir), features={"prompt_logprobs": mode})
    local = LocalProposer(tiny_model)
    root = local.start(PROBLEM, Meter())
    ids = tiny_model.tokenizer.encode(" Is it right? Yes or no.", add_special_tokens=False)
    (want,) = tiny_model.backend.score_continuations([(root, ids)], Meter())
    local.release([root])
    (got,) = backend.score_continuations([(RemoteProposer(backend).start(PROBLEM, Meter()), ids)], Meter())
    top = want.last_logprobs.topk(backend.features.top_logprobs)
    assert torch.allclose(got.logprobs, want.logprobs, atol=1e-4)
    assert torch.allclose(got.last_logprobs[top.indices], top.values, atol=1e-4)
    assert int(torch.isfinite(got.last_logprobs).sum()) == backend.features.top_logprobs


@pytest.mark.parametrize("strategy", ["self_consistency", "beam"])
def test_ttc_eval_with_model_remote_writes_the_local_runs_records(strategy, serve_url, tiny_llama_dir, tmp_path):
    from test_evals_runner import eval_config, tiny_overrides

    from ttc.evals import build
    from ttc.evals.runner import run_eval

    common = [f"strategy={strategy}", "strategy.n=2", "proposer.top_k=50", "proposer.max_tokens=12",
              "proposer.max_step_tokens=4", "budget.tokens=null"]
    build._loaded.clear()
    run_eval(eval_config(*tiny_overrides(tiny_llama_dir), *common), tmp_path / "local")
    build._loaded.clear()
    run_eval(remote_eval_config(serve_url, tiny_llama_dir, *common), tmp_path / "remote")
    build._loaded.clear()

    def records(where):
        return [json.loads(line) for line in (tmp_path / where / "results.jsonl").read_text().splitlines()]

    keys = ("id", "answer", "correct", "text", "samples", "candidates", "generated_tokens")
    local, remote = records("local"), records("remote")
    assert [{k: r[k] for k in keys} for r in remote] == [{k: r[k] for k in keys} for r in local]
    assert all(r["ledger_source"] == "server usage" for r in remote)
    assert all("ledger_source" not in r for r in local)


@pytest.mark.slow
def test_the_embedded_model_over_ttc_serve_writes_and_judges_like_the_local_one():
    """best_of_n judged by self_eval on smollm2-135m (float32), local and over ttc serve: the same samples and
    the same choice, and the judge's probabilities from the server's top-20 within 1e-3 of the local ones."""
    from ttc.search.best_of_n import BestOfN
    from ttc.verifiers.self_eval import SelfEvalVerifier

    local_model = ttc.load("smollm2-135m", dtype="float32", kv_cache_gb=0.2)
    settings = dict(SETTINGS, max_tokens=32, top_k=0)
    with ttc_serve(ttc.load("smollm2-135m", dtype="float32", kv_cache_gb=0.2), "smollm2") as url:
        backend = RemoteBackend(url, "smollm2", tokenizer="smollm2-135m", max_concurrency=1)
        local = solve(PROBLEM, BestOfN(n=2), verifier=SelfEvalVerifier(model=local_model),
                      proposer=LocalProposer(local_model, **settings))
        far = solve(PROBLEM, BestOfN(n=2), verifier=SelfEvalVerifier(model=backend),
                    proposer=RemoteProposer(backend, **settings))
        backend.close()
    assert [(n.get("status"), n.get("text")) for n in far.tree["nodes"]] == \
        [(n.get("status"), n.get("text")) for n in local.tree["nodes"]]
    scores = [(n.get("score"), m.get("score")) for n, m in zip(far.tree["nodes"], local.tree["nodes"])
              if m.get("score") is not None]
    assert scores and all(abs(a - b) < 1e-3 for a, b in scores), scores
