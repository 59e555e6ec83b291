"""The built-in layers of a pipeline (ttc.search.pipeline): each a small dataclass whose fields are its
settings, called as `layer(ctx, candidates) -> candidates`.

    strategy:
      _target_: ttc.search.pipeline.Pipeline
      n: 8
      layers:
        - {_target_: ttc.search.layers.Generate}               # 8 samples
        - {_target_: ttc.search.layers.Rank, k: 3, by: model}  # the model rates them; the best 3 go on
        - {_target_: ttc.search.layers.Fuse}                   # one solution merged from those 3
        - {_target_: ttc.search.layers.Vote}                   # last: answers (the majority)

Derived prompts (fuse, critique, revision, rating) rewrite the problem's (last) user message, with the
original message as `{task}`, as plansearch's stages do; each is one root, and a layer's roots are sampled
in one batched proposal. A candidate's text goes into a derived prompt stripped; the model sees no
answer key. Layers that score take `by`: "verifier" (the pipeline's verifier, bound to the problem) or
"model" (the policy rates each candidate 0..10, greedily, in one step: see Context.score).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ttc.budget import CannotAttempt
from ttc.result import Result
from ttc.search.pipeline import RATE_PROMPT, Candidate, Context, by_score
from ttc.verifiers.vote import vote

__all__ = ["Generate", "Rank", "Fuse", "Critique", "Verify", "Vote", "Strategy", "FUSE_PROMPT", "CRITIQUE_PROMPT",
           "REVISE_PROMPT"]

BY = ("verifier", "model")
FUSE_PROMPT = ("{task}\n\nHere are {count} candidate solutions to this problem. Some of them may be wrong.\n\n"
               "{candidates}\n\nCompare them, keep what is right and correct what is wrong, and write one better "
               "solution that ends with the final answer.")
CRITIQUE_PROMPT = ("{task}\n\nA proposed solution:\n{solution}\n\nDo not solve the problem again. Point out the "
                   "mistakes in this solution, briefly, or say that it is correct.")
REVISE_PROMPT = ("{task}\n\nA proposed solution:\n{solution}\n\nA critique of it:\n{critique}\n\nWrite a corrected "
                 "solution that ends with the final answer.")


def _check_by(layer) -> None:
    if layer.by not in BY:
        raise ValueError(f"{type(layer).__name__}.by must be one of {', '.join(BY)}, got {layer.by!r}")


@dataclass
class Generate:
    """`n` samples of the problem's own prompt, to the end, added after the candidates passed in. The
    first root on the prompt is the problem itself (so Generate then Vote is self-consistency); a later
    one samples the same prompt under a new id, so its samples are new ones."""

    n: int | None = None  # None: the pipeline's n

    def __post_init__(self):
        if self.n is not None and self.n < 1:
            raise ValueError(f"Generate.n must be >= 1 (or null: the pipeline's n), got {self.n}")

    def __call__(self, ctx: Context, candidates: list[Candidate]) -> list[Candidate]:
        n = self.n if self.n is not None else ctx.n
        # with nothing passed in and nothing tried, a prompt the budget cannot pay for: CannotAttempt
        (samples,) = ctx.sample([ctx.problem_for("sample")], n, "generate", required=not candidates)
        return candidates + [ctx.candidate(b, "generate") for b in samples]


@dataclass
class Rank:
    """Score the candidates and pass on the best `k`, best first. Candidates the budget left unscored rank
    after the scored ones, in their order (a verifier the budget cannot pay for: the first k go on)."""

    k: int = 3
    by: str = "verifier"
    rate_prompt: str = RATE_PROMPT  # by model: {task}, {solution}

    def __post_init__(self):
        _check_by(self)
        if self.k < 1:
            raise ValueError(f"Rank.k must be >= 1, got {self.k}")

    @property
    def needs_verifier(self) -> bool:
        return self.by == "verifier"

    def __call__(self, ctx: Context, candidates: list[Candidate]) -> list[Candidate]:
        scored = _scored(ctx, candidates, self.by, self.rate_prompt)
        order = by_score([c.score for c in scored])
        kept = [scored[i] for i in order[: self.k]]
        ctx.drop([scored[i] for i in order[self.k:]], kept)
        return kept


@dataclass
class Verify:
    """Drop the candidates scored below `threshold`, keeping at least one (the best scored). Candidates the
    budget left unscored are kept: nothing says they are wrong."""

    threshold: float = 0.5
    by: str = "verifier"
    rate_prompt: str = RATE_PROMPT

    def __post_init__(self):
        _check_by(self)

    @property
    def needs_verifier(self) -> bool:
        return self.by == "verifier"

    def __call__(self, ctx: Context, candidates: list[Candidate]) -> list[Candidate]:
        scored = _scored(ctx, candidates, self.by, self.rate_prompt)
        keep = [i for i, c in enumerate(scored) if c.score is None or c.score >= self.threshold]
        if not keep and scored:
            keep = by_score([c.score for c in scored])[:1]
        kept = [scored[i] for i in keep]
        ctx.drop([c for i, c in enumerate(scored) if i not in keep], kept)
        return kept


def _scored(ctx: Context, candidates: list[Candidate], by: str, rate_prompt: str) -> list[Candidate]:
    """The candidates with their new scores (unscored ones keep what they carried)."""
    scores = ctx.score(candidates, by, rate_prompt)
    return [c if s is None else replace(c, score=s) for c, s in zip(candidates, scores)]


@dataclass
class Fuse:
    """The model merges the candidates into one better solution: one derived prompt listing them all (with
    their critiques, when a critique layer wrote some), `n` replies to the end. The fused solutions replace
    the candidates (`keep_inputs`: they go first, the inputs after them). With nothing fused (the budget),
    the candidates pass on unchanged."""

    n: int = 1
    keep_inputs: bool = False
    prompt: str = FUSE_PROMPT  # {task}, {count}, {candidates}

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"Fuse.n must be >= 1, got {self.n}")

    def __call__(self, ctx: Context, candidates: list[Candidate]) -> list[Candidate]:
        if not candidates:
            return []
        listing = "\n\n".join(_shown(i, c) for i, c in enumerate(candidates, 1))
        derived = ctx.problem_for("fuse", self.prompt, count=len(candidates), candidates=listing)
        (fused,) = ctx.sample([derived], self.n, "fuse")
        if not fused:
            return candidates
        out = [ctx.candidate(b, "fuse") for b in fused]
        if self.keep_inputs:
            return out + candidates
        ctx.drop(candidates, out)
        return out


def _shown(i: int, c: Candidate) -> str:
    """A candidate as a fuse prompt lists it: its text, then its critique if it has one."""
    text = f"Solution {i}:\n{c.text.strip()}"
    return text + (f"\n\nCritique of solution {i}:\n{c.critique}" if c.critique else "")


@dataclass
class Critique:
    """The model critiques each candidate (one derived prompt each, sampled in one batch). Without `revise`
    the critique rides on the candidate for the next layer (a fuse lists it); with it the model then
    rewrites each critiqued candidate from its critique, and the revision replaces it. A candidate the
    budget gave no critique (or no revision) passes on as it was."""

    revise: bool = False
    critique_prompt: str = CRITIQUE_PROMPT  # {task}, {solution}
    revise_prompt: str = REVISE_PROMPT  # {task}, {solution}, {critique}

    def __call__(self, ctx: Context, candidates: list[Candidate]) -> list[Candidate]:
        asks = [ctx.problem_for("critique", self.critique_prompt, solution=c.text.strip()) for c in candidates]
        notes = ctx.write(asks, "critique")
        out = [replace(c, critique=note) if note else c for c, note in zip(candidates, notes)]
        if not self.revise:
            return out
        todo = [i for i, note in enumerate(notes) if note]
        asks = [ctx.problem_for("revise", self.revise_prompt, solution=out[i].text.strip(), critique=notes[i])
                for i in todo]
        revised = []
        for i, replies in zip(todo, ctx.sample(asks, 1, "revision")):
            if replies:
                revised.append(out[i])
                out[i] = ctx.candidate(replies[0], "revision", critique=notes[i])
        ctx.drop(revised, out)
        return out


@dataclass
class Vote:
    """Answer-equivalence majority (ttc.verifiers.vote). Last, it answers as self-consistency does: the
    winning group's first candidate, its share of the votes as the score, one result candidate per answer
    group. Elsewhere it passes on the winning group's candidates (all of them when none states an answer)."""

    def __call__(self, ctx: Context, candidates: list[Candidate]) -> list[Candidate]:
        v = vote([c.answer for c in candidates])
        if v.winner is None:
            return candidates
        kept = [c for c, g in zip(candidates, v.groups) if g == v.groups[v.winner]]
        ctx.drop([c for c, g in zip(candidates, v.groups) if g != v.groups[v.winner]], kept)
        return kept

    def answer(self, ctx: Context, candidates: list[Candidate]) -> Result:
        answers = [c.answer for c in candidates]
        v = vote(answers)
        groups = [{"answer": answers[v.groups.index(g)], "votes": count} for g, count in v.counts.items()]
        if v.winner is None:
            return ctx.result(candidates, candidates[0] if candidates else None, None, groups)
        share = v.counts[v.groups[v.winner]] / len(candidates)
        return ctx.result(candidates, candidates[v.winner], share, groups)


