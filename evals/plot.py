"""Accuracy versus compute from finished runs:

    python -m ttc.evals.plot multirun/eval/2025-01-01/12-00-00 outputs/eval/... --out acc_vs_tokens.png

Reads every summary.json under the given run or sweep folders, draws accuracy against mean computed
tokens per problem (`--x mean_flops` for FLOPs), one line per strategy (and verifier), and prints
the points as a table (`--markdown`: a Markdown table for reports, tokens relative to the greedy run).

A run's training work (a fitted difficulty table, a probe: summary.json's `training`) is its cost too: the
token axis and the table charge it, spread over the run's problems (`--without-training` leaves it out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ttc.evals.metrics import accuracy_vs_compute
from ttc.evals.results import SUMMARY

X_LABELS = {"mean_tokens": "computed tokens per problem", "mean_flops": "FLOPs per problem",
            "mean_generated_tokens": "generated tokens per problem", "mean_wall_s": "seconds per problem"}


def find_summaries(paths: list[str | Path]) -> list[dict]:
    """The summaries in these folders (searched recursively) or files, each once."""
    files: list[Path] = []
    for given in map(Path, paths):
        if given.is_file():
            files.append(given)
        elif given.is_dir():
            files.extend(sorted(given.rglob(SUMMARY)))
        else:
            raise FileNotFoundError(f"no run folder or summary file at {given}")
    summaries, seen = [], set()
    for f in files:
        if f.resolve() in seen:
            continue
        seen.add(f.resolve())
        summary = json.loads(f.read_text())
        summary.setdefault("out_dir", str(f.parent))
        summaries.append(summary)
    return summaries


def training_tokens(summary: dict) -> int:
    """The tokens the run's trained parts cost (0 for a run that trained nothing)."""
    return int((summary.get("training") or {}).get("total_tokens") or 0)


def tokens_with_training(summary: dict) -> float:
    """Computed tokens per problem with the run's training tokens spread over its problems."""
    return float(summary["mean_tokens"]) + training_tokens(summary) / max(int(summary["problems"]), 1)


def with_training(summaries: list[dict]) -> list[dict]:
    """The summaries with `mean_tokens` charged their training (tokens_with_training)."""
    return [{**s, "mean_tokens": tokens_with_training(s)} for s in summaries]


def points_table(summaries: list[dict], x: str = "mean_tokens") -> str:
    rows = [("label", "n", x, "accuracy", "problems", "folder")]
    for s in sorted(summaries, key=lambda s: (str(s.get("label")), float(s[x]))):
        rows.append((str(s.get("label")), str(s.get("n", "")), f"{float(s[x]):.4g}", f"{s['accuracy']:.4f}",
                     str(s["problems"]), str(s.get("out_dir", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def _run_name(s: dict) -> str:
    config = s.get("strategy_config") or {}
    knobs = [f"{k}={config[k]}" for k in ("n", "expand", "weighted") if k in config]
    name = str(s.get("label"))
    if s.get("allocation"):
        name = _allocation_label(s)
        knobs = [f"budget {s.get('budget_tokens')}/problem"]
    return f"{name} {' '.join(knobs)}".strip()


def _allocation_label(s: dict) -> str:
    verifier = s.get("verifier")
    base = f"uniform/{s.get('strategy')}" if s["allocation"] == "uniform" else str(s["allocation"])
    return base + (f"+{verifier}" if verifier not in (None, "none") else "")


def markdown_table(summaries: list[dict]) -> str:
    """One row per run: accuracy, computed tokens per problem, the run's training tokens (a fitted table, a
    probe) and the two together per problem (and that x the greedy run's, if there is one), and the best-of-k
    ceilings pass@k / maj@k at the largest k the run's samples allow. Sorted by tokens with training."""
    greedy = next((s for s in summaries if s.get("strategy") == "greedy"), None)
    rows = ["| run | accuracy | tokens / problem | training tokens | with training / problem | x greedy | pass@k "
            "| maj@k |", "|---|---|---|---|---|---|---|---|"]
    greedy_tokens = tokens_with_training(greedy) if greedy else 0.0
    for s in sorted(summaries, key=tokens_with_training):
        total = tokens_with_training(s)
        ratio = f"{total / greedy_tokens:.1f}" if greedy_tokens else "-"
        ceilings = []
        for metric in ("pass@k", "maj@k") if not s.get("allocation") else ():  # samples vary per problem there
            values = s.get(metric) or {}
            k = max(values, key=int, default=None)
            ceilings.append(f"{values[k]:.2f} (k={k})" if k is not None and int(k) > 1 else "-")
        rows.append(f"| {_run_name(s)} | {s['accuracy']:.2f} ({s['correct']}/{s['problems']}) | "
                    f"{s['mean_tokens']:.0f} | {training_tokens(s) or '-'} | {total:.0f} | {ratio} | "
                    f"{' | '.join(ceilings or ['-', '-'])} |")
    return "\n".join(rows)


def plot(summaries: list[dict], out: str | Path, x: str = "mean_tokens", title: str | None = None,
         xlabel: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # runs from before labels named their allocator: one line per allocator, not under the strategy's name
    summaries = [{**s, "label": _allocation_label(s)} if s.get("allocation") else s for s in summaries]
    datasets = sorted({str(s.get("dataset")) for s in summaries})
    if len(datasets) > 1:  # one line per strategy and dataset
        summaries = [{**s, "label": f"{s.get('label')} ({s.get('dataset')})"} for s in summaries]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, points in accuracy_vs_compute(summaries, x).items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
    if any(float(s[x]) > 0 for s in summaries):
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or X_LABELS.get(x, x))
    ax.set_ylabel("accuracy")
    ax.set_title(title or ", ".join(datasets))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run or sweep folders (searched for summary.json), or summary files")
    ap.add_argument("--out", default="acc_vs_tokens.png", help="the image to write (.png, .pdf, .svg)")
    ap.add_argument("--x", default="mean_tokens", choices=sorted(X_LABELS), help="the compute axis")
    ap.add_argument("--title", default=None)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table (and still plot)")
    ap.add_argument("--without-training", action="store_true",
                    help="plot and list tokens without the runs' training work (the Markdown table shows both)")
    args = ap.parse_args(argv)
    try:
        summaries = find_summaries(args.runs)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not summaries:
        print(f"error: no {SUMMARY} under {' '.join(args.runs)}", file=sys.stderr)
        return 2
    charged = summaries if args.without_training else with_training(summaries)
    print(markdown_table(summaries) if args.markdown else points_table(charged, args.x))
    trained = not args.without_training and any(training_tokens(s) for s in summaries)
    xlabel = X_LABELS.get(args.x, args.x) + (", training included" if trained and args.x == "mean_tokens" else "")
    print(f"wrote {plot(charged, args.out, args.x, args.title, xlabel)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
