"""Every Triton kernel equals its PyTorch reference on random inputs.

Without a GPU the kernels run on CPU tensors through Triton's interpreter: TRITON_INTERPRET is set
here, before any kernel module is imported (ttc.kernels imports them lazily, on the first CUDA call
or here). The interpreter is slow, so shapes are small and block sizes are shrunk to hit tile and
chunk boundaries. Tests marked gpu run the compiled kernels on realistic shapes.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from ttc import kernels  # noqa: E402
from ttc.kernels import attention_triton, norm_triton, rotary_triton, sampling_triton  # noqa: E402
from ttc.kernels.attention import decode_attention_naive  # noqa: E402
from ttc.kernels.decode_plan import plan_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _low_precision_ok(fast, ref_low, exact, slack=1e-3):
    """The STYLE rule: the kernel's error against exact is at most about twice PyTorch's own."""
    err_fast = (fast.double() - exact.double()).abs().max().item()
    err_ref = (ref_low.double() - exact.double()).abs().max().item()
    assert err_fast <= 2 * err_ref + slack, (err_fast, err_ref)


# -------------------------------------------------------------------------------------------------
# decode attention

def _random_tree(rng, block_size, n_rows):
    """Block tables of a random tree: a trunk, subtrees shared by some rows, each row's own tail."""
    ids = iter(range(10_000))
    trunk = [next(ids) for _ in range(rng.randint(1, 4))]
    tables, lengths, subtrees = [], [], {}
    for _ in range(n_rows):
        cut = rng.randint(0, len(trunk))
        mid = subtrees.setdefault((cut, rng.randint(0, 1)), [next(ids) for _ in range(rng.randint(0, 2))])
        own = [next(ids) for _ in range(rng.randint(1, 3))]
        tables.append(trunk[:cut] + mid + own)
        lengths.append((len(tables[-1]) - 1) * block_size + rng.randint(1, block_size))  # last block may be partial
    return tables, lengths, next(ids)


def _attention_case(tables, lengths, block_size, num_blocks, hq, hkv, d=16, seed=0, dtype=torch.float32):
    plan = plan_decode(tables, lengths, block_size, min_shared_tokens=1).to(DEVICE)  # where the engine keeps it
    k = _randn(num_blocks * block_size, hkv, d, seed=seed, dtype=dtype)
    v = _randn(num_blocks * block_size, hkv, d, seed=seed + 1, dtype=dtype)
    q = _randn(len(tables), hq, d, seed=seed + 2, dtype=dtype)
    return q, k, v, plan


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3)])
def test_triton_decode_attention_equals_per_branch_attention_on_random_trees(seed, hq, hkv):
    rng = random.Random(seed)
    block_size = rng.choice([4, 16])
    tables, lengths, num_blocks = _random_tree(rng, block_size, rng.randint(2, 7))
    q, k, v, plan = _attention_case(tables, lengths, block_size, num_blocks, hq, hkv, seed=seed)
    # small tiles and chunks: several slot tiles per item, several chunks per segment
    out = attention_triton.decode_attention(q, k, v, plan, 0.25, block_m=16, block_n=16, chunk=32)
    torch.testing.assert_close(out, decode_attention_naive(q, k, v, plan, 0.25), rtol=1e-4, atol=1e-4)


