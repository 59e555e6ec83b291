"""Trace confidence (DeepConf: Fu et al., 2025, "Deep Think with Confidence"): a trace scored by how sure the
model was of its own tokens, with no question asked and no other model.

A token's confidence is minus the mean of the top-k logprobs where it was drawn (k = 20 on the built-in
engine), recorded at sampling time (`Step.confidences`, the TOKEN_CONFIDENCE capability). A trace's
confidence, in the paper's forms:

- `mean`: the average over all its tokens (the paper's "average trace confidence");
- `group`: the mean of the lowest `bottom` fraction of its sliding-window means (windows of `window` tokens,
  stride 1); bottom=1 is the mean over every window, bottom=0.1 the paper's "bottom-10% group confidence";
- `lowest`: the lowest sliding-window mean (the paper's "lowest group confidence", what DeepConf online
  stops on);
- `tail`: the mean of the last `tail` tokens.

A trace shorter than the window is one window: all of it (as the paper's code). Sliding means come from a
float64 cumulative sum: O(tokens) per trace, and within ~1e-12 of the engine's plain window sums.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ttc.graph import TOKEN_CONFIDENCE, Branch, Meter, backend_of, require

__all__ = ["FORMS", "sliding_means", "lowest_group", "trace_confidence", "ConfidenceVerifier"]

FORMS = ("mean", "group", "lowest", "tail")


def sliding_means(confidences: Sequence[float], window: int) -> np.ndarray:
    """(max(1, L - window + 1),) means of every `window` consecutive confidences; one mean of all of them for a
    trace shorter than the window; empty for an empty trace."""
    c = np.asarray(confidences, dtype=np.float64)
    if len(c) == 0:
        return c
    if len(c) <= window:
        return np.array([c.mean()])
    sums = np.concatenate(([0.0], np.cumsum(c)))
    return (sums[window:] - sums[:-window]) / window


def lowest_group(confidences: Sequence[float], window: int) -> float:
    """The lowest sliding-window mean (DeepConf's lowest group confidence); -inf for an empty trace."""
    means = sliding_means(confidences, window)
    return float(means.min()) if len(means) else -math.inf


def trace_confidence(confidences: Sequence[float], form: str = "lowest", window: int = 32, tail: int = 32,
                     bottom: float = 0.1) -> float:
    """One trace's confidence in `form` (see the module docstring); -inf for a trace with no tokens."""
    if form not in FORMS:
        raise ValueError(f"a trace confidence's form is one of {FORMS}, not {form!r}")
    if len(confidences) == 0:
        return -math.inf
    c = np.asarray(confidences, dtype=np.float64)
    if form == "mean":
        return float(c.mean())
    if form == "tail":
        return float(c[-tail:].mean())
    means = sliding_means(c, window)
    if form == "lowest":
        return float(means.min())
    kept = max(1, math.ceil(bottom * len(means)))  # the lowest `bottom` share of the windows, at least one
    return float(np.sort(means)[:kept].mean())


class ConfidenceVerifier:
    """`verifier=confidence`: a branch's score is its trace confidence (higher: surer), in `form` with `window`,
    `tail` and `bottom` as `trace_confidence` takes them. Works on finished traces (best_of_n, weighted or not:
    confidences are positive, so a group's summed score is a confidence-weighted vote) and on partial ones.

    Cost: nothing. The numbers were recorded while the tokens were drawn, from the logits the sampler already
    had; scoring reads them back, so `cost_per_branch` and `cost_per_token` are 0 and the ledger is not charged.

    model: the policy, when the eval passes it: the verifier then fails at once, in one line, on a backend that
    records no token confidences (a remote server without `features.confidence_k`)."""

    cost_per_branch = 0.0
    cost_per_token = 0.0

    def __init__(self, form: str = "lowest", window: int = 32, tail: int = 32, bottom: float = 0.1, model=None):
        if form not in FORMS:
            raise ValueError(f"verifier=confidence's form is one of {FORMS}, not {form!r}")
        if window < 1 or tail < 1 or not 0 < bottom <= 1:
            raise ValueError("verifier=confidence needs window >= 1, tail >= 1 and 0 < bottom <= 1")
        if model is not None:
            require(backend_of(model), TOKEN_CONFIDENCE, "verifier=confidence")
        self.form, self.window, self.tail, self.bottom = form, window, tail, bottom

    def score(self, branches: list[Branch], meter: Meter) -> list[float]:
        return [self.confidence(b) for b in branches]

    def confidence(self, branch: Branch) -> float:
        confidences = branch.confidences
        if branch.num_tokens and len(confidences) != branch.num_tokens:
            raise ValueError(f"verifier=confidence: branch {branch.id} has {branch.num_tokens} generated tokens and "
                             f"{len(confidences)} token confidences; its proposer's backend does not record them "
                             "for every token (TOKEN_CONFIDENCE)")
        return trace_confidence(confidences, self.form, self.window, self.tail, self.bottom)
