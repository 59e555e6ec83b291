"""Weight-only quantized linears for decode (issue #14): int8 per output channel and int4 in groups of 32.

Why: a decode step of a small model on a CPU reads every weight once per step, so its speed follows the
bytes read. int8 halves the bytes of a bfloat16 weight, int4 quarters them. Both run PyTorch's own CPU
kernels, which dequantize in registers and accumulate in float32; activations, the KV cache and the
outputs stay bfloat16 (weight-only quantization).

Formats (N outputs, K inputs):
- `Int8Linear`: w ~= q * scale, q int8 (N, K) in [-127, 127], scale (N,) = max|w_row| / 127 rounded to
  bfloat16. Kernel: `aten._weight_int8pack_mm(x (T, K), q, scale)`, scale in x's dtype.
- `Int4Linear`: w ~= q * d + m per (row, group of 32 inputs), q in 0..15. The kernel
  `aten._weight_int4pack_mm_for_cpu` computes (q - 8) * scale + zero from bfloat16 (scale, zero) pairs
  (K/32, N, 2), so scale = d and zero = m + 8d, both rounded to bfloat16; the weight is packed once at load
  (`_convert_weight_to_int4pack_for_cpu`, a layout that depends on the CPU's vector width: never save it).
  `from_q4_1` takes a GGUF's Q4_1 blocks (d, m float16 in the file): the weights are the file's exactly up
  to that bfloat16 rounding of d and m + 8d (relative 2^-8 each), so a weight moves by at most
  2^-8 * (8d + |m + 8d|) (in the embedded model's layers at most 0.05 d, mean 0.005 d; the grid step is d).

On a CPU without fast bfloat16 the int4 mode runs float32 activations instead, on ttc's own C++ kernel
(`Int4Linear.use_float32_kernel`, kernels/int4_cpu.py), with the file's d and m unrounded.

Each class has the slow twin `reference(x)`: F.linear in float32 with the dequantized weight the kernel
reads (bfloat16 scales included; every dequantized value is exact in float32 as the kernel's), cast to x's
dtype, so fast and reference differ only in accumulation order. `weight` is that dequantized weight; reading
it dequantizes the whole matrix (a reader that wants a few rows, like the PRM's head, pays for all of them).

Limits, found on torch 2.13 (x86, AVX512) and by reading its kernels; anything outside them runs the
reference (correct, but it dequantizes the whole weight on every call), never an error:
- both fast paths take bfloat16 activations only (float32/float16 run scalar loops in PyTorch), 2-D, CPU;
- int8: K % 16 == 0 for bfloat16. The AVX512/AVX2 kernels read 16/8 columns at a time with aligned loads
  and no tail: another K, or an x whose data is not 32-byte aligned, is a segmentation fault, not an error.
  Inputs that are not contiguous and aligned are copied first (a fresh tensor is 64-byte aligned);
- int4: N % 16 == 0, K % group == 0, group in 32/64/128/256 (the op checks these and raises);
- under torch.compile (`parts()`) the int8 alignment copy is skipped: inductor's buffers are 64-byte
  aligned, and graph inputs are assumed to be fresh tensors (attention outputs, norm outputs).

The head and the embedding (a choice, not measured): the embedding lookup stays in the model's dtype (a
gather reads one row per token: nothing to gain), and so does the head in every int mode
(ttc/decoder/model.py): it is where near-ties between tokens are decided, and the PRM reads rows of its
weight. llama.cpp runs the embedded GGUF's tied head in the file's Q8_0, so ttc's int modes read ~57 MB
(bfloat16, 49152 x 576, a fifth of SmolLM2-135M's weights) where llama.cpp reads ~30 MB per step; an int8
head is what would close that part of the gap. `quantize_linear` quantizes what it is given.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import int4_cpu
from .linear import Linear

log = logging.getLogger(__name__)

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes the int4 kernel accepts


def _op(name: str):
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):  # an older torch without this kernel: the reference runs
        return None


_INT8_MM = _op("_weight_int8pack_mm")
_INT4_MM, _INT4_PACK = _op("_weight_int4pack_mm_for_cpu"), _op("_convert_weight_to_int4pack_for_cpu")


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """t itself if contiguous and 64-byte aligned, else a contiguous copy (new CPU storage is 64-byte aligned)."""
    return t if t.is_contiguous() and t.data_ptr() % 64 == 0 else t.clone(memory_format=torch.contiguous_format)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


# ---------------------------------------------------------------------------------------------
# int8, per output channel


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (T, K) bfloat16, q (N, K) int8, scales (N,) bfloat16 -> (T, N). Needs K % 16 == 0 (see the module notes)."""
    if not torch.compiler.is_compiling() and (not x.is_contiguous() or x.data_ptr() % 32):
        x = x.clone(memory_format=torch.contiguous_format)  # the kernel's aligned loads would fault
    return _add_bias(_INT8_MM(x, q, scales), bias)


