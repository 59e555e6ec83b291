"""Efficient Tree Search (ETS; Hooper et al. 2025, "ETS: Efficient Tree Search for Inference-Time Scaling").

ETS is a selector: of the candidate branches a search round produced, keep the ones that earn their
KV. It solves a small integer program (scipy's `milp`, HiGHS) over the candidates:

    maximize   sum_i v_i x_i  -  lambda_kv * sum_n y_n  +  lambda_coverage * sum_c z_c
    subject to y_n >= x_i   for every tree node n on candidate i's path (the candidate itself and its
                            ancestors, the shared root excluded)
               z_c <= sum_{i in cluster c} x_i,   z_c <= 1
               1 <= sum_i x_i <= k,   x binary, 0 <= y, z <= 1

x_i keeps candidate i; y_n says tree node n (one step's KV) must stay in memory, and a node shared by
several kept candidates is paid for once, which is how the program rewards KV sharing; z_c says
semantic cluster c is covered by some kept candidate, which keeps different lines of reasoning
alive. y and z need not be declared integral: with nonnegative lambdas an optimum puts them at
max(x) and min(1, sum x), which are integral.

Rewards: v = N * softmax(score / temperature) over the N candidates (mean 1, so the lambdas are in
units of "one average candidate": a node costs lambda_kv of it, a covered cluster is worth
lambda_coverage of it), plus a tie-break of at most 1e-3 that orders equal scores like `TopK` does.
Every v is positive, so with both lambdas 0 the program keeps exactly the top k. The paper normalizes
its terms differently (per node by the candidate count, per cluster by the cluster count, rewards by
REBASE's allocation); the trade-off it expresses is the same.

Clusters: the latest step of each candidate is embedded, by default with the policy model's own
hidden states (the mean of the final-norm hidden states over the step's tokens, computed by running
the step again on a scratch fork of the parent's KV: one verifier token per step token, which
`cost_per_token` declares so strategies reserve it in the budget), or by `embed_fn(branches, meter)`;
candidates are then grouped by average-linkage clustering on cosine distance cut at
`cluster_threshold`. Candidates that cannot be embedded (no step, their parent's KV already released,
or a budget that cannot pay for the embedding) count as clusters of their own.

`STRATEGY` here is beam search with this selector, so `strategy=ets` runs ETS end to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar, Iterable

import numpy as np

from ttc.graph import HIDDEN_STATES, Branch, Meter, Scored, require
from ttc.search.beam import Beam, TopK, rank_scores

TIE_BREAK = 1e-3


@dataclass(frozen=True)
class KeepProgram:
    """One ETS selection problem: which candidates to keep."""

    values: tuple[float, ...]  # v_i, the reward of keeping candidate i
    paths: tuple[tuple[int, ...], ...]  # the tree nodes (branch ids) candidate i needs in memory
    clusters: tuple[int, ...]  # candidate i's semantic cluster, 0..K-1
    k: int
    lambda_kv: float
    lambda_coverage: float

    def objective(self, keep: Iterable[int]) -> float:
        keep = set(keep)
        nodes = set().union(*(self.paths[i] for i in keep)) if keep else set()
        covered = {self.clusters[i] for i in keep}
        return sum(self.values[i] for i in keep) - self.lambda_kv * len(nodes) + self.lambda_coverage * len(covered)

    def solve(self, node_limit: int = 20_000) -> list[int]:
        """The indices of the candidates to keep, best value first.

        The branch-and-bound stops at `node_limit` nodes, not at a wall-clock limit: a run's keep sets
        must not depend on how loaded the machine is (a starved solver stopping early would keep a
        different feasible set). Programs here have tens of candidates and solve in a few nodes."""
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_array

        n = len(self.values)
        if n == 0 or self.k <= 0:
            return []
        nodes = sorted(set().union(*self.paths))
        node_col = {node: n + j for j, node in enumerate(nodes)}
        num_clusters = max(self.clusters) + 1 if self.clusters else 0
        z0 = n + len(nodes)
        width = z0 + num_clusters
        # milp minimizes: negate the objective
        c = np.concatenate([-np.asarray(self.values, dtype=float), np.full(len(nodes), self.lambda_kv),
                            np.full(num_clusters, -self.lambda_coverage)])
        rows, cols, vals, lo, hi = [], [], [], [], []

        def add_row(entries, lower, upper):
            r = len(lo)
            for col, v in entries:
                rows.append(r)
                cols.append(col)
                vals.append(v)
            lo.append(lower)
            hi.append(upper)

        for i, path in enumerate(self.paths):
            for node in path:  # x_i - y_n <= 0
                add_row([(i, 1.0), (node_col[node], -1.0)], -np.inf, 0.0)
        for cl in range(num_clusters):  # z_c - sum_{i in c} x_i <= 0
            add_row([(z0 + cl, 1.0)] + [(i, -1.0) for i in range(n) if self.clusters[i] == cl], -np.inf, 0.0)
        add_row([(i, 1.0) for i in range(n)], 1.0, float(min(self.k, n)))
        a = coo_array((vals, (rows, cols)), shape=(len(lo), width)).tocsr()
        integrality = np.concatenate([np.ones(n), np.zeros(width - n)])
        res = milp(c, constraints=LinearConstraint(a, lo, hi), integrality=integrality, bounds=Bounds(0.0, 1.0),
                   options={"mip_rel_gap": 0.0, "node_limit": node_limit})
        if res.x is None:  # only on the node limit without any solution: fall back to the top k by value
            order = sorted(range(n), key=lambda i: -self.values[i])
            return order[: min(self.k, n)]
        keep = [i for i in range(n) if res.x[i] > 0.5]
        return sorted(keep, key=lambda i: -self.values[i])


def path_nodes(branch: Branch) -> tuple[int, ...]:
    """The ids of the branch and its ancestors, without the root (which every candidate shares)."""
    out = []
    b = branch
    while b is not None and b.depth > 0:
        out.append(b.id)
        b = b.parent
    return tuple(out)


def cluster(embeddings: list[np.ndarray | None], threshold: float) -> list[int]:
    """Cluster labels 0..K-1: average linkage on cosine distance, cut at `threshold`.

    Candidates without a usable embedding (None or all zeros) are clusters of their own.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    ok = [i for i, e in enumerate(embeddings) if e is not None and np.linalg.norm(e) > 0]
    raw = [-1 - i for i in range(len(embeddings))]  # singletons unless clustered below
    if len(ok) >= 2:
        points = np.stack([np.asarray(embeddings[i], dtype=np.float64) for i in ok])
        labels = fcluster(linkage(points, method="average", metric="cosine"), t=threshold, criterion="distance")
        for i, label in zip(ok, labels):
            raw[i] = int(label)
    renumber: dict[int, int] = {}
    return [renumber.setdefault(r, len(renumber)) for r in raw]


