"""The GPU check's kernel section: each Triton kernel of the hot path against its PyTorch reference on the GPU.

Why: the parity section compares whole models, so a failure there says that something differs, not what. Here
RMSNorm (with and without the residual add it fuses), rotary (in place on the qkv output's strided view) and
sampling (a mix of temperatures and filters, and greedy rows) run compiled on the GPU at the throughput models'
shapes, beside their references on the same inputs: float32 within 1e-5; bfloat16 within twice the reference's
own error against float64 (+1e-3, the STYLE rule), its residual sum equal bit for bit; sampled tokens equal
the reference's except where float32 sums in another order move a draw sitting on a boundary (one row
allowed), greedy tokens equal. Decode attention has its own section (bandwidth). A few seconds on a GPU.

On the CPU (--smoke) the kernels run through Triton's interpreter when TRITON_INTERPRET=1 was set before the
run (tests/test_gpu_check.py sets it); otherwise the section says so and checks nothing.
"""

from __future__ import annotations

import os
import random

import torch

from gpu_check_harness import check, guarded, table

SMOKE_SHAPES = {"tiny": dict(hidden=64, q_heads=4, kv_heads=2, head_dim=16, vocab=1000)}


def model_shapes(models: dict) -> dict:
    """name -> the dimensions each kernel sees in that model (Hugging Face config keys in)."""
    return {name: dict(hidden=c["hidden_size"], q_heads=c["num_attention_heads"], kv_heads=c["num_key_value_heads"],
                       head_dim=c["hidden_size"] // c["num_attention_heads"], vocab=c["vocab_size"])
            for name, c in models.items()}


def kernels_section(ctx, sec: dict) -> None:
    from ttc import kernels

    if ctx.device == "cuda":
        check_kernels(ctx, sec, model_shapes(ctx.sizes.models), sample_rows=64)
    elif os.environ.get("TRITON_INTERPRET") == "1":
        with kernels.triton_on_cpu():
            check_kernels(ctx, sec, SMOKE_SHAPES, sample_rows=4)
    else:
        sec["notes"].append("CPU run without TRITON_INTERPRET=1: the Triton kernels cannot run; nothing checked")


def check_kernels(ctx, sec: dict, shapes: dict, sample_rows: int) -> None:
    """Every check, for each model's dimensions (64 rows; `sample_rows` for sampling); benchmarks/gpu_compile.py
    runs it too, to record these launches."""
    rows = table(sec, "each Triton kernel against its PyTorch reference on the same inputs",
                 ["model", "kernel", "dtype", "max err", "reference err", "passed"])
    for name, dims in shapes.items():
        for checks, extra in ((norm_checks, ()), (rotary_checks, ()), (sampling_checks, (sample_rows,))):
            with guarded(sec, f"{checks.__name__} {name}"):  # a kernel that raises (or will not compile) is
                checks(ctx, sec, rows, name, dims, *extra)  # written to the report; the others still run


def _randn(ctx, *shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(ctx.device)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def norm_checks(ctx, sec: dict, rows: list, name: str, dims: dict) -> None:
    from ttc.kernels import norm_triton
    from ttc.kernels.norm import rms_norm_reference

    T, H = 64, dims["hidden"]
    x, r = _randn(ctx, T, H, seed=1), _randn(ctx, T, H, seed=2)
    w = _randn(ctx, H, seed=3) * 0.2 + 1
    for residual in (None, r):
        label = "rms_norm" + (" + residual" if residual is not None else "")
        out, ref = norm_triton.rms_norm(x, w, 1e-5, residual), rms_norm_reference(x, w, 1e-5, residual)
        err = max(_err(a, b) for a, b in zip(out, ref)) if residual is not None else _err(out, ref)
        rows.append([name, label, "float32", err, None, err <= 1e-5])
        check(sec, f"{name}: {label} float32 within 1e-5 of the reference ({err:.2g})", err <= 1e-5)
    xb, rb = x.bfloat16(), r.bfloat16()
    (yb, sb), (yr, sr) = norm_triton.rms_norm(xb, w, 1e-5, rb), rms_norm_reference(xb, w, 1e-5, rb)
    exact = rms_norm_reference(xb.double() + rb.double(), w.double(), 1e-5)
    err, ref_err = _err(yb, exact), _err(yr, exact)
    passed = torch.equal(sb, sr) and err <= 2 * ref_err + 1e-3
    rows.append([name, "rms_norm + residual", "bfloat16", err, ref_err, passed])
    check(sec, f"{name}: bfloat16 rms_norm + residual: the sum equal, the norm within 2x the reference's error",
          passed)


def rotary_checks(ctx, sec: dict, rows: list, name: str, dims: dict) -> None:
    from ttc.kernels import rotary_triton
    from ttc.kernels.rotary import apply_rotary_reference

    T, hq, hkv, D = 64, dims["q_heads"], dims["kv_heads"], dims["head_dim"]
    angles = _randn(ctx, T, D // 2, seed=4) * 3
    cos, sin = angles.cos(), angles.sin()
    for dtype in (torch.float32, torch.bfloat16):
        qkv = _randn(ctx, T, (hq + 2 * hkv) * D, seed=5).to(dtype)
        x = qkv[:, : (hq + hkv) * D].view(T, hq + hkv, D)  # the strided rows the model passes
        v_before = qkv[:, (hq + hkv) * D:].clone()
        exact = apply_rotary_reference(x.double(), cos.double(), sin.double())
        ref = apply_rotary_reference(x, cos, sin)
        rotary_triton.apply_rotary(x, cos, sin, inplace=True)
        err, ref_err = _err(x, exact), _err(ref, exact)
        bound = 1e-5 if dtype == torch.float32 else 2 * ref_err + 1e-3
        passed = err <= bound and torch.equal(qkv[:, (hq + hkv) * D:], v_before)
        dtype_name = str(dtype).split(".")[1]
        rows.append([name, "rotary in place", dtype_name, err, ref_err, passed])
        check(sec, f"{name}: {dtype_name} rotary in place within {bound:.2g} of exact, v untouched ({err:.2g})", passed)


def sampling_checks(ctx, sec: dict, rows: list, name: str, dims: dict, B: int) -> None:
    from ttc import kernels
    from ttc.kernels import sampling_triton

    V = dims["vocab"]
    logits = _randn(ctx, B, V, seed=6) * 4
    rng = random.Random(7)
    columns = ([rng.choice([0.0, 0.6, 1.0, 1.5]) for _ in range(B)], [rng.choice([0, 1, 3, 40]) for _ in range(B)],
               [rng.choice([1.0, 0.9, 0.3]) for _ in range(B)], [rng.choice([0.0, 0.02]) for _ in range(B)])
    params = [torch.tensor(c, device=ctx.device) for c in columns]
    uniforms = torch.tensor([rng.random() for _ in range(B)], dtype=torch.float64, device=ctx.device)
    tokens, logprobs = sampling_triton.sample(logits, *params, uniforms)
    ref_tokens, ref_logprobs = kernels.sample_reference(logits, *params, uniforms)
    same = tokens == ref_tokens
    err = _err(logprobs[same], ref_logprobs[same]) if bool(same.any()) else float("inf")
    passed = int((~same).sum()) <= 1 and err <= 1e-4
    rows.append([name, f"sample ({int((~same).sum())} of {B} rows differ)", "float32", err, None, passed])
    check(sec, f"{name}: sampled tokens equal the reference's but for a boundary row, logprobs within 1e-4", passed)
    greedy = [torch.zeros(B, device=ctx.device), *params[1:]]
    tokens, _ = sampling_triton.sample(logits, *greedy, uniforms)
    passed = torch.equal(tokens, logits.argmax(-1))
    rows.append([name, "sample, temperature 0", "float32", None, None, passed])
    check(sec, f"{name}: greedy tokens equal the argmax on {B} rows", passed)
