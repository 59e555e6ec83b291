"""Dataset-wide allocation (ttc.search.allocation): the pool, the three allocators, and the runner's wiring.

Hand-checkable cases use a FakeProposer that returns scripted answers at a fixed token cost; the
budget-safety and runner cases use the tiny random model.
"""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_module

from ttc.search.allocation import DEFAULT_TABLE, AdaptiveStop, Difficulty, Pool, PoolOverdrawn, Uniform, fit_table
from ttc.budget import BudgetExceeded, Ledger
from ttc.graph import Branch, Meter, Problem, Step
from ttc.search.self_consistency import SelfConsistency

torch.set_num_threads(1)

PROMPT, SAMPLE = 10, 5  # the fake proposer's cost: prompt tokens, tokens per whole solution


class FakeProposer:
    """Scripted answers per problem id (the last one repeats); charges PROMPT per start, SAMPLE per sample,
    and, like LocalProposer, draws no sample the meter cannot pay for."""

    def __init__(self, scripts: dict[str, list]):
        self.scripts, self.drawn, self.starts, self.released = scripts, 0, 0, 0

    def start(self, problem: Problem, meter: Meter) -> Branch:
        meter.check(PROMPT)
        meter.ledger.charge_prefill(PROMPT)
        self.script, self.drawn = self.scripts[problem.id], 0
        self.starts += 1
        return Branch(handle=None)

    def propose(self, branches, n, meter, to_end=False):
        assert to_end and len(branches) == 1
        out = []
        for _ in range(n):
            if not meter.can_afford(SAMPLE):
                break
            meter.ledger.charge_generated(SAMPLE)
            answer = self.script[min(self.drawn, len(self.script) - 1)]
            self.drawn += 1
            out.append(branches[0].child(None, Step(answer or "none", (0,) * SAMPLE, 0.0, "eos"), self.drawn, True))
        return out

    def release(self, branches):
        self.released += len(branches)

    def answer(self, branch):
        text = branch.text
        return None if text == "none" else text


def problem(pid: str, answer: str | None = None) -> Problem:
    return Problem(id=pid, prompt=f"question {pid}", answer=answer)


def votes(result) -> dict:
    return {c["answer"]: c["votes"] for c in result.candidates}


def test_the_pool_is_never_overdrawn_and_is_rebuilt_from_finished_records():
    pool = Pool(total=100, problems=4)
    # an allocation never exceeds what is left after the 3 later problems' reserves (6 tokens each)
    assert pool.fair_share() == 25 and pool.grant(1000) == 100 - 3 * 6
    pool.charge(60)
    assert pool.remaining == 40 and pool.left == 3 and pool.fair_share() == 13 and pool.grant(1000) == 40 - 2 * 6
    with pytest.raises(PoolOverdrawn):
        pool.charge(41)
    assert pool.spent == 60  # a refused charge changes nothing
    records = [{"id": "a", "prefill_tokens": 10, "generated_tokens": 45, "verifier_tokens": 5, "reused_tokens": 999}]
    rebuilt = Pool.from_records(100, 4, records)  # reused tokens are not computed, so not charged
    assert (rebuilt.spent, rebuilt.done, rebuilt.fair_share()) == (pool.spent, pool.done, pool.fair_share())
    with pytest.raises(PoolOverdrawn):
        Pool.from_records(50, 4, records)


def test_adaptive_stop_stops_in_the_round_the_vote_is_decided_and_returns_the_rest_to_the_pool():
    # rounds of 2, at most 8 samples: after 2 (7:2), 4 (7:4) the leader can still be caught (2 !> 6, 4 !> 4);
    # after 6 (7:5, 3:1) it cannot (4 > 2): three rounds, 6 samples, the prompt prefilled once.
    fake = FakeProposer({"p": ["7", "7", "7", "7", "7", "3", "3", "3"]})
    pool = Pool(total=4000, problems=4)
    result, given = AdaptiveStop(round_size=2, max_samples=8, cap_factor=1.0).solve(problem("p"), fake, None, None,
                                                                                   pool)
    assert given == 1000 and fake.starts == 1 and fake.drawn == 6
    assert result.answer == "7" and votes(result) == {"7": 5, "3": 1} and result.strategy == "adaptive_stop"
    assert result.ledger.total_tokens == PROMPT + 6 * SAMPLE == pool.spent
    assert result.tree["history"][-1] == {"stopped": "decided"}
    assert pool.fair_share() == (4000 - 40) // 3 > 1000  # the unspent tokens went back to the pool
    assert fake.released == 7  # the root and every sample