def keep_values(scores: list[float], temperature: float) -> list[float]:
    """v = N * softmax(score / temperature), plus a tie-break that orders ties like TopK (earlier first)."""
    n = len(scores)
    safe = [s if not math.isnan(s) else -math.inf for s in scores]
    top = max(safe)
    if top == -math.inf:
        weights = [1.0 / n] * n
    else:
        e = [math.exp((s - top) / max(temperature, 1e-8)) for s in safe]
        total = sum(e)
        weights = [x / total for x in e]
    order = rank_scores(scores)
    bonus = [0.0] * n
    for position, i in enumerate(order):
        bonus[i] = TIE_BREAK * (n - position) / n
    return [n * w + b for w, b in zip(weights, bonus)]


@dataclass
class ETSSelector:
    """Keep at most k candidates, trading reward against KV kept and semantic coverage (see the module doc).

    lambda_kv: cost of one retained tree node, in units of an average candidate's reward.
    lambda_coverage: worth of one covered semantic cluster, in the same units.
    embedding: "hidden" (the policy model's own hidden states); embed_fn(branches, meter) -> one vector
    (or None) per branch replaces it.
    embed_batch: steps embedded per forward; it bounds the scratch KV the embeddings hold at once
    (each holds its step's blocks), which would otherwise eat into the KV that ETS saves.
    """

    lambda_kv: float = 0.5
    lambda_coverage: float = 1.0
    embedding: str = "hidden"
    cluster_threshold: float = 0.05
    temperature: float = 0.2
    embed_batch: int = 4
    embed_fn: Callable | None = None
    cost_per_branch: ClassVar[float] = 0.0
    _backend: object = field(default=None, init=False, repr=False, compare=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # branch id -> embedding

    def __post_init__(self):
        if self.lambda_kv < 0 or self.lambda_coverage < 0:
            raise ValueError("ETS's lambdas must be nonnegative")
        if self.embedding != "hidden":
            raise ValueError(f"unknown embedding {self.embedding!r}: use 'hidden' or pass embed_fn")
        if self.temperature <= 0 or self.cluster_threshold < 0 or self.embed_batch < 1:
            raise ValueError("temperature and embed_batch must be positive, cluster_threshold nonnegative")

    @property
    def _embeds_hidden(self) -> bool:
        return self.lambda_coverage > 0 and self.embed_fn is None

    @property
    def cost_per_token(self) -> float:
        """Verifier tokens per generated token: each step is run once more to embed it."""
        return 1.0 if self._embeds_hidden else 0.0

    def bind(self, proposer) -> "ETSSelector":
        """This selector for one search: a copy holding the proposer's backend (hidden-state embeddings need its
        HIDDEN_STATES) and an embedding cache of its own. The configured selector is shared by every search, and
        by an eval's worker threads at once: one shared cache let a search evict another's entries mid-round
        (KeyError at concurrency 8)."""
        bound = replace(self)  # the init=False fields start fresh: no backend, an empty cache
        bound._backend = proposer.backend
        if bound._embeds_hidden:
            require(bound._backend, HIDDEN_STATES, "strategy=ets (its coverage embeddings)")
        return bound

    # -- selection -------------------------------------------------------------------------------

    def program(self, scored: list[Scored], k: int, meter: Meter) -> KeepProgram:
        branches = [s.branch for s in scored]
        if self.lambda_coverage > 0:
            clusters = cluster(self.embed(branches, meter), self.cluster_threshold)
        else:
            clusters = list(range(len(scored)))
        return KeepProgram(values=tuple(keep_values([s.score for s in scored], self.temperature)),
                           paths=tuple(path_nodes(b) for b in branches), clusters=tuple(clusters), k=k,
                           lambda_kv=self.lambda_kv, lambda_coverage=self.lambda_coverage)

    def select(self, scored: list[Scored], k: int, meter: Meter) -> list[Branch]:
        if not scored or k <= 0:
            return []
        if self.lambda_kv == 0 and self.lambda_coverage == 0:
            return TopK().select(scored, k, meter)  # the program's optimum, without building it
        return [scored[i].branch for i in self.program(scored, k, meter).solve()]

    # -- embeddings ------------------------------------------------------------------------------

    def embed(self, branches: list[Branch], meter: Meter) -> list[np.ndarray | None]:
        """One vector per branch for its latest step (cached by branch id for the search's lifetime)."""
        todo = [b for b in branches if b.id not in self._cache]
        if todo:
            if self.embed_fn is not None:
                vectors = list(self.embed_fn(todo, meter))
            else:
                vectors = self._hidden(todo, meter)
            for b, v in zip(todo, vectors):
                self._cache[b.id] = None if v is None else np.asarray(v, dtype=np.float64)
        out = [self._cache[b.id] for b in branches]
        live = {b.id for b in branches}
        # a branch left out of this call is pruned or expanded in every strategy here; forget it
        for key in [key for key in self._cache if key not in live]:
            del self._cache[key]
        return out

    def _hidden(self, branches: list[Branch], meter: Meter) -> list[np.ndarray | None]:
        """Mean final hidden state over each branch's latest step, run on a scratch fork of its parent."""
        out: list[np.ndarray | None] = [None] * len(branches)
        items, where = [], []
        for i, b in enumerate(branches):
            parent = b.parent
            if not b.steps or not b.steps[-1].token_ids or parent is None or parent.handle is b.handle:
                continue  # no step, or a branch extended in place: nothing holds the context before its step
            if not self._backend.holds_context(parent):
                continue  # the parent's KV is gone; the step cannot be placed in context
            items.append((parent, list(b.steps[-1].token_ids)))
            where.append(i)
        if not items or self._backend is None:
            return out
        if not meter.can_afford(sum(len(ids) for _, ids in items)):
            return out  # no coverage information this round rather than a broken budget
        results = self._backend.score_continuations(items, meter, hidden=True, batch_size=self.embed_batch,
                                                    logprobs=False)
        for i, r in zip(where, results):
            out[i] = r.hidden.float().mean(0).numpy()
        return out


@dataclass
class ETS(Beam):
    """Beam search whose selector is ETS: `strategy=ets`."""

    selector: ETSSelector = field(default_factory=ETSSelector)
    name: ClassVar[str] = "ets"


STRATEGY = ETS
