"""ttc.kernels: the one place that decides which implementation of each fast path runs.

Triton kernels run on CUDA tensors when Triton is importable; everything else runs the PyTorch
reference, which is also the CPU fast path. `reference()` forces the references (tests, debugging).

| fast path | reference (CPU, oracle) | Triton twin (CUDA) |
| --- | --- | --- |
| decode attention over shared prefixes | `attention.decode_attention` | `attention_triton.decode_attention`; in a CUDA graph `decode_attention_static` (the same kernels over a fixed-capacity table, `static_work_table`) |
| prefill attention (causal, cached prefix) | `attention.prefill_attention` (SDPA, masked, one call per sequence) | none; CUDA: `attention.prefill_attention_batched` (the sequences padded into a few SDPA calls); CPU: `attention.prefill_attention_flash_cpu` |
| RMSNorm (+ residual add) | `norm.rms_norm_reference` | `norm_triton.rms_norm` |
| rotary embedding (in place on request) | `rotary.apply_rotary_reference` | `rotary_triton.apply_rotary` |
| int4 linear (Q4_1 codes) and int8 head (Q8_0), float32 activations, CPU | `quant.Int4Linear.reference`, F.linear on the float head | none; x86 AVX2: `int4_cpu` (C++, built on first use) |
| W4A8: int4 / int8 weights times activations rounded to int8 per group (`dtype=w4a8`), CPU | `quant.w4a8_reference` | none; x86 AVX512-VNNI: `int4_cpu` (`int4_q8_linear`, `int8_q8_linear`) |
| decode attention's private part read in place (the int4 CPU models) | gather + `attention._partial` | none; x86 AVX2: `int4_cpu.paged_partial` |
| a decode layer's work between attention calls (the int4 CPU models) | the model's eager layer | none; x86 AVX2: `int4_cpu.FusedLayer` (same bits) |
| temperature / top-k / top-p / min-p sampling, drawn in vocabulary order | `sampling.sample_reference` | `sampling_triton.sample` |

Prefill attention has no Triton twin yet: on CPU it runs ATen's flash kernel in fixed tiles
(`prefill_attention_flash_cpu`, whose rows do not depend on a cached prefix), on CUDA SDPA over the
sequences padded into groups (`prefill_attention_batched`: a few calls a layer, not one per sequence;
SDPA picks a fused kernel), elsewhere the reference.
Sampling has one PyTorch implementation: the engine's sampler (`ttc.decoder.sampling.sample`) is an
adapter over `sample` below, so a seed draws the same token on CPU and CUDA (up to float32 rounding
at a boundary; see `sampling_triton`).
The Triton modules are imported on the first CUDA call, never on a CPU-only path, so `import ttc`
does not pay for Triton and a test can set TRITON_INTERPRET before the kernels are compiled;
`triton_on_cpu()` then sends CPU tensors through them (the tests' way to run the CUDA hot path).
"""

if __name__ == "kernels":
    # This folder is the package `ttc.kernels` (pyproject.toml maps it). It is reached by the bare name
    # only where a checkout's root is on sys.path (`python -m ...` run there), and there it would shadow
    # Hugging Face's `kernels`, which transformers >= 5.25 imports. Hand the name to whichever package the
    # rest of sys.path holds, as if this folder were not there; where none does, stay an empty module
    # (no version, none of ttc's names), which is what transformers' availability probe expects of a
    # stray folder (raising here would fail its import). Stdlib only: this may run inside transformers'
    # own import.
    import importlib.machinery as _machinery  # underscored: the stand-in must export no names
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _rest_of_path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _checkout]
    _spec = _machinery.PathFinder.find_spec(__name__, _rest_of_path)
    if _spec is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _module  # the import system returns what sys.modules holds once this file ends
        _spec.loader.exec_module(_module)
else:
    from .dispatch import *  # noqa: F401,F403  (the public surface: dispatch.__all__)
    from .dispatch import __all__  # noqa: F401
    from .dispatch import (apply_rotary_reference, decode_attention_reference, prefill_attention_flash_cpu,  # noqa: F401
                           prefill_attention_reference, rms_norm_cpu, rms_norm_reference, sample_reference)
