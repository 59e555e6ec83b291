"""A run's output folder: what it has done, so that the same command can resume it.

    folder = OutputFolder(out_dir)
    done = folder.results.load()                 # finished records by problem id
    folder.check_resumable(cfg, has_records=bool(done))

- results.jsonl: one record per finished problem, appended and synced as each finishes. Started
  again, a run drops a partially written last line (a run killed while writing) with a warning and
  only solves the problems it does not yet hold: no record is repeated or lost.
- failures.jsonl: one line per attempt that raised (the run stops; the problem runs again on
  resume): its id, the error, when, the partial ledger of the work it did before failing, and the
  traceback.
- run.json: the config the folder was started with; resuming with a different one is refused,
  since the records would mix two experiments (RESUMABLE_CHANGES may differ). Each start also notes
  its shard and the summary's description of the run there (`note_run`), for `ttc.evals.merge`.
- training.json: what the run's trained parts (a probe, a difficulty table) cost, one Ledger each.
- summary.json (and skipped_rows.txt): written by the runner at the end.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import traceback
from pathlib import Path

from ttc.budget import Ledger

__all__ = ["OutputFolder", "ResultsFile", "FailureLog", "ResumeError", "RESUMABLE_CHANGES", "RESULTS", "SUMMARY",
           "FAILURES", "RUN_INFO", "TRAINING", "json_default", "fixed_config", "config_fingerprint"]

log = logging.getLogger(__name__)

RESULTS, SUMMARY, FAILURES, RUN_INFO, TRAINING = ("results.jsonl", "summary.json", "failures.jsonl", "run.json",
                                                  "training.json")
# Keys that may change between a run and its resumption: which problems (limit, start), how to treat bad rows,
# the progress bar, CPU threads and the KV pool's size. Everything else must match.
RESUMABLE_CHANGES = ("dataset.limit", "dataset.start", "dataset.on_error", "progress", "model.threads",
                     "model.kv_cache_gb", "concurrency", "record_trees")


class ResumeError(RuntimeError):
    """An output folder cannot be resumed: a corrupt record, or a different experiment's records."""


def json_default(value):
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    return str(value)


def _append_line(path: Path, obj: dict) -> None:
    """One JSON object as one line, flushed and synced: a crash loses at most the line being written."""
    line = json.dumps(obj, ensure_ascii=False, default=json_default) + "\n"
    with path.open("a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


class ResultsFile:
    """results.jsonl: append-only, one JSON object per line, flushed and synced per record."""

    def __init__(self, path: Path):
        self.path = path

    def load(self, repair: bool = True) -> dict[str, dict]:
        """Finished records by id. A last record cut short (a run killed while writing it) is dropped
        and cut from the file, with a warning (repair=False: only dropped, the file is left as it is, for
        readers of a run that may still be writing); a bad line anywhere else means the file was edited or
        corrupted, and is an error."""
        if not self.path.is_file():
            return {}
        pieces = self.path.read_bytes().split(b"\n")
        lines, tail = pieces[:-1], pieces[-1]  # tail: what follows the last newline (empty if complete)
        last_line = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        records: dict[str, dict] = {}
        offset = 0  # byte offset of the current line
        for i, line in enumerate(lines):
            lineno = i + 1
            if line.strip():
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict) or "id" not in record:
                        raise ValueError("not an object with an id")
                except ValueError as e:
                    if i == last_line and not tail.strip():
                        self._drop(offset, lineno, f"not valid JSON: {e}", repair)
                        return records
                    raise ResumeError(f"{self.path}:{lineno}: not a complete JSON record ({e}); the file was "
                                      "edited or corrupted: fix or remove that line to resume") from None
                if str(record["id"]) in records:
                    raise ResumeError(f"{self.path}:{lineno}: a second record for problem {record['id']!r}")
                records[str(record["id"])] = record
            offset += len(line) + 1
        if tail.strip():
            self._drop(offset, len(lines) + 1, "no newline at its end", repair)
        return records

    def _drop(self, offset: int, lineno: int, why: str, repair: bool = True) -> None:
        if not repair:
            log.warning("%s:%d: skipping a partially written last record (%s)", self.path, lineno, why)
            return
        log.warning("%s:%d: dropping a partially written last record (%s); that problem will run again",
                    self.path, lineno, why)
        with self.path.open("r+b") as f:
            f.truncate(offset)

    def append(self, record: dict) -> None:
        _append_line(self.path, record)


