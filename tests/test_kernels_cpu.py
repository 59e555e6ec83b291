"""CPU fast paths against their references: bit-identical where the arithmetic is the same."""

from __future__ import annotations

import pytest
import torch

from ttc import kernels
from ttc.kernels.linear import Linear
from ttc.kernels.norm import rms_norm_cpu, rms_norm_reference
from ttc.kernels.rotary import apply_rotary_reference, apply_rotary_tables, rotary_tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_fused_cpu_rmsnorm_is_bit_identical_to_the_reference(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x, r, w = torch.randn(rows, 96, generator=g).to(dtype), torch.randn(rows, 96, generator=g).to(dtype), \
        torch.randn(96, generator=g)
    assert torch.equal(rms_norm_cpu(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
    fast, ref = rms_norm_cpu(x, w, 1e-5, residual=r), rms_norm_reference(x, w, 1e-5, residual=r)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_rotary_is_bit_identical_to_the_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 12, 64, generator=g).to(dtype)
    angles = torch.rand(11, 32, generator=g) * 50
    cos, sin = angles.cos(), angles.sin()
    assert torch.equal(apply_rotary_tables(x, *rotary_tables(cos, sin)), apply_rotary_reference(x, cos, sin))


def test_reference_context_forces_the_explicit_formulas():
    x, w = torch.randn(3, 8), torch.rand(8)
    with kernels.reference():
        assert torch.equal(kernels.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


@pytest.mark.parametrize("rows", [1, 16, 33])
def test_packed_bfloat16_linear_stays_within_twice_plain_bfloat16_error(rows):
    g = torch.Generator().manual_seed(rows)
    w32, x32, b32 = torch.randn(160, 96, generator=g), torch.randn(rows, 96, generator=g), torch.randn(160, generator=g)
    exact = x32.double() @ w32.double().T + b32.double()
    lin = Linear(w32.bfloat16(), b32.bfloat16())
    x = x32.bfloat16()
    err_fast = (lin(x).double() - exact).abs().max()
    err_ref = (lin.reference(x).double() - exact).abs().max()
    assert err_fast <= 2 * err_ref + 1e-2


def test_engine_gives_the_same_greedy_tokens_with_cpu_fast_paths_and_references(tiny_model):
    from ttc.decoder.sampling import SamplingParams

    engine = tiny_model.engine
    prompt = tiny_model.tokenizer.encode("The rain in Spain " * 5)

    def run():
        parent = engine.new_sequence(prompt)
        kids = engine.fork(parent, 3, seeds=[1, 2, 3])
        outs = engine.generate(kids, SamplingParams(temperature=0), max_new_tokens=20, ignore_eos=True)
        engine.release(kids + [parent])
        engine.clear_prefix_cache()
        return [o.token_ids for o in outs]

    fast = run()
    with kernels.reference():
        assert run() == fast
