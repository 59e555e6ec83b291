"""Token confidence (DeepConf's), from the engine's decode loop to verifier=confidence and strategy=deepconf.

The engine's confidences are checked against a slow twin computed from full logits; the trace forms on
hand-made steps; deepconf's stopping, KV and ledger on the tiny model and on the scripted proposer (tests/
scripted.py); the remote backend on a fake server that sends top_logprobs.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from scripted import CONFIDENCES_UNSURE, STEP_TOKENS, ConfidentProposer, ScriptedBackend, ScriptedProposer
from ttc.backends.local import LocalProposer, SharedModel
from ttc.backends.remote import RemoteBackend, RemoteError, RemoteProposer
from ttc.budget import Budget, Ledger
from ttc.decoder.batch import GenerationBatch
from ttc.decoder.concurrent import ConcurrentEngine
from ttc.decoder.sampling import SamplingParams, token_confidence
from ttc.decoder.sequence import ConfidenceStop
from ttc.graph import Branch, Meter, MissingCapability, Problem, Step
from ttc.search.best_of_n import BestOfN
from ttc.search.deepconf import DeepConf
from ttc.verifiers.confidence import ConfidenceVerifier, lowest_group, sliding_means, trace_confidence

PROBLEM = Problem(id="c0", prompt=[{"role": "user", "content": "Count to five."}])
CONFS = [4.0, 2.0, 3.0, 1.0, 0.5, 5.0]  # windows of 3: means 3, 2, 1.5, 13/6


def first_character(text: str) -> str | None:
    """A tiny random model's answer: its first visible character (it writes no numbers worth reading)."""
    return text.strip()[:1] or None


def hand_made(confidences_per_step) -> Branch:
    root = Branch(handle=None)
    b = root
    for confs in confidences_per_step:
        b = b.child(None, Step("x", tuple(range(len(confs))), -1.0, "step", tuple(confs)), seed=0, finished=False)
    return b


# -- the trace forms -------------------------------------------------------------------------------------------

def test_each_form_is_the_papers_number_on_hand_made_steps():
    branch = hand_made([CONFS[:2], CONFS[2:]])
    assert branch.confidences == tuple(CONFS)
    assert trace_confidence(branch.confidences, "mean") == pytest.approx(15.5 / 6)
    assert list(sliding_means(CONFS, 3)) == pytest.approx([3.0, 2.0, 1.5, 13 / 6])
    assert trace_confidence(CONFS, "lowest", window=3) == pytest.approx(1.5)
    assert trace_confidence(CONFS, "group", window=3, bottom=0.5) == pytest.approx((1.5 + 2.0) / 2)
    assert trace_confidence(CONFS, "group", window=3, bottom=1.0) == pytest.approx((3 + 2 + 1.5 + 13 / 6) / 4)
    assert trace_confidence(CONFS, "tail", tail=2) == pytest.approx((0.5 + 5.0) / 2)


def test_a_trace_shorter_than_its_window_is_one_window_and_an_empty_one_is_minus_inf():
    assert lowest_group([1.0, 2.0], 5) == pytest.approx(1.5)
    assert trace_confidence([], "mean") == -math.inf and lowest_group([], 3) == -math.inf


def test_the_confidence_verifier_scores_in_its_form_and_charges_nothing():
    meter = Meter(Budget(tokens=100))
    verifier = ConfidenceVerifier(form="lowest", window=3)
    before = meter.ledger.as_dict()
    assert verifier.score([hand_made([CONFS])], meter) == pytest.approx([1.5])
    assert meter.ledger.as_dict() == before and verifier.cost_per_branch == verifier.cost_per_token == 0


@pytest.mark.parametrize("weighted", [False, True])
def test_best_of_n_by_confidence_finds_the_sure_path_on_the_script(weighted):
    # mean confidences: [1] 3.0 ("7"); [0] and [2] 1.1 each ("3": 2.2 weighted); [3] 1.1 ("5")
    proposer, meter = ConfidentProposer(), Meter(Budget(tokens=10_000))
    result = BestOfN(n=4, weighted=weighted)(Problem("p", "scripted"), proposer, ConfidenceVerifier(form="mean"), meter)
    assert result.answer == "7" and result.score == pytest.approx(3.0)
    assert [c["score"] for c in result.candidates] == pytest.approx([1.1, 3.0, 1.1, 1.1])
    assert meter.ledger.verifier_tokens == 0 and not proposer.live


def test_the_confidence_verifier_refuses_steps_without_confidences_in_one_line():
    branch = Branch(handle=None).child(None, Step("x", (1, 2), -1.0, "eos"), seed=0, finished=True)
    with pytest.raises(ValueError, match="does not record them"):
        ConfidenceVerifier().score([branch], Meter())


