"""Particle filtering and Particle Gibbs, after Puri et al. 2025 ("A Probabilistic Inference Approach to
Inference-Time Scaling of LLMs using Particle-Based Monte Carlo Methods").

A population of N partial solutions (particles) is moved one step at a time. Each round:
  1. every unfinished particle takes one step (one batched `propose` over all of them, one child each);
  2. the process verifier scores the new steps;
  3. each particle's log weight grows by score / temperature_weights, and the weights are normalized:
     right after a resampling this is softmax(scores / temperature_weights) over the particles;
  4. the effective sample size 1 / sum(w^2) is recorded, and the population is resampled (N ancestors
     drawn by weight, multinomially or systematically) every round, or only when ESS < ess_threshold * N.
     Resampling resets the weights to uniform. A particle drawn k times is kept once and forked k - 1
     times (its KV blocks are shared, nothing is prefilled again); a particle not drawn is released.

Finished particles (EOS, or the proposer's token limit) stay in the population, as in the paper: they take
no more steps, keep their last score (so at every later round their weight grows by their last score, like
everyone else's by their new one), and can be drawn, and forked, like any other particle.

A run ends when every particle is finished, after `max_steps` rounds, or when the budget cannot pay one more
token (and its verification) for every particle. The last round is not resampled, so the final weights still
tell the particles apart. The answer is the finished particle (any particle, if none finished) of highest
weight, or with final="vote" the best particle of the answer group with the most weight.

Particle Gibbs (gibbs_sweeps=k): after a first, unconditioned run, k more runs each keep a reference
trajectory in the population: one particle of the previous run, drawn by its final weight. At round t the
reference slot holds the reference's own branch after t steps (scored in its own run, not scored again):
it never moves, always survives resampling, and may be drawn as an ancestor, so other particles fork off
its prefix. For this, while a later sweep may need a reference, each particle keeps its whole path of step
branches alive (paths of particles with a common ancestor share them); a step branch's KV is released as
soon as no path holds it.

Resampling draws from a numpy Generator seeded by the proposer's seed and the problem id, so a run is
reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttc.graph import Branch, Meter, Problem, problem_seed
from ttc.result import Result, Tree
from ttc.search.common import bind_verifier, finish, score_or_zero, verifier_cost
from ttc.verifiers.vote import vote

_RESAMPLING_STREAM = 0x9F  # mixed into the resampling seed, so it is not the root's sampling stream


# -- weights and resampling (pure functions) ---------------------------------------------------------


def normalize(log_weights) -> np.ndarray:
    """Weights summing to one from unnormalized log weights (a softmax)."""
    x = np.asarray(log_weights, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def effective_sample_size(weights) -> float:
    """1 / sum(w^2) of normalized weights: N when they are uniform, 1 when one particle holds them all."""
    w = np.asarray(weights, dtype=np.float64)
    return float(1.0 / np.dot(w, w))


def inverse_cdf(weights, uniforms) -> list[int]:
    """The index i with cdf[i-1] <= u < cdf[i], for each uniform u in [0, 1)."""
    cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
    cdf /= cdf[-1]  # guards the last bin against rounding
    return np.minimum(np.searchsorted(cdf, uniforms, side="right"), len(cdf) - 1).tolist()


def multinomial(weights, count: int, rng: np.random.Generator) -> list[int]:
    """count independent draws by weight (one uniform each), sorted so duplicates are adjacent."""
    return inverse_cdf(weights, np.sort(rng.random(count)))


def systematic(weights, count: int, rng: np.random.Generator) -> list[int]:
    """count draws from one uniform u: the points (u + i) / count. Lower variance than multinomial."""
    return inverse_cdf(weights, (rng.random() + np.arange(count)) / count)


RESAMPLERS = {"multinomial": multinomial, "systematic": systematic}


# -- the population --------------------------------------------------------------------------------


class Holds:
    """Reference counts on the KV handles a search keeps; a handle is released when its count drops to zero."""

    def __init__(self, proposer):
        self.proposer = proposer
        self._held: dict[int, list] = {}  # id(handle) -> [count, a branch on that handle]

    def hold(self, branches) -> None:
        for b in branches:
            self._held.setdefault(id(b.handle), [0, b])[0] += 1

    def drop(self, branches) -> None:
        gone = []
        for b in branches:
            entry = self._held[id(b.handle)]
            entry[0] -= 1
            if entry[0] == 0:
                del self._held[id(b.handle)]
                gone.append(entry[1])
        if gone:
            self.proposer.release(gone)

    def drop_all(self) -> None:
        branches = [entry[1] for entry in self._held.values()]
        self._held.clear()
        if branches:
            self.proposer.release(branches)

    def __len__(self) -> int:
        return len(self._held)


class Population:
    """The particles of one run. Slot j holds a path of step branches whose KV it keeps: its current branch
    `paths[j][-1]`, and, when `keep_paths`, every earlier step of its trajectory too (a later Gibbs sweep may
    take it as its reference). The reference slot, if any, is the last one.
    """

    def __init__(self, proposer, meter: Meter, holds: Holds, keep_paths: bool, reference: tuple[Branch, ...] = ()):
        self.proposer, self.meter, self.holds, self.keep_paths = proposer, meter, holds, keep_paths
        self.reference = reference  # the reference trajectory's step branches (Particle Gibbs), else ()
        self.paths: list[tuple[Branch, ...]] = []
        self.log_weights = np.zeros(0)
        self.resampled = False  # whether weights were reset since the last reweight

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def branches(self) -> list[Branch]:
        return [p[-1] for p in self.paths]

    @property
    def ref_slot(self) -> int | None:
        return len(self.paths) - 1 if self.reference else None

    def moving(self) -> list[int]:
        """Slots that take a step next round: unfinished, and not the reference."""
        return [j for j, p in enumerate(self.paths) if not p[-1].finished and j != self.ref_slot]

    def reference_moves(self, step: int) -> bool:
        """Whether the reference slot has a `step`-th branch to move to."""
        return 1 < step <= len(self.reference)

    def start(self, children: list[Branch]) -> None:
        """The first round: one slot per child of the root, then the reference slot after its first step."""
        self.paths = [(c,) for c in children] + ([self.reference[:1]] if self.reference else [])
        self.holds.hold(self.branches)
        self.log_weights = np.zeros(len(self.paths))

    def advance(self, children: dict[int, Branch], step: int) -> None:
        """Slots take their new branches; the reference slot moves to the reference's `step`-th branch."""
        moved = dict(children)
        if self.reference and step <= len(self.reference):
            moved[self.ref_slot] = self.reference[step - 1]
        old = []
        for j, child in moved.items():
            old.append(self.paths[j][-1])
            self.paths[j] = self.paths[j] + (child,) if self.keep_paths else (child,)
        self.holds.hold(moved.values())
        if not self.keep_paths:
            self.holds.drop(old)

    def reweight(self, temperature: float) -> list[float]:
        """Every slot's weight grows by its current score / temperature; finished ones keep their last score."""
        scores = [b.scores[-1] if b.scores else 0.0 for b in self.branches]
        self.log_weights = self.log_weights + np.asarray(scores) / temperature
        self.resampled = False
        return scores

    @property
    def weights(self) -> np.ndarray:
        return normalize(self.log_weights)

    def final_weights(self, temperature: float) -> np.ndarray:
        """The weights to choose by. Right after a resampling (a run that stopped before anyone moved again)
        they are those of a round in which nobody moved: every particle keeps its last score."""
        if self.resampled:
            return normalize([(b.scores[-1] if b.scores else 0.0) / temperature for b in self.branches])
        return self.weights

    def resample(self, ancestors: list[int]) -> None:
        """New slot j continues old slot ancestors[j]; the first slot drawing an old one takes it over, each
        further one takes a fork of its KV, and old slots nobody drew are released. Weights become uniform.
        The reference slot, if any, must continue itself."""
        if self.reference:
            assert ancestors[self.ref_slot] == self.ref_slot, "the reference slot always continues itself"
        order = ([self.ref_slot] if self.reference else []) + [j for j in range(len(ancestors)) if j != self.ref_slot]
        copies: dict[int, int] = {}
        for j in order:
            copies[ancestors[j]] = copies.get(ancestors[j], 0) + 1
        drawn_again = [i for i, k in copies.items() if k > 1]
        forks = self.proposer.fork([self.paths[i][-1] for i in drawn_again], [copies[i] - 1 for i in drawn_again],
                                   self.meter)
        spare = dict(zip(drawn_again, forks))
        taken: set[int] = set()
        paths: list[tuple[Branch, ...] | None] = [None] * len(ancestors)
        for j in order:
            i = ancestors[j]
            if i not in taken:
                taken.add(i)
                paths[j] = self.paths[i]
            else:
                paths[j] = self.paths[i][:-1] + (spare[i].pop(),)
                self.holds.hold(paths[j])  # a fork shares its ancestor's earlier steps, held once more
        for i, path in enumerate(self.paths):
            if i not in taken:
                self.holds.drop(path)
        self.paths = paths
        self.log_weights = np.zeros(len(paths))
        self.resampled = True

    def close(self) -> None:
        """Release every slot's hold (the reference trajectory's own hold is its owner's)."""
        for path in self.paths:
            self.holds.drop(path)
        self.paths = []


