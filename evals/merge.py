"""Merging the folders of a sharded eval (ttc.evals.shard) into one run folder:

    python -m ttc.evals.merge multirun/eval/2025-01-01/12-00-00 --out runs/merged   # a sweep's folder, or
    python -m ttc.evals.merge multirun/eval/2025-01-01/12-00-00/* --out runs/merged # its job folders
    python -m ttc.evals.merge runs/shard0 runs/shard2 --out runs/merged --partial   # name what is missing

Writes, in `--out`: results.jsonl (every shard's records, in the unsharded dataset's order), summary.json
(the runner's, from those records: `build_summary`), training.json (the shards' training costs, summed per
kind) and failures.jsonl (every shard's failed attempts), and prints the runner's summary table and the
summary JSON last, like ttc-eval; `python -m ttc.evals.plot` and `--markdown` read the folder like any
run's. Its run.json is the unsharded run's, so `ttc-eval` with the same config and shard 0 of 1
(`hydra.run.dir=<out>`) resumes it: after a `--partial` merge, that solves only the missing problems.

Refused with one line (exit 2): folders of different experiments (their run.json configs differ in more
than `dataset.shard`: the keys a resumed run may change are not in run.json at all), shards of different
datasets, a problem in two folders (a shard given twice), and problems without a record (a shard not
finished or not given) unless `--partial`, which lists them (summary.json: "missing"). Input folders
are only read: a shard may still be running.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ttc.budget import Ledger
from ttc.evals.results import (FAILURES, RESULTS, RUN_INFO, SUMMARY, OutputFolder, ResultsFile, ResumeError,
                               config_fingerprint, json_default)
from ttc.evals.runner import build_summary, summary_table
from ttc.evals.shard import SHARD_KEYS

__all__ = ["merge", "MergeError", "experiment_key", "main"]

log = logging.getLogger(__name__)

SHOWN = 5  # problem ids named in a one-line message before "..."


class MergeError(ValueError):
    """Shard folders that cannot be merged (the message says why, in one line)."""


def experiment_key(config: dict) -> str:
    """The fingerprint of a run.json config without the shard keys: equal for every shard of one experiment,
    and equal to the unsharded run's own fingerprint."""
    return config_fingerprint(_unsharded(config))


def _unsharded(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in SHARD_KEYS}


@dataclass
class _Shard:
    path: Path
    info: dict  # run.json
    records: dict[str, dict]  # its shard's problems' records, by id

    @property
    def shard(self) -> dict:
        return self.info["shard"]

    @property
    def name(self) -> str:
        return f"shard {self.shard['index']}/{self.shard['count']} ({self.path})"


def _run_info(path: Path) -> dict:
    try:
        return json.loads((path / RUN_INFO).read_text()) if (path / RUN_INFO).is_file() else {}
    except ValueError as e:
        raise MergeError(f"{path / RUN_INFO}: not valid JSON ({e})") from None


def _shard_folders(given: list[str | os.PathLike], out: Path) -> list[Path]:
    """The run folders given, and those under a given folder that is not one (a sweep's folder), each once;
    files are skipped (a sweep's multirun.yaml, when given as `sweep/*`), and so are merged folders inside."""
    found: list[Path] = []
    for path in map(Path, given):
        if path.is_file():
            log.warning("skipping %s: not a folder", path)
        elif not path.is_dir():
            raise MergeError(f"{path}: no such folder")
        elif (path / RUN_INFO).is_file():
            found.append(path.resolve())
        else:
            inner = sorted(p.parent.resolve() for p in path.rglob(RUN_INFO)
                           if p.parent.resolve() != out.resolve() and "merged_from" not in _run_info(p.parent))
            if not inner:
                raise MergeError(f"{path}: not a run folder, and no run folder is in it (no {RUN_INFO})")
            found.extend(inner)
    if not found:
        raise MergeError("no shard folders given")
    return list(dict.fromkeys(found))  # a folder given twice counts once


def _read(path: Path) -> _Shard:
    info = _run_info(path)
    if not info:
        raise MergeError(f"{path}: not a run folder (no {RUN_INFO})")
    if "shard" not in info or "description" not in info:
        raise MergeError(f"{path}: its {RUN_INFO} does not say which problems it holds (written before shards "
                         "existed): run the same ttc-eval command on it again to record that")
    mine = set(info["shard"]["problems"])
    records = ResultsFile(path / RESULTS).load(repair=False)
    return _Shard(path, info, {i: r for i, r in records.items() if i in mine})


def _ids(ids: list[str]) -> str:
    return ", ".join(ids[:SHOWN]) + (", ..." if len(ids) > SHOWN else "")