def test_adaptive_stop_stops_at_the_confidence_after_two_rounds_or_when_the_cap_cannot_pay_a_round():
    fake = FakeProposer({"p": ["7", "3", "7", "7", "3"]})
    result, _ = AdaptiveStop(round_size=2, max_samples=16, confidence=0.75).solve(problem("p"), fake, None, None,
                                                                                 Pool(10_000, 1))
    assert fake.drawn == 4 and votes(result) == {"7": 3, "3": 1}  # 3/4 after round two
    fake = FakeProposer({"p": ["7", "3"]})
    pool = Pool(total=20, problems=1)  # the prompt and one round of two samples, nothing more
    result, given = AdaptiveStop(round_size=2, max_samples=16).solve(problem("p"), fake, None, None, pool)
    assert given == 20 and fake.drawn == 2 and result.ledger.total_tokens == 20 == pool.spent
    assert result.tree["history"][-1] == {"stopped": "cap"}


class AnswerIsFive:
    """A verifier that trusts only the answer "5"."""

    def score(self, branches, meter):
        return [1.0 if b.text == "5" else 0.2 for b in branches]


def test_adaptive_stop_with_a_verifier_stops_at_a_verified_sample_and_answers_by_the_weighted_vote():
    fake = FakeProposer({"p": ["3", "3", "5", "3", "3", "3"]})
    stop = AdaptiveStop(round_size=2, max_samples=16, verified=1.0, weighted=True)
    result, _ = stop.solve(problem("p"), fake, AnswerIsFive(), None, Pool(10_000, 1))
    assert fake.drawn == 4 and result.tree["history"][-1] == {"stopped": "verified"}  # "5" came in round two
    assert result.answer == "5"  # 1.0 outweighs three "3"s at 0.2 each
    fake = FakeProposer({"p": ["3", "3", "5", "3"]})
    result, _ = AdaptiveStop(round_size=2, max_samples=4).solve(problem("p"), fake, AnswerIsFive(), None,
                                                                Pool(10_000, 1))
    assert fake.drawn == 4 and result.answer == "3"  # without verified/weighted the verifier changes nothing


def test_difficulty_with_weighted_answers_its_vote_bands_by_the_score_weighted_vote():
    answer_now = {b: {"strategy": "self_consistency", "cap_factor": 0.0} for b in ("easy", "medium", "hopeless")}
    for weighted, expected in ((False, "3"), (True, "5")):  # three "3"s at 0.2 each against one "5" at 1.0
        fake = FakeProposer({"p": ["3", "3", "3", "5"]})
        d = Difficulty(first_pass=4, table=answer_now, weighted=weighted)
        result, _ = d.solve(problem("p"), fake, AnswerIsFive(), None, Pool(10_000, 1))
        assert d.last_band == "medium" and fake.drawn == 4 and result.answer == expected


def test_uniform_gives_every_problem_the_same_share_and_passes_nothing_on():
    fake = FakeProposer({p: ["4"] for p in "abc"})
    pool, seen = Pool(total=300, problems=3), []
    strategy = SelfConsistency(n=2)

    def recording(problem, proposer, verifier, meter):
        seen.append(meter.budget.tokens)
        return strategy(problem, proposer, verifier, meter)

    given = [Uniform().solve(problem(p), fake, None, recording, pool)[1] for p in "abc"]
    assert given == seen == [100, 100, 100]  # not 100, 180, 260: the first problems' leftovers stay unused
    assert pool.spent == 3 * (PROMPT + 2 * SAMPLE)


def test_difficulty_bands_follow_the_first_pass_vote_and_the_verifier_scores():
    d = Difficulty()
    assert d.band(["7", "7", "7", "7"]) == "easy"
    assert d.band(["1", "2", "3", "4"]) == "hopeless"  # all different, no verifier to vouch for any
    assert d.band([None, None, None, None]) == "hopeless"
    assert d.band(["7", "7", "3", None]) == "medium"
    assert d.band(["7", "7", "7", None]) == "medium"  # not unanimous: one sample had no answer
    assert d.band(["1", "2", "3", "4"], [0.1, 0.9, 0.2, 0.1]) == "medium"  # the verifier likes one
    assert d.band(["1", "2", "3", "4"], [0.1, 0.2, 0.2, 0.1]) == "hopeless"
    assert d.band(["7", "7", "7", "7"], [0.1, 0.2, 0.2, 0.1]) == "medium"  # agreeing but doubted


