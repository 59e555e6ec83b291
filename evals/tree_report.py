"""What the search trees of several runs on the same problems say: which strategy wins, and why.

    ttc-eval ... record_trees=true hydra.run.dir=runs/cmp/beam      # one folder per strategy, same problems
    python -m ttc.evals.tree_report runs/cmp/beam runs/cmp/mcts runs/cmp/rebase ... [--draw ID --out DIR]

Each run must have been made with `record_trees=true`: its records then hold the search tree with every whole
solution graded (ttc.evals.runner.graded_tree). For each run the table gives accuracy (95% Wilson interval),
the paired difference against the first run on the problems both solved, computed tokens, and from the trees:
- nodes and whole solutions per problem, and the mean depth (steps) of a solution;
- found: the share of problems whose tree holds a right solution anywhere (the ceiling of its selection);
- picked: the share of those where the answer given is right (how well the verifier and the answer rule
  used what the search found);
- best-scored right: the share of problems whose best-scored solution in the whole tree is right (what
  taking the verifier's argmax over everything the search finished would give);
- vote right: the share of problems whose majority answer over the tree's solutions is right (what
  self-consistency over everything the search finished would give);
- AUC: the verifier's score of whole solutions against their grade, pooled over problems and the mean
  within a problem (over problems with both right and wrong solutions: what selection needs);
- pruned: the share of the tree's generated tokens in steps the search threw away.
A strategy that loses on "found" explored too little or in the wrong places; one that loses on "picked"
found the answer and chose another.
"""

from __future__ import annotations

import argparse
import html
import json
import math
from pathlib import Path
from typing import Callable

import torch

from ttc.budget import Ledger
from ttc.evals.panel_report import paired_difference, wilson
from ttc.evals.regrade import run_dataset
from ttc.evals.results import RESULTS, SUMMARY, ResultsFile
from ttc.tree_view import tree_svg
from ttc.verifiers.probe import roc_auc
from ttc.verifiers.vote import vote

__all__ = ["load_trees", "tree_stats", "report", "draw", "main"]


def load_trees(folder: str | Path) -> list[dict]:
    """The run's records, each with its graded tree; a one-line error when the run kept no trees."""
    records = list(ResultsFile(Path(folder) / RESULTS).load(repair=False).values())
    if not records:
        raise SystemExit(f"{folder}: no records")
    if not any("tree" in r for r in records):
        raise SystemExit(f"{folder}: its records hold no trees; run it with record_trees=true")
    return records


def _solutions(record: dict) -> list[dict]:
    return [n for n in (record.get("tree") or {}).get("nodes", []) if "solution" in n]


def tree_stats(records: list[dict], extract: Callable[[str], str | None] | None = None) -> dict:
    """The run's accuracy, tokens and tree statistics (see the module docstring); `by_id`: problem -> right.
    `extract`: the dataset's answer extraction, for solutions recorded without their answer."""
    with_tree = [r for r in records if "tree" in r]
    solutions = [_solutions(r) for r in with_tree]
    found = [any(n.get("correct") for n in s) for s in solutions]
    picked = [bool(r.get("correct")) for r, f in zip(with_tree, found) if f]
    scored = [[(n["score"], bool(n.get("correct"))) for n in s if _has_score(n)] for s in solutions]
    within = [_auc(pairs) for pairs in scored]
    within = [a for a in within if not math.isnan(a)]
    best = [max(pairs, key=lambda p: p[0])[1] for pairs in scored if pairs]
    votes = [_vote_right(s, extract) for s in solutions]
    nodes = [(r.get("tree") or {}).get("nodes", []) for r in with_tree]
    step_tokens = sum(n.get("tokens", 0) for ns in nodes for n in ns)
    pruned_tokens = sum(n.get("tokens", 0) for ns in nodes for n in ns if n.get("status") == "pruned")
    count = max(1, len(with_tree))
    return {
        "problems": len(records), "correct": sum(bool(r.get("correct")) for r in records),
        "by_id": {r["id"]: bool(r.get("correct")) for r in records},
        "tokens": sum(Ledger.from_record(r).total_tokens for r in records) / max(1, len(records)),
        "nodes": sum(len(ns) for ns in nodes) / count,
        "solutions": sum(len(s) for s in solutions) / count,
        "depth": (sum(n.get("depth", 0) for s in solutions for n in s) / max(1, sum(len(s) for s in solutions))),
        "found": sum(found) / count, "picked": (sum(picked) / len(picked)) if picked else math.nan,
        "auc": _auc([p for pairs in scored for p in pairs]),
        "auc_within": sum(within) / len(within) if within else math.nan,
        "best_scored": sum(best) / count, "pruned": pruned_tokens / step_tokens if step_tokens else 0.0,
        "vote": (sum(v for v in votes if v is not None) / count) if all(v is not None for v in votes) else math.nan,
    }


