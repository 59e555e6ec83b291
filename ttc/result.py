"""What a search returns: the answer, the ledger, and the tree (or particle history) as plain data.

`Result` renders in Jupyter as the search tree (an SVG, `ttc.tree_view`) with scores and a budget meter
(`_repr_html_`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from ttc.budget import Ledger
from ttc.graph import Branch
from ttc.tree_view import tree_svg


class Tree:
    """Records every branch a search creates and what became of it (plain dicts, JSON-ready)."""

    def __init__(self, kind: str = "tree"):
        self.kind = kind  # "tree" or "particles"
        self.nodes: dict[int, dict] = {}
        self.history: list[dict] = []  # per-round records (particle weights, ESS, beam scores...)

    def add(self, branch: Branch, score: float | None = None, status: str = "open") -> None:
        node = self.nodes.get(branch.id)
        if node is None:
            parent = branch.parent.id if branch.parent is not None else None
            step = branch.steps[-1] if branch.steps else None
            node = {"id": branch.id, "parent": parent, "depth": branch.depth,
                    "text": step.text if step else "", "tokens": len(step.token_ids) if step else 0,
                    "score": None, "status": status}
            self.nodes[branch.id] = node
        if branch.finished and "solution" not in node:
            # a node holds only its own step's text, and steps decoded in one call (a completion, a rollout)
            # are not nodes of their own: a finished node keeps its whole solution, which evals grade
            node["solution"] = branch.text
        if score is not None:
            node["score"] = float(score)
        node["status"] = status

    def not_solutions(self, branches) -> None:
        """These finished branches are replies that answer nothing (a rating, a critique, a plan)."""
        for b in branches:
            self.nodes.get(b.id, {}).pop("solution", None)

    def mark(self, branches, status: str) -> None:
        for b in branches:
            self.add(b, status=status)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "nodes": list(self.nodes.values()), "history": self.history}


@dataclass
class Result:
    problem_id: str
    answer: str | None
    text: str  # the chosen solution's text
    score: float | None
    ledger: Ledger
    tree: dict
    strategy: str
    candidates: list[dict] = field(default_factory=list)  # [{"answer", "score", "votes"?}]
    budget_tokens: int | None = None
    details: dict = field(default_factory=dict)  # what a strategy reports beyond its answer (JSON-ready)

    def as_record(self) -> dict:
        extra = {"details": self.details} if self.details else {}
        return {"id": self.problem_id, "answer": self.answer, "score": self.score, "strategy": self.strategy,
                "candidates": self.candidates, **extra, **self.ledger.as_dict()}

    def _repr_html_(self) -> str:
        spent = self.ledger.total_tokens
        cap = self.budget_tokens
        pct = min(100.0, 100.0 * spent / cap) if cap else 0.0
        meter = (f"<div style='width:320px;border:1px solid #888;height:12px'><div style='width:{pct:.0f}%;"
                 f"height:12px;background:#4a7'></div></div>"
                 f"<small>{spent} of {cap if cap else '∞'} tokens computed, {self.ledger.reused_tokens} reused, "
                 f"{self.ledger.forward_passes} forward passes</small>")
        history = ""
        if self.tree.get("kind") == "particles" and self.tree.get("history"):
            rows = "".join(f"<tr><td>{h.get('step')}</td><td>{h.get('ess', float('nan')):.2f}</td>"
                           f"<td>{', '.join(f'{w:.2f}' for w in h.get('weights', []))}</td></tr>"
                           for h in self.tree["history"])
            history = f"<table><tr><th>step</th><th>ESS</th><th>weights</th></tr>{rows}</table>"
        return (f"<div><b>{html.escape(self.strategy)}</b> on {html.escape(str(self.problem_id))}: answer "
                f"<code>{html.escape(str(self.answer))}</code>{meter}{history}{tree_svg(self.tree)}</div>")