def test_the_confidence_verifier_on_a_backend_without_token_confidence_fails_with_one_line():
    with pytest.raises(MissingCapability, match="^verifier=confidence needs per-token confidences of its samples, "
                                                "which the scripted backend does not provide$"):
        ConfidenceVerifier(model=ScriptedBackend())


# -- the engine: fast path and slow twin, the stop rule ---------------------------------------------------------

def slow_confidences(model, prompt_ids, token_ids, k) -> torch.Tensor:
    """Each drawn token's confidence from the full logits of the prompt + completion, recomputed in one forward:
    minus the mean of the k largest entries of a whole log-softmax row."""
    engine = model.engine
    parent = engine.new_sequence(prompt_ids, Ledger())
    engine.forward([parent])
    (child,) = engine.fork(parent, 1, seeds=[0])
    try:
        engine.extend(child, list(token_ids[:-1]))
        rows = [parent.logits[None]]
        if len(token_ids) > 1:
            ((logits, _),) = engine.forward([child], all_logits=True, cache_prefix=False)
            rows.append(logits)
        full = torch.cat(rows).float()  # (n, V): row j is the distribution token j was drawn from
        return -torch.log_softmax(full, -1).topk(k, dim=-1).values.mean(-1)
    finally:
        engine.release([child, parent])


