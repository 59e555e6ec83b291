"""PlanSearch (Wang et al., 2024, "Planning in natural language improves LLM search for code generation"):
search over natural-language plans, then write code from each plan, and pick with a verifier.

Three stages, each one batched `propose` per root, all through the Proposer protocol:
1. observations: `observations` replies to the problem's prompt asking for observations, not code;
2. plans: `plans` plans written from those observations (spread over them, one root per observation);
3. code: `n` programs in all, spread over the plans (one root per plan: the problem's own prompt with the
   plan appended), scored by the verifier bound to the original problem (pair it with
   `verifier=execution`, which runs the tests the original prompt shows) and chosen as best-of-n chooses
   (`weighted`: by answer groups).
Each stage asks only for what the meter can still pay for (and starts no root it cannot), so the budget
is never exceeded; a stage the budget cuts short leaves the next with what was written.
"""

from __future__ import annotations

from dataclasses import dataclass

from ttc.budget import CannotAttempt
from ttc.graph import Branch, Meter, Problem
from ttc.result import Result, Tree
from ttc.search.best_of_n import score_and_choose
from ttc.search.common import bind_verifier, verifier_cost

OBSERVATION_PROMPT = ("{task}\n\nDo not write code yet. First list a few short observations about this problem that "
                      "would help to solve it (properties of the input, edge cases, a useful idea), one per line.")
PLAN_PROMPT = ("{task}\n\nObservations:\n{observations}\n\nUsing these observations, describe in a few sentences a "
               "plan for solving the problem, in words only. Do not write code.")
CODE_PROMPT = "{task}\n\nFollow this plan:\n{plan}"


@dataclass
class PlanSearch:
    n: int = 8  # programs written in all
    observations: int = 2  # observation lists sampled
    plans: int = 4  # plans written from them
    weighted: bool = False
    observation_prompt: str = OBSERVATION_PROMPT
    plan_prompt: str = PLAN_PROMPT
    code_prompt: str = CODE_PROMPT

    def __post_init__(self):
        if min(self.n, self.observations, self.plans) < 1:
            raise ValueError(f"plansearch needs n, observations and plans >= 1: {self}")

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        tree = Tree()
        verifier = bind_verifier(verifier, problem, proposer, meter)  # the original problem's tests
        meter.verifier_cost = verifier_cost(verifier)
        notes = self._write(problem, proposer, meter, tree, "observations",
                            [(self.observation_prompt, {})], [self.observations], first=True)
        plans = self._write(problem, proposer, meter, tree, "plan",
                            [(self.plan_prompt, {"observations": text}) for text in notes or [""]],
                            _spread(self.plans, len(notes or [""])))
        programs: list[Branch] = []
        try:
            programs = self._sample(problem, proposer, meter, tree, "code",
                                    [(self.code_prompt, {"plan": text}) for text in plans or [""]],
                                    _spread(self.n, len(plans or [""])))
            return score_and_choose("plansearch", problem, proposer, verifier, meter, tree, programs, self.weighted)
        finally:
            proposer.release(programs)

    def _write(self, problem, proposer, meter, tree, stage, prompts, counts, first=False) -> list[str]:
        """The texts of a stage's replies (their branches released at once)."""
        replies = self._sample(problem, proposer, meter, tree, stage, prompts, counts, first)
        tree.not_solutions(replies)  # observations and plans, not programs
        proposer.release(replies)
        return [b.text.strip() for b in replies if b.text.strip()]

    def _sample(self, problem, proposer, meter, tree, stage, prompts, counts, first=False) -> list[Branch]:
        """`counts[i]` finished replies to each derived prompt, one root per prompt, roots released. A prompt
        the budget cannot pay for ends the stage, except the very first one (the problem cannot be attempted)."""
        replies: list[Branch] = []
        for i, ((template, fields), count) in enumerate(zip(prompts, counts)):
            if count < 1:
                continue
            derived = Problem(id=f"{problem.id}#{stage}{i}", prompt=derive_prompt(problem.prompt, template, fields))
            try:
                root = proposer.start(derived, meter)
            except CannotAttempt:
                if first:
                    raise
                break
            tree.add(root, status=f"{stage} root")
            try:
                children = proposer.propose([root], count, meter, to_end=True)
            finally:
                proposer.release([root])
            for b in children:
                tree.add(b, status=stage)
            replies += children
        return replies


def _spread(total: int, parts: int) -> list[int]:
    """`total` split into `parts` counts that differ by at most one, larger first."""
    base, extra = divmod(total, max(1, parts))
    return [base + (i < extra) for i in range(max(1, parts))]


def derive_prompt(prompt, template: str, fields: dict):
    """The prompt with its (last) user message rewritten by `template`, whose {task} is that message."""
    if isinstance(prompt, str):
        return template.format(task=prompt, **fields)
    messages = [dict(m) for m in prompt]
    for m in reversed(messages):
        if m.get("role") == "user":
            m["content"] = template.format(task=m.get("content", ""), **fields)
            break
    return messages


STRATEGY = PlanSearch
