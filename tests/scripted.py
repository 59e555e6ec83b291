"""A scripted, pure-Python proposer, backend and verifier: no engine, no model, no tensors.

Every node speaks only the protocols of ttc.graph, so a strategy that runs here runs on any backend.

The script: a branch's k-th child (k counts every child ever drawn from that branch, fork copies
included) takes the step "[k]". Solutions are `depth` steps long (one step with to_end). A finished
solution's answer is "7" when every step is [1] (the path the verifier likes), "5" when its first step
is [3], and "3" otherwise. The verifier scores a branch 1.0 when every step so far is [1], else 0.1. So
with 4 samples self-consistency votes "3" (children 0 and 2) and every verifier-guided strategy finds "7".

`ConfidentProposer` is the same script on a backend that records token confidences and stops samples on them
(TOKEN_CONFIDENCE, EARLY_STOP): a step [1] is sure of its tokens (confidence 3.0 each, logprob -0.05 a token),
any other step less and less so (CONFIDENCES_UNSURE, logprob -1.0 a token). So the model's own signals favour
"7" too: strategies that select by them (deepconf, rpc) find it without a verifier.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from ttc.graph import EARLY_STOP, TOKEN_CONFIDENCE, Branch, Meter, Problem, Step

STEP_TOKENS = 5  # generated tokens charged per step
PROMPT_TOKENS = 10  # prefill tokens charged per root
CONFIDENCES_SURE = (3.0,) * STEP_TOKENS  # a step [1]'s token confidences
CONFIDENCES_UNSURE = (2.0, 1.5, 1.0, 0.5, 0.5)  # any other step's


class Handle:
    """What a backend would hold for a branch (KV, a server-side id): here, a released flag."""

    _ids = itertools.count()

    def __init__(self, registry: set):
        self.id = next(self._ids)
        self.released = False
        registry.add(self)


class ScriptedBackend:
    kind = "scripted"
    name = "scripted"
    capabilities = frozenset()  # no logprobs, no hidden states, no shared KV

    def score_continuations(self, items, meter, hidden=False, batch_size=64, logprobs=True):
        raise AssertionError("a strategy asked the scripted backend for a capability it does not declare")

    def holds_context(self, branch: Branch) -> bool:
        return not branch.handle.released


class ScriptedProposer:
    def __init__(self, depth: int = 2):
        self.backend = ScriptedBackend()
        self.depth = depth
        self.handles: set[Handle] = set()
        self.drawn: dict[int, int] = {}  # branch id -> children drawn so far
        self.calls: list[str] = []

    # -- protocol ------------------------------------------------------------------------------------

    def start(self, problem: Problem, meter: Meter) -> Branch:
        meter.check(PROMPT_TOKENS)
        meter.ledger.charge_prefill(PROMPT_TOKENS)
        self.calls.append("start")
        return Branch(handle=Handle(self.handles), seed=0)

    def propose(self, branches, n, meter, to_end=False):
        live = [b for b in branches if not b.finished]
        self.calls.append(f"propose {len(live)}x{n}{' to_end' if to_end else ''}")
        if not live or n < 1 or meter.generation_share(len(live) * n) < STEP_TOKENS:
            return []
        children = []
        for b in live:
            for _ in range(n):
                k = self.drawn.get(b.id, 0)
                self.drawn[b.id] = k + 1
                children.append(self._step(b, Handle(self.handles), k, meter, to_end))
        return children

    def complete(self, branches, meter):
        self.calls.append(f"complete {len(branches)}")
        out = []
        for b in branches:
            while not b.finished and meter.generation_share(1) >= STEP_TOKENS:
                b = self._step(b, b.handle, 0, meter, to_end=False)  # in place: the same handle
            out.append(b)
        return out

    def fork(self, branches, copies, meter):
        self.calls.append(f"fork {copies}")
        return [[replace(b, handle=Handle(self.handles)) for _ in range(k)] for b, k in zip(branches, copies)]

    def release(self, branches):
        for b in branches:
            b.handle.released = True

    def answer(self, branch: Branch) -> str | None:
        if not branch.finished:
            return None
        path = [s.text for s in branch.steps]
        if all(t == "[1]" for t in path):
            return "7"
        return "5" if path[0] == "[3]" else "3"

    def with_temperature(self, temperature: float):
        return self  # the script is deterministic at any temperature

    # -- helpers -------------------------------------------------------------------------------------

    def _step(self, parent: Branch, handle: Handle, k: int, meter: Meter, to_end: bool) -> Branch:
        meter.ledger.charge_generated(STEP_TOKENS)
        step = Step(f"[{k}]", tuple(range(STEP_TOKENS)), -1.0, "eos")
        finished = to_end or parent.depth + 1 >= self.depth
        return parent.child(handle, step if finished else replace(step, finish_reason="step"), seed=k,
                            finished=finished)

    @property
    def live(self) -> list[Handle]:
        return [h for h in self.handles if not h.released]


class PathVerifier:
    """1.0 for a branch whose every step is [1], else 0.1 (a process score of the branch so far)."""

    def __init__(self):
        self.scored = 0

    def score(self, branches, meter):
        self.scored += len(branches)
        return [1.0 if all(s.text == "[1]" for s in b.steps) else 0.1 for b in branches]


class ConfidentBackend(ScriptedBackend):
    kind = "scripted, with token confidences"
    capabilities = frozenset({TOKEN_CONFIDENCE, EARLY_STOP})


class ConfidentProposer(ScriptedProposer):
    """The script with token confidences on every step and propose's `stop_when`: a stopped step holds the
    tokens up to the one whose window fell below the threshold (only those are charged), finish_reason
    "stopped", and its handle is released at once, as the engine releases a stopped sample's KV."""

    def __init__(self, depth: int = 2):
        super().__init__(depth)
        self.backend = ConfidentBackend()
        self._stop_when = None

    def propose(self, branches, n, meter, to_end=False, stop_when=None):
        self._stop_when = stop_when
        try:
            return super().propose(branches, n, meter, to_end)
        finally:
            self._stop_when = None

    def _step(self, parent: Branch, handle: Handle, k: int, meter: Meter, to_end: bool) -> Branch:
        sure = k == 1
        confidences = CONFIDENCES_SURE if sure else CONFIDENCES_UNSURE
        per_token = -0.05 if sure else -1.0
        rule = self._stop_when
        cut = next((t for t in range(1, STEP_TOKENS + 1) if rule is not None and rule.stops(confidences[:t])), None)
        if cut is not None:
            meter.ledger.charge_generated(cut)
            handle.released = True
            step = Step(f"[{k}]", tuple(range(cut)), per_token * cut, "stopped", confidences[:cut])
            return parent.child(handle, step, seed=k, finished=True)
        meter.ledger.charge_generated(STEP_TOKENS)
        finished = to_end or parent.depth + 1 >= self.depth
        step = Step(f"[{k}]", tuple(range(STEP_TOKENS)), per_token * STEP_TOKENS, "eos" if finished else "step",
                    confidences)
        return parent.child(handle, step, seed=k, finished=finished)