def test_triton_decode_attention_handles_a_tree_of_several_shared_segments():
    # blocks 0-1 shared by all six rows, 2 by rows 0-2, 3-4 by rows 3-5, 5 by rows 0-1; then own blocks
    trunk, left, right = [0, 1], [2], [3, 4]
    tables = [trunk + left + [5, 10], trunk + left + [5, 11], trunk + left + [12],
              trunk + right + [13], trunk + right + [14, 15], trunk + right + [16]]
    lengths = [4 * len(t) - 1 - i % 3 for i, t in enumerate(tables)]
    q, k, v, plan = _attention_case(tables, lengths, 4, 17, 6, 2)
    assert len(plan.segments) == 4
    out = attention_triton.decode_attention(q, k, v, plan, 0.25, block_m=16, block_n=16, chunk=16)
    torch.testing.assert_close(out, decode_attention_naive(q, k, v, plan, 0.25), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("private_len", [1, 15, 16, 17, 32, 33])
def test_triton_decode_attention_at_block_tile_and_chunk_boundaries(private_len):
    """A 32-token shared prefix, then own tokens ending at, before and after block (16), tile (16)
    and chunk (32) edges; the row count spills over one item (5 rows of G=3 per 16-query tile)."""
    bs, rows = 16, 7
    own = -(-private_len // bs)
    tables = [[0, 1] + [2 + own * r + j for j in range(own)] for r in range(rows)]
    lengths = [2 * bs + private_len] * rows
    q, k, v, plan = _attention_case(tables, lengths, bs, 2 + own * rows, 6, 2, seed=private_len)
    out = attention_triton.decode_attention(q, k, v, plan, 0.25, block_m=16, block_n=16, chunk=32)
    torch.testing.assert_close(out, decode_attention_naive(q, k, v, plan, 0.25), rtol=1e-4, atol=1e-4)


def test_triton_decode_attention_without_sharing_splits_a_long_context():
    tables = [list(range(8)), list(range(8, 11))]
    q, k, v, plan = _attention_case(tables, [8 * 4, 3 * 4 - 2], 4, 11, 3, 1)
    assert not plan.segments
    out = attention_triton.decode_attention(q, k, v, plan, 0.25, block_n=16, chunk=16)
    torch.testing.assert_close(out, decode_attention_naive(q, k, v, plan, 0.25), rtol=1e-4, atol=1e-4)


def test_bfloat16_triton_decode_attention_stays_within_twice_the_reference_error():
    tables = [[0, 1, 2, 3 + i] for i in range(4)]
    q, k, v, plan = _attention_case(tables, [3 * 16 + 7] * 4, 16, 8, 9, 3, d=64)
    exact = decode_attention_naive(q.double(), k.double(), v.double(), plan, 0.125)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = attention_triton.decode_attention(q, k, v, plan, 0.125, block_n=16, chunk=32)
    assert out.dtype == torch.bfloat16
    _low_precision_ok(out, decode_attention_naive(q, k, v, plan, 0.125), exact)


def test_work_table_reads_a_shared_prefix_once_per_group():
    tables = [[0, 1, 2, 10 + i] for i in range(16)]
    plan = plan_decode(tables, [16 * 3 + 5] * 16, block_size=16)
    table = attention_triton.build_work_table(plan, rows_per_item=21, chunk=256, device=torch.device("cpu"))
    assert table.shared_items.tolist() == [[0, 16, 0, 48, 0]]  # all 16 rows, the 48 shared slots, once
    assert table.private_items[:, 1].tolist() == [1] * 16 and table.private_items[:, 3].tolist() == [5] * 16
    assert table.num_parts == 32  # a shared and a private state per row
    assert table.part_ptr.tolist() == list(range(0, 33, 2))


# -------------------------------------------------------------------------------------------------
# RMSNorm, rotary

@pytest.mark.parametrize("shape", [(1, 64), (5, 576), (2, 3, 48)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_rms_norm_equals_the_reference(shape, with_residual):
    x, r = _randn(*shape, seed=1), _randn(*shape, seed=2)
    w = _randn(shape[-1], seed=3) * 0.2 + 1
    res = r if with_residual else None
    out, ref = norm_triton.rms_norm(x, w, 1e-5, res), kernels.rms_norm_reference(x, w, 1e-5, res)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if with_residual:  # bfloat16: the sum rounds exactly as the reference's, the norm within the rule
        xb, rb = x.bfloat16(), r.bfloat16()
        yb, sb = norm_triton.rms_norm(xb, w, 1e-5, rb)
        yr, sr = kernels.rms_norm_reference(xb, w, 1e-5, rb)
        assert torch.equal(sb, sr)
        _low_precision_ok(yb, yr, kernels.rms_norm_reference(x.double() + r.double(), w.double(), 1e-5))


@pytest.mark.parametrize("T,D", [(1, 16), (3, 64), (7, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rotary_in_place_on_the_qkv_view_equals_the_reference(T, D, dtype):
    hq, hkv = 3, 1
    qkv = _randn(T, (hq + 2 * hkv) * D, seed=T, dtype=dtype)
    ang = _randn(T, D // 2, seed=T + 1) * 3
    cos, sin = ang.cos(), ang.sin()
    x = qkv[:, : (hq + hkv) * D].view(T, hq + hkv, D)  # strided rows, as the model passes it
    v_before = qkv[:, (hq + hkv) * D:].clone()
    ref = kernels.apply_rotary_reference(x, cos, sin)
    copy = rotary_triton.apply_rotary(x, cos, sin)
    out = rotary_triton.apply_rotary(x, cos, sin, inplace=True)
    assert out.data_ptr() == x.data_ptr() and copy.data_ptr() != x.data_ptr()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(x, ref, **tol)
    torch.testing.assert_close(copy, ref, **tol)
    assert torch.equal(qkv[:, (hq + hkv) * D:], v_before)  # v is untouched


# -------------------------------------------------------------------------------------------------
# sampling

def _sampling_params(rng, B, device=DEVICE):
    cols = [rng.choice([0.0, 0.6, 1.0, 1.5]) for _ in range(B)], [rng.choice([0, 1, 3, 40]) for _ in range(B)], \
        [rng.choice([1.0, 0.9, 0.3]) for _ in range(B)], [rng.choice([0.0, 0.02]) for _ in range(B)]
    t, k, p, m = (torch.tensor(c, device=device) for c in cols)
    u = torch.tensor([rng.random() for _ in range(B)], dtype=torch.float64, device=device)
    return t, k, p, m, u


@pytest.mark.parametrize("V,block_v,seed", [(300, 128, 0), (1000, 1024, 1), (257, 512, 2)])
def test_triton_sampling_draws_the_reference_token_for_every_parameter_mix(V, block_v, seed):
    rng = random.Random(seed)
    B = 6
    logits = _randn(B, V, seed=seed) * 3
    params = _sampling_params(rng, B)
    tokens, logprobs = sampling_triton.sample(logits, *params, block_v=block_v, nt=64)
    ref_tokens, ref_logprobs = kernels.sample_reference(logits, *params)
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)


def test_triton_sampling_respects_each_filter_alone():
    V, B = 200, 5
    logits = _randn(B, V, seed=7) * 2
    t = torch.full((B,), 1.0, device=DEVICE)
    k = torch.tensor([1, 0, 0, 7, 0], device=DEVICE)
    p = torch.tensor([1.0, 0.2, 1.0, 1.0, 1.0], device=DEVICE)
    m = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0], device=DEVICE)
    for u in (0.0, 0.37, 0.999999):
        uu = torch.full((B,), u, dtype=torch.float64, device=DEVICE)
        tokens, _ = sampling_triton.sample(logits, t, k, p, m, uu, block_v=256, nt=64)
        ref, _ = kernels.sample_reference(logits, t, k, p, m, uu)
        assert tokens.tolist() == ref.tolist()
    assert tokens[0] == logits[0].argmax()  # top-k 1 is greedy whatever u is


def test_triton_sampling_never_draws_a_masked_token():
    V, B = 300, 3
    logits = _randn(B, V, seed=9) * 2
    logits[:, :128] = float("-inf")  # the whole first tile is masked
    logits[1, 200:] = float("-inf")
    t = torch.tensor([1.0, 2.0, 0.0], device=DEVICE)
    k = torch.tensor([0, 500, 0], device=DEVICE)
    p, m = torch.ones(B, device=DEVICE), torch.zeros(B, device=DEVICE)
    u = torch.tensor([0.5, 0.999, 0.1], dtype=torch.float64, device=DEVICE)
    tokens, logprobs = sampling_triton.sample(logits, t, k, p, m, u, block_v=128, nt=64)
    ref, ref_logprobs = kernels.sample_reference(logits, t, k, p, m, u)
    assert tokens.tolist() == ref.tolist() and bool(torch.isfinite(logprobs).all())
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)


def _boundary_margin(logits, t, k, p, m, u):
    """How close a sampled row sits, in float64, to a place where float32 rounding may move its token:
    the draw's target to a cdf step (vocabulary order), or a token to a top-p / min-p cut or a top-k tie;
    in units of the row's mass."""
    probs = torch.softmax(logits.double() / t, -1)
    s, order = probs.sort(descending=True)
    before = s.cumsum(0) - s
    rank = torch.arange(len(s))
    cut = before >= p
    margins = [(before - p).abs().min()] if p < 1 else []
    if m > 0:
        cut |= s < m * s[0]
        margins.append((s - m * s[0]).abs().min())
    if 0 < k < len(s):
        cut |= rank >= k
        margins.append(s[k - 1] - s[k])
    cut[0] = False
    kept = torch.zeros_like(probs).scatter_(0, order, s.masked_fill(cut, 0.0))
    cdf = kept.cumsum(0)
    margins.append((cdf - u * cdf[-1]).abs().min())
    return min(float(x) for x in margins)


@pytest.mark.parametrize("V,block_v,seed", [(700, 128, 0), (1500, 512, 1)])
def test_the_triton_kernel_samples_the_reference_token_from_the_same_uniform(V, block_v, seed):
    """Both draw in vocabulary order. Rows whose target or cuts sit within 1e-5 of the mass of a boundary,
    where float32 sums in another order may move the token to its neighbour, may differ; nothing else."""
    rng = random.Random(seed)
    B = 16
    logits = _randn(B, V, seed=seed) * rng.choice([2.0, 4.0])
    t, k, p, m, u = _sampling_params(rng, B)
    u[:2] = torch.tensor([0.0, 1 - 1e-12], dtype=torch.float64)  # the ends (the second rounds to 1.0 in float32)
    tokens, logprobs = sampling_triton.sample(logits, t, k, p, m, u, block_v=block_v, nt=64)
    ref_tokens, ref_logprobs = kernels.sample_reference(logits, t, k, p, m, u)
    for row in (tokens != ref_tokens).nonzero()[:, 0].tolist():
        margin = _boundary_margin(logits[row].cpu(), float(t[row]), int(k[row]), float(p[row]), float(m[row]),
                                  float(u[row]))
        assert float(t[row]) > 0 and margin < 1e-5, (row, margin)
    assert (tokens != ref_tokens).sum() <= 1
    same = tokens == ref_tokens
    torch.testing.assert_close(logprobs[same], ref_logprobs[same], rtol=1e-5, atol=1e-5)


def test_the_triton_kernel_samples_in_vocabulary_order_across_blocks():
    """A flat row: token floor(u * V), wherever the block edges fall; a permuted small row: the token
    whose vocabulary-order interval holds u, not the sorted order's."""
    V = 300
    flat = torch.zeros(1, V, device=DEVICE).repeat(5, 1)
    u = (torch.tensor([0.0, 60.0, 127.0, 150.0, 299.0], dtype=torch.float64, device=DEVICE) + 0.5) / V
    one, none = torch.ones(5, device=DEVICE), torch.zeros(5, device=DEVICE)
    k0 = torch.zeros(5, dtype=torch.long, device=DEVICE)
    tokens, _ = sampling_triton.sample(flat, one, k0, one, none, u, block_v=128, nt=64)
    assert tokens.tolist() == [0, 60, 127, 150, 299]
    assert kernels.sample_reference(flat, one, k0, one, none, u)[0].tolist() == [0, 60, 127, 150, 299]

    small = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]], device=DEVICE)).repeat(5, 1)
    k = torch.tensor([0, 0, 2, 2, 2], device=DEVICE)
    u = torch.tensor([0.01, 0.6, 0.0, 0.7, 1 - 1e-12], dtype=torch.float64, device=DEVICE)
    tokens, _ = sampling_triton.sample(small, one, k, one, none, u, block_v=4, nt=64)
    assert tokens.tolist() == [0, 2, 1, 3, 3]
    assert kernels.sample_reference(small, one, k, one, none, u)[0].tolist() == [0, 2, 1, 3, 3]


