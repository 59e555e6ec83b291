"""The one place configs become objects: `_target_` is the registry, restricted to `ttc.*`.

Configs arrive here as plain dicts (the CLI converts Hydra's DictConfig at the edge). A node with
a `_target_` is built by calling that class or function with the node's other keys; nested nodes
with a `_target_` are built first. Objects the run owns (the policy model) are injected into every
target that names a matching parameter, unless the config sets it.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from ttc.evals.datasets import Dataset

__all__ = ["ConfigError", "locate", "instantiate", "accepts", "missing_keys", "split_strategy", "build_dataset",
           "eval_split", "train_split", "PROPOSER_KEYS", "TRAIN_SEED_OFFSET", "load_model"]

ALLOWED_PREFIX = "ttc."
MISSING = "???"  # Hydra's mandatory-value marker, kept as a string by OmegaConf.to_container
# Strategy-config keys that configure the proposer, not the strategy (popped and given to LocalProposer).
PROPOSER_KEYS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "max_step_tokens", "step_stop")
TRAIN_SEED_OFFSET = 1_000_000  # a reasoning-gym training seed far from any evaluated one


class ConfigError(ValueError):
    """A config that cannot be built: an unknown or disallowed target, a missing mandatory value."""


def locate(target: str) -> Any:
    """The object named by a dotted path inside the `ttc` package."""
    if not isinstance(target, str) or not target.startswith(ALLOWED_PREFIX):
        raise ConfigError(f"_target_ must name something inside the ttc package ({ALLOWED_PREFIX}...), got {target!r}")
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


def missing_keys(node: Any, prefix: str) -> list[str]:
    """Dotted keys still set to Hydra's `???` (mandatory values nobody gave)."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in missing_keys(value, f"{prefix}.{key}")]
    if isinstance(node, list):
        return [k for i, value in enumerate(node) for k in missing_keys(value, f"{prefix}[{i}]")]
    return [prefix] if node == MISSING else []


def instantiate(node: Any, name: str = "config", **inject) -> Any:
    """Build `node` (a dict with `_target_`, possibly nested) and return the object; None for no
    target. `inject`: objects passed to every target that accepts a parameter of that name."""
    if isinstance(node, list):
        return [instantiate(v, f"{name}[{i}]", **inject) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {k: instantiate(v, f"{name}.{k}", **inject) for k, v in node.items()}
    missing = missing_keys(node, name)
    if missing:
        raise ConfigError(f"set {', '.join(missing)} (a mandatory value, marked ??? in its config)")
    kwargs = dict(node)
    target = kwargs.pop("_target_")
    if target is None:
        return None
    obj = locate(target)
    kwargs = {k: instantiate(v, f"{name}.{k}", **inject) for k, v in kwargs.items()}
    for key, value in inject.items():
        if key not in kwargs and accepts(obj, key):
            kwargs[key] = value
    try:
        inspect.signature(obj).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{name} ({target}): {e}") from None
    except ValueError:  # no signature to check (a builtin)
        pass
    return obj(**kwargs)


# --- strategies -------------------------------------------------------------------------------

@dataclass(frozen=True)
class StrategySpec:
    config: dict  # the strategy's own keys (with _target_)
    proposer: dict  # LocalProposer keyword arguments


def split_strategy(cfg: dict) -> StrategySpec:
    """Separate the proposer's settings (temperature, top_p, max_tokens, ...) from the strategy's."""
    cfg = dict(cfg)
    proposer = {k: cfg.pop(k) for k in PROPOSER_KEYS if k in cfg}
    if isinstance(proposer.get("step_stop"), (list, str)):
        stops = proposer["step_stop"]
        proposer["step_stop"] = (stops,) if isinstance(stops, str) else tuple(stops)
    return StrategySpec(cfg, proposer)


# --- datasets ---------------------------------------------------------------------------------

def eval_split(cfg: dict) -> dict:
    """The evaluated split: the dataset config without its `train_*` keys."""
    return {k: v for k, v in cfg.items() if not k.startswith("train_")}


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
