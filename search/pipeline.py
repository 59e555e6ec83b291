"""Pipelines of layers composed in config (the Archon idea, Saad-Falcon et al. 2024, on ttc's nodes).

A `Pipeline` runs its `layers` in order; each takes the candidates the one before passed on and passes on
its own. The built-in layers (ttc.search.layers): Generate (n samples of the problem's prompt, to the end),
Rank (keep the top k by the verifier's or the model's scores), Fuse (the model merges the candidates into
one better solution), Critique (the model critiques each candidate, and revises it or leaves the critique
for the next layer), Verify (drop candidates scored below a threshold, keeping at least one), Vote (the
answer-equivalence majority) and Strategy (any strategy object, e.g. a beam search, as a layer).

The layer protocol, for a layer class of your own (built from `_target_` like the others; a class outside
`ttc` must be allowed by the run config's `allowed_targets`, read by ttc.evals.build):

    layer(ctx: Context, candidates: list[Candidate]) -> list[Candidate]       # required
    layer.answer(ctx, candidates) -> Result      # optional method: a layer that answers when it is last (Vote)
    layer.needs_verifier: bool                    # optional: the pipeline refuses to run it without one

`ctx` carries the problem, the proposer, the verifier (bound to the problem), the meter, the tree and the
pipeline's breadth `n`, and the helpers every built-in layer uses: `sample` (finished replies to
derived prompts, owned by the pipeline), `write` (reply texts), `score` (verifier scores or model
ratings, each paid for once), `candidate`, `drop`. Everything goes through the Proposer/Verifier
protocols, so every token is charged to the ledger and every request shrinks to what the meter can pay:
the budget is never exceeded, and a layer the budget cuts short passes on what it has. Every branch a
layer returns is owned by the pipeline and released at the end (a layer need not release what it drops).

The answer: the last layer's `answer` if it has one, else the best-scored candidate it passed on (ties,
and no scores at all: the first). Generate then Vote is self-consistency, to the token.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from ttc.budget import CannotAttempt
from ttc.graph import Branch, Meter, Problem
from ttc.result import Result, Tree
from ttc.search.beam import release as release_branches
from ttc.search.common import bind_verifier, finish, verifier_cost
from ttc.search.plansearch import derive_prompt

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
RATE_PROMPT = ("{task}\n\nA proposed solution:\n{solution}\n\nHow likely is this solution to be correct? Reply with "
               "one number from 0 (surely wrong) to 10 (surely right), and nothing else.")


@dataclass(frozen=True)
class Candidate:
    """One solution passed between layers."""

    text: str
    answer: str | None  # the proposer's answer extractor on the text
    branch: Branch | None = None  # the finished branch it was read from; None for a strategy layer's
    #                               answer (that strategy released its own branches): text only
    score: float | None = None  # the latest score a rank or verify layer gave it; None: not scored
    critique: str | None = None  # a critique layer's note on it, which a fuse layer shows beside it
    origin: str = ""  # the layer kind that made it: "generate", "fuse", "revision", "strategy", ...


@dataclass(eq=False)
class Context:
    """What every layer sees of the search: the nodes, the ledger's meter, the tree, and the branches the
    pipeline owns (released at the end)."""

    problem: Problem
    proposer: Any
    verifier: Any  # bound to the problem (ttc.search.common.bind_verifier) when a layer needs it; or None
    meter: Meter
    tree: Tree
    n: int  # the pipeline's breadth: a layer's count when it sets none of its own
    owned: dict[int, Branch] = field(default_factory=dict)  # id(branch) -> branch, until released
    starts: dict[str, int] = field(default_factory=dict)  # roots started per stage (derived problem ids)
    verifier_scores: dict[int, float] = field(default_factory=dict)  # branch id -> score: each paid once
    ratings: dict[tuple[str, str], float] = field(default_factory=dict)  # (prompt, text) -> the model's rating
    # whether any root was started (by `sample`, or by a strategy layer's strategy): until then a root the
    # budget cannot pay for means the problem cannot be attempted (CannotAttempt), after it a layer cut short
    attempted: bool = False

    # -- roots and replies -----------------------------------------------------------------------------

    def problem_for(self, stage: str, template: str | None = None, **fields) -> Problem:
        """The problem a root starts on. Without a template: the problem itself the first time, then the
        same prompt under a new id (a root's seed stream comes from its problem's id, so a second sample of
        the prompt draws new samples). With one: the prompt's (last) user message rewritten by `template`
        (`{task}` is that message; `fields` fill the rest), as plansearch derives its stages' prompts."""
        k = self.starts.get(stage, 0)
        self.starts[stage] = k + 1
        if template is None:
            return self.problem if k == 0 else replace(self.problem, id=f"{self.problem.id}#{stage}{k}")
        if not isinstance(self.problem.prompt, str) and any(not isinstance(m, dict) for m in self.problem.prompt):
            raise TypeError(f"a {stage} layer writes a derived prompt: it needs a text or chat prompt, not token ids")
        return Problem(id=f"{self.problem.id}#{stage}{k}", prompt=derive_prompt(self.problem.prompt, template, fields))

    def sample(self, problems: list[Problem], count: int, stage: str, required: bool = False,
               to_end: bool = True, proposer=None) -> list[list[Branch]]:
        """`count` replies to each problem, in one batched proposal over one root per problem; the roots are
        released, the replies owned by the pipeline. Roots the budget cannot start (and the ones after)
        get no replies; with `required` (a layer that has nothing to pass on otherwise), a first root the
        budget cannot start before anything was attempted raises CannotAttempt. Replies are finished (or
        one step long without `to_end`)."""
        proposer = proposer or self.proposer
        roots: list[Branch] = []
        for p in problems:
            try:
                roots.append(proposer.start(p, self.meter))
            except CannotAttempt:
                if required and not self.attempted:
                    raise
                break
            self.attempted = True
        for p, r in zip(problems, roots):
            self.tree.add(r, status="root" if p is self.problem else f"{stage} root")
        try:
            children = proposer.propose(roots, count, self.meter, to_end=to_end) if roots and count > 0 else []
        finally:
            proposer.release(roots)
        self.own(children)
        by_root: dict[int, list[Branch]] = {}
        for c in children:
            self.tree.add(c, status=stage)
            by_root.setdefault(c.parent.id, []).append(c)
        return [by_root.get(r.id, []) for r in roots] + [[] for _ in problems[len(roots):]]

    def write(self, problems: list[Problem], stage: str, to_end: bool = True, proposer=None) -> list[str | None]:
        """One reply's text per problem (None where the budget gave none); the replies are released at once."""
        replies = self.sample(problems, 1, stage, to_end=to_end, proposer=proposer)
        self.tree.not_solutions([b for bs in replies for b in bs])  # notes and ratings, not answers
        self.release([b for bs in replies for b in bs])
        return [bs[0].text.strip() if bs else None for bs in replies]

    def candidate(self, branch: Branch, origin: str, critique: str | None = None) -> Candidate:
        return Candidate(branch.text, self.proposer.answer(branch), branch, None, critique, origin)

    # -- scores ------------------------------------------------------------------------------------------

    def score(self, candidates: list[Candidate], by: str, rate_prompt: str = RATE_PROMPT) -> list[float | None]:
        """A score per candidate (None: none could be paid for), higher is better.

        by "verifier": the verifier's score of the candidate's branch; a text-only candidate (a strategy
        layer's answer) keeps the score it carries. A verifier the budget cannot pay for scores nothing.
        by "model": the model's own rating, 0..1: asked by `rate_prompt` ({solution}) for a number from 0 to
        10, greedily, one step (proposer.max_step_tokens bounds the reply; no number reads as 0). Either way
        a branch (a text, under one prompt) is paid for once per pipeline.
        """
        if by == "model":
            return self._rate(candidates, rate_prompt)
        if self.verifier is None:
            raise ValueError("scoring by the verifier needs one: set verifier=..., or score by the model")
        todo = [c.branch for c in candidates if c.branch is not None and c.branch.id not in self.verifier_scores]
        if todo:
            try:
                scores = self.verifier.score(todo, self.meter)
            except CannotAttempt:  # the budget (or the context) cannot pay for scoring: pass on what there is
                scores = None
            for b, s in zip(todo, scores or []):
                self.verifier_scores[b.id] = float(s)
        return self._shown([c.score if c.branch is None else self.verifier_scores.get(c.branch.id)
                            for c in candidates], candidates)

    def _shown(self, scores: list[float | None], candidates: list[Candidate]) -> list[float | None]:
        """The scores, also written on the candidates' tree nodes (their status unchanged)."""
        for c, s in zip(candidates, scores):
            node = self.tree.nodes.get(c.branch.id) if c.branch is not None and s is not None else None
            if node is not None:
                node["score"] = float(s)
        return scores

    def _rate(self, candidates: list[Candidate], prompt: str) -> list[float | None]:
        texts = list(dict.fromkeys(c.text for c in candidates if (prompt, c.text) not in self.ratings))
        problems = [self.problem_for("rate", prompt, solution=t) for t in texts]
        judge = self.proposer.with_temperature(0.0)
        for text, reply in zip(texts, self.write(problems, "rating", to_end=False, proposer=judge)):
            if reply is not None:
                number = _NUMBER.search(reply)
                self.ratings[prompt, text] = min(10.0, max(0.0, float(number.group()))) / 10 if number else 0.0
        return self._shown([self.ratings.get((prompt, c.text)) for c in candidates], candidates)

    # -- ownership -------------------------------------------------------------------------------------

    def own(self, branches) -> None:
        for b in branches:
            self.owned[id(b)] = b

    def release(self, branches) -> None:
        """Release owned branches now (the rest are released at the end)."""
        mine = [self.owned.pop(id(b)) for b in branches if id(b) in self.owned]
        release_branches(self.proposer, self.verifier, mine)

    def drop(self, dropped: list[Candidate], kept: list[Candidate]) -> None:
        """Candidates a layer does not pass on: marked pruned in the tree, their branches released now
        (unless a kept candidate holds the same branch)."""
        keep = {id(c.branch) for c in kept}
        gone = [c.branch for c in dropped if c.branch is not None and id(c.branch) not in keep]
        self.tree.mark(gone, "pruned")
        self.release(gone)

    # -- the answer ------------------------------------------------------------------------------------

    def result(self, final: list[Candidate], chosen: Candidate | None, score: float | None,
               candidates: list[dict]) -> Result:
        """The pipeline's Result: `final` marked final in the tree, `chosen` the answer."""
        self.tree.mark([c.branch for c in final if c.branch is not None], "final")
        branch = chosen.branch if chosen is not None else None
        answer = chosen.answer if chosen is not None else None
        out = finish("pipeline", self.problem, self.proposer, self.meter, self.tree, branch, score, candidates, answer)
        if chosen is not None and branch is None:
            out.text = chosen.text
        return out

    def best(self, final: list[Candidate]) -> Result:
        """The rule of a last layer without `answer`: the best score (ties, and no scores: the first)."""
        if not final:
            return self.result([], None, None, [])
        best = by_score([c.score for c in final])[0]
        return self.result(final, final[best], final[best].score,
                           [{"answer": c.answer, "score": c.score} for c in final])


