"""Tree search with and without KV sharing: beam, DVTS and ETS on the embedded model, GSM8K problems.

"on" is ttc as it is: children fork their parent's KV blocks (reference counts) and the prompt is
served by the prefix cache. "off" runs the same strategies, seeds and verifier on a second copy of
the model loaded with `prefix_caching=False`, through a proposer that never forks: every child is a
new sequence holding its parent's whole token ids, so every branch's context is prefilled again and
held in its own blocks. (A selector's scratch forks, ETS's step embeddings, stay forks in both.)
Sampling streams are the same, but prefilled and decoded logits differ in the last bits, so a
sampled token can flip and the two trees can drift apart; the table shows the generated tokens too.

Width N is the number of trajectories per round, as in search-and-learn and the ETS paper:
beam = Beam(n=N/expand, expand), dvts = DVTS(N/expand subtrees of one beam each, expand),
ets = ETS(n=N/expand, expand). The verifier is free (the geometric-mean token probability of the
step), so computed tokens are the proposer's (and ETS's embeddings).

    python benchmarks/search.py [--problems 3] [--width 16] [--expand 4] [--max-depth 10] [--record]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import time
from pathlib import Path

import torch

import ttc
from ttc.graph import Meter, Problem
from ttc.backends.local import LocalProposer
from ttc.search.beam import Beam
from ttc.search.dvts import DVTS
from ttc.search.ets import ETS
from decode import machine  # noqa: E402  (the sibling script; one description of the machine)

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


class RecomputingProposer(LocalProposer):
    """KV sharing off: a child is a new sequence with its parent's token ids, prefilled from scratch.

    For benchmarks only: the prefill is charged honestly (as prompt tokens) but not reserved ahead,
    so under a token budget this proposer can overshoot it; the benchmark runs without one.
    """

    def propose(self, branches, n, meter, to_end=False):
        live = [b for b in branches if not b.finished]
        limits = self._limits(live, n, meter, None if to_end else self.max_step_tokens)
        if not live or n < 1 or max(limits, default=0) < 1:
            return []
        handles, seeds, parents = [], [], []
        for b in live:
            for s in self._seeds(b, n):
                handles.append(self.engine.new_sequence(b.handle.token_ids, meter.ledger, seed=s))
                seeds.append(s)
                parents.append(b)
        return self._extend(parents, handles, seeds, limits, to_end)


class MeanProbabilityVerifier:
    """exp(mean token logprob) of the latest step, read off the proposer's own logprobs (free)."""

    def score(self, branches, meter):
        return [math.exp(b.steps[-1].logprob / max(1, len(b.steps[-1].token_ids))) if b.steps else 0.0
                for b in branches]


