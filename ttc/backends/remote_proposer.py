"""`RemoteProposer`: `LocalProposer` (ttc.backends.local) on a server, rule for rule.

The same children, the same per-child seeds (`child_seed(branch.seed, k)` from the same per-branch
expansion counters), the same step and finish rules and the same budget shrinking through
`meter.generation_share`. Each child is one n=1 request whose prompt is the branch's token ids and
whose seed is the child's (with `features.n`, one request per parent). A branch's handle is a
`RemoteHandle`, an immutable record of its token ids: `fork` copies it, `release` has nothing to do.
"""

from __future__ import annotations

from dataclasses import replace

from ttc.backends.remote_wire import RemoteHandle, Sample, sample_body
from ttc.backends.steps import StepProposer
from ttc.decoder.sampling import child_seed
from ttc.graph import (EARLY_STOP, AnswerFn, Branch, ConfidenceStop, Meter, Problem, Step, backend_of, problem_seed,
                       require)

__all__ = ["RemoteProposer"]

CONTINUED_STREAM = 1 << 32  # complete() on a branch whose stream has advanced: see RemoteProposer.complete


class RemoteProposer(StepProposer):
    """Proposes steps on a RemoteBackend (the eval injects it as `model`, as it does for LocalProposer).

    A step ends at `step_stop` (default: a blank line, kept in the step), after `max_step_tokens`, or at
    EOS. A branch is finished at EOS or once it holds `max_tokens` generated tokens. Every request is
    shrunk to what the meter can still pay for, once the prompts the round sends are paid for.
    """

    def __init__(self, model, step_stop: tuple[str, ...] = ("\n\n",), max_step_tokens: int = 256,
                 max_tokens: int = 768, temperature: float = 0.8, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0, seed: int = 0, answer_fn: AnswerFn | None = None):
        super().__init__(step_stop, max_step_tokens, max_tokens, temperature, top_p, top_k, min_p, seed, answer_fn)
        self.backend = backend_of(model)
        if getattr(self.backend, "kind", None) != "remote":
            raise TypeError(f"RemoteProposer runs on a RemoteBackend, not {type(self.backend).__name__} "
                            "(a model loaded here takes LocalProposer)")
        sample_body(self.backend.features, "", [0], str, 1, self.params, (), None)  # settings the server takes

    # -- roots -----------------------------------------------------------------------------------------

    def start(self, problem: Problem, meter: Meter) -> Branch:
        """The root: the rendered prompt (nothing is sent; the first request charges it)."""
        ids = self.backend.tokenizer.encode_prompt(problem.prompt)
        self.backend.check_prompt(ids)
        meter.check(len(ids))  # the prompt itself must fit, as on a cold local prefix cache
        seed = problem_seed(problem.id, self.seed)
        return Branch(handle=RemoteHandle(tuple(ids), seed), seed=seed)

    # -- expansion -------------------------------------------------------------------------------------

    def _reserve(self, branches: list[Branch], per_branch: int) -> int:
        """The prompt tokens a round on `branches` should make the server compute, paid for before the
        children's shares. Where the server reports its prefix cache (in blocks of `cache_block`): the
        first request on a branch computes what the server was never sent as a prompt, each further one
        (its siblings, sent after it) only the last partial block. Where it does not: every prompt token
        of every request, since every one is charged then."""
        requests = 1 if self.backend.features.n else per_branch
        if not self.backend.reports_cache:
            return sum(len(b.handle.token_ids) for b in branches) * requests
        block = self.backend.features.cache_block
        return sum(len(ids) - b.handle.sent // block * block + (requests - 1) * (len(ids) % block)
                   for b in branches for ids in (b.handle.token_ids,))

    def _limits(self, branches: list[Branch], per_branch: int, meter: Meter, step_cap: int | None) -> list[int]:
        """Per-child token limits: the step cap, the solution cap, and an equal share of what is affordable
        (LocalProposer's rule, on a meter that has paid for the round's prompts as the local one has)."""
        ahead = Meter(meter.budget, replace(meter.ledger, prefill_tokens=meter.ledger.prefill_tokens
                                            + self._reserve(branches, per_branch)))
        ahead.verifier_cost = meter.verifier_cost
        share = ahead.generation_share(len(branches) * per_branch)
        cap = share if step_cap is None else min(step_cap, share)
        room = self.backend.max_position or (1 << 62)  # the local engine stops at the context's end
        return [max(0, min(cap, self.max_tokens - b.num_tokens, room - len(b.handle.token_ids)))
                for b in branches for _ in range(per_branch)]

    def propose(self, branches: list[Branch], n: int, meter: Meter, to_end: bool = False,
                stop_when: ConfidenceStop | None = None) -> list[Branch]:
        """n children of every unfinished branch, each one step longer (or finished, with to_end). A server
        cannot stop a sample on its confidence: `stop_when` fails with one line (no EARLY_STOP)."""
        if stop_when is not None:
            require(self.backend, EARLY_STOP, "propose(stop_when=...)")
        live = [b for b in branches if not b.finished]
        limits = self._limits(live, n, meter, None if to_end else self.max_step_tokens)
        if not live or n < 1 or max(limits, default=0) < 1:
            return []
        parents, seeds = [], []
        for b in live:
            seeds.extend(self._seeds(b, n))
            parents.extend([b] * n)
        if self.backend.features.n:
            return self._extend_n(parents, seeds, limits, to_end, meter)
        return self._extend(parents, seeds, [(s, 0) for s in seeds], limits, to_end, meter)

    def complete(self, branches: list[Branch], meter: Meter) -> list[Branch]:
        """Extend each unfinished branch to the end of its solution (on a new handle: handles are records).

        The local engine goes on drawing from the branch's own random stream; a server starts a stream per
        request. A root or a fork copy has drawn nothing from its stream yet, so its request's seed is the
        stream's and the tokens are the local ones. A branch that has sampled already continues its stream
        where the server can skip draws (`ttc serve`: exact again); elsewhere it is given a stream derived
        from its seed and its draw count, the one place where this proposer's tokens may differ from the
        local one's (beam search completing an open beam at temperature > 0, on vLLM)."""
        live = [b for b in branches if not b.finished]
        limits = self._limits(live, 1, meter, None)
        if not live or max(limits, default=0) < 1:
            return list(branches)
        streams = [(b.handle.stream_seed, b.handle.draws) for b in live]
        done = iter(self._extend(live, [b.seed for b in live], streams, limits, True, meter))
        return [next(done) if not b.finished else b for b in branches]

    def _extend(self, parents, seeds, streams, limits, to_end: bool, meter: Meter) -> list[Branch]:
        """One request per child; streams: (stream seed, draws so far) per child."""
        keep = [i for i, m in enumerate(limits) if m > 0]  # children the budget cannot extend are dropped
        parents, seeds, streams, limits = ([x[i] for i in keep] for x in (parents, seeds, streams, limits))
        stop = () if to_end else self.step_stop
        requests = [(p.handle.token_ids, m, 1, *self._stream_seed(s, d)) for p, (s, d), m in zip(parents, streams, limits)]
        outs = self.backend.sample(requests, self.params, stop, meter)
        return [self._child(p, seed, stream, draws, sample, to_end)
                for p, seed, (stream, draws), (sample,) in zip(parents, seeds, streams, outs)]

    def _stream_seed(self, stream: int, draws: int) -> tuple[int, int]:
        """(seed, draws to skip) that continue a stream after `draws` draws: the stream itself where the server
        skips draws (`ttc serve`), else a stream derived from it (the local tokens are then not reproduced)."""
        if draws == 0 or self.backend.features.skip_draws:
            return stream, draws
        return child_seed(stream, CONTINUED_STREAM + draws), 0

    def _extend_n(self, parents, seeds, limits, to_end: bool, meter: Meter) -> list[Branch]:
        """One request per parent for its children (features.n). The request's seed is its first child's;
        the server draws sample i with child_seed(that seed, i) (`ttc serve`'s rule), the child's seed."""
        groups: dict[int, list[int]] = {}
        for i, (p, m) in enumerate(zip(parents, limits)):
            if m > 0:
                groups.setdefault(p.id, []).append(i)
        stop = () if to_end else self.step_stop
        requests = [(parents[ix[0]].handle.token_ids, limits[ix[0]], len(ix), seeds[ix[0]]) for ix in groups.values()]
        outs = self.backend.sample(requests, self.params, stop, meter)
        children = []
        for ix, samples in zip(groups.values(), outs):
            for k, sample in enumerate(samples):
                seed = child_seed(seeds[ix[0]], k)
                children.append(self._child(parents[ix[0]], seed, seed, 0, sample, to_end))
        return children

    def _child(self, parent: Branch, seed: int, stream: int, draws: int, sample: Sample, to_end: bool) -> Branch:
        ids = list(sample.token_ids)
        # the local engine's text: the tokens' (EOS is not text), cut after the stop string
        text = self.backend.tokenizer.decode(ids[:-1] if sample.reason == "eos" else ids)
        if sample.stop is not None and sample.stop in text:
            text = text[: text.find(sample.stop)] + sample.stop
        step = Step(text, tuple(ids), sum(sample.logprobs), sample.reason, sample.confidences)
        context = parent.handle.token_ids
        handle = RemoteHandle(context + tuple(ids), stream, draws + (len(ids) if self.params.temperature > 0 else 0),
                              sent=len(context))
        at_context_end = self.backend.max_position is not None and len(handle.token_ids) >= self.backend.max_position
        finished = sample.reason == "eos" or parent.num_tokens + len(ids) >= self.max_tokens or \
            (to_end and sample.reason == "length") or at_context_end
        return parent.child(handle, step, seed, finished)

    def fork(self, branches: list[Branch], copies: list[int], meter: Meter) -> list[list[Branch]]:
        """copies[i] more particles on branches[i]: the same node (id, seed, scores) on a new handle holding
        the same token ids, its stream seeded as the local engine seeds a fork's. Nothing is sent."""
        return [[replace(b, handle=replace(b.handle, stream_seed=child_seed(b.handle.stream_seed, i), draws=0))
                 for i in range(k)] if k > 0 else [] for b, k in zip(branches, copies)]

    # -- bookkeeping -----------------------------------------------------------------------------------

    def release(self, branches: list[Branch]) -> None:
        """Nothing is held on the server: a branch is its token ids, sent again with each request."""