# -- the strategy ----------------------------------------------------------------------------------


@dataclass
class ParticleFilter:
    """Particle filtering over solution steps; Particle Gibbs with gibbs_sweeps > 0 (see the module docstring).

    The Result's score is the chosen particle's last process score, or with final="vote" the winning answer
    group's share of the final weight; its candidates list every candidate particle's answer, score and weight.
    """

    n: int = 8  # particles (the one name for a strategy's breadth: `strategy.n`)
    max_steps: int = 20
    temperature_weights: float = 1.0  # T in softmax(score / T): lower follows the verifier more greedily
    resampling: str = "multinomial"  # or "systematic"
    ess_threshold: float | None = None  # None: resample every round; else only when ESS < threshold * N
    gibbs_sweeps: int = 0  # Particle Gibbs: conditional sweeps after the first run
    final: str = "argmax"  # or "vote": weighted vote over equivalent answers

    def __post_init__(self):
        if self.n < 1 or self.max_steps < 1 or self.gibbs_sweeps < 0:
            raise ValueError("n (particles) and max_steps must be at least 1, gibbs_sweeps at least 0")
        if self.gibbs_sweeps and self.n < 2:
            raise ValueError("Particle Gibbs needs n >= 2 particles: the reference and one that moves")
        if not self.temperature_weights > 0:
            raise ValueError("temperature_weights must be positive")
        if self.resampling not in RESAMPLERS:
            raise ValueError(f"resampling must be one of {sorted(RESAMPLERS)}, not {self.resampling!r}")
        if self.ess_threshold is not None and not 0 < self.ess_threshold <= 1:
            raise ValueError("ess_threshold is a fraction of the particle count, in (0, 1]")
        if self.final not in ("argmax", "vote"):
            raise ValueError(f"final must be 'argmax' or 'vote', not {self.final!r}")

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        tree = Tree(kind="particles")
        verifier = bind_verifier(verifier, problem, proposer, meter)
        meter.verifier_cost = verifier_cost(verifier)
        rng = np.random.default_rng([problem_seed(problem.id, getattr(proposer, "seed", 0)), _RESAMPLING_STREAM])
        holds = Holds(proposer)
        try:
            root = proposer.start(problem, meter)
            holds.hold([root])
            tree.add(root, status="root")
            reference: tuple[Branch, ...] = ()
            pop: Population | None = None
            for sweep in range(self.gibbs_sweeps + 1):
                if pop is not None:  # a Gibbs sweep: condition on a trajectory of the run before
                    if not len(pop) or meter.generation_share(self.n - 1) < 1:
                        break
                    reference = self._next_reference(pop, reference, holds, rng, tree)
                pop = Population(proposer, meter, holds, keep_paths=sweep < self.gibbs_sweeps, reference=reference)
                self._run(sweep, root, pop, proposer, verifier, meter, rng, tree)
            return self._finish(problem, pop, proposer, meter, tree)
        finally:
            holds.drop_all()

    # -- one run of the filter ---------------------------------------------------------------------

    def _run(self, sweep: int, root: Branch, pop: Population, proposer, verifier, meter: Meter,
             rng: np.random.Generator, tree: Tree) -> None:
        free = self.n - (1 if pop.reference else 0)
        pop.start(self._scored(proposer.propose([root], free, meter), verifier, meter, tree))
        if not len(pop):
            return  # the budget paid for no particle
        for step in range(1, self.max_steps + 1):
            if step > 1:
                children: dict[int, Branch] = {}
                moving = pop.moving()
                if moving:
                    parents = [pop.paths[j][-1] for j in moving]
                    scored = self._scored(proposer.propose(parents, 1, meter), verifier, meter, tree)
                    if not scored:
                        break  # the budget cannot pay for a step
                    children = self._by_slot(moving, parents, scored)
                elif not pop.reference_moves(step):
                    break
                pop.advance(children, step)
            scores = pop.reweight(self.temperature_weights)
            weights = pop.weights
            ess = effective_sample_size(weights)
            moving = pop.moving()
            more = step < self.max_steps and (bool(moving) or pop.reference_moves(step + 1)) and \
                (not moving or meter.generation_share(free) >= 1)
            resample = more and (self.ess_threshold is None or ess < self.ess_threshold * len(pop))
            ids = [b.id for b in pop.branches]
            if resample:
                ancestors = self._ancestors(weights, pop, rng)
                drawn = {ids[i] for i in ancestors}
                for b in pop.branches:
                    tree.add(b, status="kept" if b.id in drawn else "pruned")
            else:
                ancestors = list(range(len(pop)))
                tree.mark(pop.branches, "kept")
            tree.history.append({
                "sweep": sweep, "step": step, "particles": ids, "scores": [float(s) for s in scores],
                "weights": weights.tolist(), "ess": ess, "resampled": resample, "ancestors": ancestors,
                "finished": [b.finished for b in pop.branches], "reference": pop.ref_slot})
            if not more:
                break
            if resample:
                pop.resample(ancestors)

    def _ancestors(self, weights: np.ndarray, pop: Population, rng: np.random.Generator) -> list[int]:
        """N ancestors by weight; with a reference, N - 1 drawn and the reference slot continuing itself."""
        draw = RESAMPLERS[self.resampling]
        if pop.reference:
            return draw(weights, len(pop) - 1, rng) + [pop.ref_slot]
        return draw(weights, len(pop), rng)

    @staticmethod
    def _by_slot(slots: list[int], parents: list[Branch], children: list[Branch]) -> dict[int, Branch]:
        """Each child with the slot of its parent (a proposer may return fewer children than parents)."""
        waiting: dict[int, list[int]] = {}
        for j, p in zip(slots, parents):
            waiting.setdefault(id(p), []).append(j)
        return {waiting[id(c.parent)].pop(0): c for c in children}

    @staticmethod
    def _scored(children: list[Branch], verifier, meter: Meter, tree: Tree) -> list[Branch]:
        scored = [c.with_score(s) for c, s in zip(children, score_or_zero(verifier, children, meter))]
        for b in scored:
            tree.add(b, score=b.scores[-1], status="open")
        return scored

    # -- between sweeps and at the end -------------------------------------------------------------

    def _candidates(self, pop: Population) -> tuple[list[int], np.ndarray]:
        """Finished particles (all of them, if none finished) and their weights, renormalized."""
        weights = pop.final_weights(self.temperature_weights)
        done = [j for j, b in enumerate(pop.branches) if b.finished]
        slots = done or list(range(len(pop)))
        w = weights[slots]
        return slots, w / w.sum()

    def _next_reference(self, pop: Population, old: tuple[Branch, ...], holds: Holds, rng: np.random.Generator,
                        tree: Tree) -> tuple[Branch, ...]:
        """Draw the next reference trajectory by final weight; hold it, release the rest of the run."""
        slots, w = self._candidates(pop)
        (k,) = inverse_cdf(w, [rng.random()])
        reference = pop.paths[slots[k]]
        holds.hold(reference)
        if old:
            holds.drop(old)
        tree.mark([b for b in pop.branches if b.id != reference[-1].id], "pruned")
        tree.mark(reference, "kept")
        pop.close()
        return reference

    def _finish(self, problem: Problem, pop: Population | None, proposer, meter: Meter, tree: Tree) -> Result:
        if pop is None or not len(pop):
            return finish("particle_filter", problem, proposer, meter, tree, None, None)
        tree.mark(pop.branches, "final")
        slots, w = self._candidates(pop)
        branches = [pop.branches[j] for j in slots]
        answers = [proposer.answer(b) for b in branches]
        scores = [b.scores[-1] if b.scores else 0.0 for b in branches]
        candidates = [{"answer": a, "score": s, "weight": float(x)} for a, s, x in zip(answers, scores, w)]
        best, score = int(np.argmax(w)), None  # ties: the first particle
        if self.final == "vote":
            v = vote(answers, weights=w.tolist())
            if v.winner is not None:
                group = v.groups[v.winner]
                best = max((k for k, g in enumerate(v.groups) if g == group), key=lambda k: w[k])
                score = v.totals[group]  # the winning answer's share of the weight
        if score is None:
            score = scores[best]
        return finish("particle_filter", problem, proposer, meter, tree, branches[best], score, candidates)


STRATEGY = ParticleFilter
