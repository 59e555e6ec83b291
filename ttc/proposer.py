"""The built-in proposer: forks branches on the local engine and extends all children in one batched decode."""

from __future__ import annotations

import zlib
from typing import Callable

from ttc.decoder.sampling import SamplingParams, child_seed
from ttc.graph import Branch, Meter, Problem, Step


def problem_seed(problem_id: str, seed: int) -> int:
    """A stable per-problem seed (Python's hash() is salted per process)."""
    return child_seed(seed, zlib.crc32(str(problem_id).encode()))


def default_answer(text: str) -> str | None:
    from ttc.verifiers.math import extract_answer

    return extract_answer(text)


class LocalProposer:
    """Proposes steps with ttc's own decoder; children share their parent's KV blocks.

    A step ends at `step_stop` (default: a blank line), after `max_step_tokens`, or at EOS.
    A branch is finished at EOS or once it holds `max_tokens` generated tokens.
    Every request is shrunk to what the meter can still pay for, so a budget is never exceeded.
    """

    def __init__(self, model, step_stop: tuple[str, ...] = ("\n\n",), max_step_tokens: int = 256,
                 max_tokens: int = 768, temperature: float = 0.8, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0, seed: int = 0, answer_fn: Callable[[str], str | None] = default_answer):
        self.model, self.engine = model, model.engine
        self.step_stop = tuple(step_stop)
        self.max_step_tokens, self.max_tokens = max_step_tokens, max_tokens
        self.params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
        self.seed = seed
        self.answer_fn = answer_fn
        self._expansions: dict[int, int] = {}  # branch id -> children drawn so far (seeds never repeat)

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

    def _seeds(self, branch: Branch, n: int) -> list[int]:
        start = self._expansions.get(branch.id, 0)
        self._expansions[branch.id] = start + n
        return [child_seed(branch.seed, start + i) for i in range(n)]

    def _limits(self, branches: list[Branch], per_branch: int, meter: Meter, step_cap: int | None) -> list[int]:
        """Per-child token limits: the step cap, the solution cap, and an equal share of what is affordable."""
        share = meter.generation_share(len(branches) * per_branch)
        cap = share if step_cap is None else min(step_cap, share)
        return [max(0, min(cap, self.max_tokens - b.num_tokens)) for b in branches for _ in range(per_branch)]

    def propose(self, branches: list[Branch], n: int, meter: Meter, to_end: bool = False) -> list[Branch]:
        """n children of every unfinished branch, each one step longer (or finished, with to_end)."""
        live = [b for b in branches if not b.finished]
        limits = self._limits(live, n, meter, None if to_end else self.max_step_tokens)
        if not live or n < 1 or max(limits, default=0) < 1:
            return []
        # one batched forward for every parent's last sampled token, instead of one per fork
        self.engine.forward([b.handle for b in live if b.handle.num_pending])
        handles, seeds, parents = [], [], []
        for b in live:
            s = self._seeds(b, n)
            handles.extend(self.engine.fork(b.handle, n, seeds=s, ledger=meter.ledger))
            seeds.extend(s)
            parents.extend([b] * n)
        return self._extend(parents, handles, seeds, limits, to_end)

    def complete(self, branches: list[Branch], meter: Meter) -> list[Branch]:
        """Extend each unfinished branch (in place, no fork) to the end of its solution."""
        live = [b for b in branches if not b.finished]
        limits = self._limits(live, 1, meter, None)
        if not live or max(limits, default=0) < 1:
            return list(branches)
        done = iter(self._extend(live, [b.handle for b in live], [b.seed for b in live], limits, True))
        return [next(done) if not b.finished else b for b in branches]

    def _extend(self, parents, handles, seeds, limits, to_end: bool) -> list[Branch]:
        keep = [i for i, m in enumerate(limits) if m > 0]
        if len(keep) < len(handles):  # children the budget cannot extend are dropped at once
            self.engine.release([h for h, m in zip(handles, limits) if m <= 0])
            parents, handles, seeds, limits = ([x[i] for i in keep] for x in (parents, handles, seeds, limits))
        outs = self.engine.generate(handles, self.params, limits, stop=None if to_end else list(self.step_stop))
        children = []
        for parent, h, seed, out, limit in zip(parents, handles, seeds, outs, limits):
            text = out.text + (out.stop or "")
            reason = {"stop": "step", "eos": "eos"}.get(out.finish_reason, "length")
            step = Step(text, out.token_ids, sum(out.logprobs), reason)
            total = parent.num_tokens + len(out.token_ids)
            finished = reason == "eos" or total >= self.max_tokens or (to_end and reason == "length") or \
                len(h.token_ids) >= self.model.config.max_position
            children.append(parent.child(h, step, seed, finished))
        return children

    def fork(self, branch: Branch, n: int, meter: Meter) -> list[Branch]:
        """n copies of a branch sharing its KV (resampling); each copy draws its own seeds from here on."""
        handles = self.engine.fork(branch.handle, n, seeds=self._seeds(branch, n), ledger=meter.ledger)
        return [Branch(handle=h, steps=branch.steps, parent=branch.parent, scores=branch.scores,
                       finished=branch.finished, seed=h.rng.seed) for h in handles]

    # -- bookkeeping -----------------------------------------------------------------------------

    def release(self, branches: list[Branch]) -> None:
        self.engine.release([b.handle for b in branches])

    def answer(self, branch: Branch) -> str | None:
        return self.answer_fn(branch.text)
