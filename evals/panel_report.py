"""Read selector-panel runs (strategy=panel): each selector's accuracy with a 95% interval, its tokens, its
AUC, and its accuracy at fewer samples (the first k of each problem's n), against greedy and pass@k.

    python -m ttc.evals.panel_report runs/panel/chain_sum --greedy runs/greedy/chain_sum --plot curve.png
    python -m ttc.evals.panel_report RUN... --ks 1,2,4,8,16 --selectors self_consistency,probe_vote --markdown
    python -m ttc.evals.panel_report RUN --probe old=old.pt     # another probe, scored on the saved features

`--probe NAME=FILE` adds the selectors NAME and NAME_vote: a probe file's probabilities on the features the run
saved (strategy.features_dir, RUN/features unless --features says where), so two probes are compared on the
same samples; its own tokens are the run's probe tokens (the same suffix: the two probes' feature specs must match).

Tokens per problem for a selector at k samples: the prompt's prefill (once), the first k samples' generated
tokens, and the selector's own tokens (self_eval's questions, the probe's suffix) for those k; the panel's
record pays every selector's cost, so its ledger is not one selector's. AUC: how well a score ranks correct
samples above wrong ones, pooled over every sample of every problem, and within a problem (the mean over
problems with both correct and wrong samples: what choosing among one problem's samples needs).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from scipy import stats

from ttc.budget import Ledger
from ttc.evals.plot import training_tokens
from ttc.evals.results import RESULTS, SUMMARY, ResultsFile
from ttc.search.panel import choose, feature_file_name
from ttc.verifiers.probe import LogisticProbe, load_probe_file, roc_auc

__all__ = ["load_panel", "rescore_probe", "selector_rows", "wilson", "paired_difference", "main"]

DEFAULT_SHOWN = ("self_consistency", "confidence_lowest", "confidence_tail", "rpc", "self_eval", "probe_vote")


def wilson(correct: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (scipy's binomial test)."""
    if n == 0:
        return (0.0, 1.0)
    return tuple(stats.binomtest(correct, n).proportion_ci(level, method="wilson"))


def load_panel(folder: str | Path) -> list[dict]:
    records = list(ResultsFile(Path(folder) / RESULTS).load(repair=False).values())
    if not records or any(r.get("strategy") not in ("panel", None) for r in records):
        raise SystemExit(f"{folder}: not a panel run (strategy=panel)")
    return [r for r in records if r.get("candidates")]


def rescore_probe(records: list[dict], name: str, probe_file: str | Path, features: str | Path) -> None:
    """Adds `name`'s score to every candidate of `records` (in place): the probe file's probability on the
    features the panel saved for it, and its own tokens (the panel's probe tokens: the same suffix). The
    recorded picks are dropped, so every selector's choice is recomputed by the panel's rule."""
    try:
        state = load_probe_file(probe_file)
    except (ValueError, OSError) as e:  # not a probe, or no such file: one line
        raise SystemExit(str(e)) from None
    probe = LogisticProbe.from_state(state)
    for r in records:
        path = Path(features) / feature_file_name(r["id"])
        if not path.is_file():
            raise SystemExit(f"{path}: no saved features for problem {r['id']} (run the panel with strategy.features_dir)")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if dict(saved["spec"]) != dict(state["feature"]):
            raise SystemExit(f"{probe_file} reads other features than {path} holds (suffix or model differ)")
        if len(saved["features"]) != len(r["candidates"]):
            raise SystemExit(f"{path}: {len(saved['features'])} feature rows for {len(r['candidates'])} samples")
        for c, p in zip(r["candidates"], probe.predict(saved["features"]).tolist()):
            c["scores"][name] = p
            c.pop("chosen_by", None)
        own = (r.setdefault("details", {})).setdefault("selector_tokens", {})
        own[name] = own.get("probe", 0)


def _own_tokens(record: dict, selector: str, k: int) -> float:
    """The selector's own verifier tokens for the first k of the record's samples."""
    base = selector.removesuffix("_vote")
    spent = (record.get("details") or {}).get("selector_tokens", {}).get(base, 0)
    return spent * k / len(record["candidates"])


def _picks(record: dict, k: int) -> dict[str, int | None]:
    """Every selector's choice among the record's first k samples (the panel's own rule, recomputed)."""
    cands = record["candidates"][:k]
    if k == len(record["candidates"]) and all("chosen_by" in c for c in cands):
        return {name: i for i, c in enumerate(cands) for name in c.get("chosen_by", [])} | {
            name: None for name in (record.get("details") or {}).get("selectors", [])
            if not any(name in c.get("chosen_by", []) for c in cands)}
    scores = {name: [c["scores"][name] for c in cands] for name in cands[0]["scores"]}
    return choose([c["answer"] for c in cands], [c["score"] for c in cands], scores,
                  [c.get("text_key", i) for i, c in enumerate(cands)])


