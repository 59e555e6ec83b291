"""`ttc serve` under load and when clients or the server go away: no request is lost, a full queue is a
503 with Retry-After, a client that disconnects frees its KV, and SIGTERM lets in-flight requests finish."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import ttc
from test_serve import MODEL, kv_is_free, running_server, wait_until

LONG = {"model": MODEL, "prompt": "Once", "max_tokens": 900, "ignore_eos": True, "seed": 0}


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.05)


def health(url: str) -> dict:
    return httpx.get(url + "/health", trust_env=False, timeout=10).json()


def test_64_concurrent_clients_lose_no_request_and_leave_the_kv_free(model):
    shared = "You are a careful assistant. Think step by step and answer briefly. Question number "
    with running_server(model, max_concurrency=16, max_queue=64, chunk_tokens=4) as (url, runtime):
        def one(i: int):
            body = {"model": MODEL, "prompt": shared + str(i), "max_tokens": 6 + i % 5, "n": 1 + i % 2, "seed": i,
                    "ignore_eos": True}
            with httpx.Client(base_url=url, trust_env=False, timeout=60) as c:
                if i % 4 == 0:  # a quarter of them stream
                    with c.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                                   "stream_options": {"include_usage": True}}) as r:
                        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                    return r.status_code, lines[-1] == "data: [DONE]" and '"usage"' in lines[-2]
                r = c.post("/v1/completions", json=body)
                ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == body["n"] * body["max_tokens"]
                return r.status_code, ok

        started = time.monotonic()
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(one, range(64)))
        assert time.monotonic() - started < 60
        assert results == [(200, True)] * 64
        assert wait_until(lambda: runtime.stats()["running"] == 0 and kv_is_free(model))
        assert runtime.stats()["served"] == 64 and runtime.stats()["reserved_kv_blocks"] == 0


def test_a_full_queue_answers_503_with_retry_after(model):
    with running_server(model, max_concurrency=1, max_queue=1, chunk_tokens=4) as (url, runtime):
        def hold():  # a long request that gives up (disconnects) after 4 s
            try:
                httpx.post(url + "/v1/completions", json=LONG, trust_env=False, timeout=4)
            except httpx.TimeoutException:
                pass

        holders = [threading.Thread(target=hold) for _ in range(2)]
        holders[0].start()
        assert wait_until(lambda: runtime.stats()["running"] == 1, timeout=10)
        holders[1].start()
        assert wait_until(lambda: runtime.stats()["waiting"] == 1, timeout=10)
        r = httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 2}, trust_env=False, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "server_overloaded"
        for t in holders:
            t.join(timeout=30)
        assert wait_until(lambda: runtime.stats()["running"] == 0 and runtime.stats()["waiting"] == 0)
        assert wait_until(lambda: kv_is_free(model))


def test_a_client_that_disconnects_cancels_its_work_and_frees_its_kv(model):
    with running_server(model, max_concurrency=4, chunk_tokens=4) as (url, runtime):
        with pytest.raises(httpx.TimeoutException):  # non-streaming: the client gives up
            httpx.post(url + "/v1/completions", json={**LONG, "n": 2}, trust_env=False, timeout=1.0)
        assert wait_until(lambda: runtime.stats()["cancelled"] == 1 and runtime.stats()["running"] == 0, timeout=15)
        assert kv_is_free(model)
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as c:  # streaming: it stops reading
            with c.stream("POST", "/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 900,
                    "ignore_eos": True, "stream": True, "logprobs": True, "top_logprobs": 2}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
        assert wait_until(lambda: runtime.stats()["cancelled"] == 2 and runtime.stats()["running"] == 0, timeout=15)
        assert kv_is_free(model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_lets_the_in_flight_request_finish_then_exits(tiny_llama_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ttc.serve.cli", "serve", "--model", str(tiny_llama_dir),
                             "--served-model-name", MODEL, "--port", str(port), "--dtype", "float32",
                             "--kv-cache-gb", "0.05", "--chunk-tokens", "4", "--log-level", "warning"], env=env)
    try:
        assert wait_until(lambda: _up(url), timeout=120), "the server did not start"
        answer = {}

        def long_request():
            r = httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 600}, trust_env=False, timeout=120)
            answer["status"], answer["body"] = r.status_code, r.json()

        t = threading.Thread(target=long_request)
        t.start()
        assert wait_until(lambda: health(url)["running"] == 1, timeout=30)
        proc.send_signal(signal.SIGTERM)
        try:  # new work is refused: the port is closed, or a late connection gets 503
            late = httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 2}, trust_env=False, timeout=10)
            assert late.status_code == 503
        except httpx.TransportError:
            pass
        t.join(timeout=120)
        assert answer["status"] == 200 and answer["body"]["usage"]["completion_tokens"] == 600
        # uvicorn re-raises the signal once it has shut down: the exit status is SIGTERM's (or 0)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up(url: str) -> bool:
    try:
        return health(url)["status"] == "ok"
    except httpx.TransportError:
        return False
