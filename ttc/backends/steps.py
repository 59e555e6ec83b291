"""What every proposer shares, whatever it runs on: its settings, the per-branch seed streams, the answer.

LocalProposer (ttc.backends.local) and RemoteProposer (ttc.backends.remote_proposer) keep the same rules
through this one class: a branch's k-th child ever drawn gets seed `child_seed(branch.seed, k)`, so seeds
never repeat and a remote run can reproduce a local one; `with_temperature` shares those counters.
"""

from __future__ import annotations

import copy
import dataclasses

from ttc.decoder.sampling import SamplingParams, child_seed
from ttc.graph import AnswerFn, Branch

__all__ = ["StepProposer"]


class StepProposer:
    """Settings: a step ends at `step_stop` (kept in the step), after `max_step_tokens`, or at EOS; a branch
    is finished at EOS or once it holds `max_tokens` generated tokens; sampling by temperature, top_p,
    top_k, min_p; `seed` starts every problem's stream; `answer_fn` (injected) reads a solution's answer."""

    def __init__(self, step_stop: tuple[str, ...] = ("\n\n",), max_step_tokens: int = 256, max_tokens: int = 768,
                 temperature: float = 0.8, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int = 0,
                 answer_fn: AnswerFn | None = None):
        if max_step_tokens < 1 or max_tokens < 1:  # a proposer of no tokens would end every branch unwritten
            raise ValueError(f"max_step_tokens and max_tokens must be at least 1, not {max_step_tokens} and "
                             f"{max_tokens}")
        self.step_stop = tuple(step_stop)
        self.max_step_tokens, self.max_tokens = max_step_tokens, max_tokens
        self.params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
        self.seed = seed
        self.answer_fn = answer_fn
        self._expansions: dict[int, int] = {}  # branch id -> children drawn so far (seeds never repeat)

    def _seeds(self, branch: Branch, n: int) -> list[int]:
        start = self._expansions.get(branch.id, 0)
        self._expansions[branch.id] = start + n
        return [child_seed(branch.seed, start + i) for i in range(n)]

    def with_temperature(self, temperature: float):
        """Itself if it already samples at `temperature`, else a shallow copy that does (same backend, same
        seed streams and expansion counts)."""
        if self.params.temperature == temperature:
            return self
        other = copy.copy(self)
        other.params = dataclasses.replace(self.params, temperature=temperature)
        return other

    def answer(self, branch: Branch) -> str | None:
        if self.answer_fn is None:
            raise ValueError("this proposer has no answer extractor: pass answer_fn= (e.g. a dataset's extract, "
                             "or ttc.verifiers.math.extract_answer)")
        return self.answer_fn(branch.text)
