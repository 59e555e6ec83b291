"""ttc's own CPU kernels for int4 models (csrc/int4_cpu.cpp: the float32 linears and norm; csrc/decode_layer.cpp:
the fused decode layer and in-place decode attention, for float32 and bfloat16 activations; AVX2 + FMA).

Why: on a CPU without fast bfloat16 (AVX2 only), PyTorch's int4 matmul needs bfloat16 activations, which
that CPU emulates, and a one-row decode step reads the weights at ~3 GB/s through it. This kernel unpacks
the 4-bit codes in registers and multiplies them into float32 activations; its slow twin is
`quant.Int4Linear.reference` (the same q * d + m through F.linear), compared in tests/test_int4_cpu.py,
as are the int8 head and the one-pass RMSNorm beside it.

It is compiled on first use with torch.utils.cpp_extension (g++ and ninja; about a minute, then cached in
torch's extension folder) and registers `torch.ops.ttc_cpu.int4_linear`, `int8_linear`, `rms_norm`, the
fused layer's `attn_in` and `attn_out_mlp` (and their bfloat16 forms over PyTorch's int4 kernel), and
`paged_attention`, and the W4A8 kernels `int4_q8_linear` and `int8_q8_linear` (csrc/int4_q8.cpp: int8 activations,
AVX512-VNNI integer dot products; `w4a8_available()`). Where it cannot run (not x86-64 with AVX2 and FMA, no compiler, a failed build)
`available()` is False, one log line says why, int4 keeps PyTorch's kernel with bfloat16 activations, and
its layers run eager.
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
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("int4_cpu.cpp", "decode_layer.cpp", "int4_q8.cpp")]  # + int4_cpu.h
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
        # -ffp-contract=off: no FMA the source does not ask for (the fused layer's rotary must round as PyTorch's)
        load("ttc_int4_cpu", [str(path) for path in SOURCES],
             extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", "-ffp-contract=off"],
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a build error: int4 runs PyTorch's kernel instead
        log.warning("ttc int4 CPU kernel did not build (%s); PyTorch's int4 kernel runs instead",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return False

    def linear_shape(x, codes, *scales):  # x (T, K), codes (N, ...) -> (T, N), for every linear op here
        return x.new_empty(x.shape[0], codes.shape[0])

    def w4a8_shape(x, codes, *scales):  # codes (N/16, K/32, bytes): W4A8's column blocks
        return x.new_empty(x.shape[0], codes.shape[0] * W4A8_COLUMNS)

    for name in ("int4_linear", "int8_linear"):
        torch.library.register_fake(f"ttc_cpu::{name}")(linear_shape)
    for name in ("int4_q8_linear", "int8_q8_linear"):
        torch.library.register_fake(f"ttc_cpu::{name}")(w4a8_shape)

    @torch.library.register_fake("ttc_cpu::rms_norm")
    def _(x, w, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("ttc_cpu::attn_in")
    def _(h, nibbles, d, m, bias, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads, w4a8=False):
        return h.new_empty(h.shape[0], num_heads, k_cache.shape[2])

    @torch.library.register_fake("ttc_cpu::attn_out_mlp")
    def _(a, x, *weights_and_eps):
        return torch.empty_like(x), torch.empty_like(x)

    @torch.library.register_fake("ttc_cpu::paged_attention")
    def _(q, k_cache, v_cache, slots, bias, scale):
        return torch.empty_like(q, dtype=torch.float32), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("ttc_cpu::attn_in_bf16")
    def _(h, packed, scales_and_zeros, bias, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads):
        return h.new_empty(h.shape[0], num_heads, k_cache.shape[2])

    @torch.library.register_fake("ttc_cpu::attn_out_mlp_bf16")
    def _(a, x, *weights_and_eps):
        return torch.empty_like(x), torch.empty_like(x)

    return True


W4A8_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c"}  # /proc/cpuinfo's names


@functools.cache
def w4a8_available() -> bool:
    """Whether the W4A8 kernels (csrc/int4_q8.cpp: int8 activations, integer dot products) run here: the
    extension built and the CPU has AVX512-VNNI (the kernels check again and refuse otherwise)."""
    return W4A8_FLAGS <= _cpu_flags() and available()


# W4A8's weight layout (csrc/int4_q8.cpp): column blocks of 16 outputs; per (block, group of 32 inputs) the
# codes as B[k4][c][i] = q[16 * block + c][32 * group + 4 * k4 + i], k4 < 8, c < 16, i < 4 (the order
# vpdpbusd's one-column-per-lane products read), int4 two to a byte (B[j] low, B[256 + j] high).
W4A8_COLUMNS = 16


def w4a8_pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q (N, K) uint8 codes (int4: 0..15; int8: q + 128), N a multiple of 16, K of 32 -> (N/16, K/32, 256 or 512)."""
    n, k = q.shape
    blocks = q.reshape(n // W4A8_COLUMNS, W4A8_COLUMNS, k // GROUP, 8, 4).permute(0, 2, 3, 1, 4)
    flat = blocks.reshape(n // W4A8_COLUMNS, k // GROUP, 512).to(torch.uint8)
    if bits == 8:
        return flat.contiguous()
    return (flat[..., :256] | (flat[..., 256:] << 4)).contiguous()


def w4a8_unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """`w4a8_pack_codes`' inverse: (N/16, K/32, 256 or 512) -> (N, K) uint8."""
    blocks, groups, size = packed.shape
    flat = packed if size == 512 else torch.cat((packed & 0x0F, packed >> 4), dim=-1)
    q = flat.reshape(blocks, groups, 8, W4A8_COLUMNS, 4).permute(0, 3, 1, 2, 4)
    return q.reshape(blocks * W4A8_COLUMNS, groups * GROUP)


def w4a8_pack_scales(s: torch.Tensor) -> torch.Tensor:
    """Per (output, group) scales (N, G) -> (N/16, G, 16): one block's 16 outputs side by side."""
    n, groups = s.shape
    return s.reshape(n // W4A8_COLUMNS, W4A8_COLUMNS, groups).transpose(1, 2).contiguous()


def w4a8_unpack_scales(s: torch.Tensor) -> torch.Tensor:
    """`w4a8_pack_scales`' inverse: (N/16, G, 16) -> (N, G)."""
    return s.transpose(1, 2).reshape(-1, s.shape[1])


HEAD_ROWS = 16  # up to this many rows the int8 head kernel beats the float32 GEMM (19 against 29 ms at 16 rows)


class Int8HeadLinear:
    """The output head as int8 codes in groups of 32 (w = q * d, GGUF's Q8_0 form) beside its float weight.

    Why: in a one-stream decode step on a CPU the head (49152 x 576 for the embedded model, 113 MB in
    float32) is the largest single read; its int8 codes are 30 MB. Built only where that is exact
    (`exact_from_float`): the embedded model's tied head is Q8_0 in its file, so requantizing its float copy
    recovers the file's codes and scales bit for bit, and the kernel multiplies the same weights. Up to
    HEAD_ROWS rows the kernel runs; more rows (a batch of streams) multiply the float weight, which the tied
    embedding keeps anyway. A row's bits may therefore differ past HEAD_ROWS: batch-invariant models keep
    the plain head. (Tried for bfloat16 int4 models on an AMX Xeon, at one row: 2.5 ms a step against the
    bfloat16 head's 2.6, as the int4 layers evict its codes from the cache between steps; not used there.)
    """

    __slots__ = ("d", "q", "weight", "w4a8_codes")

    def __init__(self, weight: torch.Tensor, q: torch.Tensor, d: torch.Tensor, w4a8: bool = False):
        self.weight, self.q, self.d = weight, q, d
        # W4A8 models: the codes + 128 as uint8 (vpdpbusd multiplies unsigned by signed bytes) and d in W4A8's
        # column blocks, every row count; then only these are kept (`reference` unpacks them for the twin)
        self.w4a8_codes = None
        if w4a8 and q.shape[0] % W4A8_COLUMNS == 0:
            self.w4a8_codes = w4a8_pack_codes((q.to(torch.int16) + 128).to(torch.uint8), bits=8)
            self.q, self.d = None, w4a8_pack_scales(d)

    @classmethod
    def exact_from_float(cls, weight: torch.Tensor, w4a8: bool = False) -> Int8HeadLinear | None:
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
        return cls(weight, q.to(torch.int8).view(n, k).contiguous(), d.contiguous(), w4a8=w4a8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.w4a8_codes is not None and x.dim() == 2 and x.dtype == torch.float32:
            # int8 activations too, at any row count: a row's logits do not depend on its batch
            return torch.ops.ttc_cpu.int8_q8_linear(x, self.w4a8_codes, self.d)
        if x.dim() == 2 and x.dtype == torch.float32 and x.shape[0] <= HEAD_ROWS:
            return torch.ops.ttc_cpu.int8_linear(x, self.q, self.d)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.w4a8_codes is not None:
            from .quant import w4a8_reference

            codes = w4a8_unpack_codes(self.w4a8_codes).to(torch.int16) - 128
            return w4a8_reference(x.reshape(-1, x.shape[-1]), codes, w4a8_unpack_scales(self.d),
                                  None).reshape(*x.shape[:-1], -1)
        return torch.nn.functional.linear(x, self.weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (T, H) float32 or bfloat16 -> RMSNorm(x) * weight in one C++ pass per row (float32 math, rounded once);
    twin: `ttc.kernels.rms_norm_reference`.

    Used by int4 models where ttc's kernels build (ttc/decoder/model.py): its rounding is not PyTorch's."""
    if (x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == torch.float32
            and x.shape[1] % 8 == 0):
        return torch.ops.ttc_cpu.rms_norm(x, weight, eps)
    from .norm import rms_norm_reference

    return rms_norm_reference(x, weight, eps)


class FusedLayer:
    """One decoder layer's work between attention calls as two C++ calls, for int4 models.

    `before_attention`: the qkv projection, rotary, and the K/V writes; `after_attention`: o-projection,
    residual, norm, MLP, residual and the next layer's norm. Why: eagerly that is ~20 PyTorch ops from
    Python, whose dispatch at one stream costs about what the layer's matmuls do. Two forms, by the
    activations' dtype: float32 on these kernels (`attn_in`, `attn_out_mlp`; with `w4a8`, their linears quantize
    the activations to int8, as the eager W4A8 linears do), bfloat16 on PyTorch's int4
    kernel (`attn_in_bf16`, `attn_out_mlp_bf16`, the same ATen calls as the eager layer, made from C++).
    Each does the eager layer's arithmetic in its order (csrc/decode_layer.cpp says how), so the eager layer
    is its twin: the model's `fused = None` runs it, and tests/test_int4_cpu.py checks the two give the same bits.
    """

    __slots__ = ("qkv", "o", "gate_up", "down", "mlp_norm", "next_norm", "num_heads", "num_kv_heads", "eps",
                 "bf16", "w4a8")

    def __init__(self, layer: dict, next_norm: torch.Tensor, num_heads: int, num_kv_heads: int, eps: float,
                 bf16: bool):
        self.qkv, self.o, self.gate_up, self.down = (layer[k] for k in ("qkv", "o", "gate_up", "down"))
        self.mlp_norm, self.next_norm = layer["mlp_norm"].float().contiguous(), next_norm.float().contiguous()
        self.num_heads, self.num_kv_heads, self.eps, self.bf16 = num_heads, num_kv_heads, float(eps), bf16
        self.w4a8 = bool(getattr(self.qkv, "w4a8", False))  # build_all: all of a model's linears or none

    @classmethod
    def build_all(cls, layers: list[dict], final_norm: torch.Tensor, num_heads: int, num_kv_heads: int,
                  eps: float, dtype: torch.dtype = torch.float32) -> list[FusedLayer] | None:
        """The model's layers fused for activations in `dtype`, or None unless every linear is int4 on the
        kernel that dtype takes (float32: `d` set, ttc's; bfloat16: `packed` set, PyTorch's) and only qkv
        has a bias, with H a multiple of 8 (the kernels' shapes)."""
        if dtype not in (torch.float32, torch.bfloat16) or final_norm.shape[0] % 8 or not available():
            return None
        weight = "packed" if dtype == torch.bfloat16 else "d"

        def on_kernel(lin, bias_ok: bool) -> bool:
            return getattr(lin, weight, None) is not None and (bias_ok or getattr(lin, "bias", None) is None)

        for layer in layers:
            others = (layer[k] for k in ("o", "gate_up", "down"))
            if not (on_kernel(layer["qkv"], True) and all(on_kernel(lin, False) for lin in others)):
                return None
        if len({getattr(layer[k], "w4a8", False) for layer in layers for k in ("qkv", "o", "gate_up", "down")}) > 1:
            return None  # W4A8 and float32 int4 linears mixed: the eager layers run
        norms = [layer["attn_norm"] for layer in layers[1:]] + [final_norm]
        return [cls(layer, norm, num_heads, num_kv_heads, eps, dtype == torch.bfloat16)
                for layer, norm in zip(layers, norms)]

    def before_attention(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """h (T, H), the rows' rotary cos and sin (T, D/2), one layer's caches (S, Hkv, D), slots (T,)
        -> q (T, Hq, D)."""
        qkv = self.qkv
        if self.bf16:
            return torch.ops.ttc_cpu.attn_in_bf16(h, qkv.packed, qkv.scales_and_zeros, qkv.bias, cos, sin, k_cache,
                                                  v_cache, slots, self.num_heads, self.num_kv_heads)
        bias = None if qkv.bias is None else qkv.bias.float()
        return torch.ops.ttc_cpu.attn_in(h, qkv.nibbles, qkv.d, qkv.m, bias, cos, sin, k_cache, v_cache, slots,
                                         self.num_heads, self.num_kv_heads, self.w4a8)

    def after_attention(self, a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a (T, Hq*D) attention output, x (T, H) residual stream -> (the new x, the next norm of it)."""
        o, gu, down = self.o, self.gate_up, self.down
        if self.bf16:
            return torch.ops.ttc_cpu.attn_out_mlp_bf16(a, x, o.packed, o.scales_and_zeros, self.mlp_norm, gu.packed,
                                                       gu.scales_and_zeros, down.packed, down.scales_and_zeros,
                                                       self.next_norm, self.eps)
        return torch.ops.ttc_cpu.attn_out_mlp(a, x, o.nibbles, o.d, o.m, self.mlp_norm, gu.nibbles, gu.d, gu.m,
                                              down.nibbles, down.d, down.m, self.next_norm, self.eps, self.w4a8)


def paged_partial(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  bias: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The private part of decode attention read where the keys lie: q (b, Hkv, G, D) float32 or bfloat16 (the
    caches' dtype), slots (b, P), bias (b, 1, 1, P) float32 or bfloat16 -> (o (b, Hkv, G, D), lse (b, Hkv, G));
    ttc.kernels.attention's `_partial` on gathered keys is its twin. The decode path of int4 models on these kernels (ttc/decoder/model.py)."""
    b, p = slots.shape
    return torch.ops.ttc_cpu.paged_attention(q, k_cache, v_cache, slots, bias.reshape(b, p), scale)
