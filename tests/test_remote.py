"""The remote backend against fake servers: retries and errors, the ledger from usage, the wire format and
the missing-capability line (the strategies and the eval runner on a server: tests/test_remote_strategies.py).

Two fakes: `Scripted` answers each request from a list (errors, odd usages) through httpx's MockTransport;
`remote_fakes.EngineServer` is a small OpenAI completions server on the tiny model's engine (fixtures
`engine_server` and `remote` in conftest.py).
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch

from ttc.backends.local import LocalProposer
from ttc.backends.remote import RemoteBackend, RemoteError, RemoteProposer
from ttc.backends.remote_http import HttpClient
from ttc.decoder.concurrent import Cancelled
from ttc.decoder.sampling import child_seed
from ttc.graph import LOGPROBS, Meter, MissingCapability, Problem
from ttc.search.ets import ETSSelector
from ttc.verifiers.math import extract_answer

from remote_fakes import MODEL

PROBLEM = Problem(id="q0", prompt=[{"role": "user", "content": "What is 17 + 25? Think step by step."}])


# -- fakes ---------------------------------------------------------------------------------------------------

def completion(ids=(5, 6), text="ab", finish="length", stop_reason=None, usage=None, token_ids=True, **extra):
    lp = {"tokens": [f"token_id:{t}" if token_ids else f"t{t}" for t in ids], "token_logprobs": [-0.5] * len(ids)}
    choice = {"index": 0, "text": text, "finish_reason": finish, "stop_reason": stop_reason, "logprobs": lp}
    body = {"choices": [choice], **extra}
    if usage is not None:
        body["usage"] = usage
    return body


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 0}}


class Scripted:
    """Answers GET /models with MODEL, and each POST with the next item: a dict (200 JSON), an int (that
    status), an (int, dict) pair, or an exception to raise (a dropped connection)."""

    def __init__(self, *answers, handshake=True):
        self.answers = ([completion(usage=USAGE)] if handshake else []) + list(answers)
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": MODEL}]})
        self.bodies.append(json.loads(request.content))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, int):
            return httpx.Response(answer, json={"error": {"message": f"status {answer}"}})
        if isinstance(answer, tuple):
            return httpx.Response(answer[0], json=answer[1], headers=answer[2] if len(answer) > 2 else None)
        return httpx.Response(200, json=answer)


def backend_on(handler, tokenizer, **kwargs) -> RemoteBackend:
    return RemoteBackend("http://fake/v1", MODEL, tokenizer=str(tokenizer), transport=httpx.MockTransport(handler),
                         **kwargs)


# -- the HTTP client -------------------------------------------------------------------------------------

def no_sleep(client: HttpClient) -> list[float]:
    waits: list[float] = []
    client._stop.wait = lambda delay: waits.append(delay)
    return waits


def test_429_5xx_and_dropped_connections_are_retried_with_exponential_backoff():
    server = Scripted((429, {"error": {"message": "slow down"}}, {"Retry-After": "3"}), 503,
                      httpx.RemoteProtocolError("dropped"), completion(), handshake=False)
    client = HttpClient("http://fake/v1", retries=4, backoff_s=0.5, transport=httpx.MockTransport(server))
    waits = no_sleep(client)
    assert client.post("completions", {"prompt": [1]})["choices"][0]["text"] == "ab"
    assert waits == [3.0, 1.0, 2.0]  # Retry-After where given (above the backoff), then 0.5 * 2**attempt
    assert client.requests == 4


def test_a_4xx_fails_at_once_with_the_servers_message_in_one_line():
    server = Scripted((400, {"error": {"message": "max_tokens is too large", "type": "invalid_request_error"}}),
                      handshake=False)
    client = HttpClient("http://fake/v1", transport=httpx.MockTransport(server))
    with pytest.raises(RemoteError) as e:
        client.post("completions", {})
    assert str(e.value) == "POST http://fake/v1/completions: HTTP 400: max_tokens is too large"
    assert client.requests == 1  # not retried


def test_a_server_that_keeps_failing_is_given_up_after_the_retries_in_one_line():
    client = HttpClient("http://fake/v1", retries=2, transport=httpx.MockTransport(Scripted(502, handshake=False)))
    no_sleep(client)
    with pytest.raises(RemoteError, match=r"^POST http://fake/v1/completions: HTTP 502 \(after 3 attempts\): status "
                                          r"502$"):
        client.post("completions", {})
    refused = HttpClient("http://fake/v1", retries=1,
                         transport=httpx.MockTransport(Scripted(httpx.ConnectError("refused"), handshake=False)))
    no_sleep(refused)
    with pytest.raises(RemoteError, match=r"ConnectError: refused \(after 2 attempts\)"):
        refused.post("completions", {})


def test_post_all_answers_in_order_with_at_most_max_concurrency_in_flight():
    live, peak, lock = [0], [0], threading.Lock()
    gate = threading.Barrier(2, timeout=5)

    def handler(request):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        gate.wait()  # two at once, or the barrier times out
        with lock:
            live[0] -= 1
        return httpx.Response(200, json={"i": json.loads(request.content)["i"]})

    client = HttpClient("http://fake/v1", max_concurrency=2, transport=httpx.MockTransport(handler))
    assert [r["i"] for r in client.post_all("completions", [{"i": i} for i in range(6)])] == list(range(6))
    assert peak[0] == 2


def test_a_cancelled_client_fails_its_requests_with_cancelled_until_reopened():
    client = HttpClient("http://fake/v1", transport=httpx.MockTransport(Scripted(completion(), handshake=False)))
    client.cancel()
    with pytest.raises(Cancelled):
        client.post("completions", {})
    client.reopen()
    assert client.post("completions", {})["choices"]


# -- the backend on scripted answers ---------------------------------------------------------------------

def test_a_server_that_serves_another_model_is_named_in_one_line(tiny_llama_dir):
    with pytest.raises(RemoteError, match=r"^http://fake/v1 serves \['tiny'\], not 'other': set model.name$"):
        RemoteBackend("http://fake/v1", "other", tokenizer=str(tiny_llama_dir),
                      transport=httpx.MockTransport(Scripted()))


def test_a_server_that_rejects_the_extensions_says_how_to_do_without(tiny_llama_dir):
    server = Scripted((400, {"detail": "unknown field include_stop_str_in_output"}), handshake=False)
    with pytest.raises(RemoteError, match="HTTP 400: unknown field .* set model.features.extensions=false"):
        backend_on(server, tiny_llama_dir)


def one_step(backend, meter, to_end=False, **proposer) -> tuple:
    proposer = RemoteProposer(backend, max_step_tokens=4, max_tokens=8, answer_fn=extract_answer, **proposer)
    root = proposer.start(PROBLEM, meter)
    return root, proposer.propose([root], 1, meter, to_end=to_end)


def test_the_ledger_is_the_servers_usage_cached_tokens_reused_and_the_rest_computed(tiny_llama_dir):
    usage = {"prompt_tokens": 40, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 32}}
    backend = backend_on(Scripted(completion(usage=usage)), tiny_llama_dir)
    meter = Meter()
    one_step(backend, meter)
    ledger = meter.ledger
    assert (ledger.prefill_tokens, ledger.reused_tokens, ledger.generated_tokens) == (8, 32, 2)
    assert ledger.forward_passes == 1 and ledger.flops > 0  # estimated from the tiny model's config.json
    assert backend.record_notes() == {"ledger_source": "server usage", "token_source": "server token ids"}


def test_without_a_cache_report_every_prompt_token_is_computed_and_the_record_says_so(tiny_llama_dir):
    usage = {"prompt_tokens": 40, "completion_tokens": 2}
    backend = backend_on(Scripted(completion(usage=usage), handshake=False), tiny_llama_dir)
    assert backend.record_notes()["ledger_source"] == "server usage, no cache report"
    meter = Meter()
    one_step(backend, meter)
    assert (meter.ledger.prefill_tokens, meter.ledger.reused_tokens, meter.ledger.generated_tokens) == (40, 0, 2)


def test_without_usage_the_client_counts_what_it_sent_and_received(tiny_llama_dir):
    backend = backend_on(Scripted(completion(ids=(5, 6, 7)), handshake=False), tiny_llama_dir)
    meter = Meter()
    root, _ = one_step(backend, meter)
    assert meter.ledger.prefill_tokens == len(root.handle.token_ids) and meter.ledger.generated_tokens == 3
    assert backend.record_notes()["ledger_source"] == "client count, no usage report"


def test_each_threads_record_notes_only_what_its_own_answers_reported(tiny_llama_dir):
    """Two problems solved at once on one backend: the one whose answer had no usage says so in its record, the
    other's record does not inherit it (the run-wide note does), and begin_record starts a record afresh."""
    backend = backend_on(Scripted(completion(ids=(5, 6, 7)), completion(usage=USAGE)), tiny_llama_dir)
    first_done, second_done, notes = threading.Event(), threading.Event(), {}

    def first():
        backend.begin_record()
        one_step(backend, Meter())  # the answer without usage
        first_done.set()
        second_done.wait(10)
        notes["first"] = backend.record_notes()["ledger_source"]
        backend.begin_record()
        notes["first, afresh"] = backend.record_notes()["ledger_source"]

    def second():
        first_done.wait(10)
        backend.begin_record()
        one_step(backend, Meter())  # an answer with usage
        notes["second"] = backend.record_notes()["ledger_source"]
        second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert notes == {"first": "client count, no usage report", "first, afresh": "server usage",
                     "second": "server usage"}
    # this thread began no record: it reads the run's notes, the weakest any thread saw
    assert backend.record_notes()["ledger_source"] == "client count, no usage report"


