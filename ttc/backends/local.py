"""The built-in backend: ttc's own decoder, and the proposer that forks branches on it.

    backend = LocalBackend(model)            # or model.backend
    proposer = LocalProposer(model, seed=0, answer_fn=dataset.extract)

`LocalBackend` answers the capability calls of verifiers and selectors (logprobs and hidden states of
a continuation on a scratch fork, so the branch's prefix is never recomputed). `LocalProposer` forks
branches on the engine and extends all children in one batched decode. Both hide the engine: no
strategy or verifier sees a Sequence, a block table or the engine itself.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from ttc.backends.steps import StepProposer
from ttc.decoder.concurrent import ConcurrentEngine
from ttc.decoder.engine import Engine
from ttc.graph import (EARLY_STOP, HIDDEN_STATES, LOGPROBS, SHARED_KV, TOKEN_CONFIDENCE, AnswerFn, Branch,
                       ConfidenceStop, ContinuationScore, Meter, Problem, Step, backend_of, problem_seed)

__all__ = ["LocalBackend", "LocalProposer", "SharedModel", "problem_seed"]


class LocalBackend:
    """The capabilities of a model on ttc's own engine: every one of them (logprobs, hidden states, shared KV, token
    confidences recorded at sampling time, and stopping a sample inside the decode).

    The last two come from the decoder's generate loop (an Engine, or a ConcurrentEngine over one); an engine
    wrapper with a generate of its own (ttc serve's per-request view, which generates in chunks) passes on
    neither yet, so a node that needs them fails with the capability's one line there, not half way."""

    kind = "local"

    def __init__(self, model):
        self.model, self.engine, self.tokenizer = model, model.engine, model.tokenizer
        own_loop = isinstance(self.engine, (Engine, ConcurrentEngine))
        self.capabilities = frozenset({LOGPROBS, HIDDEN_STATES, SHARED_KV} |
                                      ({TOKEN_CONFIDENCE, EARLY_STOP} if own_loop else set()))
        self.name = model.name
        cfg = model.config
        self.vocab_size, self.hidden_size, self.max_position = cfg.vocab_size, cfg.hidden_size, cfg.max_position
        self.eos_ids = frozenset(self.engine.eos_ids)

    def holds_context(self, branch: Branch) -> bool:
        return not branch.handle.kv.released

    def prompt_ids(self, branch: Branch) -> list[int]:
        """The token ids of the prompt a branch grew from (its problem, rendered)."""
        ids = branch.handle.token_ids
        return list(ids[: len(ids) - branch.num_tokens])

    def score_continuations(self, items: Sequence[tuple[Branch, Sequence[int]]], meter: Meter,
                            hidden: bool = False, batch_size: int = 64,
                            logprobs: bool = True) -> list[ContinuationScore]:
        """`engine.score` of each continuation on a scratch fork of its branch, `batch_size` at a time,
        charging the continuations as verifier tokens.

        The branches' own pending tokens (the last sampled token of a fresh branch, already charged as
        generated) are computed first, in one batched forward."""
        if any(not self.holds_context(b) for b, _ in items):
            raise ValueError("cannot score after a branch whose KV was released; score branches before releasing them")
        pending = {id(b.handle): b.handle for b, _ in items if b.handle.num_pending}
        if pending:
            self.engine.forward(list(pending.values()))
        out: list[ContinuationScore] = []
        for i in range(0, len(items), batch_size):
            chunk = [(b.handle, list(ids)) for b, ids in items[i:i + batch_size]]
            for r in self.engine.score(chunk, hidden=hidden, ledger=meter.ledger, logprobs=logprobs):
                out.append(ContinuationScore(r.logprobs, r.last_logprobs, r.hidden))
        return out


class SharedModel:
    """A model whose engine is a ConcurrentEngine (ttc.decoder.concurrent): give one to each thread's
    proposer and verifiers. Everything else (tokenizer, config, dtype) is the wrapped model's; `generate` runs
    the wrapped model's own with the engine to itself (the other threads' calls and decode steps wait), since
    it drives the engine directly."""

    def __init__(self, model, engine):
        self._model, self.engine = model, engine
        self.backend = LocalBackend(self)

    def generate(self, *args, **kwargs):
        model = self._model
        while isinstance(model, SharedModel):
            model = model._model
        exclusive = getattr(self.engine, "exclusive", None)
        if exclusive is None:  # not a ConcurrentEngine: nothing to wait for
            return model.generate(*args, **kwargs)
        with exclusive():
            return model.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


class LocalProposer(StepProposer):
    """Proposes steps with ttc's own decoder; children share their parent's KV blocks.

    A step ends at `step_stop` (default: a blank line), after `max_step_tokens`, or at EOS.
    A branch is finished at EOS or once it holds `max_tokens` generated tokens.
    Every request is shrunk to what the meter can still pay for, so a budget is never exceeded.
    """

    def __init__(self, model, step_stop: tuple[str, ...] = ("\n\n",), max_step_tokens: int = 256,
                 max_tokens: int = 768, temperature: float = 0.8, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0, seed: int = 0, answer_fn: AnswerFn | None = None, share_budget: bool = False):
        super().__init__(step_stop, max_step_tokens, max_tokens, temperature, top_p, top_k, min_p, seed, answer_fn)
        # share_budget: whole solutions drawn in one call (to_end) share what the budget affords them, instead of
        # an equal cap each: tokens a sample that ended early did not draw go to the ones still running.
        self.share_budget = share_budget
        self.backend = backend_of(model)
        self.model, self.engine = self.backend.model, self.backend.engine

    # -- roots -----------------------------------------------------------------------------------

    def start(self, problem: Problem, meter: Meter) -> Branch:
        ids = self.model.tokenizer.encode_prompt(problem.prompt)
        seq = self.engine.new_sequence(ids, meter.ledger, seed=problem_seed(problem.id, self.seed))
        try:
            meter.check(seq.num_pending)  # the prompt itself must fit (cached prefix tokens are free)
        except Exception:
            self.engine.release([seq])
            raise
        self.engine.forward([seq])
        return Branch(handle=seq, seed=seq.rng.seed)

    # -- expansion -------------------------------------------------------------------------------

    def _limits(self, branches: list[Branch], per_branch: int, meter: Meter, step_cap: int | None) -> list[int]:
        """Per-child token limits: the step cap, the solution cap, and an equal share of what is affordable."""
        share = meter.generation_share(len(branches) * per_branch)
        cap = share if step_cap is None else min(step_cap, share)
        return [max(0, min(cap, self.max_tokens - b.num_tokens)) for b in branches for _ in range(per_branch)]

    def _shared_limits(self, branches: list[Branch], per_branch: int, meter: Meter) -> tuple[list[int], int | None]:
        """(per-child limits, the pool they share) for whole solutions with share_budget and a token budget: each
        child may run to the solution cap, and together they draw at most the equal shares' sum."""
        children = len(branches) * per_branch
        share = meter.generation_share(children)
        if share >= 1 << 30:  # no token budget: nothing to share
            return self._limits(branches, per_branch, meter, None), None
        pool = share * children
        return [max(0, min(pool, self.max_tokens - b.num_tokens)) for b in branches for _ in range(per_branch)], pool

    def propose(self, branches: list[Branch], n: int, meter: Meter, to_end: bool = False,
                stop_when: ConfidenceStop | None = None) -> list[Branch]:
        """n children of every unfinished branch, each one step longer (or finished, with to_end); with
        `stop_when`, a child is stopped inside the decode (finish_reason "stopped", KV released then)."""
        live = [b for b in branches if not b.finished]
        pool = None
        if to_end and self.share_budget:
            limits, pool = self._shared_limits(live, n, meter)
        else:
            limits = self._limits(live, n, meter, None if to_end else self.max_step_tokens)
        if not live or n < 1 or max(limits, default=0) < 1 or pool == 0:
            return []
        # one batched forward for every parent's last sampled token, instead of one per fork
        self.engine.forward([b.handle for b in live if b.handle.num_pending])
        handles, seeds, parents = [], [], []
        for b in live:
            s = self._seeds(b, n)
            handles.extend(self.engine.fork(b.handle, n, seeds=s, ledger=meter.ledger))
            seeds.extend(s)
            parents.extend([b] * n)
        return self._extend(parents, handles, seeds, limits, to_end, stop_when, pool)

    def complete(self, branches: list[Branch], meter: Meter) -> list[Branch]:
        """Extend each unfinished branch (in place, no fork) to the end of its solution."""
        live = [b for b in branches if not b.finished]
        limits = self._limits(live, 1, meter, None)
        if not live or max(limits, default=0) < 1:
            return list(branches)
        done = iter(self._extend(live, [b.handle for b in live], [b.seed for b in live], limits, True))
        return [next(done) if not b.finished else b for b in branches]

    def _extend(self, parents, handles, seeds, limits, to_end: bool, stop_when: ConfidenceStop | None = None,
                shared_tokens: int | None = None):
        keep = [i for i, m in enumerate(limits) if m > 0]
        if len(keep) < len(handles):  # children the budget cannot extend are dropped at once
            self.engine.release([h for h, m in zip(handles, limits) if m <= 0])
            parents, handles, seeds, limits = ([x[i] for i in keep] for x in (parents, handles, seeds, limits))
        stop = None if to_end else list(self.step_stop)
        extra = {} if stop_when is None else {"stop_when": stop_when}  # engine wrappers without it (see LocalBackend)
        if shared_tokens is not None:
            extra["shared_tokens"] = shared_tokens
        outs = self.engine.generate(handles, self.params, limits, stop=stop, **extra)
        children = []
        for parent, h, seed, out, limit in zip(parents, handles, seeds, outs, limits):
            text = out.text + (out.stop or "")
            reason = {"stop": "step", "eos": "eos", "stopped": "stopped"}.get(out.finish_reason, "length")
            step = Step(text, out.token_ids, sum(out.logprobs), reason, out.confidences)
            total = parent.num_tokens + len(out.token_ids)
            finished = reason in ("eos", "stopped") or total >= self.max_tokens or (to_end and reason == "length") or \
                len(h.token_ids) >= self.model.config.max_position
            children.append(parent.child(h, step, seed, finished))
        return children

    def fork(self, branches: list[Branch], copies: list[int], meter: Meter) -> list[list[Branch]]:
        """copies[i] more particles on branches[i]: the same node (id, seed, scores), each on its own KV
        fork. The branches' pending tokens are computed first in one batched forward, not one per fork."""
        self.engine.forward([b.handle for b in branches if b.handle.num_pending])
        return [[replace(b, handle=h) for h in self.engine.fork(b.handle, k, ledger=meter.ledger)] if k > 0 else []
                for b, k in zip(branches, copies)]

    # -- bookkeeping -----------------------------------------------------------------------------

    def release(self, branches: list[Branch]) -> None:
        self.engine.release([b.handle for b in branches])
