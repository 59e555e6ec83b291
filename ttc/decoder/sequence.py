"""The engine's plain data: a Sequence (one branch), a Completion (what generate returns) and a
ScoreResult (what score returns). Kept apart from engine.py so that batch.py and engine.py need not
import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ttc.budget import Ledger

from .cache import KVSequence
from .sampling import BranchRng

# What given (not sampled) tokens are charged as, by the `charge=` names the engine takes. "generated" is
# for text that stands for the model's own output (replaying a solution, teacher forcing in tests).
GIVEN_KINDS = {"prefill": Ledger.charge_prefill, "verifier": Ledger.charge_verifier,
               "generated": Ledger.charge_generated}


def charge_given(ledger: Ledger | None, kind: str, tokens: int) -> None:
    """Charge `tokens` given tokens of `kind` (a GIVEN_KINDS name) to `ledger` (None: only check the kind)."""
    if kind not in GIVEN_KINDS:
        raise ValueError(f"charge must be one of {sorted(GIVEN_KINDS)}, got {kind!r}")
    if ledger is not None:
        GIVEN_KINDS[kind](ledger, tokens)


@dataclass(frozen=True)
class Completion:
    token_ids: tuple[int, ...]  # the new tokens, stop string included
    text: str  # their text, cut before the stop string that ended it
    logprobs: tuple[float, ...]  # each new token's logprob under the model (temperature 1)
    finish_reason: str  # "stop", "eos" or "length"
    stop: str | None = None  # the stop string that matched


@dataclass(frozen=True)
class ScoreResult:
    logprobs: torch.Tensor  # (n,) logprob of each given token
    last_logprobs: torch.Tensor  # (V,) distribution after the last given token
    hidden: torch.Tensor | None  # (n, H) final-norm hidden state at each given token


@dataclass(eq=False)
class Sequence:
    token_ids: list[int]
    kv: KVSequence
    rng: BranchRng
    ledger: Ledger
    logits: torch.Tensor | None = None  # (V,) next-token logits once every token is computed
    uncharged: dict[str, int] = field(default_factory=dict)  # pending given tokens, by kind ("prefill", "verifier")

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.kv.num_tokens