def test_a_re_tokenized_answer_marks_only_its_own_threads_record(tiny_llama_dir):
    backend = backend_on(Scripted(completion(text=" seven", token_ids=False, usage=USAGE), completion(usage=USAGE)),
                         tiny_llama_dir)
    notes = {}

    def solve(name):
        backend.begin_record()
        one_step(backend, Meter())
        notes[name] = backend.record_notes()["token_source"]

    for name in ("first", "second"):  # one after the other, each in a thread of its own
        thread = threading.Thread(target=solve, args=(name,))
        thread.start()
        thread.join(20)
    assert notes == {"first": "re-tokenized text", "second": "server token ids"}
    assert backend.record_notes()["token_source"] == "re-tokenized text"


def test_a_step_request_sends_the_branch_ids_the_childs_seed_and_the_step_stops(tiny_llama_dir):
    server = Scripted(completion(ids=(5, 6), text="x\n\n", finish="stop", stop_reason="\n\n", usage=USAGE))
    backend = backend_on(server, tiny_llama_dir)
    root, (child,) = one_step(backend, Meter(), seed=3, temperature=0.7)
    body = server.bodies[-1]
    assert body["prompt"] == list(root.handle.token_ids) and body["seed"] == child_seed(root.seed, 0)
    assert body["stop"] == ["\n\n"] and body["max_tokens"] == 4 and body["temperature"] == 0.7
    assert body["include_stop_str_in_output"] and body["return_tokens_as_token_ids"] and body["logprobs"] == 0
    assert child.steps[-1].finish_reason == "step" and child.steps[-1].token_ids == (5, 6)
    assert child.handle.token_ids == root.handle.token_ids + (5, 6) and not child.finished
    _, (done,) = one_step(backend, Meter(), to_end=True)
    assert "stop" not in server.bodies[-1]  # to the end: no step stops