def test_the_engines_token_confidences_equal_the_slow_twin_from_full_logits(tiny_model):
    prompt_ids = tiny_model.tokenizer.encode_prompt(PROBLEM.prompt)
    outs = tiny_model.generate(PROBLEM.prompt, n=3, max_new_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    for out in outs:
        assert len(out.confidences) == len(out.token_ids) == 10
        want = slow_confidences(tiny_model, prompt_ids, out.token_ids, tiny_model.engine.confidence_k)
        assert torch.allclose(torch.tensor(out.confidences), want, atol=1e-4)


def test_token_confidence_is_minus_the_mean_of_the_top_k_logprobs():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    want = -torch.log_softmax(logits, -1).topk(2, dim=-1).values.mean(-1)
    assert torch.allclose(token_confidence(logits, 2), want)
    assert token_confidence(logits, 2)[1] == pytest.approx(math.log(4))


def test_a_stop_rule_that_never_fires_leaves_every_token_as_it_was(tiny_model):
    engine = tiny_model.engine
    params = SamplingParams(temperature=1.0)

    def run(stop_when):
        parent = engine.new_sequence(tiny_model.tokenizer.encode("Once upon"), Ledger(), seed=9)
        children = engine.fork(parent, 3)
        try:
            return engine.generate(children, params, 12, ignore_eos=True, stop_when=stop_when)
        finally:
            engine.release(children + [parent])

    plain, guarded = run(None), run(ConfidenceStop(4, -math.inf))
    assert [o.token_ids for o in plain] == [o.token_ids for o in guarded]
    assert [o.confidences for o in plain] == [o.confidences for o in guarded]
    assert {o.finish_reason for o in guarded} == {"length"}


def test_a_sample_is_stopped_at_its_first_unsure_window_and_its_kv_freed_in_that_step(tiny_model):
    engine, params, window = tiny_model.engine, SamplingParams(temperature=1.0), 3
    parent = engine.new_sequence(tiny_model.tokenizer.encode("The river"), Ledger(), seed=2)
    engine.forward([parent])
    free = engine.free_blocks()
    children = engine.fork(parent, 6)
    full = engine.generate(children, params, 20, ignore_eos=True)
    engine.release(children)
    # just under the surest sample's lowest window: it never stops, the others stop where their first window
    # falls below (the margin keeps float sums in another order from deciding)
    lows = [lowest_group(o.confidences, window) for o in full]
    threshold = max(lows) - 1e-6
    stops = [next((j + window for j, m in enumerate(sliding_means(o.confidences, window)) if m < threshold), None)
             for o in full]
    assert any(s is not None for s in stops)

    batch = GenerationBatch(engine)
    children = engine.fork(parent, 6)
    request = batch.add(children, params, 20, ignore_eos=True, stop_when=ConfidenceStop(window, threshold))
    released_while_running = set()
    while not request.done:
        batch.step()
        for i, (reason, _) in enumerate(request.finish):
            if reason == "stopped" and not request.done:
                assert children[i].kv.released  # back in the pool while the others still decode
                released_while_running.add(i)
    for i, (out, stop, seq) in enumerate(zip(request.completions, stops, children)):
        if stop is None:
            assert out.finish_reason == "length" and out.token_ids == full[i].token_ids and not seq.kv.released
        else:
            assert out.finish_reason == "stopped" and seq.kv.released
            assert out.token_ids == full[i].token_ids[:stop]  # the same draws, cut at the first unsure window
    assert released_while_running == {i for i, s in enumerate(stops) if s is not None and s < 20}
    engine.release(children)
    assert engine.free_blocks() == free
    engine.release([parent])


def test_only_the_decoders_own_generate_loop_declares_token_confidence_and_early_stop(tiny_model):
    class Wrapper:  # an engine view with a generate of its own, as ttc serve's per-request one
        def __init__(self, engine):
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

    wanted = {"token_confidence", "early_stop"}
    assert wanted <= tiny_model.backend.capabilities
    assert wanted <= SharedModel(tiny_model, ConcurrentEngine(tiny_model.engine)).backend.capabilities
    assert not wanted & SharedModel(tiny_model, Wrapper(tiny_model.engine)).backend.capabilities


# -- deepconf on the tiny model --------------------------------------------------------------------------------

def run_local(tiny_model, strategy, verifier=None, seed=4):
    """One strategy on a cold prefix cache (a cached prompt's logits can differ in their last bits)."""
    tiny_model.engine.clear_prefix_cache()
    proposer = LocalProposer(tiny_model, max_tokens=24, temperature=1.0, seed=seed, answer_fn=first_character)
    meter = Meter(Budget())
    return strategy(PROBLEM, proposer, verifier, meter), meter


def test_deepconf_stops_unsure_traces_frees_their_kv_and_charges_fewer_tokens_than_running_them_out(tiny_model):
    engine = tiny_model.engine
    free = engine.free_blocks()
    stopping, meter = run_local(tiny_model, DeepConf(n=6, warmup=2, percentile=100, window=4))
    assert engine.free_blocks() == free
    full, full_meter = run_local(tiny_model, DeepConf(n=6, threshold=-math.inf, window=4))
    assert engine.free_blocks() == free
    (history,) = stopping.tree["history"]
    assert history["warmup"] == 2 and history["stopped"] >= 1 and history["saved_tokens_estimate"] > 0
    # the same six seeds either way: the tokens not drawn are the ledger's difference
    assert meter.ledger.generated_tokens < full_meter.ledger.generated_tokens
    ran = sum(n["tokens"] for n in stopping.tree["nodes"] if n["status"] in ("final", "chosen") and n["parent"])
    assert ran + history["stopped_tokens"] == meter.ledger.generated_tokens
    stopped = [n for n in stopping.tree["nodes"] if n["status"] == "stopped"]
    assert len(stopped) == history["stopped"] and all(n["tokens"] < 24 for n in stopped)


def test_deepconf_with_threshold_minus_inf_is_a_confidence_weighted_vote_of_full_traces(tiny_model):
    deepconf, deepconf_meter = run_local(tiny_model, DeepConf(n=5, threshold=-math.inf, window=4))
    weighted, weighted_meter = run_local(tiny_model, BestOfN(n=5, weighted=True),
                                         ConfidenceVerifier(form="lowest", window=4, model=tiny_model))
    assert (deepconf.answer, deepconf.text, deepconf.score) == (weighted.answer, weighted.text, weighted.score)
    assert deepconf_meter.ledger.generated_tokens == weighted_meter.ledger.generated_tokens
    assert weighted_meter.ledger.verifier_tokens == 0  # the confidence verifier charged nothing


def test_deepconf_on_a_concurrent_engine_stops_the_same_traces_as_on_the_plain_one(tiny_model):
    strategy = DeepConf(n=6, warmup=2, percentile=100, window=4)
    plain, plain_meter = run_local(tiny_model, strategy)
    shared = SharedModel(tiny_model, ConcurrentEngine(tiny_model.engine))
    concurrent, concurrent_meter = run_local(shared, strategy)
    assert concurrent.tree["history"] == plain.tree["history"] and concurrent.text == plain.text
    assert concurrent_meter.ledger.generated_tokens == plain_meter.ledger.generated_tokens


def test_deepconf_reproduces_at_the_same_seed(tiny_model):
    first, first_meter = run_local(tiny_model, DeepConf(n=5, warmup=2, percentile=90, window=4), seed=7)
    again, again_meter = run_local(tiny_model, DeepConf(n=5, warmup=2, percentile=90, window=4), seed=7)
    assert (first.answer, first.text, first.candidates) == (again.answer, again.text, again.candidates)
    assert first.tree["history"] == again.tree["history"]
    assert first_meter.ledger.generated_tokens == again_meter.ledger.generated_tokens


# -- deepconf on the scripted proposer ---------------------------------------------------------------------------

def test_deepconf_on_the_script_votes_only_the_sure_trace_and_stops_the_others_mid_step():
    proposer = ConfidentProposer()
    meter = Meter(Budget(tokens=10_000))
    result = DeepConf(n=4, warmup=2, percentile=50, window=2)(Problem("p", "scripted"), proposer, None, meter)
    # warm-up lowest groups: [0] 0.5, [1] 3.0 -> threshold 1.75; [2] and [3] stop at their second window (1.25)
    assert result.answer == "7" and result.tree["history"][0]["threshold"] == pytest.approx(1.75)
    assert result.tree["history"][0]["stopped"] == 2 and result.tree["history"][0]["stopped_tokens"] == 2 * 3
    assert meter.ledger.generated_tokens == 2 * STEP_TOKENS + 2 * 3
    assert [c["voted"] for c in result.candidates] == [False, True]
    assert not proposer.live


def test_deepconf_on_a_backend_without_token_confidences_fails_with_one_line():
    with pytest.raises(MissingCapability, match="^strategy=deepconf needs per-token confidences"):
        DeepConf(n=2, warmup=1)(Problem("p", "scripted"), ScriptedProposer(), None, Meter())


@pytest.mark.parametrize("tokens", [10, 24, 41])
def test_deepconf_never_spends_more_than_its_budget_and_releases_everything(tokens):
    proposer = ConfidentProposer()
    meter = Meter(Budget(tokens=tokens))
    DeepConf(n=4, warmup=2, percentile=50, window=2)(Problem("p", "scripted"), proposer, None, meter)
    assert meter.ledger.total_tokens <= tokens and not proposer.live


def test_the_scripted_stop_rule_is_the_engines():
    rule = ConfidenceStop(2, 1.75)
    assert [rule.stops(CONFIDENCES_UNSURE[:t]) for t in range(1, 6)] == [False, False, True, True, True]


# -- the remote backend -------------------------------------------------------------------------------------------

def top_logprobs_server(bodies: list):
    """A fake completions server: two sampled tokens, each with a top-4 of alternatives."""
    tops = [{"token_id:5": -0.1, "token_id:7": -2.0, "token_id:8": -3.0, "token_id:9": -9.0},
            {"token_id:6": -0.5, "token_id:1": -1.0, "token_id:3": -4.5, "token_id:4": -6.0}]

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "tiny"}]})
        bodies.append(json.loads(request.content))
        lp = {"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-0.1, -0.5], "top_logprobs": tops}
        choice = {"index": 0, "text": "ab", "finish_reason": "length", "stop_reason": None, "logprobs": lp}
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 0}}
        return httpx.Response(200, json={"choices": [choice], "usage": usage})

    return httpx.MockTransport(handle)


