"""`ttc-eval` / `python -m ttc.evals`: the Hydra entry point (the only place a DictConfig exists).

    ttc-eval strategy=self_consistency strategy.n=8 dataset=gsm8k dataset.limit=50 budget.tokens=8192
    ttc-eval strategy=beam strategy.n=4 proposer.max_tokens=256 verifier=calculator
    ttc-eval dataset=reasoning_gym dataset.task=chain_sum dataset.options={min_terms:2,max_terms:2}
    ttc-eval experiment=chain_sum_quick hydra.run.dir=runs/quick      # run again to resume
    ttc-eval --multirun strategy.n=1,2,4,8,16                          # one folder per job

Prints the summary table, then the summary as one JSON object on the last line of stdout.
Exit status 130 when interrupted (what is done is saved; the same command resumes), 2 for a
config, dataset or output-folder problem, a server that cannot be reached or a KV pool too small for one
problem (with a one-line message; what was done is saved).
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from ttc.backends.remote_http import RemoteError
from ttc.decoder.cache import PoolExhausted
from ttc.evals.build import ConfigError
from ttc.evals.datasets import DatasetError
from ttc.evals.results import ResumeError
from ttc.evals.runner import run_eval, summary_table


def config_dict(cfg: DictConfig) -> dict:
    """The config as plain containers, interpolations resolved; Hydra's `???` stays a string."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


@hydra.main(config_path="pkg://ttc.configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    runtime = HydraConfig.get().runtime
    try:
        outcome = run_eval(config_dict(cfg), runtime.output_dir, names=dict(runtime.choices))
    except (ConfigError, DatasetError, ResumeError, RemoteError, PoolExhausted) as e:  # the user's: one line
        print(f"ttc-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary_table(outcome.summary))
    print(json.dumps(outcome.summary, default=str), flush=True)
    if outcome.interrupted:
        sys.exit(130)


if __name__ == "__main__":
    main()