def test_a_request_stops_at_the_models_context_as_the_local_engine_does(tiny_llama_dir):
    from ttc.decoder.engine import PromptTooLong

    server = Scripted(completion(ids=(5, 6, 7, 8), usage=USAGE))
    backend = backend_on(server, tiny_llama_dir)  # the tiny model's context: 1024 tokens
    proposer = RemoteProposer(backend, max_step_tokens=256, max_tokens=768)
    root = proposer.start(Problem(id="long", prompt=[9] * 1020), Meter())
    (child,) = proposer.propose([root], 1, Meter())
    assert server.bodies[-1]["max_tokens"] == 4 and child.finished  # the context is full
    with pytest.raises(PromptTooLong):
        proposer.start(Problem(id="too long", prompt=[9] * 1024), Meter())


def test_an_eos_the_server_left_out_is_appended_as_the_local_engine_keeps_it(tiny_llama_dir):
    backend = backend_on(Scripted(completion(ids=(5, 6), finish="stop", stop_reason=None, usage=USAGE)),
                         tiny_llama_dir)
    _, (child,) = one_step(backend, Meter())
    assert child.steps[-1].token_ids == (5, 6, 2) and child.steps[-1].finish_reason == "eos" and child.finished


def test_a_server_without_token_ids_is_re_tokenized_and_the_record_says_so(tiny_llama_dir, embedded_tokenizer):
    text = " seven"
    backend = backend_on(Scripted(completion(text=text, token_ids=False, usage=USAGE)), tiny_llama_dir)
    _, (child,) = one_step(backend, Meter())
    assert list(child.steps[-1].token_ids) == embedded_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert backend.record_notes()["token_source"] == "re-tokenized text"


def test_a_server_that_ignores_n_is_told_to_do_without(tiny_llama_dir):
    backend = backend_on(Scripted(completion(usage=USAGE)), tiny_llama_dir, features={"n": True})
    proposer = RemoteProposer(backend, answer_fn=extract_answer)
    root = proposer.start(PROBLEM, Meter())
    with pytest.raises(RemoteError, match="asked http://fake/v1 for 3 samples and got 1: the server ignores n"):
        proposer.propose([root], 3, Meter())


