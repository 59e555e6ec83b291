"""DeepConf, online (Fu et al., 2025, "Deep Think with Confidence"): traces stopped as soon as the model loses
confidence, and a confidence-weighted vote over the rest.

1. `warmup` traces run to the end in one batched decode. The threshold is the `percentile` of their lowest
   group confidences (the lowest mean over `window` consecutive token confidences; ttc.verifiers.confidence):
   percentile 90 is DeepConf-low (only traces as sure as the warm-up's top 10% survive), 10 DeepConf-high
   (the top 90%).
2. The other `n - warmup` traces run in one batched decode with `stop_when=ConfidenceStop(window, threshold)`:
   the engine stops a trace at the first token where its last `window` confidences average below the
   threshold, and releases its KV in that decode step. The tokens it would have drawn after are never drawn,
   so they are not in the ledger.
3. The answer: a vote over the traces that ran to the end with a lowest group confidence at or above the
   threshold (warm-up ones included, as the paper's code), each weighted by that confidence, answers grouped by
   equivalence (ttc.verifiers.vote, through best-of-n's `best_scored`). If none of them states an answer,
   every trace that ran to the end votes.

A fixed `threshold` skips the warm-up (all `n` traces run under it); -inf stops nothing, which makes this a
confidence-weighted vote over n full traces. Limits: no adaptive consensus stop (the paper's optional
early exit once one answer holds a share tau of the vote); a trace shorter than `window` is never stopped
mid-generation, only left out of the vote when its mean confidence is below the threshold.

The tree's history records the threshold, how many traces were stopped, the tokens they drew, and an estimate
of the tokens they saved (each stopped trace's shortfall from the mean length of the traces that ran to the
end, counted only where positive); stopped traces are tree nodes with status "stopped". The candidates are the
traces that ran to the end (each with its lowest group confidence and whether it voted), not the stopped ones:
a stopped trace is not a sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ttc.graph import EARLY_STOP, TOKEN_CONFIDENCE, Branch, ConfidenceStop, Meter, Problem, require
from ttc.result import Result, Tree
from ttc.search.best_of_n import best_scored
from ttc.verifiers.confidence import lowest_group

STOPPED = "stopped"


@dataclass
class DeepConf:
    n: int = 16  # traces in all, the warm-up's included
    warmup: int = 4
    percentile: float = 90.0  # 90: DeepConf-low, 10: DeepConf-high
    window: int = 32  # tokens per group (the paper's 2048 suits 10k-token traces; ours run to hundreds)
    threshold: float | None = None  # fixed: no warm-up

    def __post_init__(self):
        if self.n < 1 or self.window < 1 or not 0 <= self.percentile <= 100:
            raise ValueError("deepconf needs n >= 1, window >= 1 and a percentile in [0, 100]")
        if self.threshold is None and not 1 <= self.warmup <= self.n:
            raise ValueError("deepconf's warmup is at least 1 and at most n (or give a fixed threshold)")
        if self.threshold is not None:
            self.threshold = float(self.threshold)

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        """The verifier is not used: the traces' own confidences select."""
        require(proposer.backend, TOKEN_CONFIDENCE, "strategy=deepconf")
        require(proposer.backend, EARLY_STOP, "strategy=deepconf")
        tree = Tree()
        root = proposer.start(problem, meter)
        tree.add(root, status="root")
        warm: list[Branch] = []
        rest: list[Branch] = []
        try:
            threshold, later = self.threshold, self.n
            if threshold is None:  # one batched decode of warm-up traces, run to the end, sets the threshold
                warm = proposer.propose([root], self.warmup, _share(meter, self.warmup / self.n), to_end=True)
                lows = [lowest_group(b.confidences, self.window) for b in warm]
                threshold = float(np.percentile(lows, self.percentile)) if lows else -math.inf
                later = self.n - self.warmup
            if later > 0:  # one batched decode of the rest, each stopped inside it once its window is unsure
                rest = proposer.propose([root], later, meter, to_end=True,
                                        stop_when=ConfidenceStop(self.window, threshold))
            return self._vote(problem, proposer, meter, tree, (warm, rest), threshold)
        finally:
            proposer.release([root] + warm + rest)

    def _vote(self, problem: Problem, proposer, meter: Meter, tree: Tree, traces: tuple[list, list],
              threshold: float) -> Result:
        warm, rest = traces
        stopped = [b for b in rest if _stopped(b)]
        full = warm + [b for b in rest if not _stopped(b)]
        lows = {b.id: lowest_group(b.confidences, self.window) for b in full}
        answers = {b.id: proposer.answer(b) for b in full}
        for b in stopped:
            tree.add(b, status=STOPPED)
        for b in full:
            tree.add(b, score=lows[b.id], status="final")
        voters = [b for b in full if lows[b.id] >= threshold and answers[b.id] is not None] or full
        mean_full = sum(b.num_tokens for b in full) / len(full) if full else 0.0
        tree.history.append({"threshold": threshold, "warmup": len(warm), "traces": len(warm) + len(rest),
                             "voters": len(voters), "stopped": len(stopped),
                             "stopped_tokens": sum(b.num_tokens for b in stopped),
                             "saved_tokens_estimate": sum(max(0.0, mean_full - b.num_tokens) for b in stopped)})
        result = best_scored("deepconf", problem, proposer, meter, tree, voters, [answers[b.id] for b in voters],
                             [lows[b.id] for b in voters], weighted=True)
        result.details = dict(tree.history[-1])  # the record's: threshold, stopped traces, their tokens
        voted = {b.id for b in voters}  # candidates: every trace that ran to the end (pass@k), voter or not
        result.candidates = [{"answer": answers[b.id], "score": lows[b.id], "voted": b.id in voted} for b in full]
        return result


def _stopped(branch: Branch) -> bool:
    return bool(branch.steps) and branch.steps[-1].finish_reason == STOPPED


def _share(meter: Meter, fraction: float) -> Meter:
    """A meter on the same ledger that may spend only `fraction` of what `meter` can still afford (the warm-up's
    share of a token budget, so the later traces keep theirs); `meter` itself without a token budget."""
    if meter.budget.tokens is None:
        return meter
    cap = meter.ledger.total_tokens + int(max(0.0, meter.affordable_tokens()) * fraction)
    share = Meter(replace(meter.budget, tokens=cap), meter.ledger)
    share.verifier_cost = meter.verifier_cost
    return share


STRATEGY = DeepConf
