"""Shards: one eval split over k jobs (a SLURM array through submitit, Ray, local processes), merged after.

    ttc-eval --multirun dataset.shard.count=8 'dataset.shard.index=range(0,8)' hydra/launcher=submitit_slurm
    python -m ttc.evals.merge multirun/eval/.../* --out runs/merged

`dataset.shard.index=i dataset.shard.count=k` keeps the problems at positions i, i+k, i+2k, ... of the
dataset as its loader built it (after its own seed and limit; the loaders never see the shard). Strided
rather than in blocks, so that growing `dataset.limit` on resume keeps every shard's finished problems in
that shard, and a dataset ordered by difficulty is spread evenly. The first `size % k` shards hold one
problem more. Every problem keeps the seed it has in the unsharded run (`ttc.graph.problem_seed` derives
it from the problem's id), so at concurrency=1 the shards' answers and texts are the unsharded run's.
Their ledgers differ in one way: each shard starts with a cold prefix cache, so a problem may count as
prefill what the unsharded run counted as reused (the shared chat-template prefix).

A dataset-wide budget (`allocation=...`) is split over the shards in proportion to their problems:
shard i's Pool holds floor(total x problems_i / size), and the tokens those floors leave over go one
each to the first shards, so the shares sum to the total exactly (`Shard.share`). A shard's pool is
its own: no shard can spend another's share, so a sharded allocation run is not the unsharded one
(each pool balances only its own problems).

Each shard is a run folder of its own (resumable like any other), which records in run.json what the
merge needs: the shard, its problem ids and the whole dataset's ids (`Shard.info`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ttc.evals.build import ConfigError
from ttc.evals.datasets import Dataset

__all__ = ["Shard", "shard_settings", "SHARD_KEYS"]

# The config keys that say which shard a run is: the same experiment whatever their values (the merge).
SHARD_KEYS = ("dataset.shard.index", "dataset.shard.count")


def shard_settings(dataset_cfg: dict) -> tuple[int, int]:
    """(index, count) of the `dataset.shard` node ((0, 1) without one); a ConfigError if they make no shard."""
    node = dataset_cfg.get("shard") or {}
    index, count = node.get("index", 0), node.get("count", 1)
    if isinstance(index, bool) or isinstance(count, bool) or not isinstance(index, int) or not isinstance(count, int):
        raise ConfigError(f"dataset.shard.index and dataset.shard.count must be integers, got {index!r} and {count!r}")
    if count < 1:
        raise ConfigError(f"dataset.shard.count must be at least 1, got {count}")
    if not 0 <= index < count:
        raise ConfigError(f"dataset.shard.index must be in 0..{count - 1} (dataset.shard.count={count}), got {index}")
    return index, count


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` of a dataset of `size` problems (as built: after its seed and limit)."""

    index: int
    count: int
    size: int

    def positions(self, index: int | None = None) -> range:
        """The dataset positions of this shard (or of shard `index`)."""
        return range(self.index if index is None else index, self.size, self.count)

    def select(self, dataset: Dataset) -> Dataset:
        """The dataset with this shard's problems only, in their dataset order."""
        if len(dataset) != self.size:
            raise ValueError(f"a shard of {self.size} problems cannot select from {len(dataset)}")
        return replace(dataset, problems=[dataset.problems[i] for i in self.positions()])

    def share(self, total: int) -> int:
        """This shard's part of a dataset budget of `total` tokens: floor(total x its problems / size), plus
        one of the tokens the floors leave over if it is among the first shards (the shares sum to total)."""
        if self.size == 0:
            return int(total) if self.index == 0 else 0
        floors = [int(total) * len(self.positions(i)) // self.size for i in range(self.count)]
        left_over = int(total) - sum(floors)  # < count: each floor drops less than one token
        return floors[self.index] + (1 if self.index < left_over else 0)

    def info(self, dataset: Dataset) -> dict:
        """What run.json (and a sharded run's summary.json) records for the merge; `dataset`: the whole one."""
        ids = [p.id for p in dataset.problems]
        return {"index": self.index, "count": self.count, "dataset_size": self.size,
                "problems": [ids[i] for i in self.positions()], "dataset_ids": ids}
