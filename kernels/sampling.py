"""Token sampling with per-row temperature, top-k, top-p and min-p, driven by one uniform per row.

The one PyTorch sampler: the engine's CPU path (`ttc.decoder.sampling.sample` is a thin adapter
over `ttc.kernels.sample`) and the oracle of the Triton twin `sampling_triton.sample`. Both draw
in VOCABULARY order, so the same seed picks the same token on a CPU and a GPU:
1. probs = softmax(logits / T) per sampled row (float32);
2. the filters are found in the sorted (descending) domain and applied as a mask in vocabulary
   order: top-k keeps the k most likely, top-p keeps a token while the mass strictly above it is
   < top_p, min-p keeps probs >= min_p * (the most likely prob); the most likely token always
   survives;
3. the token is the first one, in vocabulary order, whose cumulative kept mass exceeds
   u * (kept mass) (inverse CDF, float32 cumsum); when rounding at the top end finds none, or
   lands on a filtered entry, it is the last kept token.
The randomness is the caller's: one uniform per row from that row's own seeded generator.

Temperature 0 means greedy (the first maximal logit). The logprob returned is the token's under
the model's own distribution (temperature 1, no filtering): logit - logsumexp, the quantity
verifiers and likelihood weights need.

This is the engine's sampler as it was before it moved here, op for op, so fixed-seed runs keep
their tokens bit for bit. That includes two batch-level choices: the sort (top-k / top-p) runs on
every sampled row when any sampled row asks for it, and then a row without those filters still
loses tail tokens whose mass above rounds to >= 1.0 in float32 (below ~1e-7 of the row's mass);
and exactly tied probabilities at a top-k cut are kept in torch.topk's order. The one change: a
top_k above V keeps every token (the old sampler raised there in a batch that only used top-k).
"""

from __future__ import annotations

import torch


def sample_reference(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     min_p: torch.Tensor, uniforms: torch.Tensor, lse: torch.Tensor | None = None):
    """logits (B, V); temperature, top_p, min_p (B,) float; top_k (B,) int, 0 = no limit; uniforms (B,) in [0, 1).

    Returns (tokens (B,) long, logprobs (B,) float32). Parameters may be float64 (the engine passes
    temperature and top_p that way): a row is greedy when temperature == 0 and sorts when top_p < 1,
    both decided in the given dtype; the arithmetic is float32. Parameters may sit on the CPU. lse: the rows'
    torch.logsumexp, where the caller has it already (the same values; computed here otherwise).
    """
    logits = logits.float()
    B = logits.shape[0]
    dev = logits.device
    temperature, top_k, top_p, min_p, uniforms = (t.to(dev) for t in (temperature, top_k, top_p, min_p, uniforms))
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)  # (B,); one pass instead of a full log_softmax
    hot = temperature > 0
    R = int(hot.sum())
    if R == 0:
        tokens = logits.argmax(dim=-1)
    elif R == B:
        tokens = _sample_rows(logits, temperature, top_k, top_p, min_p, uniforms)
    else:  # argmax only where asked: on CPU it costs about as much as the softmax
        tokens = torch.empty(B, dtype=torch.long, device=dev)
        tokens[~hot] = logits[~hot].argmax(dim=-1)
        tokens[hot] = _sample_rows(logits[hot], temperature[hot], top_k[hot], top_p[hot], min_p[hot], uniforms[hot])
    return tokens, logits.gather(1, tokens[:, None])[:, 0] - lse


def _sample_rows(logits, temperature, top_k, top_p, min_p, uniforms) -> torch.Tensor:
    """logits (R, V) float32 and (R,) parameters of sampled rows -> token ids (R,), in vocabulary order."""
    R, V = logits.shape
    probs = torch.softmax(logits / temperature.float()[:, None], dim=-1)
    top_k = top_k.long()
    nucleus = bool((top_p < 1.0).any())
    if nucleus or bool((top_k > 0).any()):
        # a top-k-only batch sorts just its largest k; anything else sorts the whole row
        k_max = V if nucleus or bool((top_k == 0).any()) else min(int(top_k.max()), V)
        sorted_probs, order = torch.topk(probs, k_max, dim=-1)  # (R, K) descending
        cut = torch.arange(k_max, device=logits.device)[None, :] >= torch.where(top_k > 0, top_k, V)[:, None]
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above each token
        cut |= before >= top_p.float()[:, None]
        cut[:, 0] = False  # the most likely token always survives
        keep = torch.zeros(R, V, dtype=torch.bool, device=logits.device).scatter_(1, order, ~cut)
        probs = probs.masked_fill(~keep, 0.0)
    min_p = min_p.float()[:, None]
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return _inverse_cdf(probs, uniforms.float())


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs (R, K) unnormalized, u (R,) in [0, 1) -> index (R,) of the first cdf entry above u * total.

    float32 cumsum (on CPU torch accumulates it in float64 and rounds each entry): its rounding
    (~1e-7 relative) moves a draw only between neighbouring tokens at that resolution, far below
    any sampling effect.
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