def test_a_server_asked_for_top_logprobs_gives_each_sampled_tokens_confidence(tiny_llama_dir):
    bodies: list = []
    backend = RemoteBackend("http://fake/v1", "tiny", tokenizer=str(tiny_llama_dir),
                            transport=top_logprobs_server(bodies), features={"confidence_k": 3})
    assert "token_confidence" in backend.capabilities and "early_stop" not in backend.capabilities
    proposer = RemoteProposer(backend, max_step_tokens=2, seed=0)
    meter = Meter()
    (child,) = proposer.propose([proposer.start(PROBLEM, meter)], 1, meter)
    assert bodies[-1]["logprobs"] == 3
    assert child.confidences == pytest.approx(((0.1 + 2.0 + 3.0) / 3, (0.5 + 1.0 + 4.5) / 3))
    with pytest.raises(MissingCapability, match="^strategy=deepconf needs stopping a sample mid-generation, which "
                                                "the remote backend does not provide$"):
        DeepConf(n=2, warmup=1)(PROBLEM, proposer, None, Meter())


def test_a_remote_backend_not_asked_for_confidences_declares_none(tiny_llama_dir):
    backend = RemoteBackend("http://fake/v1", "tiny", tokenizer=str(tiny_llama_dir),
                            transport=top_logprobs_server([]))
    assert "token_confidence" not in backend.capabilities
    with pytest.raises(MissingCapability, match="^verifier=confidence needs per-token confidences"):
        ConfidenceVerifier(model=backend)


def test_a_server_that_sends_no_top_logprobs_is_told_how_to_do_without(tiny_llama_dir):
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "tiny"}]})
        lp = {"tokens": ["token_id:5"], "token_logprobs": [-0.1]}
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "a", "finish_reason": "length",
                                                      "logprobs": lp}]})

    with pytest.raises(RemoteError, match="top_logprobs for 0 of 1 sampled tokens.*set it to 0 to do without"):
        RemoteBackend("http://fake/v1", "tiny", tokenizer=str(tiny_llama_dir), transport=httpx.MockTransport(handle),
                      features={"confidence_k": 3})
