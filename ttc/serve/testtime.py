"""Test-time compute per request: `"ttc": {"strategy": "self_consistency", "n": 8, "verifier": "self_eval",
"budget_tokens": 4096}` runs that strategy on the prompt and answers with its chosen solution.

Names are config names (configs/strategy/<name>.yaml, configs/verifier/<name>.yaml), built by the
config edge (`ttc.evals.build.instantiate`), exactly as `ttc-eval strategy=<name> verifier=<name>` would:
  - strategy: the file's `strategy` node, its fields overridden by the request's other `ttc` keys;
  - proposer: configs/proposer/local.yaml, then the strategy file's `proposer` defaults, then the
    request's `ttc.proposer` object, then the request's temperature / top_p / top_k / min_p /
    max_tokens when given; answers are extracted with `ttc.verifiers.math.extract_answer`;
  - verifier: the file's node (or {"name": ..., overrides}), the model injected as `model=`.
Everything runs in the request's worker on its RequestEngine, so the strategy's decoding is batched
with every other request's, cancelled with its client, and its KV released at the end.

Budget: `budget_tokens` is the request's `ttc.Budget(tokens=...)` (computed tokens). Strategies shrink
their proposals to what is left, so the budget is never exceeded: a budget that runs out mid-search
still answers (200) with what was finished, `answer` null if nothing was (finish_reason "length");
a budget that cannot even pay for the prompt is a 400.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass
from importlib import resources

import yaml

from ttc.budget import Budget, BudgetExceeded, Ledger
from ttc.evals.build import ConfigError, instantiate, locate
from ttc.graph import MissingCapability, Problem
from ttc.result import Result
from ttc.search.solve import solve
from ttc.serve.errors import bad_request
from ttc.serve.protocol import TTCInfo, TTCOptions
from ttc.verifiers.math import extract_answer

__all__ = ["Plan", "plan", "run_plan", "summary", "available"]

_NAME = re.compile(r"^[a-z0-9_]+$")
_SAMPLING = ("temperature", "top_p", "top_k", "min_p")


def available(group: str) -> list[str]:
    folder = resources.files("ttc.configs") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _config(group: str, name: str) -> dict:
    path = resources.files("ttc.configs") / group / f"{name}.yaml"
    if not _NAME.match(name) or not path.is_file():
        raise bad_request(f"unknown {group} {name!r}; choose one of {', '.join(available(group))}",
                          param=f"ttc.{group}")
    return yaml.safe_load(path.read_text()) or {}


@dataclass(frozen=True)
class Plan:
    """What a ttc request builds in its worker (plain dicts: nodes for `instantiate`)."""

    name: str
    strategy: dict
    proposer: dict
    verifier: dict | None
    budget_tokens: int | None
    breadth: int  # branches alive at once, roughly: for the KV reservation
    max_tokens: int  # per solution


def _no_targets(value, where: str) -> None:
    """A request names configs; it never names code: `_target_` anywhere in what it sends is refused."""
    if isinstance(value, dict):
        if "_target_" in value:
            raise bad_request(f"{where}: a request cannot set _target_; name a strategy or verifier config",
                              param=where)
        for k, v in value.items():
            _no_targets(v, f"{where}.{k}")
    elif isinstance(value, list):
        for v in value:
            _no_targets(v, where)


def _check_fields(node: dict, where: str) -> None:
    """Unknown fields fail here, at the edge (400), not in the worker."""
    params = dict(node)
    try:
        inspect.signature(locate(params.pop("_target_"))).bind_partial(**params)
    except (TypeError, ConfigError) as e:
        raise bad_request(f"{where}: {e}", param=where) from None


def plan(opts: TTCOptions, request, max_tokens: int | None) -> Plan:
    """Resolve a request's `ttc` options into config nodes; 400 for unknown names or fields.
    `max_tokens`: the request's own limit when it set one (else the strategy's proposer default)."""
    _no_targets(opts.model_dump(), "ttc")
    file = _config("strategy", opts.strategy)
    strategy = {**copy.deepcopy(file["strategy"]), **opts.strategy_fields}
    _check_fields(strategy, "ttc")
    proposer = {**_config("proposer", "local"), **(file.get("proposer") or {}), **(opts.proposer or {})}
    proposer.update({k: getattr(request, k) for k in _SAMPLING if getattr(request, k) is not None})
    proposer["top_k"] = max(0, proposer.get("top_k") or 0)
    if max_tokens is not None:
        proposer["max_tokens"] = max_tokens
    _check_fields(proposer, "ttc.proposer")
    verifier = None
    if opts.verifier not in (None, "none"):
        spec = {"name": opts.verifier} if isinstance(opts.verifier, str) else dict(opts.verifier)
        name = spec.pop("name", None)
        if not isinstance(name, str):
            raise bad_request("ttc.verifier: give a config name, or an object with a `name`", param="ttc.verifier")
        verifier = {**_config("verifier", name), **spec}
        if verifier.get("_target_") is not None:
            _check_fields(verifier, "ttc.verifier")
        else:
            verifier = None
    try:
        breadth = int(strategy.get("n") or 1) * int(strategy.get("expand") or 1)
        limit = int(proposer.get("max_tokens") or 512)
    except (TypeError, ValueError):
        raise bad_request("ttc: n, expand and max_tokens must be integers", param="ttc") from None
    return Plan(opts.strategy, strategy, proposer, verifier, opts.budget_tokens, breadth, limit)


def run_plan(view, model, p: Plan, prompt_ids: list[int], seed: int) -> tuple[Result, int]:
    """Run the plan on `model` (a SharedModel over the request's RequestEngine `view`) in a worker.
    Returns the Result and the prompt's tokens served by the prefix cache."""
    try:
        strategy = instantiate(p.strategy, "strategy", model=model)
        verifier = instantiate(p.verifier, "verifier", model=model) if p.verifier else None
        proposer = instantiate(p.proposer, "proposer", model=model, seed=seed, answer_fn=extract_answer)
    except (ConfigError, MissingCapability, ValueError, TypeError) as e:
        raise bad_request(f"ttc: {e}", param="ttc") from None
    ledger = Ledger()
    try:
        result = solve(Problem(id="request", prompt=list(prompt_ids)), strategy, verifier=verifier,
                       budget=Budget(tokens=p.budget_tokens), proposer=proposer, ledger=ledger)
    except BudgetExceeded as e:
        raise bad_request(f"ttc.budget_tokens={p.budget_tokens} is too small for this request ({e})",
                          param="ttc.budget_tokens", code="budget_exceeded") from None
    return result, view.prompt_cached or 0


def summary(result: Result) -> TTCInfo:
    ledger = result.ledger
    nodes = result.tree.get("nodes", [])
    return TTCInfo(
        strategy=result.strategy, answer=result.answer, score=result.score, budget_tokens=result.budget_tokens,
        ledger={"generated_tokens": ledger.generated_tokens, "prefill_tokens": ledger.prefill_tokens,
                "reused_tokens": ledger.reused_tokens, "verifier_tokens": ledger.verifier_tokens,
                "forward_passes": ledger.forward_passes, "total_tokens": ledger.total_tokens,
                "wall_s": round(ledger.wall_s, 4)},
        tree={"nodes": len(nodes), "finished": sum(1 for n in nodes if n.get("status") in ("final", "chosen")),
              "depth": max((n.get("depth", 0) for n in nodes), default=0), "candidates": result.candidates})