# -------------------------------------------------------------------------------------------------
# dispatch and the engine

def test_cpu_tensors_run_the_references():
    x = torch.randn(3, 8)
    assert not kernels.uses_triton(x)
    assert torch.equal(kernels.rms_norm(x, torch.ones(8), 1e-5), kernels.rms_norm_reference(x, torch.ones(8), 1e-5))
    cos, sin = torch.rand(3, 2), torch.rand(3, 2)
    x4 = torch.randn(3, 1, 4)
    assert torch.equal(kernels.apply_rotary(x4.clone(), cos, sin, inplace=True), kernels.apply_rotary(x4, cos, sin))


def test_engine_makes_the_same_greedy_tokens_with_the_triton_kernels(tiny_model, monkeypatch):
    """float32, greedy: three branches forked from one prompt, each extended differently."""
    from ttc.decoder.sampling import SamplingParams

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the engine runs on CPU tensors, which reach Triton only through its interpreter")

    engine = tiny_model.engine
    prompt = list(range(100, 140))  # 40 tokens: two full shared blocks of 16 and a partial one

    def run():
        engine.clear_prefix_cache()
        root = engine.new_sequence(prompt)
        branches = engine.fork(root, 3)
        for i, b in enumerate(branches):
            engine.extend(b, [200 + j for j in range(i + 1)])
        outs = engine.generate(branches, SamplingParams(temperature=0.0), max_new_tokens=5, ignore_eos=True)
        engine.release(branches + [root])
        return [o.token_ids for o in outs]

    with kernels.reference():
        expected = run()
    monkeypatch.setattr(kernels.dispatch, "uses_triton", lambda t: True)  # CPU tensors through the (interpreted) kernels
    calls = []
    triton_attention = attention_triton.decode_attention
    monkeypatch.setattr(attention_triton, "decode_attention", lambda *a: calls.append(1) or triton_attention(*a))
    assert run() == expected
    assert len(calls) == 4 * tiny_model.config.num_layers  # the first token comes from the prompt's forward


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_the_dispatcher_runs_triton_and_matches_the_reference_at_smollm2_shapes(dtype):
    B, prefix, private, bs, hq, hkv, d = 64, 512, 32, 16, 9, 3, 64
    nb = prefix // bs
    tables = [list(range(nb)) + [nb + 2 * i, nb + 2 * i + 1] for i in range(B)]
    q, k, v, plan = _attention_case(tables, [prefix + private] * B, bs, nb + 2 * B, hq, hkv, d=d, dtype=dtype)
    assert kernels.uses_triton(q)
    out = kernels.decode_attention(q, k, v, plan, d ** -0.5)
    with kernels.reference():
        assert not kernels.uses_triton(q)
        ref = kernels.decode_attention(q, k, v, plan, d ** -0.5)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    else:
        exact = decode_attention_naive(q.double(), k.double(), v.double(), plan, d ** -0.5)
        _low_precision_ok(out, ref, exact)


@gpu
@pytest.mark.gpu
def test_on_cuda_sampling_over_a_full_vocabulary_matches_the_reference():
    B, V = 64, 49152
    logits = _randn(B, V, seed=3) * 4
    params = _sampling_params(random.Random(3), B)
    tokens, logprobs = kernels.sample(logits, *params)
    ref_tokens, ref_logprobs = kernels.sample_reference(logits, *params)
    # float32 sums in another order may move a draw that sits exactly on a boundary: allow one row
    assert (tokens != ref_tokens).sum().item() <= 1
    torch.testing.assert_close(logprobs[tokens == ref_tokens], ref_logprobs[tokens == ref_tokens])
