"""ttc's own CPU kernels for int4 models with float32 activations (csrc/int4_cpu.cpp, AVX2 + FMA).

Why: on a CPU without fast bfloat16 (AVX2 only), PyTorch's int4 matmul needs bfloat16 activations, which
that CPU emulates, and a one-row decode step reads the weights at ~3 GB/s through it. This kernel unpacks
the 4-bit codes in registers and multiplies them into float32 activations; its slow twin is
`quant.Int4Linear.reference` (the same q * d + m through F.linear), compared in tests/test_int4_cpu.py,
as are the int8 head and the one-pass RMSNorm beside it.

It is compiled on first use with torch.utils.cpp_extension (g++ and ninja; about a minute, then cached in
torch's extension folder) and registers `torch.ops.ttc_cpu.int4_linear`, `int8_linear` and `rms_norm`. Where it cannot run (not x86-64
with AVX2 and FMA, no compiler, a failed build) `available()` is False, one log line says why, and int4
keeps PyTorch's kernel with bfloat16 activations.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "int4_cpu.cpp"
GROUP = 32  # inputs per (scale, minimum) pair: the kernel's one group size


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the pip package's copy is not there unless its venv is active."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:  # the build then fails with its own message, and int4 keeps PyTorch's kernel
            pass


@functools.cache
def available() -> bool:
    """Whether `torch.ops.ttc_cpu.int4_linear` is loaded (building it the first time)."""
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= _cpu_flags():
        log.info("ttc int4 CPU kernel: needs x86-64 with AVX2 and FMA; PyTorch's int4 kernel runs instead")
        return False
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()

        # -fopenmp: at::parallel_for in the kernels is OpenMP's, as in PyTorch's own CPU build
        load("ttc_int4_cpu", [str(SOURCE)], extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a build error: int4 runs PyTorch's kernel instead
        log.warning("ttc int4 CPU kernel did not build (%s); PyTorch's int4 kernel runs instead",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return False

    @torch.library.register_fake("ttc_cpu::int4_linear")
    def _(x, nibbles, d, m):
        return x.new_empty(x.shape[0], nibbles.shape[0])

    @torch.library.register_fake("ttc_cpu::int8_linear")
    def _(x, q, d):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("ttc_cpu::rms_norm")
    def _(x, w, eps):
        return torch.empty_like(x)

    return True


HEAD_ROWS = 16  # up to this many rows the int8 head kernel beats the float32 GEMM (19 against 29 ms at 16 rows)


class Int8HeadLinear:
    """The output head as int8 codes in groups of 32 (w = q * d, GGUF's Q8_0 form) beside its float weight.

    Why: in a one-stream decode step on a CPU the head (49152 x 576 for the embedded model, 113 MB in
    float32) is the largest single read; its int8 codes are 30 MB. Built only where that is exact
    (`exact_from_float`): the embedded model's tied head is Q8_0 in its file, so requantizing its float copy
    recovers the file's codes and scales bit for bit, and the kernel multiplies the same weights. Up to
    HEAD_ROWS rows the kernel runs; more rows (a batch of streams) multiply the float weight, which the tied
    embedding keeps anyway. A row's bits may therefore differ past HEAD_ROWS: batch-invariant models keep
    the plain head.
    """

    __slots__ = ("d", "q", "weight")

    def __init__(self, weight: torch.Tensor, q: torch.Tensor, d: torch.Tensor):
        self.weight, self.q, self.d = weight, q, d

    @classmethod
    def exact_from_float(cls, weight: torch.Tensor) -> Int8HeadLinear | None:
        """Codes q = round(w / d), d = max|w| / 127 per group of 32, if q * d gives w back exactly; else None."""
        n, k = weight.shape
        if weight.dtype != torch.float32 or k % 32 or not available():
            return None
        groups = weight.view(n, k // 32, 32)
        d = groups.abs().amax(dim=-1) / 127  # (N, K/32)
        safe = torch.where(d > 0, d, torch.ones_like(d))
        q = (groups / safe[..., None]).round().clamp(-127, 127)
        if not torch.equal(q * d[..., None], groups):
            return None
        return cls(weight, q.to(torch.int8).view(n, k).contiguous(), d.contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == torch.float32 and x.shape[0] <= HEAD_ROWS:
            return torch.ops.ttc_cpu.int8_linear(x, self.q, self.d)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (T, H) float32 -> RMSNorm(x) * weight in one C++ pass per row; twin: `ttc.kernels.rms_norm_reference`.

    Used by int4 models on ttc's kernels only (ttc/decoder/model.py): its rounding is not PyTorch's."""
    if x.dim() == 2 and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.shape[1] % 8 == 0:
        return torch.ops.ttc_cpu.rms_norm(x, weight, eps)
    from .norm import rms_norm_reference

    return rms_norm_reference(x, weight, eps)