def selector_rows(records: list[dict], k: int) -> dict[str, dict]:
    """{selector: {"correct", "problems", "tokens", "by_id": {problem id: right}}} at k samples per problem."""
    rows: dict[str, dict] = {}
    for r in records:
        gen = sum(c.get("tokens", 0) for c in r["candidates"][:k])
        for name, pick in _picks(r, k).items():
            row = rows.setdefault(name, {"correct": 0, "problems": 0, "tokens": 0.0, "by_id": {}})
            right = pick is not None and bool(r["candidates"][pick].get("correct"))
            row["problems"] += 1
            row["correct"] += int(right)
            row["by_id"][r["id"]] = right
            row["tokens"] += r.get("prefill_tokens", 0) + gen + _own_tokens(r, name, k)
    for row in rows.values():
        row["tokens"] /= max(1, row["problems"])
    return rows


def paired_difference(a: dict[str, bool], b: dict[str, bool]) -> tuple[float, float, float]:
    """(mean, low, high): accuracy of a minus b on the problems both hold, with a 95% normal interval of the
    paired per-problem differences (what a comparison on the same problems can tell; -1, 0 or 1 each)."""
    d = [int(a[i]) - int(b[i]) for i in a if i in b]
    if not d:
        return (math.nan, math.nan, math.nan)
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1))
    half = 1.96 * sd / math.sqrt(len(d))
    return (mean, mean - half, mean + half)


def pass_at(records: list[dict], k: int) -> tuple[int, int]:
    """(problems with a correct sample among their first k, problems)."""
    return sum(any(c.get("correct") for c in r["candidates"][:k]) for r in records), len(records)


def aucs(records: list[dict]) -> dict[str, tuple[float, float]]:
    """{score name: (pooled AUC, mean within-problem AUC)}; "probability" is exp(mean logprob)."""
    names = list(records[0]["candidates"][0]["scores"]) + ["probability"]
    out = {}
    for name in names:
        get = (lambda c: c["score"]) if name == "probability" else (lambda c, n=name: c["scores"][n])
        values = [(get(c), bool(c.get("correct"))) for r in records for c in r["candidates"]]
        pooled = roc_auc(torch.tensor([_finite(v) for v, _ in values]), torch.tensor([y for _, y in values]))
        within = []
        for r in records:
            ys = [bool(c.get("correct")) for c in r["candidates"]]
            if any(ys) and not all(ys):
                within.append(roc_auc(torch.tensor([_finite(get(c)) for c in r["candidates"]]), torch.tensor(ys)))
        out[name] = (pooled, sum(within) / len(within) if within else math.nan)
    return out


def _finite(x: float) -> float:
    return -1e30 if x == -math.inf else float(x)


def _greedy(folder: str | None, ids: set[str] | None = None) -> dict | None:
    """A baseline run's accuracy and mean computed tokens, on the panel's own problems (`ids`) when given."""
    if not folder:
        return None
    records = [r for r in ResultsFile(Path(folder) / RESULTS).load(repair=False).values() if ids is None or r["id"] in ids]
    if ids is not None and len(records) < len(ids):
        raise SystemExit(f"{folder} holds {len(records)} of the panel's {len(ids)} problems")
    tokens = sum(Ledger.from_record(r).total_tokens for r in records) / max(1, len(records))
    return {"correct": sum(bool(r.get("correct")) for r in records), "problems": len(records), "tokens": tokens,
            "by_id": {r["id"]: bool(r.get("correct")) for r in records}}


