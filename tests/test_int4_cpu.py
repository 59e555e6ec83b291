"""ttc's own int4 CPU kernel (kernels/int4_cpu.py, csrc/int4_cpu.cpp) against its slow twin, the dequantized
weight through F.linear in float32. Skipped where the kernel cannot build (not x86-64 with AVX2 and FMA)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ttc
from tests.conftest import q4_1_blocks as blocks
from ttc.kernels import int4_cpu
from ttc.kernels.quant import Int4Linear, quantize_linear

pytestmark = pytest.mark.skipif(not int4_cpu.available(), reason="ttc's int4 CPU kernel needs x86-64 AVX2 + FMA")


def file_weight(q, d, m):
    return q.float() * d.repeat_interleave(32, dim=1) + m.repeat_interleave(32, dim=1)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 32, 33, 40])
@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (576, 576)])
def test_the_kernel_equals_the_dequantized_float32_linear(rows, n, k):
    q, d, m = blocks(n, k, seed=rows + n)
    lin = Int4Linear.from_q4_1(q, d, m, bias=torch.randn(n))
    assert lin.use_float32_kernel(exact_dm=(d, m))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    want = F.linear(x.double(), file_weight(q, d, m).double(), lin.bias.double())
    torch.testing.assert_close(lin(x).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin(x), lin.reference(x), rtol=1e-5, atol=1e-5)


def test_the_float32_kernel_reads_the_gguf_blocks_unrounded():
    q, d, m = blocks(32, 64, seed=1)
    lin = Int4Linear.from_q4_1(q, d, m)
    rounded = lin.weight  # PyTorch's kernel form: d and m + 8d rounded to bfloat16
    assert lin.use_float32_kernel(exact_dm=(d, m)) and lin.packed is None
    assert torch.equal(lin.weight, file_weight(q, d, m))
    assert not torch.equal(rounded, lin.weight)


def test_a_row_does_not_depend_on_the_other_rows_or_the_thread_count_up_to_thirty_two_rows():
    q, d, m = blocks(96, 576, seed=2)
    lin = Int4Linear.from_q4_1(q, d, m)
    lin.use_float32_kernel(exact_dm=(d, m))
    x = torch.randn(32, 576, generator=torch.Generator().manual_seed(2))
    alone = torch.cat([lin(x[i:i + 1]) for i in range(32)])
    for rows in (2, 3, 4, 5, 8, 13, 16, 31, 32):
        assert torch.equal(lin(x[:rows]), alone[:rows]), rows
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = lin(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one_thread, lin(x))


def test_weights_the_kernel_cannot_take_keep_the_reference():
    g = torch.Generator().manual_seed(3)
    padded = Int4Linear.from_float(torch.randn(32, 48, generator=g))  # K = 48: a padded last group
    wide_groups = Int4Linear.from_float(torch.randn(32, 128, generator=g), group_size=64)
    assert not padded.use_float32_kernel() and not wide_groups.use_float32_kernel()
    x = torch.randn(3, 48, generator=g)
    torch.testing.assert_close(padded(x), padded.reference(x))


def test_quantize_linear_with_float32_activations_takes_the_kernel():
    q, d, m = blocks(32, 64, seed=4)
    lin = quantize_linear(file_weight(q, d, m), None, "int4", q4_1=(q, d, m), activations=torch.float32)
    assert lin.d is not None and torch.equal(lin.weight, file_weight(q, d, m))
    assert quantize_linear(file_weight(q, d, m), None, "int4", q4_1=(q, d, m)).d is None  # bfloat16: PyTorch's


def test_the_kernel_runs_inside_torch_compile():
    q, d, m = blocks(48, 64, seed=5)
    lin = Int4Linear.from_q4_1(q, d, m, bias=torch.randn(48))
    lin.use_float32_kernel(exact_dm=(d, m))
    fn, tensors = lin.parts()
    x = torch.randn(3, 64)
    compiled = torch.compile(fn, dynamic=False, fullgraph=True)
    assert torch.equal(compiled(x, *tensors), lin(x))


def q8_0_weight(n, k, seed):
    """A float weight that is exactly Q8_0 blocks (q in -127..127 with 127 in every group, d float16)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k // 32, 32), generator=g)
    q[..., 0] = 127 * torch.where(torch.rand(n, k // 32, generator=g) < 0.5, 1, -1)  # llama.cpp: d = amax / 127
    d = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-4).half().float()
    return (q * d[..., None]).reshape(n, k).float()


def test_the_int8_head_recovers_q8_0_codes_exactly_and_equals_its_float_twin_up_to_sixteen_rows():
    from ttc.kernels.int4_cpu import Int8HeadLinear

    w = q8_0_weight(200, 64, seed=6)
    head = Int8HeadLinear.exact_from_float(w)
    assert head is not None and torch.equal(head.q.float().view(200, 2, 32) * head.d[..., None], w.view(200, 2, 32))
    for rows in (1, 3, 16, 17):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
        torch.testing.assert_close(head(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(head(x[:5]), torch.cat([head(x[i:i + 1]) for i in range(5)]))


def test_a_head_that_is_not_exactly_int8_stays_float():
    from ttc.kernels.int4_cpu import Int8HeadLinear

    assert Int8HeadLinear.exact_from_float(torch.randn(64, 64, generator=torch.Generator().manual_seed(7))) is None
    assert Int8HeadLinear.exact_from_float(q8_0_weight(64, 48 + 16, seed=8)[:, :48]) is None  # K % 32 != 0


@pytest.mark.parametrize("fast_bf16,built,want", [(True, True, torch.bfloat16), (False, False, torch.bfloat16),
                                                  (False, True, torch.float32)])
def test_int4_activations_are_float32_only_without_fast_bfloat16_and_with_the_kernel_built(monkeypatch, fast_bf16,
                                                                                            built, want):
    from ttc import api

    monkeypatch.setattr(api, "cpu_has_fast_bf16", lambda: fast_bf16)
    monkeypatch.setattr(int4_cpu, "available", lambda: built)
    assert api.activation_dtype("int4", "int4", "cpu") == want
    assert api.activation_dtype("int8", "int8", "cpu") == torch.bfloat16  # PyTorch's int8 kernel takes bfloat16
    assert api.activation_dtype("float32", "plain", "cpu") == torch.float32


@pytest.mark.parametrize("rows", [1, 3, 70])
def test_the_one_pass_rms_norm_equals_the_reference_to_float32_rounding(rows):
    from ttc.kernels import rms_norm_reference

    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 576, generator=g) * 3, torch.randn(576, generator=g)
    torch.testing.assert_close(int4_cpu.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    assert torch.equal(int4_cpu.rms_norm(x[:1], w, 1e-5), int4_cpu.rms_norm(x, w, 1e-5)[:1])


@pytest.mark.parametrize("rows", [1, 70])
def test_the_one_pass_rms_norm_of_bfloat16_rows_is_the_float32_norm_rounded_once(rows):
    from ttc.kernels import rms_norm_reference

    g = torch.Generator().manual_seed(rows)
    x, w = (torch.randn(rows, 576, generator=g) * 3).to(torch.bfloat16), torch.randn(576, generator=g)
    y = int4_cpu.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, int4_cpu.rms_norm(x.float(), w, 1e-5).to(torch.bfloat16))  # the float32 norm, rounded
    # PyTorch's float32 norm sums in another order: at most one bfloat16 step apart
    torch.testing.assert_close(y.float(), rms_norm_reference(x, w, 1e-5).float(), rtol=2 ** -7, atol=0)


# --- the fused layer: two C++ calls per layer, the eager layer's bits --------------------------------------

@pytest.fixture(params=[("llama", torch.float32), ("qwen2", torch.float32), ("llama", torch.bfloat16),
                        ("qwen2", torch.bfloat16), ("llama", "w4a8"), ("qwen2", "w4a8")],
                ids=["llama-float32", "qwen2-float32", "llama-bf16", "qwen2-bf16", "llama-w4a8", "qwen2-w4a8"])
def int4_model(request, tmp_path_factory, monkeypatch):
    """A tiny random model loaded as int4 with float32 activations (ttc's kernels: a CPU without fast bfloat16)
    or bfloat16 ones (PyTorch's int4 kernel: a CPU with it), or as w4a8 (float32 activations rounded to int8
    on the way into each linear; AVX512-VNNI CPUs). qwen2 has a qkv bias."""
    from tests.conftest import make_tiny_folder
    from ttc import api

    arch, activations = request.param
    dtype = "int4"
    if activations == "w4a8":
        if not int4_cpu.w4a8_available():
            pytest.skip("w4a8 needs AVX512-VNNI")
        dtype, activations = "w4a8", torch.float32
    monkeypatch.setattr(api, "cpu_has_fast_bf16", lambda: activations == torch.bfloat16)
    folder = make_tiny_folder(tmp_path_factory.mktemp(f"tiny_{arch}"), arch, seed=3)
    model = ttc.load(str(folder), dtype=dtype, kv_cache_gb=0.05)
    assert model.dtype == activations
    assert all(f.w4a8 == (dtype == "w4a8") for f in model.engine.model.fused)
    return model


def test_fused_layers_give_the_eager_layers_tokens_and_logprobs_bit_for_bit(int4_model):
    model = int4_model.engine.model
    assert model.fused is not None and len(model.fused) == model.cfg.num_layers
    assert model.private_attention is int4_cpu.paged_partial  # in both runs: the layers are what is compared
    fused = model.fused

    def run():  # a prompt prefill, then 3 samples decoding from its shared blocks (a cascade plan)
        int4_model.engine.clear_prefix_cache()
        outs = int4_model.generate("1+2+3 =", n=3, max_new_tokens=12, temperature=0.9, seed=7,
                                           ignore_eos=True)
        return [(o.token_ids, o.logprobs) for o in outs]

    with_fused = run()
    model.fused = None  # the eager twin
    try:
        eager = run()
    finally:
        model.fused = fused
    assert with_fused == eager


def test_a_linear_with_a_bias_outside_qkv_keeps_the_model_eager(int4_model):
    from ttc.kernels.int4_cpu import FusedLayer

    model = int4_model.engine.model
    layers = [dict(layer) for layer in model.layers]
    assert FusedLayer.build_all(layers, model.norm, 4, 2, 1e-5, model.dtype) is not None
    layers[1]["down"] = copy.copy(layers[1]["down"])
    layers[1]["down"].bias = torch.zeros(model.cfg.hidden_size, dtype=model.dtype)
    assert FusedLayer.build_all(layers, model.norm, 4, 2, 1e-5, model.dtype) is None


# --- decode attention's private part read in place -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_equals_gathered_keys_through_the_reference_softmax_including_padding_and_empty_rows(dtype):
    from ttc.kernels.attention import _partial_reference

    gen = torch.Generator().manual_seed(5)
    S, Hkv, G, D, b, P = 64, 3, 3, 64, 4, 20
    k_cache, v_cache = (torch.randn(S, Hkv, D, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(b, Hkv, G, D, generator=gen).to(dtype)
    slots = torch.randint(0, S, (b, P), generator=gen)
    counts = torch.tensor([20, 7, 1, 0])  # the last row has no valid key: (0, -inf) by definition
    bias = torch.zeros(b, 1, 1, P).masked_fill_((torch.arange(P)[None, :] >= counts[:, None])[:, None, None, :],
                                                float("-inf"))
    o, lse = int4_cpu.paged_partial(q, k_cache, v_cache, slots, bias.to(dtype), 0.125)  # the plan's dtype, the model's
    assert torch.equal(o, int4_cpu.paged_partial(q, k_cache, v_cache, slots, bias, 0.125)[0])  # or float32: the same
    k = k_cache[slots].permute(0, 2, 1, 3)  # (b, Hkv, P, D)
    v = v_cache[slots].permute(0, 2, 1, 3)
    o_ref, lse_ref = _partial_reference(q.float(), k.float(), v.float(), bias, 0.125)  # bfloat16 in, float32 math
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(o[3], torch.zeros_like(o[3])) and bool((lse[3] == float("-inf")).all())


@pytest.mark.parametrize("scale", [0.5, 4.0])  # score spreads of tens, and of hundreds (weights underflow to 0)
@pytest.mark.parametrize("G", [3, 12])  # query heads per KV head: compiled (1-8), and any
def test_paged_attention_keeps_float32_accuracy_over_wide_score_ranges_and_long_rows(scale, G):
    from ttc.kernels.attention import _partial_reference

    gen = torch.Generator().manual_seed(7)
    S, Hkv, D, b, P = 300, 2, 64, 2, 257  # P not a multiple of the 8 keys scored at a time
    k_cache, v_cache = torch.randn(S, Hkv, D, generator=gen), torch.randn(S, Hkv, D, generator=gen)
    q = torch.randn(b, Hkv, G, D, generator=gen)
    slots = torch.randint(0, S, (b, P), generator=gen)
    bias = torch.zeros(b, 1, 1, P)
    o, lse = int4_cpu.paged_partial(q, k_cache, v_cache, slots, bias, scale)
    k, v = k_cache[slots].permute(0, 2, 1, 3), v_cache[slots].permute(0, 2, 1, 3)
    o_ref, lse_ref = _partial_reference(q, k, v, bias, scale)
    # scores of |s| ~ 100 carry ~1e-5 of rounding in either dot-product order, which exp passes on to each weight
    tol = 1e-5 if scale < 1 else 1e-4
    torch.testing.assert_close(o, o_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-6, atol=tol)


def test_cascade_decode_with_the_in_place_private_part_equals_the_naive_twin():
    from ttc.kernels import attention
    from ttc.kernels.decode_plan import plan_decode

    gen = torch.Generator().manual_seed(6)
    block, Hkv, G, D = 4, 2, 3, 64
    # three rows sharing a 3-block prefix (a shared segment), each with its own tail of a different length
    tables = [[0, 1, 2, 3, 4], [0, 1, 2, 5], [0, 1, 2, 6, 7, 8]]
    lengths = [19, 14, 23]
    k_cache, v_cache = torch.randn(40, Hkv, D, generator=gen), torch.randn(40, Hkv, D, generator=gen)
    q = torch.randn(3, Hkv * G, D, generator=gen)
    plan = plan_decode(tables, lengths, block, min_shared_tokens=4)
    assert plan.segments  # the shared prefix is read once, merged with the in-place private parts
    fast = attention.decode_attention(q, k_cache, v_cache, plan, 0.125, int4_cpu.paged_partial)
    torch.testing.assert_close(fast, attention.decode_attention_naive(q, k_cache, v_cache, plan, 0.125),
                               rtol=1e-5, atol=1e-5)