def int8_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _add_bias(F.linear(x.float(), q.float() * scales.float()[:, None]).to(x.dtype), bias)


class Int8Linear:
    """y = x @ (q * scale[:, None]).T + bias, q int8 (N, K) and scale (N,) bfloat16."""

    __slots__ = ("bias", "fast", "q", "scales")

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        self.q, self.scales, self.bias = _fresh(q), scales.to(torch.bfloat16).contiguous(), bias
        self.fast = _INT8_MM is not None and q.device.type == "cpu" and q.shape[1] % 16 == 0

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Symmetric per row: the scale is rounded to bfloat16 first, so q is chosen for the scale the kernel uses."""
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127).bfloat16().float()  # (N,)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row: q = 0
        q = (w / safe[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q, scales, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and x.dtype == torch.bfloat16 and x.dim() == 2 and x.device.type == "cpu":
            return int8_linear(x, self.q, self.scales, self.bias)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return int8_reference(x, self.q, self.scales, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (N, K) float32 (a full dequantization per read)."""
        return self.q.float() * self.scales.float()[:, None]

    def parts(self):
        """(function, tensors) with function(x, *tensors) == self(x) for 2-D bfloat16 x (ttc/decoder/compiled.py)."""
        return (int8_linear if self.fast else int8_reference), (self.q, self.scales, self.bias)


# ---------------------------------------------------------------------------------------------
# int4, asymmetric in groups along K


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x (T, K) bfloat16, packed from `_convert_weight_to_int4pack_for_cpu`, scales_and_zeros (K/g, N, 2) -> (T, N)."""
    group = x.shape[1] // scales_and_zeros.shape[0]
    return _add_bias(_INT4_MM(x.contiguous(), packed, group, scales_and_zeros), bias)


def int4_float32_linear(x: torch.Tensor, nibbles: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """x (T, K) float32, nibbles (N, K/2), d and m (N, K/32) float32 -> (T, N), w = q * d + m per group of 32:
    ttc's own kernel (kernels/int4_cpu.py)."""
    return _add_bias(torch.ops.ttc_cpu.int4_linear(x, nibbles, d, m), bias)


def w4a8_reference(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The W4A8 kernels' twin (csrc/int4_q8.cpp): x (T, K) float32 quantized to int8 per group of 32
    (d_x = max|x| / 127, q_x = round-half-even(x * (1 / d_x))), times integer codes (N, K) (int4: 0..15 with
    w = q * d + m; int8: -127..127 with w = q * d, m None), d and m (N, K/32) (float16 or float32) -> (T, N).

    The per-group integer sums are exact here and there; only the order of the float sum over groups
    differs, so the two agree to float32 rounding (tests/test_int4_q8.py)."""
    t, k = x.shape
    n, groups = codes.shape[0], k // int4_cpu.GROUP
    xg = x.float().view(t, groups, int4_cpu.GROUP)
    dx = xg.abs().amax(dim=-1) / 127  # (T, G)
    inv = 1 / torch.where(dx != 0, dx, torch.ones_like(dx))
    inv = torch.where((dx != 0) & inv.isfinite(), inv, torch.zeros_like(inv))  # tiny groups: zero codes
    qx = torch.round(xg * inv[..., None])  # (T, G, 32), integers in -127..127
    qw = codes.view(n, groups, int4_cpu.GROUP).double()
    isum = torch.einsum("tgk,ngk->tng", qx.double(), qw).float()  # exact: |sums| < 2^24
    y = (d.float()[None] * dx[:, None, :] * isum).sum(dim=-1)
    if m is not None:
        y = y + (m.float()[None] * (dx * qx.sum(dim=-1))[:, None, :]).sum(dim=-1)
    return _add_bias(y, bias)


def int4_w4a8_linear(x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """x (T, K) float32 quantized to int8 per group, times the int4 codes with integer dot products (W4A8,
    csrc/int4_q8.cpp); packed (N/16, K/32, 256), d and m (N/16, K/32, 16) float16 in W4A8's column blocks
    (int4_cpu.w4a8_pack_codes): `w4a8_reference` is its twin."""
    return _add_bias(torch.ops.ttc_cpu.int4_q8_linear(x, packed, d, m), bias)


def _int4_w4a8_reference(x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """`int4_w4a8_linear`'s arguments (W4A8's column blocks, int4_cpu.w4a8_pack_codes) -> its twin's result."""
    return w4a8_reference(x, int4_cpu.w4a8_unpack_codes(packed), int4_cpu.w4a8_unpack_scales(d),
                          int4_cpu.w4a8_unpack_scales(m), bias).to(x.dtype)


