"""Token sampling: temperature, top-k, top-p, min-p, per-branch seeds, token logprobs.

Randomness is one uniform number per branch per step, drawn from that branch's own generator and
turned into a token by inverse-CDF over the filtered distribution. So a branch's tokens depend only
on its seed and its own logits, not on which other branches share the batch, and a forked child with
its own seed is independent from its first token on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    min_p: float = 0.0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or not 0 <= self.min_p < 1:
            raise ValueError(f"invalid sampling parameters {self}")


def child_seed(seed: int, index: int) -> int:
    """A well-mixed seed for the index-th child of a branch seeded with `seed`."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFFFFFF, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class BranchRng:
    """One branch's random stream: a uniform per sampled token."""

    __slots__ = ("seed", "_rng")

    def __init__(self, seed: int):
        self.seed = seed
        self._rng = random.Random(seed)

    def uniform(self) -> float:
        return self._rng.random()


def sample(logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float]):
    """logits (B, V) float32 -> (tokens (B,) long, logprobs (B,) float32).

    The logprob reported is the token's under the model's own distribution (temperature 1, no
    filtering), the quantity verifiers and likelihood weights need.
    """
    B, V = logits.shape
    lse = torch.logsumexp(logits, dim=-1)  # (B,); one pass instead of a full log_softmax
    if all(p.temperature == 0 for p in params):
        tokens = logits.argmax(dim=-1)
    else:
        tokens = torch.empty(B, dtype=torch.long)
        greedy_rows = [i for i, p in enumerate(params) if p.temperature == 0]
        if greedy_rows:
            tokens[greedy_rows] = logits[greedy_rows].argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if p.temperature > 0]
        sub = logits if len(rows) == B else logits[rows]
        ps = params if len(rows) == B else [params[i] for i in rows]
        u = torch.tensor([uniforms[i] for i in rows], dtype=torch.float32)
        drawn = _sample_rows(sub, ps, u)
        if len(rows) == B:
            tokens = drawn
        else:
            tokens[rows] = drawn
    return tokens, logits.gather(1, tokens[:, None])[:, 0] - lse


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Every row draws in vocabulary order, whatever the other rows ask for.

    Filters (top-k, top-p, min-p) are found in the sorted domain but applied as a mask in vocabulary
    order, so a row's token depends only on its own logits, parameters and uniform, never on which
    other branches share the batch.
    """
    R, V = logits.shape
    temp = torch.tensor([p.temperature for p in params], dtype=torch.float32)[:, None]
    probs = torch.softmax(logits / temp, dim=-1)
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)[:, None]
    if any(p < 1.0 for p in top_p) or any(k > 0 for k in top_k):
        k_max = V if any(p < 1.0 for p in top_p) or any(k == 0 for k in top_k) else max(top_k)
        sorted_probs, order = torch.topk(probs, k_max, dim=-1)  # (R, K) descending
        cut = torch.arange(k_max)[None, :] >= torch.tensor([k if k > 0 else V for k in top_k])[:, None]
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above each token
        cut |= before >= torch.tensor(top_p, dtype=torch.float32)[:, None]
        cut[:, 0] = False  # the most likely token always survives
        keep = torch.zeros(R, V, dtype=torch.bool).scatter_(1, order, ~cut)
        probs = probs.masked_fill(~keep, 0.0)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return _inverse_cdf(probs, u)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs (R, K) unnormalized, u (R,) in [0, 1) -> index (R,) of the first cdf entry above u * total.

    float32 cumsum: its rounding (~1e-7 relative) moves a draw only between neighbouring tokens at
    that resolution, far below any sampling effect; a float64 pass would double the cost.
    """
    cdf = torch.cumsum(probs, dim=-1)
    target = (u * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]
    idx = idx.clamp_(max=probs.shape[1] - 1)
    # never land on a filtered (zero-probability) entry because of rounding at the top end
    zero = probs.gather(1, idx[:, None])[:, 0] <= 0
    if bool(zero.any()):
        last_nonzero = (probs > 0).long().cumsum(-1).argmax(-1)
        idx = torch.where(zero, last_nonzero, idx)
    return idx
