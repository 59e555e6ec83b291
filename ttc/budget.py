"""Compute accounting: the Ledger every node charges, and the Budget a strategy checks.

Honest accounting means: every token a forward pass computes is counted once, as prompt
(`prefill_tokens`), sampled (`generated_tokens`) or verifier work (`verifier_tokens`); every token
whose KV was served from a shared block is counted in `reused_tokens` (work not redone, but visible).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

__all__ = ["Ledger", "Budget", "BudgetExceeded", "CannotAttempt"]


@dataclass
class Ledger:
    """Counts of work done. Mutable and additive: `a + b`, `a += b`, `Ledger.sum(records)`."""

    prefill_tokens: int = 0  # prompt / appended-text tokens whose KV was computed
    reused_tokens: int = 0  # tokens whose KV came from shared blocks or the prefix cache
    generated_tokens: int = 0  # tokens sampled by the model
    verifier_tokens: int = 0  # tokens computed on behalf of a verifier (scoring, judging)
    forward_passes: int = 0  # batched model forwards (one step of many branches is one pass)
    flops: float = 0.0  # estimated: 2 * params per computed token + attention over the context
    peak_kv_bytes: int = 0  # largest live KV footprint seen while this ledger was charged
    wall_s: float = 0.0

    @property
    def computed_tokens(self) -> int:
        """Tokens a forward pass actually ran on (everything but reused)."""
        return self.prefill_tokens + self.generated_tokens + self.verifier_tokens

    @property
    def total_tokens(self) -> int:
        """The unit budgets are expressed in: computed tokens (reused KV is not recomputed).

        The one definition of "total tokens": records, pools and summaries all go through it
        (`Ledger.from_record(r).total_tokens`)."""
        return self.computed_tokens

    # -- charging: the only way work enters a ledger -------------------------------------------

    def charge_prefill(self, tokens: int) -> None:
        """Given tokens (a prompt, appended text) whose KV a forward computed."""
        self.prefill_tokens += tokens

    def charge_generated(self, tokens: int = 1) -> None:
        """Tokens the model sampled."""
        self.generated_tokens += tokens

    def charge_verifier(self, tokens: int) -> None:
        """Tokens computed on a verifier's behalf (scoring, judging, embedding)."""
        self.verifier_tokens += tokens

    def charge_reused(self, tokens: int) -> None:
        """Tokens whose KV came from shared blocks or the prefix cache (not recomputed)."""
        self.reused_tokens += tokens

    def charge_flops(self, flops: float) -> None:
        self.flops += flops

    def charge_forward(self, live_kv_bytes: int) -> None:
        """One batched model forward this ledger took part in, and the KV footprint after it."""
        self.forward_passes += 1
        self.observe_kv(live_kv_bytes)

    def charge_wall(self, seconds: float) -> None:
        self.wall_s += seconds

    def observe_kv(self, live_bytes: int) -> None:
        if live_bytes > self.peak_kv_bytes:
            self.peak_kv_bytes = live_bytes

    def __add__(self, other: "Ledger") -> "Ledger":
        out = dataclasses.replace(self)
        out += other
        return out

    def __iadd__(self, other: "Ledger") -> "Ledger":
        for f in dataclasses.fields(self):
            if f.name == "peak_kv_bytes":
                self.peak_kv_bytes = max(self.peak_kv_bytes, other.peak_kv_bytes)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "Ledger":
        """The ledger fields of a results.jsonl record (missing ones are 0)."""
        return cls(**{f.name: record.get(f.name) or 0 for f in dataclasses.fields(cls)})

    @classmethod
    def sum(cls, ledgers) -> "Ledger":
        out = cls()
        for ledger in ledgers:
            out += ledger
        return out


class CannotAttempt(Exception):
    """A problem cannot be attempted within its limits: its budget (BudgetExceeded) or the model's
    context (ttc.decoder.PromptTooLong). Evals record such a problem as failed, with its partial work."""


class BudgetExceeded(CannotAttempt, RuntimeError):
    """Raised when work is requested that the budget cannot pay for."""


@dataclass
class Budget:
    """Limits in any ledger unit; None means unlimited. `tokens` limits computed tokens.

    A strategy asks `can_afford(ledger, tokens=k)` before each expansion and stops when it cannot.
    """

    tokens: int | None = None
    flops: float | None = None
    forward_passes: int | None = None
    wall_s: float | None = None
    started: float = field(default_factory=time.perf_counter, repr=False, compare=False)

    def __post_init__(self):
        given = {"tokens": self.tokens, "flops": self.flops, "forward_passes": self.forward_passes,
                 "wall_s": self.wall_s}
        bad = [f"{name}={value}" for name, value in given.items() if value is not None and not value > 0]
        if bad:  # a budget of nothing would fail every problem as "exhausted" instead of saying why
            raise ValueError(f"a budget's limits are positive numbers or None (unlimited), not {', '.join(bad)}")

    def remaining_tokens(self, ledger: Ledger) -> float:
        if self.tokens is None:
            return float("inf")
        return self.tokens - ledger.total_tokens

    def can_afford(self, ledger: Ledger, tokens: int = 0, flops: float = 0.0, forward_passes: int = 0) -> bool:
        if self.tokens is not None and ledger.total_tokens + tokens > self.tokens:
            return False
        if self.flops is not None and ledger.flops + flops > self.flops:
            return False
        if self.forward_passes is not None and ledger.forward_passes + forward_passes > self.forward_passes:
            return False
        if self.wall_s is not None and time.perf_counter() - self.started > self.wall_s:
            return False
        return True

    def check(self, ledger: Ledger, tokens: int = 0) -> None:
        if not self.can_afford(ledger, tokens=tokens):
            raise BudgetExceeded(
                f"budget exhausted: {ledger.total_tokens} tokens spent of {self.tokens}, {tokens} more requested"
            )