def _unpack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8, even columns in the low nibble -> q (N, K) uint8 in 0..15."""
    return torch.stack((nibbles & 0x0F, nibbles >> 4), dim=-1).reshape(nibbles.shape[0], -1)


def int4_dequantize(nibbles: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The weight (N, K) float32 the int4 kernel reads: (q - 8) * scale + zero, per (row, group).

    (q - 8) * scale is exact in float32 (4 x 8 significant bits), so the one rounding of the sum is the
    kernel's fused multiply-add."""
    q = _unpack_nibbles(nibbles)
    group = q.shape[1] // scales_and_zeros.shape[0]
    sz = scales_and_zeros.float().transpose(0, 1).repeat_interleave(group, dim=1)  # (N, K, 2)
    return (q.float() - 8) * sz[..., 0] + sz[..., 1]


def int4_reference(x: torch.Tensor, nibbles: torch.Tensor, scales_and_zeros: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    w = int4_dequantize(nibbles, scales_and_zeros)[:, : x.shape[-1]]  # a padded last group (from_float)
    return _add_bias(F.linear(x.float(), w).to(x.dtype), bias)


class Int4Linear:
    """y = x @ w.T + bias with w = (q - 8) * scale + zero per (row, group of inputs), q in 0..15.

    Stored: the nibbles (N, K/2) for the reference and `weight`, the kernel's packed copy (N, K/2) (None where
    the kernel refuses the shape), scales_and_zeros (K/group, N, 2) bfloat16: about 1.1 bytes a weight. After
    `use_w4a8_kernel`, `nibbles`, `d` and `m` hold W4A8's column blocks instead (int4_cpu.w4a8_pack_codes).
    """

    __slots__ = ("bias", "d", "in_features", "m", "nibbles", "packed", "scales_and_zeros", "w4a8")

    def __init__(self, q: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None = None,
                 in_features: int | None = None):
        """q (N, Kp) uint8 in 0..15 with Kp a multiple of the group; in_features K <= Kp (default Kp)."""
        n, kp = q.shape
        groups = scales_and_zeros.shape[0]
        if kp % groups or kp % 2 or scales_and_zeros.shape[1:] != (n, 2):
            raise ValueError(f"int4: q {tuple(q.shape)} does not fit scales_and_zeros {tuple(scales_and_zeros.shape)}")
        self.nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).contiguous()
        self.scales_and_zeros = scales_and_zeros.to(torch.bfloat16).contiguous()
        self.bias, self.in_features = bias, kp if in_features is None else in_features
        self.packed = self.d = self.m = None  # d, m: ttc's float32 kernel's form (`use_float32_kernel`)
        self.w4a8 = False  # float32 activations quantized to int8 per group (`use_w4a8_kernel`)
        if (_INT4_MM is not None and q.device.type == "cpu" and n % 16 == 0 and kp // groups in INT4_GROUPS
                and self.in_features == kp):
            try:
                self.packed = _INT4_PACK(q.to(torch.int32).contiguous(), 2)  # inner_k_tiles: ignored on CPU
            except RuntimeError:  # a constraint this torch adds: the reference runs
                self.packed = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   group_size: int = 32) -> Int4Linear:
        """Min/max per (row, group): d = (max - min) / 15 rounded to bfloat16, zero = bf16(min + 8d), then
        q = round((w - (zero - 8d)) / d) clamped to 0..15 (q chosen for the grid the kernel uses; d = 0 for a
        constant group, whose value is then zero itself). K not a multiple of the group size: the last group is
        padded by repeating the last column (min/max unchanged), and the layer runs the reference."""
        if group_size % 2:
            raise ValueError(f"int4 group size must be even, not {group_size}")
        w = weight.float()
        n, k = w.shape
        kp = -(-k // group_size) * group_size
        w = torch.cat([w, w[:, -1:].expand(n, kp - k)], dim=1) if kp > k else w
        wg = w.reshape(n, kp // group_size, group_size)
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, G)
        d = ((hi - lo) / 15).bfloat16().float()
        zero = (lo + 8 * d).bfloat16().float()
        safe = torch.where(d > 0, d, torch.ones_like(d))
        q = ((wg - (zero - 8 * d)[..., None]) / safe[..., None]).round().clamp(0, 15)
        q = torch.where(d[..., None] > 0, q, 0.0).to(torch.uint8).reshape(n, kp)
        return cls(q, torch.stack((d, zero), dim=-1).transpose(0, 1), bias, in_features=k)

    @classmethod
    def from_q4_1(cls, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                  bias: torch.Tensor | None = None) -> Int4Linear:
        """GGUF Q4_1 blocks: q (N, K) uint8 in 0..15, d and m (N, K/32) float32; w = q * d + m per block."""
        zero = m.float() + 8 * d.float()  # q * d + m == (q - 8) * d + (m + 8d)
        return cls(q, torch.stack((d.float(), zero), dim=-1).transpose(0, 1), bias)

    def use_float32_kernel(self, exact_dm: tuple[torch.Tensor, torch.Tensor] | None = None) -> bool:
        """Run float32 activations on ttc's own kernel (kernels/int4_cpu.py) from now on, if it can take this
        weight (groups of 32, no padded group, the kernel built here). Keeps w = q * d + m per group in
        float32: exact_dm, a GGUF's own (d, m) (N, K/32) for the q this linear was made from (so w is the
        file's weight exactly, without the bfloat16 rounding PyTorch's kernel needs), else d = scale,
        m = zero - 8 * scale. Drops
        PyTorch's packed copy, which only bfloat16 activations use; `reference` and `weight` then read the
        same (d, m). Returns whether it did."""
        groups = self.scales_and_zeros.shape[0]
        if self.nibbles.shape[1] * 2 != groups * int4_cpu.GROUP or self.in_features != groups * int4_cpu.GROUP:
            return False
        if not int4_cpu.available():
            return False
        if exact_dm is not None:
            self.d, self.m = (t.float().contiguous() for t in exact_dm)
        else:
            sz = self.scales_and_zeros.float()  # (G, N, 2)
            self.d = sz[..., 0].t().contiguous()  # (N, G)
            self.m = (sz[..., 1] - 8 * sz[..., 0]).t().contiguous()
        self.packed = None
        return True

    def use_w4a8_kernel(self, exact_dm: tuple[torch.Tensor, torch.Tensor] | None = None) -> bool:
        """`use_float32_kernel`, then quantize the float32 activations to int8 per group of 32 and multiply with
        integer dot products (W4A8: csrc/int4_q8.cpp, AVX512-VNNI), if this CPU has them. The weight stays the
        same; the activations' rounding is what changes, so `reference` becomes `w4a8_reference` (the same
        quantization in PyTorch). Returns whether it did."""
        if (not int4_cpu.w4a8_available() or self.nibbles.shape[0] % int4_cpu.W4A8_COLUMNS
                or not self.use_float32_kernel(exact_dm)):
            return False
        # the codes, d and m in the kernel's column blocks (int4_cpu.w4a8_pack_codes), kept instead of the row
        # form; d and m in float16, as a GGUF's Q4_1 blocks store them (exact there; rounded once otherwise, and
        # the twin and `weight` read the same rounded values): at one stream the layers are bound by bytes read
        self.nibbles = int4_cpu.w4a8_pack_codes(_unpack_nibbles(self.nibbles), bits=4)
        self.d, self.m = int4_cpu.w4a8_pack_scales(self.d.half()), int4_cpu.w4a8_pack_scales(self.m.half())
        self.w4a8 = True
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.d is not None and x.dtype == torch.float32 and x.dim() == 2 and x.device.type == "cpu":
            if self.w4a8:
                return int4_w4a8_linear(x, self.nibbles, self.d, self.m, self.bias)
            return int4_float32_linear(x, self.nibbles, self.d, self.m, self.bias)
        if self.packed is not None and x.dtype == torch.bfloat16 and x.dim() == 2 and x.device.type == "cpu":
            return int4_linear(x, self.packed, self.scales_and_zeros, self.bias)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.w4a8:
            return _int4_w4a8_reference(x.reshape(-1, x.shape[-1]), self.nibbles, self.d, self.m,
                                        self.bias).reshape(*x.shape[:-1], -1)
        if self.d is not None:
            return _add_bias(F.linear(x.float(), self.weight).to(x.dtype), self.bias)
        return int4_reference(x, self.nibbles, self.scales_and_zeros, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (N, K) float32 (a full dequantization per read)."""
        if self.d is not None:  # q * d + m, the float32 kernel's weight (W4A8's: read from its column blocks)
            if self.w4a8:
                q, d, m = (int4_cpu.w4a8_unpack_codes(self.nibbles), int4_cpu.w4a8_unpack_scales(self.d),
                           int4_cpu.w4a8_unpack_scales(self.m))
            else:
                q, d, m = _unpack_nibbles(self.nibbles), self.d, self.m
            return (q.float().unflatten(1, (-1, int4_cpu.GROUP)) * d.float()[..., None] + m.float()[..., None]).flatten(1)
        return int4_dequantize(self.nibbles, self.scales_and_zeros)[:, : self.in_features]

    def parts(self):
        """(function, tensors) with function(x, *tensors) == self(x) for 2-D x in the model's activation dtype
        (ttc/decoder/compiled.py): float32 after `use_float32_kernel`, else bfloat16."""
        if self.w4a8:
            return int4_w4a8_linear, (self.nibbles, self.d, self.m, self.bias)
        if self.d is not None:
            return int4_float32_linear, (self.nibbles, self.d, self.m, self.bias)
        if self.packed is not None:
            return int4_linear, (self.packed, self.scales_and_zeros, self.bias)
        return int4_reference, (self.nibbles, self.scales_and_zeros, self.bias)


# ---------------------------------------------------------------------------------------------


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str, q4_1=None,
                    activations: torch.dtype = torch.bfloat16):
    """The linear for a weight format: "plain" (also "bfloat16", "none": the weight as given), "int8", "int4" or
    "w4a8" (int4 weights, float32 activations quantized to int8 per group on the way in: `use_w4a8_kernel`).

    weight (N, K), ideally float32 (quantizing a bfloat16 copy adds its rounding); bias (N,) in the activations'
    dtype. For int4, q4_1 = (q, d, m) from `ttc.decoder.weights.load_gguf_q4_1` uses the file's blocks instead
    of requantizing the dequantized weight (which would round a second time). activations: the dtype the
    linear will be called with; int4 with float32 runs ttc's own CPU kernel (kernels/int4_cpu.py).
    """
    if mode in ("plain", "bfloat16", "none"):
        return Linear(weight, bias)
    if mode == "int8":
        return Int8Linear.from_float(weight, bias)
    if mode in ("int4", "w4a8"):
        lin = Int4Linear.from_q4_1(*q4_1, bias=bias) if q4_1 is not None else Int4Linear.from_float(weight, bias)
        exact_dm = q4_1[1:] if q4_1 is not None else None
        if mode == "w4a8" and not int4_cpu.w4a8_available():
            raise ValueError("w4a8 needs ttc's CPU kernels with AVX512-VNNI (this CPU or build lacks them); use int4")
        if mode == "w4a8" and not lin.use_w4a8_kernel(exact_dm):
            # a shape ttc's kernels refuse (K not a multiple of 32, a padded group, N not a multiple of W4A8's
            # 16-output blocks): this linear runs its float32 reference, and the model's layers run eager
            # (FusedLayer.build_all)
            log.warning("w4a8: a %s linear runs its float32 reference (a shape the kernel refuses)",
                        tuple(weight.shape))
        if mode == "int4" and activations == torch.float32:  # where it cannot, float32 activations run the reference
            lin.use_float32_kernel(exact_dm=exact_dm)
        return lin
    raise ValueError(f"weight format {mode!r} is not one of plain, int8, int4, w4a8")
