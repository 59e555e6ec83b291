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


# DeepConf's k (Fu et al., 2025): a token's confidence is minus the mean of the k largest logprobs where it was drawn
CONFIDENCE_K = 20


@dataclass(frozen=True)
class ConfidenceStop:
    """Stop a sample inside the decode once the mean confidence of its last `window` tokens falls below
    `threshold` (DeepConf's online early stop). Checked after every drawn token once `window` tokens of this
    generate call exist (a shorter sample is never stopped); the window spans only the tokens of this call.
    A stopped sample's KV is released in the decode step that stops it; threshold -inf never stops."""

    window: int
    threshold: float

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"a confidence window holds at least one token, not {self.window}")

    def stops(self, confidences) -> bool:
        """Whether a sample whose tokens so far have these confidences is stopped now (its last window's mean
        is below the threshold). A plain sum over the window, O(window) per token: no running sum to drift."""
        if len(confidences) < self.window:
            return False
        return sum(confidences[-self.window:]) / self.window < self.threshold


@dataclass(frozen=True)
class Completion:
    token_ids: tuple[int, ...]  # the new tokens, stop string included
    text: str  # their text, cut before the stop string that ended it
    logprobs: tuple[float, ...]  # each new token's logprob under the model (temperature 1)
    finish_reason: str  # "stop", "eos", "length" or "stopped" (by a ConfidenceStop; its KV is released)
    stop: str | None = None  # the stop string that matched
    confidences: tuple[float, ...] = ()  # each new token's confidence (CONFIDENCE_K), where the engine recorded it


@dataclass(frozen=True)
class ScoreResult:
    logprobs: torch.Tensor | None  # (n,) logprob of each given token (None: hidden states only were asked)
    last_logprobs: torch.Tensor | None  # (V,) distribution after the last given token (or None)
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
