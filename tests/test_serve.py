"""`ttc serve` through the official openai client: chat, completions, streaming, n, logprobs, seeds,
test-time compute in extra_body, and OpenAI-shaped 4xx errors. The server runs in-process on the tiny
model, on 127.0.0.1 and a free port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

import ttc
from ttc.budget import Ledger
from ttc.decoder import SamplingParams
from ttc.serve.app import create_app
from ttc.serve.runtime import Settings

MODEL = "tiny"


@contextlib.contextmanager
def running_server(model, **settings):
    """A ttc server on 127.0.0.1 in a thread; yields its base URL and its Runtime."""
    app = create_app(model, Settings(model_name=MODEL, **settings))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app.state.runtime
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def kv_is_free(model) -> bool:
    engine = model.engine
    return engine.pool.num_free + engine.prefix.num_cached_blocks == engine.pool.num_blocks


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.05)


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, max_concurrency=8, chunk_tokens=3) as (url, runtime):
        yield url, runtime


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=120,
                         http_client=httpx.Client(trust_env=False))


def ids_of(logprobs_tokens) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in logprobs_tokens]


def test_models_lists_the_served_model_and_health_reports_the_kv(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server[0] + "/health", trust_env=False).json()
    assert health["status"] == "ok" and health["kv_blocks"] > 0


def test_chat_completion_reports_usage_and_the_cached_prompt(client):
    messages = [{"role": "user", "content": "What is 2 + 2? Answer with a number and nothing else, please."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, seed=1)
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, seed=1)
    assert first.choices[0].message.role == "assistant"
    assert again.choices[0].message.content == first.choices[0].message.content
    assert first.usage.completion_tokens <= 5 and first.usage.total_tokens == first.usage.prompt_tokens + \
        first.usage.completion_tokens
    # the second request found the prompt's full blocks in the radix prefix cache
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    assert again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens


def test_completions_with_n_and_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="Once upon a time", n=3, max_tokens=6, logprobs=2, seed=4,
                                    temperature=1.0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) > 1  # independent samples
    for c in out.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert all(len(top) <= 3 for top in lp.top_logprobs)  # the top 2, and the sampled token
        assert all(t in top and top[t] == pytest.approx(v, abs=1e-4)
                   for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
        assert all(max(top.values()) >= v - 1e-4 for v, top in zip(lp.token_logprobs, lp.top_logprobs))
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices)


def test_top_logprobs_are_the_distributions_the_samples_were_drawn_from(client, model):
    prompt = [5, 6, 7, 8, 9, 10, 11]
    out = client.completions.create(model=MODEL, prompt=prompt, n=2, max_tokens=7, logprobs=3, seed=8,
                                    extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    engine = model.engine
    for c in out.choices:
        ids = ids_of(c.logprobs.tokens)
        seq = engine.new_sequence(prompt[:1], Ledger())  # one token: the prefix cache has nothing to give
        engine.forward([seq])
        first = seq.logits[None]
        engine.extend(seq, prompt[1:] + ids[:-1])
        ((logits, _),) = engine.forward([seq], all_logits=True, cache_prefix=False)
        engine.release([seq])
        expected = torch.log_softmax(torch.cat([first, logits])[-len(ids):], -1).topk(3)
        for top, values, top_ids in zip(c.logprobs.top_logprobs, expected.values, expected.indices):
            want = {f"token_id:{i}": v for i, v in zip(top_ids.tolist(), values.tolist())}
            assert {k: top[k] for k in want} == pytest.approx(want, abs=1e-4)


def test_echo_prepends_the_prompt_and_its_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, logprobs=1, echo=True, seed=0)
    c = out.choices[0]
    assert c.text.startswith("The sky is")
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    n_prompt = out.usage.prompt_tokens
    assert len(c.logprobs.tokens) == n_prompt + out.usage.completion_tokens
    assert "".join(c.logprobs.tokens[:n_prompt]) == "The sky is"


def test_prompt_logprobs_in_vllm_shape_agree_with_the_echoed_logprobs(client):
    prompt = [5, 6, 7, 8, 9, 10]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, logprobs=2, echo=True,
                                    extra_body={"prompt_logprobs": 2, "return_tokens_as_token_ids": True})
    c = out.choices[0]
    plp = c.model_extra["prompt_logprobs"]
    assert len(plp) == len(prompt) and plp[0] is None
    for t, entry, echoed in zip(prompt[1:], plp[1:], c.logprobs.token_logprobs[1:len(prompt)]):
        assert entry[str(t)]["logprob"] == pytest.approx(echoed, abs=1e-5)
        assert entry[str(t)]["decoded_token"] == f"token_id:{t}" and entry[str(t)]["rank"] >= 1
        assert 2 <= len(entry) <= 3  # the top 2, and the prompt's own token


def test_streaming_gives_the_text_of_the_same_request_unstreamed(client):
    kw = dict(model=MODEL, prompt="Hello there, my friend", max_tokens=24, seed=7, stop=["e ", "an"])
    whole = client.completions.create(**kw)
    pieces, finish, usage = [], None, None
    for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == whole.choices[0].text
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_chat_with_n_opens_each_choice_with_its_role(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                                 max_tokens=5, seed=3, stream=True))
    firsts = {}
    text = {0: "", 1: ""}
    for chunk in chunks:
        for c in chunk.choices:
            firsts.setdefault(c.index, c.delta.role)
            text[c.index] += c.delta.content or ""
    assert firsts == {0: "assistant", 1: "assistant"}
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                           max_tokens=5, seed=3)
    assert [text[0], text[1]] == [c.message.content for c in whole.choices]


def test_chat_logprobs_and_top_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                         logprobs=True, top_logprobs=3, seed=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-4 for t in content)


@pytest.fixture(scope="module")
def invariant_model(tiny_llama_dir):
    return ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.05, batch_invariant=True)


def test_a_seeded_sample_equals_the_local_engine_fork_and_generate(invariant_model):
    """Bit for bit only with a batch-invariant model: the server prefills in chunks of 3 tokens and the local
    engine the prompt whole (or from the prefix cache), and a plain model's linears may round those row
    counts differently (at two threads here the 20th token, at a sampling boundary, flipped)."""
    model = invariant_model
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
    with running_server(model, max_concurrency=8, chunk_tokens=3) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120,
                               http_client=httpx.Client(trust_env=False))
        for seed, stop in ((123, None), (77, ["e", "an"])):
            _check_seeded_sample(client, model, prompt, seed, stop)


def _check_seeded_sample(client, model, prompt, seed, stop):
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, seed=seed, temperature=0.9,
                                    top_p=0.95, stop=stop, logprobs=0,
                                    extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    engine = model.engine
    parent = engine.new_sequence(prompt, Ledger())
    engine.forward([parent])
    kids = engine.fork(parent, 1, seeds=[seed])
    (local,) = engine.generate(kids, SamplingParams(temperature=0.9, top_p=0.95), 20, stop=stop, ignore_eos=True)
    engine.release([parent, *kids])
    choice = out.choices[0]
    assert ids_of(choice.logprobs.tokens) == list(local.token_ids)
    assert choice.text == local.text
    assert choice.logprobs.token_logprobs == pytest.approx(list(local.logprobs), abs=1e-5)
    assert choice.model_extra["stop_reason"] == local.stop


def test_n_seeded_samples_equal_model_generate(client, model):
    prompt = [5, 6, 7, 8, 9]
    out = client.completions.create(model=MODEL, prompt=prompt, n=4, max_tokens=12, seed=9, temperature=0.8,
                                    logprobs=0, extra_body={"return_tokens_as_token_ids": True})
    local = model.generate(prompt, n=4, max_new_tokens=12, temperature=0.8, seed=9)
    assert [ids_of(c.logprobs.tokens) for c in out.choices] == [list(o.token_ids) for o in local]
    assert [c.text for c in out.choices] == [o.text for o in local]


def test_stop_reason_and_include_stop_str_in_output(client):
    base = client.completions.create(model=MODEL, prompt="Tell me", max_tokens=30, seed=5,
                                     extra_body={"ignore_eos": True})
    stop = base.choices[0].text[8:10]
    for include in (False, True):
        out = client.completions.create(model=MODEL, prompt="Tell me", max_tokens=30, seed=5, stop=[stop],
                                        extra_body={"ignore_eos": True, "include_stop_str_in_output": include})
        c = out.choices[0]
        assert c.finish_reason == "stop" and c.model_extra["stop_reason"] == stop
        assert c.text == base.choices[0].text[: base.choices[0].text.find(stop)] + (stop if include else "")


def test_continue_final_message_extends_the_assistant_turn(client, model):
    messages = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "One, two,"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, seed=1, logprobs=True,
                                         extra_body={"continue_final_message": True, "add_generation_prompt": False,
                                                     "return_tokens_as_token_ids": True})
    text = model.tokenizer.hf.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    prompt = model.tokenizer.encode(text, add_special_tokens=False)
    assert out.usage.prompt_tokens == len(prompt)
    assert model.tokenizer.decode(prompt).endswith("One, two,")


def test_extra_body_runs_a_strategy_and_reports_its_ledger(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 3 + 4?"}], max_tokens=12, seed=0,
        extra_body={"ttc": {"strategy": "best_of_n", "n": 3, "verifier": "self_eval", "budget_tokens": 4096}})
    info = out.model_extra["ttc"]
    assert info["strategy"] == "best_of_n"
    assert info["tree"]["nodes"] == 4 and info["tree"]["finished"] >= 3  # the root and 3 samples
    ledger = info["ledger"]
    assert 0 < ledger["total_tokens"] <= 4096
    assert ledger["verifier_tokens"] > 0  # self_eval asked its question of each sample
    assert ledger["total_tokens"] == ledger["prefill_tokens"] + ledger["generated_tokens"] + ledger["verifier_tokens"]
    assert out.usage.completion_tokens == ledger["generated_tokens"]
    assert isinstance(out.choices[0].message.content, str)


def test_a_strategy_run_through_completions_streams_its_answer(client):
    chunks = list(client.completions.create(model=MODEL, prompt="2 + 2 =", max_tokens=8, seed=0, stream=True,
                                            extra_body={"ttc": {"strategy": "self_consistency", "n": 2}}))
    assert len(chunks) == 1
    info = chunks[0].model_extra["ttc"]
    assert info["strategy"] == "self_consistency" and info["tree"]["finished"] == 2  # the tiny model states no answer
    assert chunks[0].choices[0].finish_reason == ("stop" if info["answer"] is not None else "length")


def status_and_message(call) -> tuple[int, str]:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value.status_code, e.value.body["message"]


def test_errors_are_openai_shaped_with_the_right_status(client, server):
    chat = client.chat.completions.create
    cases = [
        (lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=0), 400, "max_tokens"),
        (lambda: chat(model=MODEL, messages=[]), 400, "messages must not be empty"),
        (lambda: client.completions.create(model=MODEL, prompt=[5] * 1100, max_tokens=2), 400, "context length"),
        (lambda: client.completions.create(model="gpt-4", prompt="x"), 404, "gpt-4"),
        (lambda: chat(model=MODEL, messages=[{"role": "user", "content": "x"}],
                      extra_body={"ttc": {"strategy": "nope"}}), 400, "unknown strategy 'nope'"),
        (lambda: chat(model=MODEL, messages=[{"role": "user", "content": "x"}],
                      extra_body={"ttc": {"strategy": "best_of_n", "verifier": "oracle"}}), 400, "unknown verifier"),
        (lambda: chat(model=MODEL, messages=[{"role": "user", "content": "x"}],
                      extra_body={"ttc": {"strategy": "beam", "widht": 3}}), 400, "widht"),
        (lambda: chat(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                      extra_body={"ttc": {"strategy": "greedy", "budget_tokens": 2}}), 400, "budget_tokens"),
        (lambda: chat(model=MODEL, messages=[{"role": "user", "content": "x"}],
                      extra_body={"ttc": {"strategy": "beam", "selector": {"_target_": "ttc.evals.runner.run_eval"}}}),
         400, "cannot set _target_"),
        (lambda: client.completions.create(model=MODEL, prompt="x", n=200, max_tokens=1000), 400, "KV cache"),
        (lambda: client.completions.create(model=MODEL, prompt="x", frequency_penalty=0.5), 400, "penalties"),
    ]
    for call, status, words in cases:
        got_status, message = status_and_message(call)
        assert (got_status, words in message) == (status, True), message
        assert "\n" not in message
    raw = httpx.post(server[0] + "/v1/completions", content=b"{not json", trust_env=False,
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["message"].startswith("malformed JSON body")
    assert raw.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.slow
def test_the_embedded_model_serves_a_chat_and_a_strategy():
    model = ttc.load("smollm2-135m", dtype="float32", kv_cache_gb=0.25)
    with running_server(model) as (url, runtime):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300,
                               http_client=httpx.Client(trust_env=False))
        messages = [{"role": "user", "content": "What is 12 + 30? Answer with the number."}]
        plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
        (local,) = model.generate(messages, max_new_tokens=24, temperature=0)
        assert plain.choices[0].message.content == local.text
        out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, seed=0,
                                             extra_body={"ttc": {"strategy": "self_consistency", "n": 4}})
        info = out.model_extra["ttc"]
        assert info["tree"]["finished"] == 4 and out.usage.completion_tokens == info["ledger"]["generated_tokens"]
        if info["answer"] is not None:  # the majority of the candidates' votes
            top = max(info["tree"]["candidates"], key=lambda c: c["votes"])
            assert info["answer"] == top["answer"]
        assert out.usage.prompt_tokens_details.cached_tokens > 0  # the plain request's prompt, from the prefix cache
    assert kv_is_free(model)
