"""A selector panel: n whole solutions sampled once, and every oracle-free selector's choice among the SAME
samples, so that selectors are compared paired (the differences between them are not sampling noise).

Selectors (each one's pick is marked on the candidate it chose, `chosen_by`):
- `self_consistency`: the majority answer (ttc.verifiers.vote);
- `confidence_<form>`: a vote weighted by each trace's confidence in that form (ttc.verifiers.confidence:
  mean, group, lowest, tail), DeepConf's offline selection; costs nothing (recorded while sampling);
- `rpc` and `pc`: perplexity consistency with and without reasoning pruning (ttc.verifiers.rpc); costs nothing;
- `self_eval` and `self_eval_vote`: the highest P(yes), and the vote weighted by it (ttc.verifiers.self_eval);
  costs its question's tokens per sample. `self_evals` names one or more framings ({name: SelfEvalVerifier
  settings}), each a selector of its own (e.g. the chat turn against the plain "Answer:" template);
- `probe` and `probe_vote`: the same with a trained probe's probability (ttc.verifiers.probe); costs its suffix's
  tokens per sample. Without a probe file (`probe_path`, else the shipped one) these are left out.

The record's answer is `answer_by`'s choice. Every candidate carries its text, its scores (`scores`: each
selector's number for that sample), its token count, its probability exp(mean logprob), and `chosen_by`; `details` holds each
selector's own verifier tokens, so a selector's cost is the generation's plus its own. With `features_dir`, the
probe's features of every sample are saved as <features_dir>/<problem id>.pt (rows, labels come from grading
the candidates): the training data of `python -m ttc.evals.fit_probe`.

Limits: this is an evaluation tool; it spends every selector's cost on every problem (self_eval and the probe's
forward passes), so the record's ledger is the panel's, not one selector's: read a selector's cost from
`details` (see ttc.evals.panel_report).
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ttc.budget import Ledger
from ttc.graph import Meter, Problem
from ttc.result import Result, Tree
from ttc.search.common import finish, sample_solutions
from ttc.verifiers.confidence import FORMS, trace_confidence
from ttc.verifiers.math import group_equivalent
from ttc.verifiers.probe import ProbeVerifier, load_probe_file, shipped_probe_path
from ttc.verifiers.rpc import path_probability, rpc_select
from ttc.verifiers.self_eval import SelfEvalVerifier
from ttc.verifiers.vote import heaviest_group_best

__all__ = ["Panel", "choose", "feature_file_name", "VOTE_SELECTORS"]

VOTE_SELECTORS = ("self_consistency", *(f"confidence_{f}" for f in FORMS))


@dataclass
class Panel:
    n: int = 16
    answer_by: str = "self_consistency"
    window: int = 32  # the confidence forms' window and tail, DeepConf's group size (ttc.verifiers.confidence)
    bottom: float = 0.1
    self_eval: bool = True  # false: no self_eval framing at all
    self_evals: dict | None = None  # {name: SelfEvalVerifier settings}; None: {"self_eval": {}} (its defaults)
    probe_path: str | None = None  # None: the shipped probe for this model, if there is one
    features_dir: str | None = None  # save every sample's probe features here (training data)

    def __post_init__(self):
        if self.n < 1:
            raise ValueError("panel needs n >= 1 samples")
        self._verifiers_built: tuple[ProbeVerifier, dict[str, SelfEvalVerifier]] | None = None
        self._lock = threading.Lock()  # concurrent problems (threads) build the verifiers once, together

    def training_cost(self, model_name: str) -> Ledger | None:
        """What training the probe this panel scores with cost (its file's metadata: the rollouts that made its
        rows), None without a probe file: the eval reports it with the run (training.json), as for verifier=probe."""
        path = self.probe_path or shipped_probe_path(model_name)
        if path is None:
            return None
        fields = (load_probe_file(path).get("metadata") or {}).get("ledger")
        return Ledger.from_record(fields) if fields else None

    def _verifiers(self, backend) -> tuple[ProbeVerifier, dict[str, SelfEvalVerifier]]:
        """Built once per run, on the first problem's backend (every problem shares the model)."""
        with self._lock:
            if self._verifiers_built is None:
                path = self.probe_path or shipped_probe_path(backend.name)
                framings = (self.self_evals or {"self_eval": {}}) if self.self_eval else {}
                self._verifiers_built = (ProbeVerifier(backend, path=str(path) if path else None),
                                         {name: SelfEvalVerifier(backend, **dict(settings or {}))
                                          for name, settings in framings.items()})
            return self._verifiers_built

    def __call__(self, problem: Problem, proposer, verifier, meter: Meter) -> Result:
        """The verifier is not used: the panel's own selectors choose."""
        probe, self_evals = self._verifiers(proposer.backend)
        tree = Tree()
        samples = sample_solutions(problem, proposer, meter, tree, self.n)
        try:
            answers = [proposer.answer(b) for b in samples]
            scores: dict[str, list[float]] = {
                f"confidence_{f}": [trace_confidence(b.confidences, f, self.window, self.window, self.bottom)
                                    for b in samples] for f in FORMS}
            probabilities = [path_probability(b.logprob, b.num_tokens) for b in samples]
            costs: dict[str, int] = {}
            for name, judge in self_evals.items():
                scores[name], costs[name] = _charged(meter, lambda judge=judge: judge.score(samples, meter))
            features, costs["probe"] = _charged(meter, lambda: probe.features(samples, meter))
            if probe.probe is not None:
                scores["probe"] = probe.probe.predict(features).tolist()
            if self.features_dir:
                _save_features(Path(self.features_dir), problem.id, features, probe.spec)
            keys = [hashlib.sha1(b.text.encode()).hexdigest()[:16] for b in samples]
            picks = choose(answers, probabilities, scores, keys)
            if self.answer_by not in picks:
                raise ValueError(f"panel: answer_by={self.answer_by!r} is not one of {sorted(picks)}")
            candidates = []
            for i, (b, a) in enumerate(zip(samples, answers)):
                tree.add(b, score=probabilities[i], status="final")
                candidates.append({"answer": a, "score": probabilities[i], "tokens": b.num_tokens, "text_key": keys[i],
                                   "scores": {k: v[i] for k, v in scores.items()}, "text": b.text,
                                   "chosen_by": sorted(k for k, j in picks.items() if j == i)})
            chosen = picks[self.answer_by]
            result = finish("panel", problem, proposer, meter, tree, samples[chosen] if chosen is not None else None,
                            None, candidates)
            result.details = {"selector_tokens": costs, "selectors": sorted(picks)}
            return result
        finally:
            proposer.release(samples)