def test_difficulty_answers_easy_and_hopeless_problems_after_the_first_pass_and_spends_on_medium_ones():
    fake = FakeProposer({"easy": ["5"], "hopeless": [None], "medium": ["2", "1", "1", "2", "1"]})
    pool = Pool(total=3000, problems=3)
    d = Difficulty(first_pass=4)
    result, given = d.solve(problem("easy"), fake, None, None, pool)
    assert d.last_band == "easy" and given == 1000 and fake.drawn == 4 and result.answer == "5"
    assert pool.spent == PROMPT + 4 * SAMPLE
    result, given = d.solve(problem("hopeless"), fake, None, None, pool)
    assert d.last_band == "hopeless" and fake.drawn == 4 and result.answer is None and given == (3000 - 30) // 2
    share = pool.fair_share()
    result, given = d.solve(problem("medium"), fake, None, None, pool)
    assert d.last_band == "medium" and given == min(share * DEFAULT_TABLE["medium"]["cap_factor"], 3000 - 60)
    # 2,1,1,2 then 1s: after 4+2k samples the lead 2k must exceed 16-4-2k, so k=4: 12 samples
    assert fake.drawn == 12 and result.answer == "1" and votes(result) == {"2": 2, "1": 10}
    assert pool.spent == 60 + PROMPT + 12 * SAMPLE <= pool.total


def test_fit_table_keeps_per_band_the_best_accuracy_per_token_on_training_problems():
    scripts = {"easy": ["5"], "medium": ["2", "1", "1", "2", "1"], "hopeless": [None]}
    train = [problem("easy", "5"), problem("medium", "1"), problem("hopeless", "9")]
    table = fit_table(train, lambda: FakeProposer(scripts), lambda p, a: a == p.answer, tokens_per_problem=100)
    assert table["easy"] == {"strategy": "self_consistency", "cap_factor": 0.0}  # right at once, cheapest
    assert table["hopeless"] == {"strategy": "self_consistency", "cap_factor": 0.0}  # never right: spend least
    assert table["medium"] == {"strategy": "self_consistency", "cap_factor": 2.0}  # the tie 2:2 needs more samples
    assert Difficulty(table=table).table == table
    fit_table.last_stats = None
    assert fit_table(train, lambda: FakeProposer(scripts), lambda p, a: a == p.answer, tokens_per_problem=100,
                     concurrency=3) == table  # problems tried in threads: the same table
    from ttc.search.allocation import accuracy_only

    most_accurate = fit_table(train, lambda: FakeProposer(scripts), lambda p, a: a == p.answer, tokens_per_problem=100,
                              objective=accuracy_only)
    assert most_accurate["easy"]["cap_factor"] == 0.0 and most_accurate["hopeless"]["cap_factor"] == 0.0  # ties: cheaper
    assert most_accurate["medium"]["cap_factor"] > 0.0


def test_a_dataset_budget_is_never_exceeded_over_a_tiny_model_run(tiny_model):
    from ttc.backends.local import LocalProposer
    from ttc.verifiers.math import extract_answer

    problems = [Problem(id=f"q{i}", prompt=[{"role": "user", "content": f"What is {i} + {i}?"}]) for i in range(4)]
    prompt = len(tiny_model.tokenizer.encode_prompt(problems[0].prompt))
    total = 4 * (prompt + 40)
    for allocator, strategy in ((Uniform(), SelfConsistency(n=4)), (AdaptiveStop(cap_factor=3.0), None),
                                (Difficulty(first_pass=2), None)):
        tiny_model.engine.clear_prefix_cache()
        pool, spent = Pool(total=total, problems=len(problems)), []
        for p in problems:
            ledger, proposer = Ledger(), LocalProposer(tiny_model, max_tokens=16, answer_fn=extract_answer)
            try:
                _, given = allocator.solve(p, proposer, None, strategy, pool, ledger=ledger)
                assert ledger.total_tokens <= given
            except BudgetExceeded:
                pass  # an early problem took the pool's last tokens (allowed), and the failed one is charged too
            spent.append(ledger.total_tokens)
        assert sum(spent) == pool.spent <= total and pool.done == len(problems)
        assert sum(spent) > 0


