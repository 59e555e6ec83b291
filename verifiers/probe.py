"""A learned probe: logistic regression on the policy's hidden states predicts whether a branch is correct.

Features of a branch: on a scratch fork (the backend's `score_continuations` with hidden states), a short fixed suffix is appended (by
default the self-evaluation question) and the final-norm hidden state at its last token is read,
optionally concatenated with the mean over the suffix's tokens. Cost: the suffix's tokens per branch.

`ProbeVerifier.fit` samples the policy's own solutions to TRAINING problems (never the evaluated
ones: the caller supplies them), labels them with `grade_fn(problem, text) -> bool`, standardizes
the features, fits an L2-regularized logistic regression (the strength chosen on a validation split
of the training problems), reports AUC and accuracy on held-out problems, and saves
{weights, mean/std, feature spec, model name, metadata} with torch.save.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import random
import re
import shutil
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ttc.budget import Ledger
from ttc.graph import HIDDEN_STATES, Branch, Meter, as_problem, backend_of, require
from ttc.verifiers.self_eval import DEFAULT_QUESTION, PLAIN_TEMPLATE, judge_suffix_text, uses_chat

__all__ = ["ProbeVerifier", "LogisticProbe", "fit_logistic", "fit_rows", "load_probe_file", "probe_metrics", "roc_auc",
           "shipped_probe_path", "SHIPPED_PROBES"]

log = logging.getLogger(__name__)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
FORMAT_VERSION = 1
# Probes trained for the models ttc ships (package data): <model name>.pt, e.g. smollm2-135m.pt. How each was
# trained, its held-out AUC and its training cost are in its metadata; docs/results.md has the command.
SHIPPED_PROBES = Path(__file__).parent / "probes"


def load_probe_file(path: str | Path) -> dict:
    """A saved probe's state (weights, feature spec, metadata), refused with one line if it is not a ttc probe."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, cut short, or text torch's reader trips on (an IndexError, ...)
        raise ValueError(f"{path} is not a ttc probe (torch.load could not read it: {type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a ttc probe (format {found!r})")
    return state


def shipped_probe_path(model_name: str) -> Path | None:
    """The probe shipped for `model_name` (a ttc.load spec, e.g. "smollm2-135m"), or None."""
    path = SHIPPED_PROBES / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(model_name))}.pt"
    return path if path.is_file() else None


# -------------------------------------------------------------------------------------------------
# the classifier (pure tensors: testable without a model)


class LogisticProbe:
    """p(correct | x) = sigmoid(w . (x - mean) / std + b)."""

    def __init__(self, weight: torch.Tensor, bias: float, mean: torch.Tensor, std: torch.Tensor):
        self.weight, self.bias = weight.double(), float(bias)  # (F,)
        self.mean, self.std = mean.double(), std.double()  # (F,)

    @classmethod
    def from_state(cls, state: dict) -> "LogisticProbe":
        """The classifier of a saved probe (`load_probe_file`)."""
        return cls(state["weights"], state["bias"], state["mean"], state["std"])

    def file_state(self, spec: dict, model: str, metadata: dict) -> dict:
        """What a probe file holds (`load_probe_file` reads it back): this classifier, the feature spec it was
        trained on, the model's name and the training's metadata. The one writer of the format."""
        return {"format": FORMAT_VERSION, "weights": self.weight, "bias": self.bias, "mean": self.mean,
                "std": self.std, "feature": dict(spec), "model": model, "metadata": metadata}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities (N,) for features (N, F)."""
        z = ((x.double() - self.mean) / self.std) @ self.weight + self.bias
        return torch.sigmoid(z)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None) -> LogisticProbe:
    """Minimize mean log loss + l2/2 * |w|^2 on standardized features (full-batch L-BFGS, float64)."""
    x, y = x.double(), y.double()
    mean = x.mean(0) if mean is None else mean
    std = x.std(0, unbiased=False).clamp_min(1e-6) if std is None else std
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    rate = y.mean().clamp(1e-3, 1 - 1e-3)
    b = torch.log(rate / (1 - rate)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may sit inside inference_mode
        opt.step(closure)
    return LogisticProbe(w.detach(), float(b.detach()), mean, std)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (ties count half); nan when only one class is present."""
    pos, neg = scores[labels.bool()].double(), scores[~labels.bool()].double()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def probe_metrics(probe: LogisticProbe, x: torch.Tensor, y: torch.Tensor) -> dict:
    if len(y) == 0:
        return {"n": 0, "auc": float("nan"), "accuracy": float("nan"), "log_loss": float("nan")}
    p = probe.predict(x)
    accuracy = float(((p > 0.5).double() == y.double()).double().mean())
    return {"n": int(len(y)), "auc": roc_auc(p, y), "accuracy": accuracy,
            "log_loss": float(F.binary_cross_entropy(p.clamp(1e-12, 1 - 1e-12), y.double())),
            "positive_rate": float(y.double().mean())}


