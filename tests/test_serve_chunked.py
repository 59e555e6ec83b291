"""The server's chunked generation draws exactly what one engine.generate call draws, stops included."""

from __future__ import annotations

import threading

import pytest

import ttc
from ttc.budget import Ledger
from ttc.decoder import SamplingParams
from ttc.decoder.concurrent import ConcurrentEngine
from ttc.serve.chunked import chunked_generate
from ttc.serve.request_engine import ClientGone, RequestEngine

PARAMS = SamplingParams(temperature=1.0)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.05)


def draw(engine, gen, prompt, seeds, limit, stop, **kw):
    parent = engine.new_sequence(prompt, Ledger(), seed=0)
    engine.forward([parent])
    kids = engine.fork(parent, len(seeds), seeds=seeds)
    try:
        return [(o.token_ids, o.text, o.logprobs, o.finish_reason, o.stop)
                for o in gen(kids, PARAMS, limit, stop=stop, **kw)]
    finally:
        engine.release([parent, *kids])


def frequent_stops(model, prompt, seed, limit):
    """Stop strings the unstopped samples actually contain (so some stops fall across chunk edges)."""
    (ids, text, *_), = draw(model.engine, model.engine.generate, prompt, [seed], limit, None, ignore_eos=True)
    pieces = [text[i:i + 2] for i in range(5, len(text) - 2, 7)]
    return [p for p in pieces if p.strip()][:3]


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_generation_equals_one_generate_call(model, chunk):
    engine = model.engine
    prompt = [5, 6, 7, 8, 9]
    seeds = [11, 12, 13]
    for stop in (None, frequent_stops(model, prompt, 11, 24), ["e", "an"]):
        one = draw(engine, engine.generate, prompt, seeds, 24, stop)
        chunked = draw(engine, lambda *a, **k: chunked_generate(engine, *a, chunk=chunk, **k), prompt, seeds, 24, stop)
        assert chunked == one, (chunk, stop)
    assert engine.pool.num_free + engine.prefix.num_cached_blocks == engine.pool.num_blocks


def test_a_stop_string_split_by_a_chunk_edge_still_stops_the_sample(model):
    engine = model.engine
    prompt = [5, 6, 7]
    (ids, text, *_), = draw(engine, engine.generate, prompt, [3], 30, None, ignore_eos=True)
    # a stop string made of the end of token 3 and the start of token 4: with chunk=4 the edge falls between them
    t3, t4 = engine.tokenizer.decode(ids[:4]), engine.tokenizer.decode(ids[:5])
    stop = t4[len(t3) - 1: len(t3) + 1]
    one = draw(engine, engine.generate, prompt, [3], 30, [stop], ignore_eos=True)
    chunked = draw(engine, lambda *a, **k: chunked_generate(engine, *a, chunk=4, **k), prompt, [3], 30, [stop],
                   ignore_eos=True)
    assert chunked == one
    assert one[0][3] == "stop" and len(one[0][0]) <= 5


def test_a_cancelled_request_stops_between_chunks_and_releases_everything(model):
    shared = ConcurrentEngine(model.engine)
    cancel = threading.Event()
    view = RequestEngine(shared, cancel, chunk_tokens=2)
    seen = []

    def on_chunk(progress):
        seen.append(sum(len(p.token_ids) for p in progress))
        cancel.set()

    view.on_chunk = on_chunk
    parent = view.new_sequence([5, 6, 7], Ledger())
    kids = view.fork(parent, 2, seeds=[1, 2])
    with pytest.raises(ClientGone):
        view.generate(kids, PARAMS, 50, ignore_eos=True)
    view.release_all()
    assert seen == [4]  # one chunk of 2 tokens for each of the 2 samples, then it stopped
    pool = model.engine.pool
    assert pool.num_free + model.engine.prefix.num_cached_blocks == pool.num_blocks