def _check(shards: list[_Shard], partial: bool) -> tuple[list[str], list[str]]:
    """(the whole dataset's ids in order, the missing ones), or a MergeError."""
    first = shards[0]
    key = experiment_key(first.info["config"])
    for other in shards[1:]:
        if experiment_key(other.info["config"]) != key:
            a, b = _unsharded(first.info["config"]), _unsharded(other.info["config"])
            changed = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
            detail = ", ".join(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in changed[:6])
            raise MergeError(f"{other.path} is a different experiment from {first.path} ({detail}): merge only the "
                             "shards of one run")
    dataset = first.shard["dataset_ids"]
    for other in shards[1:]:
        if other.shard["dataset_ids"] != dataset:
            sizes = f"{len(other.shard['dataset_ids'])} and {len(dataset)} problems"
            raise MergeError(f"{other.path} and {first.path} sharded different datasets ({sizes}, or other ones): was "
                             "the data file changed between them?")
    owner: dict[str, _Shard] = {}
    for s in shards:
        for problem in s.shard["problems"]:
            if problem in owner:
                raise MergeError(f"problem {problem} is in two folders: {owner[problem].name} and {s.name}; give each "
                                 "shard once")
            owner[problem] = s
    missing = [i for i in dataset if i not in owner or i not in owner[i].records]
    if missing and not partial:
        parts = [f"{s.name} lacks {len(lack)} of {len(s.shard['problems'])} ({_ids(lack)})" for s in shards
                 if (lack := [i for i in s.shard["problems"] if i not in s.records])]
        nowhere = [i for i in dataset if i not in owner]
        if nowhere:
            count = first.shard["count"]
            absent = sorted(set(range(count)) - {s.shard["index"] for s in shards if s.shard["count"] == count})
            parts.append(f"{len(nowhere)} are in no folder given ({_ids(nowhere)}; shard(s) "
                         f"{', '.join(map(str, absent))} of {count}?)")
        raise MergeError(f"incomplete: {len(missing)} of {len(dataset)} problems have no record: {'; '.join(parts)}. "
                         "Finish the shards (the same ttc-eval command resumes each), or pass --partial")
    return dataset, missing


def merge(dirs: list[str | os.PathLike], out: str | os.PathLike, partial: bool = False) -> dict:
    """Merge the shard folders `dirs` into `out`; return the merged summary (see the module docstring)."""
    out = Path(out)
    paths = _shard_folders(dirs, out)
    if out.resolve() in paths:
        raise MergeError(f"--out {out} is one of the shard folders: choose a new folder")
    if (out / RESULTS).is_file() and "merged_from" not in _run_info(out):
        raise MergeError(f"--out {out} holds a run's results (not a merge's): choose a new folder")
    shards = [_read(p) for p in paths]
    dataset, missing = _check(shards, partial)
    records = {i: r for s in shards for i, r in s.records.items()}
    merged = [records[i] for i in dataset if i in records]

    folder = OutputFolder(out)
    _write_lines(out / RESULTS, merged)
    _write_lines(out / FAILURES, [a for s in shards for a in OutputFolder(s.path).failures.load()])
    folder.write_training(_summed_training(shards))
    first = shards[0].info
    config = _unsharded(first["config"])
    whole = {"index": 0, "count": 1, "dataset_size": len(dataset), "problems": dataset, "dataset_ids": dataset}
    (out / RUN_INFO).write_text(json.dumps({"fingerprint": config_fingerprint(config), "config": config,
                                            "shard": whole, "description": first["description"],
                                            "merged_from": [str(s.path) for s in shards]},
                                           indent=2, default=json_default) + "\n")

    summaries = [json.loads((s.path / SUMMARY).read_text()) for s in shards if (s.path / SUMMARY).is_file()]
    skipped = _skipped_rows(shards)
    summary = build_summary(first["description"], merged, len(dataset), folder, skipped_rows=len(skipped))
    summary["shards"] = {"count": first["shard"]["count"], "merged": [str(s.path) for s in shards]}
    if missing:
        summary["missing"] = missing
    # the shards' wall times, summed (machine time: shards that ran side by side took less, elapsed)
    summary["run_wall_s"] = sum(float(s.get("run_wall_s") or 0.0) for s in summaries)
    folder.write_summary(summary, skipped)
    return summary


def _summed_training(shards: list[_Shard]) -> dict[str, Ledger]:
    """Each kind of training (a probe, a difficulty table) summed over the shards that did it."""
    by_kind: dict[str, list[Ledger]] = {}
    for s in shards:
        for kind, ledger in OutputFolder(s.path).training().items():
            by_kind.setdefault(kind, []).append(ledger)
    return {kind: Ledger.sum(ledgers) for kind, ledgers in by_kind.items()}


def _skipped_rows(shards: list[_Shard]) -> list[str]:
    """The malformed rows the dataset skipped (every shard built the same dataset: the first list found)."""
    for s in shards:
        path = s.path / "skipped_rows.txt"
        if path.is_file():
            return path.read_text().splitlines()
    return []


def _write_lines(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written whole and then renamed into place."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False, default=json_default) + "\n" for r in rows),
                       encoding="utf-8")
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="the shards' run folders (one per ttc-eval job)")
    ap.add_argument("--out", required=True, help="the merged run folder to write")
    ap.add_argument("--partial", action="store_true",
                    help="merge what is there, listing the problems without a record (summary.json: missing)")
    args = ap.parse_args(argv)
    try:
        summary = merge(args.dirs, args.out, args.partial)
    except (MergeError, ResumeError) as e:
        print(f"ttc.evals.merge: error: {e}", file=sys.stderr)
        return 2
    if summary.get("missing"):
        print(f"missing ({len(summary['missing'])}): {', '.join(summary['missing'])}")
    print(summary_table(summary))
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