def by_score(scores: list[float | None]) -> list[int]:
    """Indices from the best score to the worst; None and NaN last; ties keep their order."""
    return sorted(range(len(scores)), key=lambda i: math.inf if scores[i] is None or math.isnan(scores[i])
                  else -scores[i])


@dataclass
class Pipeline:
    layers: list  # layer objects (built from `_target_` nodes at the config edge)
    n: int = 8  # the breadth (`strategy.n`): the samples of a generate layer that sets no n of its own

    def __post_init__(self):
        if not self.layers:
            raise ValueError("a pipeline needs at least one layer")
        for i, layer in enumerate(self.layers):
            if not callable(layer):
                raise TypeError(f"pipeline layer {i} is {layer!r}, not a layer: give a `_target_` node whose object "
                                "is called as layer(ctx, candidates) -> candidates")
        if self.n < 1:
            raise ValueError(f"a pipeline's n must be >= 1, got {self.n}")

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        needs = [type(layer).__name__ for layer in self.layers if getattr(layer, "needs_verifier", False)]
        if needs and verifier is None:
            raise ValueError(f"pipeline layers {', '.join(needs)} score with the verifier: set one (verifier=...), "
                             "or have them score with the model (by: model)")
        if needs:
            verifier = bind_verifier(verifier, problem, proposer, meter)
            meter.verifier_cost = verifier_cost(verifier)  # generation leaves room to score what it writes
        ctx = Context(problem, proposer, verifier, meter, Tree(), self.n)
        candidates: list[Candidate] = []
        try:
            for i, layer in enumerate(self.layers):
                last = i == len(self.layers) - 1
                spent = meter.ledger.total_tokens
                if last and callable(getattr(layer, "answer", None)):
                    note = self._note(ctx, i, layer, candidates, 0)
                    result = layer.answer(ctx, candidates)
                    note["tokens"] = meter.ledger.total_tokens - spent  # result.tree holds the same history
                    return result
                candidates = list(layer(ctx, candidates))
                if any(not isinstance(c, Candidate) for c in candidates):
                    raise TypeError(f"pipeline layer {i} ({type(layer).__name__}) returned something other than a "
                                    "list of ttc.search.pipeline.Candidate")
                ctx.own(c.branch for c in candidates if c.branch is not None)  # a user layer's own branches too
                self._note(ctx, i, layer, candidates, meter.ledger.total_tokens - spent)
            return ctx.best(candidates)
        finally:
            ctx.release(list(ctx.owned.values()))

    @staticmethod
    def _note(ctx: Context, i: int, layer, candidates: list[Candidate], tokens: int) -> dict:
        """One history record per layer: its kind, the candidates it passed on (an answering layer: those it
        answered from), the tokens it spent."""
        note = {"layer": i, "kind": type(layer).__name__, "candidates": len(candidates), "tokens": tokens}
        ctx.tree.history.append(note)
        return note


STRATEGY = Pipeline
