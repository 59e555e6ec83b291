"""Several problems at once: a ConcurrentEngine shared by threads gives each thread what a lone engine gives."""

from __future__ import annotations

import json
import threading

import pytest

import ttc
from ttc.search.allocation import Pool
from ttc.budget import Ledger
from ttc.decoder import SamplingParams
from ttc.decoder.concurrent import Cancelled, ConcurrentEngine

PARAMS = SamplingParams(temperature=1.0)


def sample_alone(engine, prompt_ids, n, limit, seed, stop=None):
    ledger = Ledger()
    root = engine.new_sequence(prompt_ids, ledger, seed=seed)
    engine.forward([root])
    kids = engine.fork(root, n, seeds=[seed * 10 + i for i in range(n)], ledger=ledger)
    outs = engine.generate(kids, PARAMS, [limit + i for i in range(n)], stop=stop, ignore_eos=True)
    engine.release([root, *kids])
    return [o.token_ids for o in outs], ledger.generated_tokens


@pytest.fixture
def fresh_model(tiny_llama_dir):
    return ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.05)


def test_threads_sharing_a_concurrent_engine_get_the_tokens_each_would_get_alone(fresh_model):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [5, 6, 7, 14]]
    alone = [sample_alone(fresh_model.engine, p, n=3, limit=6, seed=i) for i, p in enumerate(prompts)]
    fresh_model.engine.clear_prefix_cache()
    shared = ConcurrentEngine(fresh_model.engine)
    together: list = [None] * len(prompts)

    def work(i):
        together[i] = sample_alone(shared, prompts[i], n=3, limit=6, seed=i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert fresh_model.engine.pool.num_free + fresh_model.engine.prefix.num_cached_blocks == \
        fresh_model.engine.pool.num_blocks


def test_a_shared_models_generate_has_the_engine_to_itself_and_gives_each_thread_its_own_samples(fresh_model):
    from ttc.backends.local import SharedModel

    prompts = ["one two", "three", "four five six", "seven"]
    alone = [[c.token_ids for c in fresh_model.generate(p, n=2, max_new_tokens=5, seed=i, ignore_eos=True)]
             for i, p in enumerate(prompts)]
    fresh_model.engine.clear_prefix_cache()
    shared_engine = ConcurrentEngine(fresh_model.engine)
    entered = []
    exclusive = shared_engine.exclusive
    shared_engine.exclusive = lambda: entered.append(1) or exclusive()
    shared = SharedModel(SharedModel(fresh_model, shared_engine), shared_engine)  # nested: unwrapped once
    together: list = [None] * (len(prompts) + 1)

    def work(i):
        together[i] = [c.token_ids for c in shared.generate(prompts[i], n=2, max_new_tokens=5, seed=i,
                                                             ignore_eos=True)]

    def beside():  # a worker's own request on the shared batch at the same time
        together[-1] = sample_alone(shared_engine, [5, 6, 7], n=2, limit=4, seed=9)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    threads.append(threading.Thread(target=beside))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh_model.engine.clear_prefix_cache()
    assert together[:-1] == alone and len(entered) == len(prompts)
    assert together[-1] == sample_alone(fresh_model.engine, [5, 6, 7], n=2, limit=4, seed=9)
    assert fresh_model.engine.pool.num_free + fresh_model.engine.prefix.num_cached_blocks == \
        fresh_model.engine.pool.num_blocks


def test_stop_strings_stay_per_request_in_a_shared_batch(fresh_model):
    text_alone = sample_alone(fresh_model.engine, [5, 6, 7], n=2, limit=30, seed=1, stop=["e"])
    shared = ConcurrentEngine(fresh_model.engine)
    results = {}
    threads = [threading.Thread(target=lambda: results.setdefault("stop", sample_alone(shared, [5, 6, 7], 2, 30, 1,
                                                                                         stop=["e"]))),
               threading.Thread(target=lambda: results.setdefault("free", sample_alone(shared, [9, 9], 2, 30, 2)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["stop"] == text_alone
    assert [len(ids) for ids in results["free"][0]] == [30, 31]  # no stop string: they run to their limits


def test_a_cancelled_engine_fails_generate_but_still_releases(fresh_model):
    shared = ConcurrentEngine(fresh_model.engine)
    seq = shared.new_sequence([5, 6, 7], Ledger(), seed=0)
    shared.cancel()
    with pytest.raises(Cancelled):
        shared.generate([seq], PARAMS, 4)
    shared.release([seq])
    assert fresh_model.engine.pool.num_free + fresh_model.engine.prefix.num_cached_blocks == \
        fresh_model.engine.pool.num_blocks


def test_a_request_too_big_for_the_pool_fails_alone_with_the_pool_size(tiny_llama_dir):
    small = ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=1e-4)
    shared = ConcurrentEngine(small.engine)
    seq = shared.new_sequence([5, 6, 7], Ledger(), seed=0)
    with pytest.raises(ttc.PoolExhausted, match="kv_cache_gb"):
        shared.generate([seq], PARAMS, 900, ignore_eos=True)
    shared.release([seq])


def test_concurrent_grants_under_tickets_never_add_up_to_more_than_the_pool():
    pool = Pool(total=1000, problems=4)  # uniform share 250, reserve 62 per later problem
    a, b = pool.open(), pool.open()
    assert pool.fair_share(a) == 1000 // 3  # two in flight: a, and the two not started
    cap_a = pool.grant(10_000, a)
    assert cap_a == (1000 - 2 * 62) // 2  # an equal split with b (in flight); the 2 unstarted keep reserves
    cap_b = pool.grant(10_000, b)
    assert cap_b == (1000 - 2 * 62 - cap_a) // 2 and cap_a + cap_b <= 1000 - 2 * 62
    assert pool.grant(0, a) == 0 and pool.held == cap_a + cap_b  # a smaller grant never shrinks a hold
    pool.charge(100, a)
    assert pool.held == cap_b and pool.spent == 100 and pool.done == 1
    pool.charge(cap_b, b)
    assert pool.held == 0 and pool.remaining == 1000 - 100 - cap_b


# Every search strategy, each with its configured object shared by the worker threads as in a real run: a
# per-search value kept on it (ETS's embedding cache once was) would make a concurrent run differ or fail.
STEPWISE = ("proposer.max_step_tokens=3",)
CONCURRENT_CASES = {
    "self_consistency": ("strategy.n=2",),
    "best_of_n": ("strategy=best_of_n", "strategy.n=2"),
    "greedy": ("strategy=greedy",),
    "beam": ("strategy=beam", "strategy.n=2", "strategy.expand=2", "strategy.max_depth=3", *STEPWISE),
    "dvts": ("strategy=dvts", "strategy.n=2", "strategy.subtrees=2", "strategy.expand=2", "strategy.max_depth=3",
             *STEPWISE),
    "ets": ("strategy=ets", "strategy.n=2", "strategy.expand=2", "strategy.max_depth=3", *STEPWISE),
    "astar": ("strategy=astar", "strategy.n=2", "strategy.max_expansions=4", *STEPWISE),
    "particle_gibbs": ("strategy=particle_filter", "strategy.n=2", "strategy.max_steps=3", "strategy.gibbs_sweeps=1",
                       *STEPWISE),
    "mcts": ("strategy=mcts", "strategy.n=2", "strategy.simulations=3", *STEPWISE),
    "rebase": ("strategy=rebase", "strategy.n=2", "strategy.max_depth=3", *STEPWISE),
    # a verifier on the shared engine (the policy judging forks of each branch), shared by the threads too; its
    # scores are floats read off KV that decode steps shared with other threads' rows computed, so the batch
    # invariant kernels (without them the scores move in the third decimal with the batch's shape)
    "beam+self_eval": ("strategy=beam", "strategy.n=2", "strategy.expand=2", "strategy.max_depth=3", *STEPWISE,
                       "verifier=self_eval", "model.batch_invariant=true"),
    "best_of_n+calculator": ("strategy=best_of_n", "strategy.n=3", "verifier=calculator"),
}


@pytest.mark.parametrize("strategy", list(CONCURRENT_CASES.values()), ids=list(CONCURRENT_CASES))
def test_a_concurrent_run_writes_the_same_records_as_one_problem_at_a_time(tiny_llama_dir, tmp_path, strategy):
    from test_evals_runner import eval_config, tiny_overrides

    from ttc.evals.runner import run_eval

    def records(folder, *more):
        cfg = eval_config(*tiny_overrides(tiny_llama_dir, strategy), "dataset.size=5", *more)
        outcome = run_eval(cfg, folder)
        rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        keys = ("answer", "correct", "candidates", "generated_tokens")
        # which problem computes a prompt prefix they share (and which reuses it) depends on timing
        return {r["id"]: {**{k: r[k] for k in keys}, "prompt_tokens": r["prefill_tokens"] + r["reused_tokens"]}
                for r in rows}, outcome.summary

    one, _ = records(tmp_path / "one")
    three, summary = records(tmp_path / "three", "concurrency=3")
    assert three == one and summary["problems"] == 5 and summary["complete"]


def test_a_concurrent_allocation_run_stays_within_the_dataset_budget(tiny_llama_dir, tmp_path):
    from test_allocation import eval_config as allocation_config

    from ttc.evals.runner import run_eval

    cfg = allocation_config(tiny_llama_dir, "allocation=adaptive_stop", "allocation.max_samples=4",
                            "allocation.total_tokens=1200", "dataset.size=4", "concurrency=3")
    outcome = run_eval(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    spent = [Ledger.from_record(r).total_tokens for r in rows]
    assert len(rows) == 4 and sum(spent) <= 1200
    assert all(0 < s <= r["given_tokens"] for r, s in zip(rows, spent))
    assert outcome.summary["given_tokens"] <= 1200


def test_a_request_that_does_not_fit_beside_the_running_ones_waits_for_room_instead_of_failing(tiny_llama_dir):
    small = ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=1e-4, prefix_caching=False)
    blocks, size = small.engine.pool.num_blocks, small.engine.pool.block_size
    limit = (blocks // 2 + 1) * size - 3  # one request needs more than half of the pool
    alone = [sample_alone(small.engine, [5, 6, 7], n=1, limit=limit, seed=s)[0] for s in (1, 2)]
    shared = ConcurrentEngine(small.engine)
    together: dict = {}
    threads = [threading.Thread(target=lambda s=s: together.__setitem__(s, sample_alone(shared, [5, 6, 7], 1, limit, s)[0]))
               for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[1], together[2]] == alone
    assert small.engine.pool.num_free == blocks