class FailureLog:
    """failures.jsonl: the attempts that raised, with the work they did (counted, though they left no record)."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, problem_id: str, error: BaseException, ledger: Ledger) -> None:
        """One line: the error in one line, when, the work it did, and the traceback (for a bug report; the
        console and the log get only the one line)."""
        _append_line(self.path, {"id": problem_id, "error": f"{type(error).__name__}: {error}",
                                 "time": datetime.datetime.now().isoformat(timespec="seconds"), **ledger.as_dict(),
                                 "traceback": "".join(traceback.format_exception(error)).rstrip()})

    def load(self) -> list[dict]:
        """Every failed attempt so far, in order; a line cut short by a kill is skipped with a warning."""
        if not self.path.is_file():
            return []
        out = []
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("%s:%d: skipping a line that is not valid JSON", self.path, lineno)
        return out

    def summary(self) -> dict:
        """{"count", "total_tokens", "ledger"}: the failed attempts and the sum of their partial work."""
        attempts = self.load()
        ledger = Ledger.sum(Ledger.from_record(a) for a in attempts)
        return {"count": len(attempts), "total_tokens": ledger.total_tokens, "ledger": ledger.as_dict()}


class OutputFolder:
    """The files of one run folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.results = ResultsFile(self.path / RESULTS)
        self.failures = FailureLog(self.path / FAILURES)

    def check_resumable(self, cfg: dict, has_records: bool) -> None:
        """Refuse to add records made with another config to the folder's records; remember this config."""
        check_resumable(cfg, self.path / RUN_INFO, has_records)

    def note_run(self, **info) -> None:
        """Add to run.json what the merge of shards needs (the shard, the summary's description of the run);
        written by every start, after check_resumable, so it describes the latest one."""
        path = self.path / RUN_INFO
        _write_json(path, {**self.run_info(), **info})

    def run_info(self) -> dict:
        """run.json: {"fingerprint", "config", and what note_run added}; {} before a run started here."""
        path = self.path / RUN_INFO
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_training(self, training: dict[str, Ledger]) -> None:
        """The latest setup's training costs (a resumed run that trains again states one training)."""
        _write_json(self.path / TRAINING, {name: ledger.as_dict() for name, ledger in training.items()})

    def training(self) -> dict[str, Ledger]:
        path = self.path / TRAINING
        stored = json.loads(path.read_text()) if path.is_file() else {}
        return {name: Ledger.from_record(fields) for name, fields in stored.items()}

    def write_summary(self, summary: dict, skipped_rows: list[str]) -> None:
        _write_json(self.path / SUMMARY, summary)
        if skipped_rows:
            (self.path / "skipped_rows.txt").write_text("\n".join(skipped_rows) + "\n")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=json_default) + "\n")


# --- resumption safety ------------------------------------------------------------------------

def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def fixed_config(cfg: dict) -> dict:
    """The config as run.json keeps it: flat dotted keys, without those a resumed run may change."""
    return {k: v for k, v in _flatten(cfg).items() if k not in RESUMABLE_CHANGES}


def config_fingerprint(fixed: dict) -> str:
    """run.json's fingerprint of a `fixed_config`: equal fingerprints, the same experiment."""
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()


def check_resumable(cfg: dict, info_path: Path, has_records: bool) -> None:
    """Refuse to add records made with another config to a folder's records; remember this config."""
    if (cfg.get("allocation") or {}).get("_target_") is None:  # allocation=none: folders from before it existed
        cfg = {k: v for k, v in cfg.items() if k != "allocation"}
    dataset = cfg.get("dataset")
    if isinstance(dataset, dict) and dataset.get("shard", {}) == {"index": 0, "count": 1}:
        # unsharded: the fingerprint of folders from before shards existed
        cfg = {**cfg, "dataset": {k: v for k, v in dataset.items() if k != "shard"}}
    for group in ("model", "verifier"):  # the policy's and a PRM's own model
        node = cfg.get(group)
        if isinstance(node, dict) and node.get("device", "cpu") == "cpu":
            # on the CPU: the fingerprint of folders from before the device keys existed (cuda_graphs is CUDA's)
            cfg = {**cfg, group: {k: v for k, v in node.items() if k not in ("device", "cuda_graphs")}}
    fixed = fixed_config(cfg)
    fingerprint = config_fingerprint(fixed)
    if info_path.is_file() and has_records:  # without records, a run that failed to start left it: replace it
        stored = json.loads(info_path.read_text())
        if stored.get("fingerprint") != fingerprint:
            before = stored.get("config", {})
            changed = sorted(k for k in set(before) | set(fixed) if before.get(k, "<unset>") != fixed.get(k, "<unset>"))
            detail = ", ".join(f"{k}: {before.get(k, '<unset>')!r} -> {fixed.get(k, '<unset>')!r}" for k in changed[:6])
            raise ResumeError(f"{info_path.parent} holds results of a different config ({detail}); choose another "
                              "output folder (hydra.run.dir=...) or delete this one")
        return
    info_path.write_text(json.dumps({"fingerprint": fingerprint, "config": fixed}, indent=2, default=str) + "\n")