def _split(groups: list[int], fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """Row indices (kept, held out), holding out about `fraction` of the groups (problems).

    With fewer than 5 groups, single rows are held out instead (a problem per split is too coarse).
    """
    keys = sorted(set(groups))
    if len(keys) >= 5:
        rng.shuffle(keys)
        held = set(keys[: max(1, round(fraction * len(keys)))])
        out = [i for i, g in enumerate(groups) if g in held]
    else:
        rows = list(range(len(groups)))
        rng.shuffle(rows)
        out = sorted(rows[: max(1, round(fraction * len(rows)))])
    held_rows = set(out)
    return [i for i in range(len(groups)) if i not in held_rows], out


def fit_rows(x: torch.Tensor, y: torch.Tensor, groups: list, held_out: float = 0.2,
             l2_grid: tuple[float, ...] = L2_GRID, seed: int = 0) -> tuple[LogisticProbe, dict]:
    """(probe, {"l2", "validation_log_loss", "metrics", "held_out_rows"}) fitted on rows x (N, F), labels y (N,).

    Rows of one group (problem) stay on one side of every split: `held_out` of the groups are kept out to
    report AUC/accuracy, the L2 strength is chosen on a quarter of the rest, and the probe is refitted on all
    of the rest with it."""
    rng = random.Random(seed)
    train, test = _split(groups, held_out, rng)
    fit_part, val_part = _split([groups[i] for i in train], 0.25, rng)
    fit_part, val_part = [train[i] for i in fit_part], [train[i] for i in val_part]
    tr = torch.tensor(train)
    mean, std = x[tr].double().mean(0), x[tr].double().std(0, unbiased=False).clamp_min(1e-6)
    losses = {}
    for l2 in l2_grid:
        probe = fit_logistic(x[fit_part], y[fit_part], l2, mean, std)
        losses[l2] = probe_metrics(probe, x[val_part], y[val_part])["log_loss"]
    best = min(l2_grid, key=lambda l2: (losses[l2] if not math.isnan(losses[l2]) else math.inf, -l2))
    probe = fit_logistic(x[tr], y[tr], best, mean, std)
    report = {"train": probe_metrics(probe, x[tr], y[tr]), "held_out": probe_metrics(probe, x[test], y[test])}
    return probe, {"l2": best, "validation_log_loss": losses, "metrics": report, "held_out_rows": test}


# -------------------------------------------------------------------------------------------------
# the verifier


class _RowStore:
    """A fit's finished problems on disk, one file each ({x: (N, F) features, y: labels, ledger}), written whole
    (temp file, then rename), so Ctrl-C or a kill loses at most the problem being sampled. `key` (the problem ids
    and the sampling and feature settings) is checked on every run: rows drawn otherwise are never mixed in."""

    def __init__(self, folder: Path, key: dict):
        self.folder, self.resumed = folder, 0
        key_file = folder / "key.json"
        text = json.dumps(key, sort_keys=True, default=str)
        if key_file.is_file() and key_file.read_text(encoding="utf-8") != text:
            raise ValueError(f"{folder} holds samples of another probe training (other problems or settings): "
                             "delete it to start over")
        folder.mkdir(parents=True, exist_ok=True)
        key_file.write_text(text, encoding="utf-8")

    def load(self, index: int) -> dict | None:
        file = self.folder / f"{index:06d}.pt"
        if not file.is_file():
            return None
        self.resumed += 1
        return torch.load(file, weights_only=True)

    def save(self, index: int, rows: dict) -> None:
        file = self.folder / f"{index:06d}.pt"
        temp = file.with_suffix(".tmp")
        torch.save(rows, temp)
        os.replace(temp, file)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class ProbeVerifier:
    """Scores a branch with a trained probe's probability that it is (or will end) correct.

    model: the policy (the eval CLI passes it). path: a probe saved by `fit` (or `save`); without
    one, the probe must be fitted before scoring. question / template / chat / use_mean: the feature
    spec for a new probe (a loaded probe brings its own).
    """

    def __init__(self, model, path: str | None = None, question: str = DEFAULT_QUESTION,
                 template: str = PLAIN_TEMPLATE, chat: bool | None = None, use_mean: bool = True,
                 batch_size: int = 64):
        self.backend = backend_of(model)
        require(self.backend, HIDDEN_STATES, "verifier=probe")
        self.tokenizer = self.backend.tokenizer
        self.batch_size = batch_size
        self.probe: LogisticProbe | None = None
        self.metadata: dict = {}
        if path is not None:
            self._set_state(load_probe_file(path), path)
        else:
            text = judge_suffix_text(self.tokenizer, question, template, uses_chat(self.tokenizer, chat))
            self.spec = {"suffix_text": text, "suffix_ids": self.tokenizer.encode(text, add_special_tokens=False),
                         "use_mean": use_mean, "hidden_size": self.backend.hidden_size}
        self.cost_per_branch = float(len(self.spec["suffix_ids"]))
        self.cost_per_token = 0.0

    @classmethod
    def load(cls, model, path: str) -> "ProbeVerifier":
        return cls(model, path=path)

    # -- scoring -----------------------------------------------------------------------------------

    def features(self, branches: list[Branch], meter: Meter) -> torch.Tensor:
        """(N, F) features: the hidden state at the suffix's end [, the suffix's mean hidden state]."""
        if not branches:
            return torch.zeros(0, self.num_features)
        ids = self.spec["suffix_ids"]
        meter.check(len(ids) * len(branches))
        results = self.backend.score_continuations([(b, ids) for b in branches], meter, hidden=True,
                                                   batch_size=self.batch_size, logprobs=False)
        rows = []
        for r in results:
            h = r.hidden.float()  # (n, H)
            rows.append(torch.cat([h[-1], h.mean(0)]) if self.spec["use_mean"] else h[-1])
        return torch.stack(rows)

    @property
    def num_features(self) -> int:
        return self.spec["hidden_size"] * (2 if self.spec["use_mean"] else 1)

    def score(self, branches: list[Branch], meter: Meter) -> list[float]:
        if self.probe is None:
            raise RuntimeError("this probe is not trained: use ProbeVerifier.fit(...) or pass path= to a saved probe")
        if not branches:
            return []
        return self.probe.predict(self.features(branches, meter)).tolist()

    # -- persistence -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return self.probe.file_state(self.spec, self.backend.name, self.metadata)

    def save(self, path: str) -> None:
        if self.probe is None:
            raise RuntimeError("nothing to save: the probe is not trained")
        torch.save(self.state_dict(), path)

    def _set_state(self, state: dict, where: str = "the state") -> None:
        """state: a `load_probe_file` (its format checked there)."""
        spec = dict(state["feature"])
        if spec["hidden_size"] != self.backend.hidden_size:
            raise ValueError(f"{where} was trained on hidden size {spec['hidden_size']} ({state['model']}); this "
                             f"model's is {self.backend.hidden_size}")
        if state["model"] != self.backend.name:
            warnings.warn(f"{where} was trained on {state['model']!r}, not {self.backend.name!r}", stacklevel=3)
        self.spec = spec
        self.probe = LogisticProbe.from_state(state)
        self.metadata = dict(state.get("metadata", {}))

    # -- training ----------------------------------------------------------------------------------

    @classmethod
    def fit(cls, model, problems, grade_fn: Callable[[object, str], bool], samples_per_problem: int = 8,
            max_tokens: int = 256, path: str | None = None, seed: int = 0, progress: bool = True,
            temperature: float = 0.8, per_step: bool = False, held_out: float = 0.2,
            l2_grid: tuple[float, ...] = L2_GRID, **feature_spec) -> "ProbeVerifier":
        """Train a probe on the model's own solutions to `problems` (training problems only).

        Each problem gets `samples_per_problem` sampled solutions (at most `max_tokens` tokens each),
        labelled by `grade_fn(problem, text)`. With `path`, each problem's rows are also kept in `path`.rows/ as
        it finishes, so an interrupted fit run again with the same arguments samples only the problems left
        (each problem's samples depend on its id and `seed` only); the folder goes once the probe is saved.
        With per_step, solutions are sampled step by step and every partial solution is a training row labelled
        with its solution's final grade (a value probe for step-wise search). `held_out` of the problems are kept out of training to report
        AUC/accuracy; the L2 strength is chosen on a validation split of the rest.
        `feature_spec`: question, template, chat, use_mean (see the class).
        """
        from tqdm.auto import tqdm

        from ttc.backends.local import LocalProposer  # training samples on the local engine

        out = cls(model, **feature_spec)
        # a question string becomes a Problem with its own id (and so its own sampling seed)
        problems = [replace(as_problem(p), id=f"train-{i}") if isinstance(p, str) else as_problem(p)
                    for i, p in enumerate(problems)]
        if not problems:
            raise ValueError("fit needs training problems")
        proposer = LocalProposer(model, max_tokens=max_tokens, max_step_tokens=max_tokens, temperature=temperature,
                                 seed=seed, answer_fn=lambda text: None)  # rows are graded by grade_fn, not answers
        store = None if path is None else _RowStore(Path(str(path) + ".rows"), {
            "problems": [p.id for p in problems], "samples_per_problem": samples_per_problem, "max_tokens": max_tokens,
            "temperature": temperature, "per_step": per_step, "seed": seed, "feature": out.spec})
        xs, ys, groups, ledgers = [], [], [], []
        bar = tqdm(problems, desc="probe: sampling", disable=not progress)
        for g, problem in enumerate(bar):
            saved = store.load(g) if store is not None else None
            if saved is None:
                meter = Meter()  # one per problem: its cost is kept with its rows
                feats, labels = out._rollouts(proposer, problem, grade_fn, samples_per_problem, per_step, meter)
                saved = {"x": feats, "y": labels, "ledger": meter.ledger.as_dict()}
                if store is not None:
                    store.save(g, saved)
            xs.append(saved["x"])
            ys.extend(saved["y"])
            groups.extend([g] * len(saved["y"]))
            ledgers.append(Ledger.from_record(saved["ledger"]))
            bar.set_postfix(rows=len(ys), correct=f"{sum(ys) / max(1, len(ys)):.2f}")
        if store is not None and store.resumed:
            log.info("probe: %d of %d problems' samples were kept from an interrupted run (%s)", store.resumed,
                     len(problems), store.folder)
        x, y = torch.cat(xs), torch.tensor(ys, dtype=torch.float64)
        if y.min() == y.max():
            raise ValueError(f"every sampled solution was graded {bool(y[0])}: a probe needs both correct and "
                             "incorrect examples (use more or harder/easier problems, or more samples)")

        out.probe, fitted = fit_rows(x, y, groups, held_out, l2_grid, seed)
        fitted.pop("held_out_rows")
        out.metadata = {**fitted, "problems": len(problems), "rows": len(ys), "samples_per_problem": samples_per_problem,
                        "max_tokens": max_tokens, "temperature": temperature, "per_step": per_step, "seed": seed,
                        "ledger": Ledger.sum(ledgers).as_dict(), "created": datetime.datetime.now().isoformat()}
        h = fitted["metrics"]["held_out"]
        line = (f"probe: {len(ys)} rows from {len(problems)} problems ({y.mean():.0%} correct), l2={fitted['l2']:g}; "
                f"held-out AUC {h['auc']:.3f}, accuracy {h['accuracy']:.3f} on {h['n']} rows")
        log.info(line)
        if progress:
            print(line)
        if path is not None:
            out.save(path)
            store.remove()
        return out

    def _rollouts(self, proposer, problem, grade_fn, n: int, per_step: bool, meter: Meter):
        """Sample n solutions; return their feature rows (N, F) and labels (one per row)."""
        root = proposer.start(problem, meter)
        feats: list[torch.Tensor] = []
        lineage: list[int] = []  # which sample each row belongs to
        finals: dict[int, str] = {}
        live = [(i, b) for i, b in enumerate(proposer.propose([root], n, meter, to_end=not per_step))]
        proposer.release([root])
        try:
            while live:
                rows = live if per_step else [(i, b) for i, b in live if b.finished]
                if rows:
                    feats.append(self.features([b for _, b in rows], meter))
                    lineage.extend(i for i, _ in rows)
                finals.update({i: b.text for i, b in live if b.finished})
                open_ = [(i, b) for i, b in live if not b.finished]
                children = proposer.propose([b for _, b in open_], 1, meter) if open_ else []
                sample_of = {b.id: i for i, b in open_}
                proposer.release([b for _, b in live])
                live = [(sample_of[c.parent.id], c) for c in children]
                for i, b in open_:  # a branch the proposer could not extend ends where it is
                    if not any(j == i for j, _ in live):
                        finals.setdefault(i, b.text)
        except BaseException:
            proposer.release([b for _, b in live])
            raise
        grades = {i: bool(grade_fn(problem, text)) for i, text in finals.items()}
        labels = [float(grades.get(i, False)) for i in lineage]
        x = torch.cat(feats) if feats else torch.zeros(0, self.num_features)
        return x, labels