def test_verifier_probe_fails_with_the_missing_capability_line(tiny_llama_dir):
    from ttc.evals.build import ConfigError, build_verifier
    from ttc.verifiers.probe import ProbeVerifier

    backend = backend_on(Scripted(), tiny_llama_dir)
    line = "verifier=probe needs hidden states, which the remote backend does not provide"
    with pytest.raises(MissingCapability, match=f"^{line}$"):
        ProbeVerifier(path="unused.pt", model=backend)
    # ttc-eval says it as a config error, before training a probe on a model it cannot run
    with pytest.raises(ConfigError, match=f"^{line}$"):
        build_verifier({"verifier": {"_target_": "ttc.verifiers.probe.ProbeVerifier", "path": "???"}}, backend,
                       {"verifier": "probe"})
    with pytest.raises(MissingCapability, match="strategy=ets .* needs hidden states, which the remote backend"):
        ETSSelector(lambda_coverage=1.0).bind(RemoteProposer(backend))


# -- scoring continuations -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["echo", "prompt_logprobs"])
def test_continuation_logprobs_match_the_local_backend_and_the_rest_of_the_vocabulary_is_minus_inf(
        mode, engine_server, tiny_model, tiny_llama_dir):
    backend = RemoteBackend("http://fake/v1", MODEL, tokenizer=str(tiny_llama_dir), transport=engine_server.transport(),
                            features={"prompt_logprobs": mode, "top_logprobs": 5})
    assert backend.capabilities == {LOGPROBS}
    local = LocalProposer(tiny_model, answer_fn=extract_answer)
    root = local.start(PROBLEM, Meter())
    ids = tiny_model.tokenizer.encode(" Yes or no?", add_special_tokens=False)
    (want,) = tiny_model.backend.score_continuations([(root, ids)], Meter())
    remote_root = RemoteProposer(backend).start(PROBLEM, Meter())
    meter = Meter()
    (got,) = backend.score_continuations([(remote_root, ids)], meter)
    local.release([root])
    assert torch.allclose(got.logprobs, want.logprobs, atol=1e-4)
    top = want.last_logprobs.topk(5)
    assert torch.allclose(got.last_logprobs[top.indices], top.values, atol=1e-4)
    assert torch.isinf(got.last_logprobs).sum() == backend.vocab_size - 5
    assert meter.ledger.verifier_tokens == len(remote_root.handle.token_ids) + len(ids) and \
        meter.ledger.generated_tokens == 0  # a verifier's request: nothing was generated


def test_self_eval_on_a_server_judges_from_the_yes_and_no_in_its_top_k(tiny_llama_dir):
    import math

    from ttc.verifiers.self_eval import SelfEvalVerifier

    words = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": MODEL}]})
        body = json.loads(request.content)
        if not body.get("echo"):
            return httpx.Response(200, json=completion(usage=USAGE))
        words["body"] = body
        top = {f"token_id:{words['yes']}": math.log(0.6), f"token_id:{words['no']}": math.log(0.2), "token_id:7": -0.3}
        n = len(body["prompt"])
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": {
            "tokens": [f"token_id:{t}" for t in body["prompt"]] + ["token_id:7"],
            "token_logprobs": [None] + [-1.0] * (n - 1) + [-0.3], "top_logprobs": [None] * n + [top]}}],
            "usage": {"prompt_tokens": n, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 16}}})

    backend = backend_on(handler, tiny_llama_dir, features={"prompt_logprobs": "echo"})
    verifier = SelfEvalVerifier(model=backend)
    words.update(yes=int(verifier.yes_ids[0]), no=int(verifier.no_ids[0]))
    root = RemoteProposer(backend).start(PROBLEM, Meter())
    meter = Meter()
    assert verifier.score([root], meter) == pytest.approx([0.75])  # 0.6 / (0.6 + 0.2)
    sent = words["body"]
    assert sent["prompt"] == list(root.handle.token_ids) + verifier.suffix_ids(root) and sent["logprobs"] == 20
    assert meter.ledger.verifier_tokens == len(sent["prompt"]) - 16 and meter.ledger.reused_tokens == 16


def test_a_server_without_token_id_prompts_gets_the_rendered_text(tiny_llama_dir):
    server = Scripted(completion(usage=USAGE))
    backend = backend_on(server, tiny_llama_dir, features={"token_ids": False})
    root, _ = one_step(backend, Meter())
    body = server.bodies[-1]
    assert body["prompt"] == backend.tokenizer.decode(root.handle.token_ids) and body["add_special_tokens"] is False


def test_scoring_without_prompt_logprobs_is_a_missing_capability(tiny_llama_dir):
    from ttc.verifiers.self_eval import SelfEvalVerifier

    backend = backend_on(Scripted(), tiny_llama_dir, features={"prompt_logprobs": None})
    with pytest.raises(MissingCapability, match="^verifier=self_eval needs logprobs of a continuation, which the "
                                                "remote backend does not provide$"):
        SelfEvalVerifier(model=backend)