def _charged(meter: Meter, work):
    """(work's value, the verifier tokens it charged to the meter's ledger)."""
    before = meter.ledger.verifier_tokens
    value = work()
    return value, meter.ledger.verifier_tokens - before


def choose(answers: list[str | None], probabilities: list[float], scores: dict[str, list[float]],
           keys: list) -> dict[str, int | None]:
    """Each selector's chosen sample (None: no sample states an answer, for the votes). keys: what makes two
    paths the same path for perplexity consistency (their texts, or hashes of them)."""
    picks: dict[str, int | None] = {}
    groups = group_equivalent(answers)  # once for every vote below: math-verify's comparisons are the slow part

    def best_of_group(weights: list[float]) -> int | None:
        weights = [w if w > 0 and w != float("inf") else 0.0 for w in weights]  # an empty trace's -inf: no weight
        return heaviest_group_best(answers, weights, groups)

    picks["self_consistency"] = best_of_group([1.0] * len(answers))
    for name in VOTE_SELECTORS[1:]:
        picks[name] = best_of_group(scores[name])
    for name in scores:  # self_eval framings and the probe: the best-scored sample, and the vote weighted by it
        if not name.startswith("confidence_"):
            picks[name] = max(range(len(answers)), key=lambda i: scores[name][i])
            picks[f"{name}_vote"] = best_of_group(scores[name])
    picks["rpc"] = rpc_select(answers, probabilities, keys=keys, prune=True, groups=groups).winner
    picks["pc"] = rpc_select(answers, probabilities, keys=keys, prune=False, groups=groups).winner
    return picks


def _save_features(folder: Path, problem_id: str, features: torch.Tensor, spec: dict) -> None:
    """(n, F) float16 features of one problem's samples, written under a temporary name then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    name = feature_file_name(problem_id)
    partial = folder / f"{name}.partial"
    torch.save({"id": str(problem_id), "features": features.to(torch.float16), "spec": dict(spec)}, partial)
    partial.replace(folder / name)


def feature_file_name(problem_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(problem_id)) + ".pt"


STRATEGY = Panel
