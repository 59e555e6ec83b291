"""Token sampling with per-row temperature, top-k, top-p and min-p, driven by one uniform per row.

Reference (the slow, obviously right twin of `sampling_triton.sample`): sort each row's tempered
probabilities in descending order, cut a prefix of that order (top-k, top-p on the untruncated
distribution, min-p relative to the most likely token; the most likely token always survives),
and pick the first token whose cumulative kept mass exceeds u * (kept mass). The randomness is the
caller's: one uniform per row from that row's own seeded generator, so a row's token depends only
on its own logits, parameters and uniform, never on the rest of the batch.

Temperature 0 means greedy (the first maximal logit). The logprob returned is the token's under
the model's own distribution (temperature 1, no filtering), the quantity verifiers need.
Ties in the sorted order go to the lower token id.
"""

from __future__ import annotations

import torch


def sample_reference(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     min_p: torch.Tensor, uniforms: torch.Tensor):
    """logits (B, V); temperature, top_p, min_p (B,) float; top_k (B,) int, 0 = no limit; uniforms (B,) in [0, 1).

    Returns (tokens (B,) long, logprobs (B,) float32).
    """
    logits = logits.float()
    B, V = logits.shape
    tokens = logits.argmax(-1)
    hot = (temperature > 0).nonzero()[:, 0]
    if hot.numel():
        x = logits[hot] / temperature[hot, None].float()
        probs, order = torch.softmax(x, -1).sort(dim=-1, descending=True, stable=True)  # (R, V)
        rank = torch.arange(V, device=logits.device)[None, :]
        k = top_k[hot, None].long()
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        cut = ((k > 0) & (rank >= k)) | (before >= top_p[hot, None].float())
        cut |= probs < min_p[hot, None].float() * probs[:, :1]
        cut[:, 0] = False  # the most likely token always survives
        kept = probs.masked_fill(cut, 0.0).double()
        cdf = kept.cumsum(-1)
        target = uniforms[hot].double()[:, None] * cdf[:, -1:]
        idx = torch.searchsorted(cdf, target, right=True).clamp_(max=V - 1)
        # rounding at the top end must not land on a cut token: fall back to the last kept one
        last_kept = (kept > 0).long().cumsum(-1).argmax(-1, keepdim=True)
        idx = torch.where(kept.gather(1, idx) > 0, idx, last_kept)
        tokens[hot] = order.gather(1, idx)[:, 0]
    logprobs = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs
