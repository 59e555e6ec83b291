"""RPC (Zhou et al., 2025): n whole solutions in one batched decode, low-probability reasoning paths pruned (a
two-Weibull mixture over the paths' probabilities), and the answer whose distinct remaining paths hold the
most probability (perplexity consistency). The numbers are the sampled tokens' own logprobs, recorded while
they were drawn: choosing costs no tokens. The rule itself is ttc.verifiers.rpc.
"""

from __future__ import annotations

from dataclasses import dataclass

from ttc.graph import Meter, Problem
from ttc.result import Result, Tree
from ttc.search.common import finish, sample_solutions
from ttc.verifiers.rpc import path_probability, rpc_select


@dataclass
class RPC:
    n: int = 8
    prune: bool = True  # false: perplexity consistency alone

    def __post_init__(self):
        if self.n < 1:
            raise ValueError("rpc needs n >= 1 samples")

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        """The verifier is not used: the paths' own probabilities select."""
        tree = Tree()
        samples = sample_solutions(problem, proposer, meter, tree, self.n)
        try:
            answers = [proposer.answer(b) for b in samples]
            probabilities = [path_probability(b.logprob, b.num_tokens) for b in samples]
            choice = rpc_select(answers, probabilities, keys=[b.text for b in samples], prune=self.prune)
            for b, p, k in zip(samples, probabilities, choice.keep):
                tree.add(b, score=p, status="final" if k else "pruned")
            tree.history.append({"pruned": choice.keep.count(False),
                                 "mixture": choice.mixture.as_dict() if choice.mixture is not None else None})
            candidates = [{"answer": a, "score": p, "pruned": not k}
                          for a, p, k in zip(answers, probabilities, choice.keep)]
            chosen = samples[choice.winner] if choice.winner is not None else None  # no kept path answers
            return finish("rpc", problem, proposer, meter, tree, chosen, choice.share, candidates)
        finally:
            proposer.release(samples)


STRATEGY = RPC
