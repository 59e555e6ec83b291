"""Rotary position embedding (half-split layout, as transformers' rotate_half), applied to new tokens.

cos and sin are (T, D/2) rows of a table precomputed in float64 and stored in float32.
Reference: for x = [x1, x2] (halves of the head dim), out = [x1*cos - x2*sin, x2*cos + x1*sin].
"""

from __future__ import annotations

import torch


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D); cos, sin (T, D/2). Returns a new tensor in x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D/2) cos, sin -> (T, 1, D) [cos, cos] and [-sin, sin], built once per forward for every layer."""
    return torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]


def apply_rotary_tables(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """The CPU fast path: x * [cos, cos] + roll(x, D/2) * [-sin, sin] in float32 is the reference's
    arithmetic exactly (bit-identical, tests/test_kernels_cpu.py) in 4-6 ops instead of 10."""
    xf = x.float()
    return (xf * cos_full + xf.roll(x.shape[-1] // 2, -1) * sin_signed).to(x.dtype)
