"""The one place configs become objects: `_target_` is the registry, restricted to `ttc.*`.

A run config may widen that for its strategy and verifier nodes with `allowed_targets`, a list of the
user's own packages (`allowed_targets: [mylab.layers]` lets `_target_: mylab.layers.KeepShortest` be built:
a pipeline layer, a strategy or a verifier of one's own, importable from the run). Only `build_run` reads it,
from the run's own config; a `ttc serve` request never widens anything.

Configs arrive here as plain dicts (the CLI converts Hydra's DictConfig at the edge). A node with
a `_target_` is built by calling that class or function with the node's other keys; nested nodes
with a `_target_` are built first. Objects the run owns (the policy model) are injected into every
target that names a matching parameter, unless the config sets it.

    run = build_run(cfg, dataset, done, names)   # everything a run needs before its first problem

builds the model (shared by threads with `concurrency`), a proposer factory (one proposer per
problem, from the `proposer` node, with the model, seed and the dataset's answer extractor
injected), the strategy, the verifier (training a probe first if its file is missing), and the
allocation (fitting a difficulty table first if asked), and says what that training cost.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ttc.budget import Budget, Ledger
from ttc.evals.datasets import Dataset, DatasetError

__all__ = ["ConfigError", "locate", "instantiate", "allowed_targets", "accepts", "missing_keys", "build_dataset",
           "eval_split", "dataset_start", "from_start", "train_split", "TRAIN_SEED_OFFSET", "load_model",
           "proposer_factory", "build_strategy", "build_verifier", "build_allocation", "build_run", "Run", "run_names",
           "run_label"]

log = logging.getLogger(__name__)

ALLOWED_PREFIX = "ttc."
ALLOW_KEY = "allowed_targets"  # the run config's extra packages its strategy and verifier nodes may name
MISSING = "???"  # Hydra's mandatory-value marker, kept as a string by OmegaConf.to_container
TRAIN_SEED_OFFSET = 1_000_000  # a reasoning-gym training seed far from any evaluated one


class ConfigError(ValueError):
    """A config that cannot be built: an unknown or disallowed target, a missing mandatory value."""


def allowed_targets(cfg: dict) -> tuple[str, ...]:
    """The run config's `allowed_targets`: packages or modules (dotted names) outside ttc whose objects its
    strategy and verifier nodes may name. Allowing a package lets the config run its code: name only your
    own; the standard library is refused (os.system, subprocess.run, builtins.eval would be one line away)."""
    names = cfg.get(ALLOW_KEY) or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(f"{ALLOW_KEY}: each entry is a dotted package or module name (mylab.layers), "
                              f"got {name!r}")
        top = name.split(".")[0]
        if top == "ttc" or top in sys.stdlib_module_names:
            where = "ttc itself" if top == "ttc" else "in the standard library"
            raise ConfigError(f"{ALLOW_KEY}: {name!r} is {where}; list your own packages only")
    return names


def locate(target: str, allowed: tuple[str, ...] = ()) -> Any:
    """The object named by a dotted path inside the `ttc` package, or inside one of the `allowed` packages
    (a run's `allowed_targets`)."""
    if not isinstance(target, str) or not (target.startswith(ALLOWED_PREFIX) or
                                           any(target.startswith(f"{name}.") for name in allowed)):
        extra = f" or the run's {ALLOW_KEY} {list(allowed)}" if allowed else \
            f" (to build your own classes, list their package in the run config's {ALLOW_KEY})"
        raise ConfigError(f"_target_ must name something inside the ttc package ({ALLOWED_PREFIX}...){extra}, "
                          f"got {target!r}")
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix, then attributes
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and not module_name.startswith(e.name):
                raise  # the module exists but one of its own imports is missing
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ConfigError(f"cannot find _target_ {target!r}")


def accepts(obj: Any, name: str) -> bool:
    """Whether calling `obj` takes a parameter called `name` (explicitly, not through **kwargs)."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return name in params and params[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      inspect.Parameter.KEYWORD_ONLY)


def unknown_keys(obj: Any, kwargs: dict) -> list[str]:
    """The keys of `kwargs` that calling `obj` cannot take (none when it takes **kwargs or has no signature)."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [k for k in kwargs if not accepts(obj, k)]


def missing_keys(node: Any, prefix: str) -> list[str]:
    """Dotted keys still set to Hydra's `???` (mandatory values nobody gave)."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in missing_keys(value, f"{prefix}.{key}")]
    if isinstance(node, list):
        return [k for i, value in enumerate(node) for k in missing_keys(value, f"{prefix}[{i}]")]
    return [prefix] if node == MISSING else []


def instantiate(node: Any, name: str = "config", allowed: tuple[str, ...] = (), **inject) -> Any:
    """Build `node` (a dict with `_target_`, possibly nested, lists of nodes too: a pipeline's layers) and
    return the object; None for no target. `allowed`: packages outside ttc its targets may name (a run's
    `allowed_targets`). `inject`: objects passed to every target that accepts a parameter of that name."""
    if isinstance(node, list):
        return [instantiate(v, f"{name}[{i}]", allowed, **inject) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {k: instantiate(v, f"{name}.{k}", allowed, **inject) for k, v in node.items()}
    missing = missing_keys(node, name)
    if missing:
        raise ConfigError(f"set {', '.join(missing)} (a mandatory value, marked ??? in its config)")
    kwargs = dict(node)
    target = kwargs.pop("_target_")
    if target is None:
        return None
    obj = locate(target, allowed)
    kwargs = {k: instantiate(v, f"{name}.{k}", allowed, **inject) for k, v in kwargs.items()}
    for key, value in inject.items():
        if key not in kwargs and accepts(obj, key):
            kwargs[key] = value
    try:
        inspect.signature(obj).bind(**kwargs)
    except TypeError as e:
        unknown = unknown_keys(obj, kwargs)
        if unknown:  # most often a key an experiment set for the config group's default, left behind by a swap
            drops = " ".join(f"~{name}.{k}" for k in unknown)
            raise ConfigError(f"{name} ({target}) takes no {', '.join(unknown)}: a key meant for another "
                              f"{name} config (an experiment's or an override's); drop it with {drops}") from None
        raise ConfigError(f"{name} ({target}): {e}") from None
    except ValueError:  # no signature to check (a builtin)
        pass
    try:
        return obj(**kwargs)
    except (ConfigError, DatasetError):  # already the user's one line
        raise
    except (ValueError, FileNotFoundError) as e:  # the target refused what the config gave it: a missing model
        # (ModelNotFoundError), an unsupported checkpoint, a strategy's or a budget's own checks; the user's to fix
        raise ConfigError(f"{name} ({target}): {type(e).__name__}: {e}") from e


# --- datasets ---------------------------------------------------------------------------------

# Dataset keys the runner applies to the built dataset (loaders never see them): `start` (the first
# problems left out: dataset.start=160 dataset.limit=200 evaluates positions 160-199) and `shard`.
RUNNER_DATASET_KEYS = ("start", "shard")


def eval_split(cfg: dict) -> dict:
    """The evaluated split: the dataset config without its `train_*` keys and the keys the runner takes
    after the dataset is built (RUNNER_DATASET_KEYS: `start`, `shard`, ttc.evals.shard)."""
    return {k: v for k, v in cfg.items() if not k.startswith("train_") and k not in RUNNER_DATASET_KEYS}


def dataset_start(cfg: dict) -> int:
    """`dataset.start` (0 without it): how many of the dataset's first problems the run leaves out."""
    start = cfg.get("start") or 0
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ConfigError(f"dataset.start must be an integer >= 0 (the first problems left out), got {start!r}")
    return start


def from_start(dataset: Dataset, start: int) -> Dataset:
    """The dataset without its first `start` problems (each keeps its id, hence its seed: ttc.graph.problem_seed)."""
    return replace(dataset, problems=dataset.problems[start:]) if start else dataset


def train_split(cfg: dict) -> dict:
    """The training split (for probes and other learned verifiers), never the evaluated problems:
    every `train_<key>` replaces `<key>` (train_path, train_split, train_seed); a config with a
    `seed` but no `train_seed` (reasoning-gym) trains on seed + 1_000_000."""
    out = eval_split(cfg)
    overrides = {k[len("train_"):]: v for k, v in cfg.items() if k.startswith("train_") and v is not None}
    if "seed" in out and "seed" not in overrides:
        overrides["seed"] = int(out["seed"]) + TRAIN_SEED_OFFSET
    if not overrides:
        raise ConfigError(f"the dataset {cfg.get('_target_')} has no training split: set dataset.train_path "
                          "(or train_seed) to train a verifier on it")
    if overrides.get("seed") == out.get("seed") and overrides.get("path", out.get("path")) == out.get("path"):
        raise ConfigError("the training split is the evaluated split (same seed and path): a probe must be trained "
                          "on other problems")
    out.update(overrides)
    return out


def build_dataset(cfg: dict) -> Dataset:
    dataset = instantiate(cfg, "dataset")
    if not isinstance(dataset, Dataset):
        raise ConfigError(f"dataset._target_ {cfg.get('_target_')} returned {type(dataset).__name__}, not a Dataset")
    return dataset


# --- models -----------------------------------------------------------------------------------

_loaded: dict[str, Any] = {}  # the last model loaded, kept across multirun jobs in one process


def load_model(cfg: dict):
    """The policy model (ttc.load by default); jobs of a sweep with the same model config share it."""
    import json

    key = json.dumps(cfg, sort_keys=True, default=str)
    if key not in _loaded:
        _loaded.clear()  # one model in memory at a time
        _loaded[key] = instantiate(cfg, "model")
    return _loaded[key]


# --- proposers ----------------------------------------------------------------------------------

def proposer_factory(node: dict, model, seed: int, answer_fn: Callable[[str], str | None]) -> Callable[[], Any]:
    """A function returning a fresh proposer built from the `proposer` node (one per problem: a proposer
    counts the children drawn per branch), with `model`, `seed` and `answer_fn` injected. One is built
    here already, so that a config error shows before any work is done."""
    node = dict(node)

    def make():
        return instantiate(node, "proposer", model=model, seed=seed, answer_fn=answer_fn)

    if make() is None:
        raise ConfigError("proposer._target_ is not set: choose a proposer (proposer=local)")
    return make


# --- verifiers, with probe training on demand -------------------------------------------------

def build_verifier(cfg: dict, model, names: dict):
    """The verifier (None without a `_target_`), built with the policy model injected.

    A verifier class with a `fit` classmethod (the learned probe) whose `path` is unset or names no
    file is trained first on the dataset's training split, and cached: see `ttc.evals.probe_training`.
    """
    from ttc.graph import HIDDEN_STATES, MissingCapability, backend_of, require
    from ttc.verifiers.probe import shipped_probe_path

    node = dict(cfg.get("verifier") or {})
    if node.get("_target_") is None:
        return None
    allowed = allowed_targets(cfg)
    cls = locate(node["_target_"], allowed)
    try:
        if hasattr(cls, "fit") and "path" in node:
            # the learned probe reads the policy's hidden states: say so before training it, not after
            require(backend_of(model), HIDDEN_STATES, f"verifier={names.get('verifier') or 'probe'}")
            path = node["path"]
            shipped = shipped_probe_path(getattr(model, "name", "")) if path in (None, MISSING) else None
            if shipped is not None:  # the probe ttc ships for this model: verifier=probe works at once
                node["path"] = str(shipped)
            elif path in (None, MISSING) or not Path(str(path)).expanduser().is_file():
                from ttc.evals.probe_training import ensure_probe

                node["path"] = str(ensure_probe(cfg, model, names, path=None if path in (None, MISSING) else path))
        return instantiate(node, "verifier", allowed, model=model)
    except MissingCapability as e:  # a verifier the backend cannot serve: a config error, in one line
        raise ConfigError(str(e)) from None


def training_cost(verifier) -> Ledger | None:
    """What training a learned verifier cost (its rollouts, as `fit` recorded them in the probe's
    metadata, whether trained by this run or loaded from a file); None for other verifiers."""
    fields = (getattr(verifier, "metadata", None) or {}).get("ledger") if hasattr(type(verifier), "fit") else None
    return Ledger.from_record(fields) if fields else None


def _share_verifier_engine(verifier, engine) -> None:
    """A verifier with an engine of its own (a PRM) gets it wrapped too: engines are not thread-safe."""
    from ttc.decoder.concurrent import ConcurrentEngine

    own = getattr(verifier, "engine", None)
    if own is not None and own is not engine and not isinstance(own, ConcurrentEngine):
        verifier.engine = ConcurrentEngine(own)


# --- strategies -------------------------------------------------------------------------------

def build_strategy(cfg: dict, model=None):
    """The strategy (with its nested nodes: a pipeline's layers, a selector), the policy model injected where
    a target takes one, targets outside ttc allowed by the run's `allowed_targets`."""
    return instantiate(cfg["strategy"], "strategy", allowed_targets(cfg), model=model)


# --- allocation -------------------------------------------------------------------------------

def build_allocation(cfg: dict, model, dataset: Dataset, done: dict, verifier,
                     shard=None) -> tuple[Any, Any, Ledger | None]:
    """(allocator, pool, fitting cost) for `allocation=<name>`, or (None, None, None) for `allocation=none`.

    The pool holds `allocation.total_tokens` (default: budget.tokens x problems) and is rebuilt from
    the finished records, so a resumed run goes on with what is left. `shard` (a ttc.evals.shard.Shard,
    `dataset` being its problems): the total is the whole dataset's, and the pool holds this shard's
    share of it (`Shard.share`: in proportion to its problems; the shards' pools sum to the total).
    A Difficulty allocator with `train` and no table fits its table first on the dataset's training split
    (never evaluated); the third item is that fitting's summed ledger (None when nothing was fitted).
    """
    from ttc.search.allocation import Pool

    node = dict(cfg.get("allocation") or {})
    total = node.pop("total_tokens", None)
    if node.get("_target_") is None:
        return None, None, None
    allocator = instantiate(node, "allocation", model=model)
    if total is None:
        per_problem = (cfg.get("budget") or {}).get("tokens")
        if per_problem is None:
            raise ConfigError("an allocation needs a token total: set allocation.total_tokens or budget.tokens")
        total = int(per_problem) * (len(dataset) if shard is None else shard.size)
    if shard is not None:
        total = shard.share(int(total))
    ids = {p.id for p in dataset.problems}
    pool = Pool.from_records(int(total), len(dataset), (r for r in done.values() if r["id"] in ids))
    pool.concurrency = max(1, int(cfg.get("concurrency") or 1))
    train = getattr(allocator, "train", None)
    if not train or node.get("table"):
        return allocator, pool, None
    return allocator, pool, _fit_difficulty_table(cfg, model, allocator, pool, verifier, dict(train))


def _fit_difficulty_table(cfg: dict, model, allocator, pool, verifier, train: dict) -> Ledger:
    """Fit `allocator.table` on `train["problems"]` training problems; return what the trials cost."""
    from ttc.search.allocation import OBJECTIVES, fit_table

    objective = train.get("objective", "accuracy_per_token")
    if objective not in OBJECTIVES:
        raise ConfigError(f"allocation.train.objective: {objective!r}; choose one of {sorted(OBJECTIVES)}")
    problems = build_dataset(train_split(cfg["dataset"]))
    training = problems.problems[: int(train.get("problems", 16))]
    allocator.table = fit_table(
        training, proposer_factory(cfg["proposer"], model, int(cfg.get("seed", 0)), problems.extract),
        problems.grade, verifier=verifier,
        tokens_per_problem=int(train.get("tokens_per_problem") or pool.total // pool.problems),
        options=train.get("options"), objective=OBJECTIVES[objective], concurrency=pool.concurrency,
        # the trials run the allocator the run will use, but for its table
        **{name: getattr(allocator, name) for name in ("first_pass", "round_size", "max_samples", "confidence",
                                                       "easy_score", "hopeless_score", "weighted")})
    log.info("difficulty table fitted on %d training problems: %s", len(training), allocator.table)
    return fit_table.last_ledger


# --- the run ----------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a run builds once from its config, before its first problem."""

    model: Any  # the policy; a SharedModel over `engine` when problems are solved concurrently
    strategy: Any
    verifier: Any
    make_proposer: Callable[[], Any]  # a fresh proposer per problem
    make_budget: Callable[[], Any]  # a fresh per-problem Budget (its wall clock starts when it is made)
    allocator: Any = None  # with a dataset-wide allocation: the allocator and its Pool
    pool: Any = None
    engine: Any = None  # the ConcurrentEngine the worker threads share (concurrency > 1), or the remote backend
    concurrency: int = 1
    training: dict[str, Ledger] = field(default_factory=dict)  # "probe", "difficulty_table": what training cost
    record_trees: bool = False  # each record keeps its search tree, finished nodes graded (`record_trees=true`)


def build_run(cfg: dict, dataset: Dataset, done: dict, names: dict, shard=None) -> Run:
    """Build `cfg`'s objects for solving `dataset` (`done`: the finished records, for the pool; `shard`: the
    ttc.evals.shard.Shard that `dataset` is, whose share of a dataset-wide budget the pool holds)."""
    model, engine = load_model(cfg["model"]), None
    concurrency = max(1, int(cfg.get("concurrency") or 1))
    if concurrency > 1 and getattr(model, "engine", None) is not None:  # the built-in decoder: one batched engine
        from ttc.backends.local import SharedModel
        from ttc.decoder.concurrent import ConcurrentEngine

        engine = ConcurrentEngine(model.engine)
        model = SharedModel(model, engine)
    elif concurrency > 1 and hasattr(model, "cancel"):
        engine = model  # a server batches the threads' requests itself; a failure or Ctrl-C cancels the backend
        model.reopen()  # one kept from an earlier job of this process, cancelled there, takes requests again
    make_proposer = proposer_factory(cfg["proposer"], model, int(cfg.get("seed", 0)), dataset.extract)
    strategy = build_strategy(cfg, model)
    verifier = build_verifier(cfg, model, names)  # may train a probe first
    if engine is not None and verifier is not None:
        _share_verifier_engine(verifier, engine)
    allocator, pool, table_cost = build_allocation(cfg, model, dataset, done, verifier, shard)
    probe_cost = training_cost(verifier)
    if probe_cost is None and hasattr(strategy, "training_cost"):  # a strategy scoring with its own probe (panel)
        probe_cost = strategy.training_cost(getattr(model, "name", ""))
    costs = {"probe": probe_cost, "difficulty_table": table_cost}
    # Every run starts with a cold prefix cache, so that its compute does not depend on which jobs of
    # a sweep (or which probe training) ran before it in this process.
    clear = getattr(getattr(model, "engine", None), "clear_prefix_cache", None)
    if clear is not None:
        clear()
    return Run(model, strategy, verifier, make_proposer, budget_factory(cfg["budget"]), allocator, pool, engine,
               concurrency, {k: v for k, v in costs.items() if v is not None}, bool(cfg.get("record_trees")))


def budget_factory(node: dict) -> Callable[[], Budget]:
    """A fresh per-problem Budget from the `budget` node (a plain dict of limits is a ttc.Budget)."""
    node = dict(node)
    make = lambda: instantiate(node, "budget") if node.get("_target_") else Budget(**node)  # noqa: E731
    make()  # built once now: a budget the config gets wrong is refused before any problem starts
    return make


# --- names --------------------------------------------------------------------------------------

def run_names(cfg: dict, names: dict | None = None) -> dict:
    """The config-group choices ({"strategy": "best_of_n", ...}): the CLI's where given, else like them
    from the `_target_`s: a target's module (search/<name>.py, verifiers/<name>.py), a dataset
    loader's name without `load_`."""
    derived = {}
    for group in ("strategy", "verifier", "dataset"):
        target = (cfg.get(group) or {}).get("_target_")
        parts = target.split(".") if target else []
        if group == "dataset":
            derived[group] = parts[-1].removeprefix("load_") if parts else None
        else:
            derived[group] = parts[-2] if len(parts) >= 2 else None
    return {**derived, **{k: v for k, v in (names or {}).items() if v is not None}}


def run_label(names: dict) -> str:
    """strategy(+verifier); with an allocator, its name instead of the strategy's (adaptive_stop and
    difficulty run their own sampling; uniform runs the strategy: "uniform/self_consistency")."""
    verifier, allocation = names.get("verifier"), names.get("allocation")
    base = str(names.get("strategy"))
    if allocation not in (None, "none"):
        base = f"uniform/{base}" if allocation == "uniform" else str(allocation)
    return f"{base}+{verifier}" if verifier not in (None, "none") else base
