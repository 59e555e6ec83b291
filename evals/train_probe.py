"""Train a probe verifier on a dataset's training split and save it:

    python -m ttc.evals.train_probe dataset=reasoning_gym dataset.task=chain_sum model.spec=smollm2-135m
    python -m ttc.evals.train_probe dataset=gsm8k probe_training.problems=200 out=probes/gsm8k.pt

Without `out`, the probe goes to the cache path the eval runner looks in
(~/.cache/ttc/probes/<model>-<task>-<hash>.pt), so a later `ttc-eval verifier=probe` with the same
model, dataset and settings uses it, unless ttc ships a probe for the model (the embedded one has
verifiers/probes/smollm2-135m.pt, which `verifier=probe` takes first): then pass `verifier.path=PATH`.
The path is printed as the last line of stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ttc.backends.remote_http import RemoteError
from ttc.decoder.cache import PoolExhausted
from ttc.evals.__main__ import config_dict
from ttc.evals.build import ConfigError, load_model
from ttc.evals.datasets import DatasetError
from ttc.evals.probe_training import DEFAULT_SETTINGS, fit_settings, probe_cache_path, train_probe_for


@hydra.main(config_path="pkg://ttc.configs", config_name="train_probe", version_base="1.3")
def main(cfg: DictConfig) -> None:
    cfg = config_dict(cfg)
    settings = {**DEFAULT_SETTINGS, **cfg["probe_training"]}
    out = Path(cfg["out"]).expanduser() if cfg.get("out") else probe_cache_path(cfg["model"], cfg["dataset"],
                                                                                 settings, cfg["verifier"])
    try:
        model = load_model(cfg["model"])
        train_probe_for(cfg["dataset"], model, cfg["verifier"], path=out, progress=bool(cfg.get("progress", True)),
                        **fit_settings(settings))
    except (ConfigError, DatasetError, RemoteError, PoolExhausted) as e:  # the user's to fix: one line
        print(f"train_probe: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(out, flush=True)


if __name__ == "__main__":
    main()
