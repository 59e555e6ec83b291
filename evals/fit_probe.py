"""Fit the hidden-state probe (verifier=probe) on the features that selector-panel runs saved, and save it in
the format ProbeVerifier loads:

    python -m ttc.evals.fit_probe RUN... --out verifiers/probes/smollm2-135m.pt

Each RUN is a panel run on TRAINING problems (strategy=panel strategy.features_dir=RUN/features), one per task;
the labels are the graded candidates of its results.jsonl. Rows of one problem stay on one side of every split
(ttc.verifiers.probe.fit_rows): a fifth of the problems are held out for the AUC reported per task and overall.

The probe's training cost is what its runs computed to produce the rows: their prompts and samples, and the
probe's own suffix tokens; the self_eval questions a panel also asks are not part of it. It is saved in the
probe's metadata (`ledger`), where every eval that uses the probe reads it (training.json).
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import torch

from ttc.budget import Ledger
from ttc.evals.results import RESULTS, ResultsFile
from ttc.search.panel import feature_file_name
from ttc.verifiers.probe import fit_rows, probe_metrics

__all__ = ["load_rows", "main"]


def load_rows(run: str | Path) -> tuple[torch.Tensor, list[float], list[str], dict, Ledger]:
    """(features (N, F), labels, problem id per row, feature spec, training ledger) of one run."""
    run = Path(run)
    records = ResultsFile(run / RESULTS).load(repair=False)
    xs, ys, groups, spec, ledgers = [], [], [], None, []
    for pid, record in records.items():
        path = run / "features" / feature_file_name(pid)
        if not record.get("candidates") or not path.is_file():
            continue
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if len(saved["features"]) != len(record["candidates"]):
            raise ValueError(f"{path}: {len(saved['features'])} feature rows for {len(record['candidates'])} samples")
        spec = spec or saved["spec"]
        xs.append(saved["features"].float())
        ys.extend(float(bool(c.get("correct"))) for c in record["candidates"])
        groups.extend([f"{run}:{pid}"] * len(record["candidates"]))
        ledger = Ledger.from_record(record)
        own = (record.get("details") or {}).get("selector_tokens", {})
        ledger.verifier_tokens = own.get("probe", 0)  # the self_eval questions were not spent for the probe
        ledgers.append(ledger)
    if not xs:
        raise SystemExit(f"{run}: no saved features (run the panel with strategy.features_dir={run}/features)")
    return torch.cat(xs), ys, groups, spec, Ledger.sum(ledgers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="smollm2-135m", help="the model name the probe is for (ttc.load's spec)")
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    xs, ys, groups, per_run, specs, costs = [], [], [], [], [], []
    for i, run in enumerate(args.runs):
        x, y, g, spec, cost = load_rows(run)
        xs.append(x), ys.extend(y), groups.extend(g), specs.append(spec), costs.append(cost)
        per_run.extend([i] * len(y))
        print(f"{run}: {len(y)} rows from {len(set(g))} problems, {sum(y) / len(y):.1%} correct")
    if any(s != specs[0] for s in specs):
        raise SystemExit("the runs saved features of different probe specs (suffix or model); fit them apart")
    x, y = torch.cat(xs), torch.tensor(ys, dtype=torch.float64)
    probe, fitted = fit_rows(x, y, groups, args.held_out, seed=args.seed)
    test = fitted.pop("held_out_rows")
    by_run = {}
    for i, run in enumerate(args.runs):
        rows = torch.tensor([j for j in test if per_run[j] == i], dtype=torch.long)
        by_run[str(run)] = probe_metrics(probe, x[rows], y[rows])
    cost = Ledger.sum(costs)
    metadata = {**fitted, "held_out_by_run": by_run, "rows": len(ys), "problems": len(set(groups)),
                "runs": [str(r) for r in args.runs], "seed": args.seed, "ledger": cost.as_dict(),
                "created": datetime.datetime.now().isoformat(),
                "command": "python -m ttc.evals.fit_probe " + " ".join(str(r) for r in args.runs) + f" --out {args.out}"}
    state = probe.file_state(specs[0], args.model, metadata)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out.with_name(out.name + ".partial"))
    os.replace(out.with_name(out.name + ".partial"), out)
    h = fitted["metrics"]["held_out"]
    print(f"probe: {len(ys)} rows, l2={fitted['l2']:g}; held-out AUC {h['auc']:.3f} on {h['n']} rows "
          f"({len(set(groups))} problems); training cost {cost.computed_tokens} computed tokens")
    for run, m in by_run.items():
        print(f"  {run}: held-out AUC {m['auc']:.3f} on {m['n']} rows")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
