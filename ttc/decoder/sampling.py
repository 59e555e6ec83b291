"""Token sampling: temperature, top-k, top-p, min-p, per-branch seeds, token logprobs.

Randomness is one uniform number per branch per step, drawn from that branch's own generator and
turned into a token by inverse-CDF, in vocabulary order, over the filtered distribution. So a
branch's tokens depend only on its seed and its own logits, not on which other branches share the
batch (up to float32 rounding, see kernels/sampling.py), and a forked child with its own seed is
independent from its first token on. The draw itself is `ttc.kernels.sample`: one PyTorch
reference (kernels/sampling.py) on CPU tensors and its Triton twin on CUDA tensors, both in
vocabulary order, so a seed picks the same token on either.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from ttc import kernels


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


def sample(logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float], lse: torch.Tensor | None = None):
    """logits (B, V) float32 -> (tokens (B,) long, logprobs (B,) float32).

    An adapter over `ttc.kernels.sample` (the PyTorch reference on CPU tensors, the Triton kernel on
    CUDA ones): both draw in vocabulary order, so a seed picks the same token either way up to
    float32 rounding at a boundary. The parameters go over as (B,) tensors: temperature and top-p as
    float64, so that "greedy" and "top-p < 1" are decided on the caller's exact values, min-p and the
    uniforms as float32, the precision of the arithmetic. The logprob reported is the token's under
    the model's own distribution (temperature 1, no filtering), the quantity verifiers and
    likelihood weights need. lse: torch.logsumexp(logits, -1) where the caller has it (GenerationBatch shares
    it with `token_confidence`: one pass over (B, V) instead of two).
    """
    if all(p.temperature == 0 for p in params):  # greedy batches skip building the parameter tensors
        tokens = logits.argmax(dim=-1)
        return tokens, logits.gather(1, tokens[:, None])[:, 0] - (torch.logsumexp(logits, dim=-1) if lse is None else lse)
    # (5, B) float64, moved beside the logits in one copy: temperature and top-p keep the caller's exact values,
    # top-k is an exact integer there, min-p and the uniforms round to float32 as if made in float32
    state = torch.tensor([[p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params],
                          [p.min_p for p in params], list(uniforms)], dtype=torch.float64).to(logits.device)
    temperature, top_k, top_p, min_p, u = state
    return kernels.sample(logits, temperature, top_k.long(), top_p, min_p.float(), u.float(), lse)


def token_confidence(logits: torch.Tensor, k: int, lse: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> (B,) float32: each row's token confidence as DeepConf defines it (Fu et al., 2025), minus
    the mean of the k largest logprobs, under the model's own distribution (temperature 1, no filtering, as the
    reported logprobs). -mean(top_k(logits) - lse) = lse - mean(top_k(logits)): one logsumexp and one top-k
    over the logits the sampler already has, no (B, V) log-softmax (lse: that logsumexp, if the caller has it).
    High when the mass sits on a few tokens."""
    logits = logits.float()
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).values  # (B, k)
    return (torch.logsumexp(logits, dim=-1) if lse is None else lse) - top.mean(dim=-1)