CHAIN_SUM = ["dataset=reasoning_gym", "dataset.task=chain_sum", "dataset.size=3",
             "dataset.options={min_terms:2,max_terms:2}"]


def eval_config(folder, *overrides: str) -> dict:
    from ttc.evals.__main__ import config_dict

    base = [f"model.spec={folder}", "model.dtype=float32", "model.kv_cache_gb=0.05", *CHAIN_SUM, "strategy.n=2",
            "proposer.max_tokens=8", "progress=false"]
    with initialize_config_module(config_module="ttc.configs", version_base="1.3"):
        return config_dict(compose("eval", overrides=[*base, *overrides]))


def test_the_runner_with_adaptive_stop_records_what_each_problem_was_given_and_resumes_the_pool(tiny_llama_dir,
                                                                                                tmp_path):
    from ttc.evals.runner import run_eval

    cfg = eval_config(tiny_llama_dir, "allocation=adaptive_stop", "allocation.max_samples=4",
                      "allocation.total_tokens=900", "dataset.limit=2")
    assert cfg["allocation"]["_target_"] == "ttc.search.allocation.AdaptiveStop"
    run_eval(cfg, tmp_path)
    first = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    outcome = run_eval({**cfg, "dataset": {**cfg["dataset"], "limit": 3}}, tmp_path)  # resumed: a third problem
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert records[:2] == first and len(records) == 3
    spent = [Ledger.from_record(r).total_tokens for r in records]
    for r, s in zip(records, spent):
        assert r["allocation"] == "adaptive_stop" and 0 < s <= r["given_tokens"]
    # the pool was rebuilt from the two saved records: the last problem may take all that is left
    assert records[2]["given_tokens"] == 900 - sum(spent[:2])
    assert sum(spent) <= 900 and outcome.summary["allocation"] == "adaptive_stop"
    assert outcome.summary["given_tokens"] == sum(r["given_tokens"] for r in records)


def test_a_fitted_difficulty_table_is_reported_as_the_runs_training_cost(tiny_llama_dir, tmp_path):
    from ttc.evals.runner import run_eval

    cfg = eval_config(tiny_llama_dir, "allocation=difficulty", "allocation.total_tokens=900", "dataset.limit=2",
                      "allocation.first_pass=2", "allocation.max_samples=2",
                      "allocation.train={problems:2,options:[{strategy:self_consistency,cap_factor:0.0}]}")
    outcome = run_eval(cfg, tmp_path)
    fitting = outcome.summary["training"]["difficulty_table"]
    assert fitting["generated_tokens"] > 0  # two training problems' trials: work no record holds
    assert outcome.summary["training"]["total_tokens"] == Ledger.from_record(fitting).total_tokens
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sum(Ledger.from_record(r).total_tokens for r in records) <= 900  # the pool pays for the records only
    resumed = run_eval(cfg, tmp_path)  # nothing left to do: the training cost is still stated
    assert resumed.summary["training"] == outcome.summary["training"]


def test_allocation_none_is_the_default_and_changes_nothing(tiny_llama_dir):
    cfg = eval_config(tiny_llama_dir)
    assert cfg["allocation"] == {"_target_": None, "total_tokens": None}
    for name in ("uniform", "adaptive_stop", "difficulty"):
        from ttc.evals.build import instantiate

        node = dict(eval_config(tiny_llama_dir, f"allocation={name}")["allocation"])
        node.pop("total_tokens")
        assert instantiate(node, "allocation").name == name


def test_a_generous_grant_still_leaves_every_later_problem_its_reserve():
    from ttc.search.allocation import Pool

    pool = Pool(total=1000, problems=4)  # uniform share 250, reserve 62 for each of the 3 others
    assert pool.grant(10_000) == 1000 - 3 * 62
    pool.charge(pool.grant(10_000))
    assert pool.fair_share() >= 62 and pool.grant(10_000) == pool.remaining - 2 * 62