@dataclass
class Strategy:
    """Any strategy object as a layer (a beam search, best-of-n, ...): each of `runs` runs on the problem's
    prompt (a new seed stream each, as a later Generate's) adds its chosen solution as a text-only candidate
    with the strategy's answer and score. The strategy releases its own branches; its tree joins the
    pipeline's, every status prefixed with its name ("beam/final"). A run the budget cannot start ends the
    layer (and raises CannotAttempt when it is the pipeline's first attempt and nothing was passed in)."""

    strategy: Any  # a strategy object: strategy(problem, proposer, verifier, meter) -> Result
    runs: int = 1

    def __post_init__(self):
        if not callable(self.strategy):
            raise TypeError(f"Strategy.strategy must be a strategy object (a `_target_` node), got {self.strategy!r}")
        if self.runs < 1:
            raise ValueError(f"Strategy.runs must be >= 1, got {self.runs}")

    def __call__(self, ctx: Context, candidates: list[Candidate]) -> list[Candidate]:
        out = list(candidates)
        for _ in range(self.runs):
            try:
                result = self.strategy(ctx.problem_for("sample"), ctx.proposer, ctx.verifier, ctx.meter)
            except CannotAttempt:
                if out or ctx.attempted:
                    break
                raise
            ctx.attempted = True
            for node in result.tree.get("nodes", []):
                ctx.tree.nodes.setdefault(node["id"], {**node, "status": f"{result.strategy}/{node['status']}"})
            if result.text or result.answer is not None:
                out.append(Candidate(result.text, result.answer, None, result.score, None, "strategy"))
        return out
