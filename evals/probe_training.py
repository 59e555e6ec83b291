"""Training a learned verifier (the hidden-state probe) on problems the eval never sees.

The training problems come from the dataset's training split (`ttc.evals.build.train_split`):
reasoning-gym at seed + 1_000_000 (or `dataset.train_seed`), GSM8K from its train file
(`dataset.train_path`). Any training problem whose prompt also appears in the evaluated split is
dropped, so a probe never learns the answers it is later asked to judge.

Trained probes are cached under ~/.cache/ttc/probes/<model>-<task>-<hash>.pt, the hash covering
the model, the training split, the training settings and the probe's feature options; the eval
runner and `python -m ttc.evals.train_probe` compute the same path, so either can train it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from ttc.evals.build import build_dataset, eval_split, locate, train_split

__all__ = ["train_probe_for", "ensure_probe", "fit_settings", "probe_cache_path", "DEFAULT_PROBE", "DEFAULT_SETTINGS"]

log = logging.getLogger(__name__)

DEFAULT_PROBE = {"_target_": "ttc.verifiers.probe.ProbeVerifier"}
DEFAULT_SETTINGS = {"problems": 64, "samples_per_problem": 4, "max_tokens": 256, "seed": 0}
# Verifier-config keys that say where a probe lives or how it runs, not what it computes (not hashed).
_RUNTIME_KEYS = ("path", "batch_size")


def _probe_options(probe_cfg: dict | None) -> tuple[str, dict]:
    """(target, the feature options given to `fit`) of a probe verifier config."""
    probe_cfg = dict(probe_cfg or DEFAULT_PROBE)
    target = probe_cfg.pop("_target_", DEFAULT_PROBE["_target_"])
    return target, {k: v for k, v in probe_cfg.items() if k not in _RUNTIME_KEYS and k != "model"}


def train_probe_for(dataset_cfg: dict, model, probe_cfg: dict | None = None, problems: int = 64,
                    samples_per_problem: int = 4, max_tokens: int = 256, path: str | Path | None = None,
                    seed: int = 0, progress: bool = True, **fit_options):
    """Fit a probe on `problems` training problems of `dataset_cfg`'s training split and save it to `path`.

    dataset_cfg: the dataset config of the EVALUATED split (with `_target_`); its training split is
    derived from it. probe_cfg: the verifier config (its `_target_` class must have a `fit`).
    fit_options: more arguments for `fit` (temperature, per_step, ...). Returns the fitted verifier.
    """
    target, options = _probe_options(probe_cfg)
    cls = locate(target)
    if not hasattr(cls, "fit"):
        raise TypeError(f"{target} has no fit(): it is not a trainable verifier")
    evaluated = build_dataset({**eval_split(dataset_cfg), "limit": None})
    seen = {json.dumps(p.prompt, sort_keys=True) for p in evaluated.problems}
    train_cfg = train_split(dataset_cfg)
    want = problems + len(seen)  # enough to still have `problems` after dropping any overlap
    train_cfg["limit"] = want
    if "size" in train_cfg:  # a generated dataset: generate enough
        train_cfg["size"] = max(int(train_cfg["size"]), want)
    training = build_dataset(train_cfg)
    chosen = [p for p in training.problems if json.dumps(p.prompt, sort_keys=True) not in seen][:problems]
    overlap = sum(1 for p in training.problems[:problems] if json.dumps(p.prompt, sort_keys=True) in seen)
    if overlap:
        log.warning("probe training: %d training problem(s) also appear in the evaluated split; replaced", overlap)
    if not chosen:
        raise ValueError(f"no training problems left in {training.name} after removing the evaluated ones")
    log.info("probe training: %d %s problems x %d samples, up to %d tokens each", len(chosen), training.name,
             samples_per_problem, max_tokens)
    partial = None
    if path is not None:  # saved under a temporary name, then renamed: a killed run leaves no half-written probe
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
    verifier = cls.fit(model, chosen, training.grade_text, samples_per_problem=samples_per_problem,
                       max_tokens=max_tokens, path=None if partial is None else str(partial), seed=seed,
                       progress=progress, **options, **fit_options)
    if partial is not None and partial.is_file():
        os.replace(partial, path)
    return verifier


def probe_cache_path(model_cfg: dict, dataset_cfg: dict, settings: dict, probe_cfg: dict | None = None) -> Path:
    """~/.cache/ttc/probes/<model>-<task>-<hash>.pt for this model, training split, settings and probe."""
    from ttc.decoder.weights import cache_root

    target, options = _probe_options(probe_cfg)
    train_cfg = {k: v for k, v in train_split(dataset_cfg).items() if k not in ("limit", "on_error")}
    model_key = {k: model_cfg.get(k) for k in ("_target_", "spec", "dtype")}
    key = json.dumps({"model": model_key, "data": train_cfg, "settings": {**DEFAULT_SETTINGS, **settings},
                      "probe": {"_target_": target, **options}}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    model_name = Path(str(model_cfg.get("spec", "model")).rstrip("/")).name
    task = dataset_cfg.get("task") or str(dataset_cfg.get("_target_", "data")).rsplit(".", 1)[-1].removeprefix("load_")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model_name}-{task}-{digest}")
    return cache_root() / "probes" / f"{name}.pt"


def fit_settings(settings: dict) -> dict:
    """probe_training settings as train_probe_for arguments (unknown keys pass through to `fit`)."""
    out = {**DEFAULT_SETTINGS, **settings}
    for key in ("problems", "samples_per_problem", "max_tokens", "seed"):
        out[key] = int(out[key])
    return out


def ensure_probe(cfg: dict, model, names: dict | None = None, path: str | Path | None = None) -> Path:
    """The file of the probe an eval config asks for, training it first if it is not there.

    cfg: the whole eval config (model, dataset, verifier, probe_training). path: where the user
    wants it; None: the cache path.
    """
    settings = {**DEFAULT_SETTINGS, **(cfg.get("probe_training") or {})}
    target = Path(path).expanduser() if path is not None else probe_cache_path(cfg["model"], cfg["dataset"],
                                                                                settings, cfg.get("verifier"))
    if target.is_file():
        log.info("using the trained probe %s", target)
        return target
    log.warning("no trained probe at %s: training one first (%d problems x %d samples)", target,
                settings["problems"], settings["samples_per_problem"])
    train_probe_for(cfg["dataset"], model, cfg.get("verifier"), path=target, progress=bool(cfg.get("progress", True)),
                    **fit_settings(settings))
    if not target.is_file():
        raise RuntimeError(f"the probe's fit() did not save a file at {target}")
    return target
