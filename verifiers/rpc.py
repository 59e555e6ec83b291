"""RPC: Perplexity Consistency with Reasoning Pruning (Zhou et al., 2025, "A Theoretical Study on Bridging
Internal Probability and Self-Consistency for LLM Reasoning"), as plain functions over sampled paths.

- A path's probability is exp(mean token logprob) = 1 / perplexity (the paper's code; the total logprob would
  make long paths vanish).
- Reasoning Pruning: the probabilities are modelled as a mixture of two Weibull distributions, fitted by
  maximum likelihood (scipy.stats.weibull_min densities, scipy.optimize.minimize over weight, shapes and
  scales, with the paper's bounds and starting point). The component with the larger mean is the
  high-probability one; a path is pruned when the low component explains it better (posterior above the
  high one's) and its probability is below the mean of all paths.
- Perplexity Consistency: each answer (grouped by equivalence, ttc.verifiers.vote) scores the summed
  probability of its distinct reasoning paths (a path sampled twice counts once, keyed by its text); the
  highest wins, ties going to the answer seen first.

Without pruning this is plain perplexity consistency; with every probability equal it is a vote over distinct
paths. A strategy (ttc.search.rpc) samples the paths and chooses through `rpc_select`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
from scipy import optimize, special, stats

from ttc.verifiers.vote import Vote, vote

__all__ = ["WeibullMixture", "RPCChoice", "path_probability", "fit_weibull_mixture", "prune_low_probability",
           "perplexity_consistency", "rpc_select"]

# the paper's starting point (weight of component 1, shape 1, scale 1, shape 2, scale 2) and bounds
_START = (0.5, 1.0, 1.0, 1.5, 2.0)
_BOUNDS = ((0.2, 0.8), (0.01, None), (0.01, None), (0.01, None), (0.01, None))


@dataclass(frozen=True)
class WeibullMixture:
    """w * Weibull(high) + (1 - w) * Weibull(low), each (shape, scale); `high` has the larger mean."""

    weight: float
    high: tuple[float, float]
    low: tuple[float, float]

    def log_components(self, x) -> np.ndarray:
        """(2, N): log w + log f_high(x), log(1 - w) + log f_low(x)."""
        x = np.asarray(x, dtype=np.float64)
        return np.stack([math.log(self.weight) + stats.weibull_min.logpdf(x, self.high[0], scale=self.high[1]),
                         math.log1p(-self.weight) + stats.weibull_min.logpdf(x, self.low[0], scale=self.low[1])])

    def posterior_high(self, x) -> np.ndarray:
        """(N,): the probability that each x comes from the high component."""
        parts = self.log_components(x)
        return np.exp(parts[0] - special.logsumexp(parts, axis=0))

    def as_dict(self) -> dict:
        return {"weight": self.weight, "high": list(self.high), "low": list(self.low)}


def path_probability(logprob: float, tokens: int) -> float:
    """exp(mean token logprob) of a path of `tokens` tokens whose logprobs sum to `logprob` (1 for no tokens)."""
    return math.exp(logprob / tokens) if tokens else 1.0


def _weibull_logpdf(x: np.ndarray, shape: float, scale: float) -> np.ndarray:
    """log of the Weibull density at positive x, written out: scipy.stats.weibull_min.logpdf's argument checks
    cost ~20x the arithmetic, and the fit evaluates it hundreds of times per problem (tested equal to it)."""
    z = x / scale
    return math.log(shape / scale) + (shape - 1.0) * np.log(z) - z ** shape


def _negative_log_likelihood(params, x: np.ndarray) -> float:
    w, k1, lam1, k2, lam2 = params
    parts = np.stack([math.log(w) + _weibull_logpdf(x, k1, lam1), math.log1p(-w) + _weibull_logpdf(x, k2, lam2)])
    return float(-special.logsumexp(parts, axis=0).sum())


def fit_weibull_mixture(probabilities: Sequence[float]) -> WeibullMixture:
    """The two-Weibull mixture of largest likelihood for positive `probabilities` (L-BFGS-B from the paper's
    starting point, within its bounds: weight in [0.2, 0.8], shapes and scales >= 0.01)."""
    x = np.asarray(probabilities, dtype=np.float64)
    if len(x) == 0 or np.any(x <= 0):
        raise ValueError("a Weibull mixture is fitted to positive probabilities")
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        fit = optimize.minimize(_negative_log_likelihood, _START, args=(x,), method="L-BFGS-B", bounds=_BOUNDS)
    w, k1, lam1, k2, lam2 = (float(v) for v in fit.x)
    first, second = (k1, lam1), (k2, lam2)
    if stats.weibull_min.mean(k1, scale=lam1) >= stats.weibull_min.mean(k2, scale=lam2):
        return WeibullMixture(w, first, second)
    return WeibullMixture(1.0 - w, second, first)


def prune_low_probability(probabilities: Sequence[float]) -> tuple[list[bool], WeibullMixture | None]:
    """(keep per path, the fitted mixture): the paper's Reasoning Pruning. A path is dropped when the low
    component's posterior exceeds the high one's and its probability is below the mean; so the most probable
    path always stays. Fewer than two distinct probabilities: nothing to separate, no fit, all kept."""
    x = np.asarray(probabilities, dtype=np.float64)
    if len(np.unique(x)) < 2:
        return [True] * len(x), None
    mixture = fit_weibull_mixture(x)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        high = mixture.posterior_high(x)
    drop = (high < 0.5) & (x < x.mean())  # posterior high < posterior low, and below the mean
    return [not d for d in drop.tolist()], mixture


def perplexity_consistency(answers: Sequence[str | None], probabilities: Sequence[float],
                           keys: Sequence[Hashable] | None = None, groups: Sequence[int] | None = None) -> Vote:
    """A vote in which each answer group totals the probabilities of its distinct paths: a path whose key (its
    text) was seen before weighs 0. Unanswered paths are in no group. groups: the answers' equivalence groups
    when the caller has them (ttc.verifiers.vote.vote)."""
    seen: set = set()
    weights = []
    for i, p in enumerate(probabilities):
        key = keys[i] if keys is not None else i
        weights.append(0.0 if key in seen else float(p))
        seen.add(key)
    return vote(list(answers), weights, None if groups is None else list(groups))


@dataclass(frozen=True)
class RPCChoice:
    winner: int | None  # the most probable kept path of the winning answer (None: no kept path has an answer)
    keep: list[bool]  # per path: survived pruning
    share: float | None  # the winning answer's share of the kept paths' distinct probability mass
    mixture: WeibullMixture | None  # the fit pruning used (None: not pruned, or nothing to fit)


def rpc_select(answers: Sequence[str | None], probabilities: Sequence[float],
               keys: Sequence[Hashable] | None = None, prune: bool = True,
               groups: Sequence[int] | None = None) -> RPCChoice:
    """Reasoning Pruning (with `prune`), then Perplexity Consistency over the paths that remain. groups: the
    answers' equivalence groups (ttc.verifiers.math.group_equivalent) when the caller has them; any numbering
    of the same partition chooses the same path."""
    keep, mixture = prune_low_probability(probabilities) if prune else ([True] * len(answers), None)
    kept = [i for i, k in enumerate(keep) if k]
    v = perplexity_consistency([answers[i] for i in kept], [probabilities[i] for i in kept],
                               None if keys is None else [keys[i] for i in kept],
                               None if groups is None else [groups[i] for i in kept])
    if v.winner is None:
        return RPCChoice(None, keep, None, mixture)
    group = v.groups[v.winner]
    members = [j for j, g in enumerate(v.groups) if g == group]
    best = max(members, key=lambda j: probabilities[kept[j]])  # ties: the first
    total = sum(v.totals.values())
    return RPCChoice(kept[best], keep, v.totals[group] / total if total > 0 else None, mixture)
