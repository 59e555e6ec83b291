"""W4A8 (csrc/int4_q8.cpp): int4 and int8 weights times activations rounded to int8 per group of 32, with integer
dot products, against the twin `quant.w4a8_reference` (the same rounding in PyTorch, exact integer sums).
Skipped where the kernels cannot run (no AVX512-VNNI, or ttc's CPU kernels not built)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ttc
from tests.conftest import q4_1_blocks
from ttc import api
from ttc.kernels import int4_cpu
from ttc.kernels.int4_cpu import Int8HeadLinear
from ttc.kernels.quant import Int4Linear, quantize_linear, w4a8_reference

needs_vnni = pytest.mark.skipif(not int4_cpu.w4a8_available(), reason="W4A8 needs AVX512-VNNI")


def w4a8_linear(n, k, seed=0):
    q, d, m = q4_1_blocks(n, k, seed)
    lin = Int4Linear.from_q4_1(q, d, m)
    assert lin.use_w4a8_kernel(exact_dm=(d, m)) and lin.w4a8
    return lin, q, d, m


@needs_vnni
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 19])  # tiles of 8 rows, then one of the 1-7 left
@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (576, 576), (96, 1536), (32, 608)])  # odd group counts
def test_the_int4_kernel_equals_its_twin_to_float32_rounding(rows, n, k):
    lin, q, d, m = w4a8_linear(n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    d16, m16 = int4_cpu.w4a8_unpack_scales(lin.d), int4_cpu.w4a8_unpack_scales(lin.m)
    assert d16.dtype == torch.float16 and torch.equal(d16.float(), d.half().float())  # GGUF's own storage
    fast, twin = lin(x), w4a8_reference(x, q, d16, m16)
    assert fast.shape == (rows, n) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, twin, rtol=1e-5, atol=1e-5 * twin.abs().max().item())
    torch.testing.assert_close(lin.reference(x), twin, rtol=0, atol=0)  # the linear's own twin is that one
    torch.testing.assert_close(lin.weight, q.float() * d16.float().repeat_interleave(32, 1)
                               + m16.float().repeat_interleave(32, 1), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_codes_and_scales_into_column_blocks_puts_each_code_where_the_kernel_reads_it(bits):
    g = torch.Generator().manual_seed(6)
    q = torch.randint(0, 16 if bits == 4 else 256, (32, 64), generator=g).to(torch.uint8)
    packed = int4_cpu.w4a8_pack_codes(q, bits)
    assert packed.shape == (2, 2, 256 if bits == 4 else 512)
    flat = packed[1, 1] if bits == 8 else torch.cat((packed[1, 1] & 0x0F, packed[1, 1] >> 4))
    # B[k4][c][i] = q[16 * block + c][32 * group + 4 * k4 + i]: block 1, group 1, k4 = 5, column 3, i = 2
    assert flat[5 * 64 + 3 * 4 + 2] == q[16 + 3, 32 + 4 * 5 + 2]
    assert torch.equal(int4_cpu.w4a8_unpack_codes(packed), q)
    scales = torch.randn(32, 2, generator=g)
    assert int4_cpu.w4a8_pack_scales(scales)[1, 0, 3] == scales[19, 0]
    assert torch.equal(int4_cpu.w4a8_unpack_scales(int4_cpu.w4a8_pack_scales(scales)), scales)


@needs_vnni
def test_each_activation_is_rounded_half_to_even_exactly_as_the_twin_rounds_it():
    # one-hot codes (w = 1 at input n, else 0) make y[t, n] = d_x * round(x[t, n] / d_x) alone: exact
    k = 64
    one_hot = torch.eye(k, dtype=torch.uint8)
    lin = Int4Linear.from_q4_1(one_hot, torch.ones(k, 2), torch.zeros(k, 2))  # d = 1, m = 0
    assert lin.use_w4a8_kernel()
    x = torch.zeros(2, k)
    x[:, 0] = x[:, 32] = 127.0  # d_x = 1 in both groups of both rows
    x[0, 1:9] = torch.tensor([2.5, -2.5, 3.5, -3.5, 0.5, -0.5, 1.5, 126.5])
    x[1, 33:37] = torch.tensor([4.5, -0.49999997, 5.5, -6.5])
    y = lin(x)
    assert torch.equal(y, x.round())  # half to even: 2.5 -> 2, 3.5 -> 4, -0.5 -> -0, 126.5 -> 126
    assert torch.equal(y, lin.reference(x))


@needs_vnni
def test_a_nan_or_an_infinity_in_a_row_makes_that_row_nan_and_leaves_the_others_alone():
    lin, q, d, m = w4a8_linear(64, 576)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(5))
    x[0, 40], x[2, 300] = float("nan"), float("inf")
    y, twin = lin(x), lin.reference(x)
    assert y[0].isnan().all() and y[2].isnan().all() and twin[0].isnan().all() and twin[2].isnan().all()
    assert torch.equal(y[1], lin(x[1:2])[0]) and y[1].isfinite().all()


@pytest.mark.parametrize("n,k", [(32, 40), (33, 64)])  # a padded last group; N not a multiple of 16
def test_a_shape_the_w4a8_kernel_refuses_runs_its_reference_instead_of_failing(monkeypatch, n, k):
    if not int4_cpu.available():
        pytest.skip("ttc's CPU kernels are not built here")
    monkeypatch.setattr(int4_cpu, "w4a8_available", lambda: True)
    lin = quantize_linear(torch.randn(n, k), None, "w4a8")
    assert not lin.w4a8 and lin.d is None  # neither ttc kernel took it
    x = torch.randn(2, k)
    assert lin(x).shape == (2, n)
    assert torch.equal(lin(x), lin.reference(x))


@needs_vnni
def test_activations_already_on_the_int8_grid_give_the_float_product():
    # x = q * s with max |q| = 127 in every group: rounding to int8 loses nothing, so W4A8 is the float linear
    lin, q, d, m = w4a8_linear(64, 256)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-127, 128, (2, 8, 32), generator=g).float()
    codes[:, :, 0] = 127
    x = (codes * 2.0 ** -6).reshape(2, 256)  # power-of-two scale: 127 * s / 127 == s exactly
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)


@needs_vnni
def test_the_activation_rounding_costs_about_what_int8_should():
    lin, *_ = w4a8_linear(576, 576)
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(2))
    full = F.linear(x, lin.weight)
    error = ((lin(x) - full).norm() / full.norm()).item()
    assert 1e-4 < error < 2e-2  # int8 per group of 32 on gaussian rows: ~5e-3


@needs_vnni
def test_a_row_does_not_depend_on_the_other_rows_or_the_thread_count():
    lin, *_ = w4a8_linear(576, 1536)
    x = torch.randn(40, 1536, generator=torch.Generator().manual_seed(3))
    batch = lin(x)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(40)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = lin(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batch, alone) and torch.equal(batch, one_thread)


def q8_0_head(n, k, seed=4):
    """A weight (n, k) whose requantization recovers its codes and scales exactly (a Q8_0 head), and its codes."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), generator=g).float()
    codes[:, ::32] = 127  # with power-of-two scales, requantizing q * d recovers q and d exactly
    scales = 2.0 ** -torch.randint(5, 10, (n, k // 32, 1), generator=g).float()
    return (codes.view(n, k // 32, 32) * scales).view(n, k), codes


@needs_vnni
@pytest.mark.parametrize("rows", [1, 2, 5, 40])
@pytest.mark.parametrize("k", [96, 576])  # three groups; eighteen
def test_the_int8_head_equals_its_twin_at_every_row_count(rows, k):
    weight, codes = q8_0_head(208, k)
    head = Int8HeadLinear.exact_from_float(weight, w4a8=True)
    assert head is not None and head.w4a8_codes is not None
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    twin = head.reference(x)
    d = int4_cpu.w4a8_unpack_scales(head.d)
    torch.testing.assert_close(twin, w4a8_reference(x, codes.to(torch.int8), d, None), rtol=0, atol=0)
    torch.testing.assert_close(head(x), twin, rtol=1e-5, atol=1e-5 * twin.abs().max().item())
    assert torch.equal(head(x)[:1], head(x[:1]))


@needs_vnni
def test_a_head_whose_rows_are_not_a_multiple_of_16_keeps_the_plain_int8_head():
    weight, _ = q8_0_head(200, 64)
    head = Int8HeadLinear.exact_from_float(weight, w4a8=True)
    assert head.w4a8_codes is None and head.q is not None
    x = torch.randn(2, 64)
    torch.testing.assert_close(head(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_dtype_w4a8_on_a_machine_without_vnni_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(int4_cpu, "w4a8_available", lambda: False)
    with pytest.raises(ValueError, match="w4a8 needs x86-64 with AVX512-VNNI") as caught:
        api.activation_dtype("w4a8", "w4a8", "cpu")
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="use int4"):
        quantize_linear(torch.randn(32, 64), None, "w4a8")


@needs_vnni
def test_a_w4a8_model_runs_every_linear_and_the_head_on_the_w4a8_kernels(tiny_llama_dir):
    model = ttc.load(str(tiny_llama_dir), dtype="w4a8", kv_cache_gb=0.05)
    inner = model.engine.model
    assert model.dtype == torch.float32
    assert all(layer[k].w4a8 for layer in inner.layers for k in ("qkv", "o", "gate_up", "down"))
    assert inner.fused is not None and all(f.w4a8 for f in inner.fused)
    out = model.generate("1+2+3 =", max_new_tokens=6, temperature=0.0, ignore_eos=True)
    assert len(out[0].token_ids) == 6
