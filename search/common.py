"""What every strategy shares: turning a chosen branch into a Result, the verifier's cost model, and binding a
verifier to its problem."""

from __future__ import annotations

from ttc.graph import Branch, Meter, Problem, Verifier
from ttc.result import Result, Tree


def verifier_cost(verifier: Verifier | None) -> tuple[float, float]:
    """(tokens per scored branch, tokens per generated token) a verifier charges; (0, 0) if unknown."""
    if verifier is None:
        return (0.0, 0.0)
    return (float(getattr(verifier, "cost_per_branch", 0.0)), float(getattr(verifier, "cost_per_token", 0.0)))


def bind_verifier(verifier: Verifier | None, problem: Problem, proposer, meter: Meter) -> Verifier | None:
    """The verifier to score this problem's branches with: `verifier.for_problem(problem, proposer, meter)`
    for a verifier that needs the problem itself (verifier=execution runs the tests its prompt shows and has
    the policy write more), else the verifier as it is. Every strategy calls it first."""
    bind = getattr(verifier, "for_problem", None)
    return verifier if bind is None else bind(problem, proposer, meter)


def sample_solutions(problem: Problem, proposer, meter: Meter, tree: Tree, n: int) -> list[Branch]:
    """n whole solutions from the problem's root (prefilled once, its KV shared by all n), the root recorded
    in the tree and released; the caller releases the samples. best_of_n, self_consistency and rpc start so."""
    root = proposer.start(problem, meter)
    tree.add(root, status="root")
    try:
        return proposer.propose([root], n, meter, to_end=True)
    finally:
        proposer.release([root])


def score_or_zero(verifier: Verifier | None, branches: list[Branch], meter: Meter) -> list[float]:
    if verifier is None or not branches:
        return [0.0] * len(branches)
    return [float(s) for s in verifier.score(branches, meter)]


def finish(strategy: str, problem: Problem, proposer, meter: Meter, tree: Tree, chosen: Branch | None,
           score: float | None, candidates: list[dict] | None = None, answer: str | None = None) -> Result:
    """Build the Result; `answer` overrides the chosen branch's own (a vote's winner, say)."""
    if chosen is not None:
        tree.add(chosen, status="chosen")
    text = chosen.text if chosen is not None else ""
    if answer is None and chosen is not None:
        answer = proposer.answer(chosen)
    return Result(problem_id=problem.id, answer=answer, text=text, score=score, ledger=meter.ledger,
                  tree=tree.as_dict(), strategy=strategy, candidates=candidates or [],
                  budget_tokens=meter.budget.tokens)