def _vote_right(solutions: list[dict], extract) -> bool | None:
    """Whether the majority answer over the tree's solutions is right (ties: the first found); None when a
    solution has no recorded answer and no `extract` is given."""
    if not solutions:
        return False
    if any("answer" not in n for n in solutions) and extract is None:
        return None
    answers = [n["answer"] if "answer" in n else extract(n["solution"]) for n in solutions]
    winner = vote(answers).winner
    return winner is not None and bool(solutions[winner].get("correct"))


def _has_score(node: dict) -> bool:
    return node.get("score") is not None and not math.isnan(node["score"])


def _auc(pairs: list[tuple[float, bool]]) -> float:
    """ROC AUC of (score, right) pairs; NaN unless both grades occur."""
    labels = [y for _, y in pairs]
    if not any(labels) or all(labels):
        return math.nan
    return roc_auc(torch.tensor([v for v, _ in pairs]), torch.tensor(labels))


def _label(folder: str | Path) -> str:
    path = Path(folder) / SUMMARY
    label = json.loads(path.read_text()).get("label") if path.is_file() else None
    return f"{Path(folder).name} ({label})" if label else Path(folder).name


def report(folders: list[str], extract_answers: bool = False) -> str:
    """A markdown table, one row per run; differences are paired against the first run. `extract_answers`:
    rebuild each run's dataset to extract the answers of solutions recorded without one (the vote column)."""
    stats = [tree_stats(load_trees(f), run_dataset(f).extract if extract_answers else None) for f in folders]
    base = stats[0]["by_id"]
    head = ("| run | accuracy (95% CI) | vs first (paired 95% CI) | tokens | nodes | solutions | depth | found "
            "| picked | best-scored right | vote right | AUC pooled / within | pruned |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for folder, s in zip(folders, stats):
        low, high = wilson(s["correct"], s["problems"])
        mean, dlow, dhigh = paired_difference(s["by_id"], base)
        lines.append(
            f"| {_label(folder)} | {s['correct'] / max(1, s['problems']):.0%} ({s['correct']}/{s['problems']}; "
            f"{low:.0%}-{high:.0%}) | {100 * mean:+.0f} ({100 * dlow:+.0f} to {100 * dhigh:+.0f}) "
            f"| {s['tokens']:.0f} | {s['nodes']:.1f} | {s['solutions']:.1f} | {s['depth']:.1f} | {s['found']:.0%} "
            f"| {_percent(s['picked'])} | {s['best_scored']:.0%} | {_percent(s['vote'])} "
            f"| {_number(s['auc'])} / {_number(s['auc_within'])} "
            f"| {s['pruned']:.0%} |")
    return "\n".join(lines)


def _percent(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.0%}"


def _number(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders made with record_trees=true; the first is the baseline")
    parser.add_argument("--extract-answers", action="store_true",
                        help="rebuild each run's dataset to extract answers its trees did not record (the vote column)")
    parser.add_argument("--draw", metavar="PROBLEM_ID", help="also draw each run's tree of this problem")
    parser.add_argument("--out", default=".", help="the folder for the drawings (<run>-<problem>.html)")
    args = parser.parse_args(argv)
    print(report(args.runs, args.extract_answers))
    if args.draw:
        for path in draw(args.runs, args.draw, args.out):
            print(f"tree: {path}")
    return 0


def draw(folders: list[str], problem_id: str, out: str | Path) -> list[Path]:
    """Each run's tree of one problem as an HTML page (ttc.tree_view: solutions marked right or wrong)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    written = []
    for folder in folders:
        record = next((r for r in load_trees(folder) if r["id"] == problem_id), None)
        if record is None:
            raise SystemExit(f"{folder}: no record of problem {problem_id}")
        path = Path(out) / f"{Path(folder).name}-{problem_id}.html"
        head = html.escape(f"{_label(folder)}: {problem_id}, answer {record.get('answer')!r} "
                           f"({'right' if record.get('correct') else 'wrong'}; reference {record.get('reference')!r})")
        path.write_text(f"<!doctype html><meta charset='utf-8'><p style='font-family:sans-serif'>{head}</p>"
                        f"{tree_svg(record.get('tree') or {})}\n")
        written.append(path)
    return written


if __name__ == "__main__":
    raise SystemExit(main())