def report(folder: str, records: list[dict], ks: list[int], greedy: dict | None, shown: list[str]) -> str:
    n = min(len(r["candidates"]) for r in records)
    ks = [k for k in ks if k <= n] or [n]
    full = selector_rows(records, n)
    auc = aucs(records)
    lines = [f"## {folder}: {len(records)} problems, {n} samples each",
             "", "| selector | accuracy (95% CI) | minus self-consistency (paired 95% CI) | minus greedy (paired) | "
             "tokens/problem | own tokens | AUC pooled | AUC within |", "|---|---|---|---|---|---|---|---|"]
    sc = full["self_consistency"]["by_id"]
    if greedy:
        lo, hi = wilson(greedy["correct"], greedy["problems"])
        lines.append(f"| greedy (its own run) | {greedy['correct'] / greedy['problems']:.1%} ({lo:.0%}-{hi:.0%}) | "
                     f"{_diff(greedy['by_id'], sc)} | | {greedy['tokens']:.0f} | 0 | | |")
    for name, row in sorted(full.items(), key=lambda kv: -kv[1]["correct"]):
        lo, hi = wilson(row["correct"], row["problems"])
        a = auc.get(name.removesuffix("_vote")) if name not in ("self_consistency", "rpc", "pc") else None
        own = sum(_own_tokens(r, name, n) for r in records) / len(records)
        vs_greedy = _diff(row["by_id"], greedy["by_id"]) if greedy else ""
        lines.append(f"| {name} | {row['correct'] / row['problems']:.1%} ({lo:.0%}-{hi:.0%}) | "
                     f"{_diff(row['by_id'], sc) if name != 'self_consistency' else ''} | {vs_greedy} | "
                     f"{row['tokens']:.0f} | {own:.0f} | {_fmt(a, 0)} | {_fmt(a, 1)} |")
    c, m = pass_at(records, n)
    lines.append(f"| pass@{n} (an oracle picks) | {c / m:.1%} | | | {full['self_consistency']['tokens']:.0f} | | | |")
    lines.append(f"\nAUC of exp(mean logprob): pooled {_fmt(auc['probability'], 0)}, within {_fmt(auc['probability'], 1)}")
    trained = _training_tokens(folder)
    if trained:
        lines.append(f"Training the run's probe cost {trained} computed tokens, once (not in the table): "
                     f"{trained / len(records):.0f} per problem if charged to these {len(records)} problems alone")
    lines += ["", "| selector | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    curves = {k: selector_rows(records, k) for k in ks}
    for name in [s for s in shown if s in full] + ["pass@k"]:
        cells = []
        for k in ks:
            if name == "pass@k":
                c, m = pass_at(records, k)
                cells.append(f"{c / m:.0%}")
            else:
                row = curves[k][name]
                cells.append(f"{row['correct'] / row['problems']:.0%} @{row['tokens']:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _training_tokens(folder: str) -> int:
    """The computed tokens training the run's learned parts cost (summary.json's training: the probe's file)."""
    path = Path(folder) / SUMMARY
    return training_tokens(json.loads(path.read_text())) if path.is_file() else 0


def _diff(a: dict[str, bool], b: dict[str, bool]) -> str:
    mean, lo, hi = paired_difference(a, b)
    return "" if math.isnan(mean) else f"{mean:+.0%} ({lo:+.0%} to {hi:+.0%})"


def _fmt(pair, i: int) -> str:
    return "" if pair is None or math.isnan(pair[i]) else f"{pair[i]:.2f}"


def plot_curves(folder: str, records: list[dict], ks: list[int], greedy: dict | None, shown: list[str],
                out: str) -> None:
    """Accuracy against tokens per problem, one line per shown selector, 95% Wilson intervals as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    curves = {k: selector_rows(records, k) for k in ks}
    for name in shown:
        pts = [(curves[k][name]["tokens"], curves[k][name]["correct"], curves[k][name]["problems"]) for k in ks
               if name in curves[k]]
        if not pts:
            continue
        xs = [t for t, _, _ in pts]
        ys = [c / m for _, c, m in pts]
        errs = [[y - wilson(c, m)[0] for y, (_, c, m) in zip(ys, pts)], [wilson(c, m)[1] - y for y, (_, c, m) in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=name)
    oracle = [(curves[k]["self_consistency"]["tokens"], pass_at(records, k)) for k in ks]
    ax.plot([t for t, _ in oracle], [c / m for _, (c, m) in oracle], linestyle="--", color="grey",
            label="pass@k (an oracle picks)")
    if greedy:
        lo, hi = wilson(greedy["correct"], greedy["problems"])
        g = greedy["correct"] / greedy["problems"]
        ax.errorbar([greedy["tokens"]], [g], yerr=[[g - lo], [hi - g]], marker="s", color="black", capsize=3,
                    label="greedy")
    ax.set_xscale("log")
    ax.set_xlabel("computed tokens per problem (log)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{Path(folder).parent.name}/{Path(folder).name}: {len(records)} problems, k = {', '.join(map(str, ks))} samples")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--greedy", nargs="*", default=[], help="greedy run folders, one per panel run, in order")
    parser.add_argument("--ks", default="1,2,4,8,16")
    parser.add_argument("--selectors", default=",".join(DEFAULT_SHOWN))
    parser.add_argument("--plot", help="a PNG of the first run's curves")
    parser.add_argument("--probe", action="append", default=[], metavar="NAME=FILE",
                        help="score the saved features with another probe file, as selectors NAME and NAME_vote")
    parser.add_argument("--features", help="where the run saved its features (default RUN/features); one run only")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    shown = args.selectors.split(",")
    if args.probe and args.features and len(args.runs) > 1:
        parser.error("--features names one run's folder; give one run")
    runs = {}
    for folder in args.runs:
        runs[folder] = load_panel(folder)
        for spec in args.probe:
            name, sep, file = spec.partition("=")
            if not sep or not name or not file:
                parser.error(f"--probe {spec!r}: expected NAME=FILE")
            rescore_probe(runs[folder], name, file, args.features or Path(folder) / "features")
            shown += [s for s in (name, f"{name}_vote") if s not in shown]
    greedy = [_greedy(g, {r["id"] for r in runs[run]}) for g, run in zip(args.greedy, args.runs)]
    greedy += [None] * len(args.runs)
    for folder, g in zip(args.runs, greedy):
        print(report(folder, runs[folder], ks, g, shown), "\n")
    if args.plot:
        plot_curves(args.runs[0], runs[args.runs[0]], ks, greedy[0], shown, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
