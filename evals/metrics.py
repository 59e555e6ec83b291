"""Metrics over result records (the dicts in results.jsonl) and over run summaries.

- accuracy: the share of problems whose chosen answer is correct.
- pass@k: the chance that at least one of k samples is correct, estimated without bias from n >= k
  samples of which c are correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k).
- maj@k: the chance that the majority answer of k samples, drawn without replacement from the n,
  is correct; a tie is broken uniformly at random, and k unanswered samples are wrong. Exact.
- coverage: the share of problems with at least one correct sample (pass@n).
- compute per problem: means of the ledger fields; `mean_tokens` (computed tokens) is the x-axis
  of accuracy-versus-compute plots.

A record's samples are its `candidates`: {"answer", "correct", "votes"?}; a candidate with votes
stands for that many samples with the same answer. `samples` in the record counts every sample the
strategy finished, including those without an answer (they count towards n, never towards c).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np

from ttc.budget import Ledger
from ttc.verifiers.math import canonical_key

__all__ = ["pass_at_k", "maj_at_k", "sample_groups", "accuracy", "coverage", "ledger_totals", "summarize",
           "k_values", "accuracy_vs_compute", "LEDGER_FIELDS"]

LEDGER_FIELDS = tuple(f.name for f in dataclasses.fields(Ledger))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1 (n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def maj_at_k(groups: list[tuple[int, bool]], n: int, k: int) -> float:
    """Exact maj@k. groups: (size, correct) per distinct answer; n: all samples, the n - sum(sizes)
    others gave no answer. The expectation is over k-subsets drawn uniformly without replacement."""
    sizes = [s for s, _ in groups]
    unanswered = n - sum(sizes)
    if unanswered < 0 or any(s < 1 for s in sizes):
        raise ValueError(f"group sizes {sizes} must be positive and sum to at most n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"maj@k needs 1 <= k <= n (k={k}, n={n})")
    total = 0.0
    for target, (size, correct) in enumerate(groups):
        if not correct:
            continue
        others = sizes[:target] + sizes[target + 1:]
        for x in range(1, min(size, k) + 1):  # x samples of the target answer drawn
            # ways[m, t]: draws of m samples from the other groups in which none beats x and t tie it
            ways = np.zeros((k - x + 1, len(others) + 1))
            ways[0, 0] = 1.0
            for s in others:
                ways = _add_group(ways, s, x)
            ways = _add_group(ways, unanswered, None)
            ties = ways[k - x] / np.arange(1, len(others) + 2)  # the target wins a t-way tie with chance 1/(t+1)
            total += math.comb(size, x) * float(ties.sum())
    return total / math.comb(n, k)


def _add_group(ways: np.ndarray, size: int, cap: int | None) -> np.ndarray:
    """Fold one more group into ways[m, t]: draw y <= min(size, cap) of it (y == cap is a tie).
    cap None: the unanswered samples, which never compete."""
    out = np.zeros_like(ways)
    rows = ways.shape[0]
    for y in range(0, min(size, rows - 1, cap if cap is not None else size) + 1):
        shifted = ways[: rows - y] * math.comb(size, y)
        if cap is not None and y == cap:
            out[y:, 1:] += shifted[:, :-1]
        else:
            out[y:] += shifted
    return out


def sample_groups(record: dict) -> tuple[int, list[tuple[int, bool]]] | None:
    """(n, [(size, correct) per distinct answer]) of a record; None if its candidates are not graded.

    Answers are grouped by `canonical_key` (1/2, 0.5 and \\frac{1}{2} share one), which is cheap and
    keeps groups a strategy already formed by equivalence (self-consistency's) together. A record
    with samples but no candidates (no sample stated an answer) has n = samples and no groups."""
    candidates = record.get("candidates") or []
    if any("correct" not in c for c in candidates):
        return None
    groups: dict[str, list] = {}
    listed = 0
    for c in candidates:
        votes = int(c.get("votes", 1))
        listed += votes
        key = canonical_key(c.get("answer"))
        if key is None:
            continue
        group = groups.setdefault(key, [0, False])
        group[0] += votes
        group[1] = group[1] or bool(c["correct"])
    n = max(int(record.get("samples") or 0), listed)
    return n, [(size, correct) for size, correct in groups.values()]


def accuracy(records: list[dict]) -> float:
    return sum(bool(r.get("correct")) for r in records) / len(records) if records else 0.0


def coverage(records: list[dict]) -> float | None:
    """The share of problems with at least one correct sample; None if some record's candidates are not graded."""
    if not records or any(sample_groups(r) is None for r in records):
        return None
    return sum(any(c.get("correct") for c in r.get("candidates") or []) for r in records) / len(records)


def ledger_totals(records: Iterable[dict]) -> Ledger:
    """The ledger fields summed over records (peak_kv_bytes: the largest)."""
    return Ledger.sum(Ledger(**{f: r.get(f, 0) for f in LEDGER_FIELDS}) for r in records)


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    return ks + ([n] if n and ks[-1] != n else [])


def summarize(records: list[dict]) -> dict:
    """Accuracy, ledger sums and per-problem means, coverage, pass@k and maj@k (for every k that all
    answered problems have samples for; problems that failed with an error count as wrong)."""
    problems = len(records)
    totals = ledger_totals(records)
    per = max(problems, 1)
    summary = {
        "accuracy": accuracy(records),
        "correct": sum(bool(r.get("correct")) for r in records),
        "problems": problems,
        "errors": sum(1 for r in records if r.get("error")),
        "mean_tokens": totals.computed_tokens / per,
        "mean_reused_tokens": totals.reused_tokens / per,
        "mean_generated_tokens": totals.generated_tokens / per,
        "mean_verifier_tokens": totals.verifier_tokens / per,
        "mean_flops": totals.flops / per,
        "mean_wall_s": totals.wall_s / per,
        **totals.as_dict(),
        "computed_tokens": totals.computed_tokens,
    }
    cover = coverage(records)
    if cover is not None:
        summary["coverage"] = cover
        graded = [sample_groups(r) for r in records]
        sizes = [g[0] for g in graded if g is not None and g[0] > 0]
        if sizes:
            ks = k_values(min(sizes))
            summary["pass@k"] = {str(k): _mean(_pass(g, k) for g in graded) for k in ks}
            summary["maj@k"] = {str(k): _mean(_maj(g, k) for g in graded) for k in ks}
    return summary


def _pass(graded, k: int) -> float:
    if graded is None or graded[0] < k:
        return 0.0
    n, groups = graded
    return pass_at_k(n, sum(size for size, correct in groups if correct), k)


def _maj(graded, k: int) -> float:
    if graded is None or graded[0] < k:
        return 0.0
    n, groups = graded
    return maj_at_k(groups, n, k)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def accuracy_vs_compute(summaries: list[dict], x: str = "mean_tokens") -> dict[str, list[tuple[float, float]]]:
    """{label: [(compute, accuracy), ...] sorted by compute}: one line per strategy (and verifier)."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for s in summaries:
        lines.setdefault(s.get("label") or s.get("strategy") or "run", []).append((float(s[x]), float(s["accuracy"])))
    return {label: sorted(points) for label, points in sorted(lines.items())}