def strategies(width: int, expand: int, max_depth: int) -> dict:
    beams = max(1, width // expand)
    return {"beam": Beam(n=beams, expand=expand, max_depth=max_depth),
            "dvts": DVTS(n=beams, subtrees=beams, expand=expand, max_depth=max_depth),
            "ets": ETS(n=beams, expand=expand, max_depth=max_depth)}


def run(model, proposer_cls, strategy, problems, args) -> dict:
    ledger = ttc.Ledger()
    nodes = 0
    for problem in problems:
        model.engine.clear_prefix_cache()  # every problem prefills its prompt from scratch
        proposer = proposer_cls(model, max_step_tokens=args.max_step_tokens, max_tokens=args.max_tokens,
                                temperature=0.8, seed=args.seed)
        meter = Meter(ttc.Budget(), ttc.Ledger())
        started = time.perf_counter()
        result = strategy(problem, proposer, MeanProbabilityVerifier(), meter)
        meter.ledger.wall_s += time.perf_counter() - started
        ledger += meter.ledger
        nodes += len(result.tree["nodes"])
        engine = model.engine
        cached = engine.prefix.num_cached_blocks if engine.prefix is not None else 0
        assert engine.pool.num_free + cached == engine.pool.num_blocks, "KV blocks leaked"
    return {"ledger": ledger, "nodes": nodes}


def table(rows: dict) -> str:
    lines = ["| strategy | KV sharing | peak KV | tokens computed | reused | generated | tree nodes | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for (name, mode), r in rows.items():
        lg = r["ledger"]
        lines.append(f"| {name} | {mode} | {lg.peak_kv_bytes / 1e6:.1f} MB | {lg.computed_tokens} | {lg.reused_tokens} "
                     f"| {lg.generated_tokens} | {r['nodes']} | {lg.wall_s:.1f} |")
    lines += ["", "| strategy | peak KV off/on | tokens computed off/on | wall off/on |", "|---|---|---|---|"]
    for name in dict.fromkeys(n for n, _ in rows):
        on, off = rows[(name, "on")]["ledger"], rows[(name, "off")]["ledger"]
        ratios = (off.peak_kv_bytes / max(1, on.peak_kv_bytes), off.computed_tokens / max(1, on.computed_tokens),
                  off.wall_s / max(1e-9, on.wall_s))
        lines.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=3)
    ap.add_argument("--width", type=int, default=16, help="trajectories per round")
    ap.add_argument("--expand", type=int, default=4, help="children per kept beam")
    # Short solutions and enough rounds for every trajectory to finish inside the search, so the runs
    # do not end in a long one-stream completion that would swamp the comparison.
    ap.add_argument("--max-depth", type=int, default=10, help="rounds (steps) at most")
    ap.add_argument("--max-step-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--strategies", default="beam,dvts,ets")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 is steadier when other work shares the cores)")
    ap.add_argument("--data", type=Path, default=GSM8K)
    ap.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    args = ap.parse_args()

    rows_in = [json.loads(line) for line in args.data.read_text().splitlines()[: args.problems]]
    problems = [Problem(id=f"gsm8k-{i}", prompt=[{"role": "user", "content": r["question"]}])
                for i, r in enumerate(rows_in)]
    chosen = {k: v for k, v in strategies(args.width, args.expand, args.max_depth).items()
              if k in args.strategies.split(",")}
    rows: dict = {}
    for mode, prefix_caching, proposer_cls in (("on", True, LocalProposer), ("off", False, RecomputingProposer)):
        model = ttc.load("smollm2-135m", dtype=args.dtype, prefix_caching=prefix_caching, threads=args.threads)
        model.generate("warm-up", n=2, max_new_tokens=4)
        for name, strategy in chosen.items():
            rows[(name, mode)] = run(model, proposer_cls, strategy, problems, args)
            print(f"{name} {mode}: {rows[(name, mode)]['ledger']}", flush=True)
        del model
        gc.collect()
    rows = {(n, m): rows[(n, m)] for n in chosen for m in ("on", "off")}
    out = table(rows)
    print(out)
    if args.record:
        doc = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        doc.parent.mkdir(exist_ok=True)
        text = doc.read_text() if doc.is_file() else ""
        command = (f"python benchmarks/search.py --problems {args.problems} --width {args.width} --expand {args.expand}"
                   f" --max-depth {args.max_depth} --max-step-tokens {args.max_step_tokens} --max-tokens "
                   f"{args.max_tokens} --dtype {args.dtype}" + (f" --threads {args.threads}" if args.threads else "")
                   + " --record")
        with doc.open("a") as f:
            if "## Search (KV sharing)" not in text:
                f.write("\n## Search (KV sharing)\n\nBeam, DVTS and ETS with children forking their parent's KV "
                        "(on) against the same searches re-prefilling every branch from its token ids (off). "
                        "See `benchmarks/search.py`.\n")
            f.write(f"\n### search, {datetime.date.today().isoformat()}\n\nMachine: {machine()}. Command: "
                    f"`{command}`. {len(problems)} GSM8K test problems, {args.width} trajectories per round, "
                    f"temperature 0.8, seed {args.seed}, {args.dtype}.\n\n{out}\n")


if __name__ == "__main__":
    main()
