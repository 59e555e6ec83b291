"""The host's whole decode step: what the engine does per step besides the model's own compute.

Why: on a GPU a captured decode step of a small model takes a few milliseconds, and the host's work around it
(the cascade plan, the Triton work table, the step's inputs, the draw's read-back, stop strings, the ledger) is
paid every step in series with it; a CUDA graph removes the launches, not this. Here the model is a stand-in
that returns fixed random logits at no cost, so a step's time is the engine's own work. N rows are forked from
one prompt and draw `--steps` tokens each (temperature 0.8, EOS ignored), on two paths:
- "cpu": the CPU's eager step (the reference attention's plan);
- "gpu host": what a CUDA step does on the host: the decode graphs' buffers refilled from the plan (the work
  table), the forward itself replaced (no GPU here: nothing is launched, nothing captured).
A vocabulary of 64 (a word-level tokenizer), so that the CPU's sampling arithmetic, which a GPU does itself,
is next to nothing here.

    python benchmarks/step_host.py [--before REV] [--steps 64]

--before REV runs the same measurement on the ttc of git revision REV (`git archive` into a temporary folder,
imported from there in a child process): the peer this script compares against; ratios are before / now.
Prints ms per step, the best of 3 runs, one thread.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpu_check_harness import ROOT, bootstrap_ttc, word_level_tokenizer  # noqa: E402

import torch  # noqa: E402

VOCAB = 64  # drawing from (rows, 64) logits costs the CPU next to nothing, as the draw costs a GPU's host
# (rows, prompt tokens, stop strings): forked samples, with and without a search's step delimiter
CASES = [(16, 200, ("\n\n",)), (64, 200, ("\n\n",)), (256, 200, ("\n\n",)), (256, 200, ()), (64, 1000, ("\n\n",))]
PATHS = ("cpu", "gpu host")


class HostOnlyModel:
    """Stands in for ttc.decoder.model.Transformer: (rows, V) fixed random logits, no compute."""

    def __init__(self, cfg, max_rows: int):
        self.cfg, self.device, self.dtype, self.min_shared_tokens = cfg, torch.device("cpu"), torch.bfloat16, 16
        self.logits = torch.randn(max_rows, cfg.vocab_size, generator=torch.Generator().manual_seed(0))

    def __call__(self, tokens, positions, k, v, slots, attn, logits_rows=None, return_hidden=False):
        rows = tokens.shape[0] if logits_rows is None else logits_rows.shape[0]
        return self.logits[:rows], None


def engine_for(path: str, max_rows: int):
    from ttc.decoder.config import ModelConfig
    from ttc.decoder.engine import Engine
    from ttc.decoder.tokenizer import Tokenizer

    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position=4096, eos_token_ids=(2,))
    return Engine(HostOnlyModel(cfg, max_rows), Tokenizer(word_level_tokenizer(VOCAB)), kv_cache_bytes=64 << 20,
                  cuda_graphs=path == "gpu host")


def ms_per_step(engine, rows: int, prompt: int, stop: tuple[str, ...], steps: int) -> float:
    from ttc.decoder.sampling import SamplingParams

    def once() -> float:
        engine.clear_prefix_cache()
        root = engine.new_sequence([3 + i % (VOCAB - 3) for i in range(prompt)])
        engine.forward([root])
        kids = engine.fork(root, rows, seeds=list(range(rows)))
        t = time.perf_counter()
        engine.generate(kids, SamplingParams(temperature=0.8), steps, stop=list(stop), ignore_eos=True)
        seconds = time.perf_counter() - t
        engine.release(kids + [root])
        return seconds

    once()
    return min(once() for _ in range(3)) / steps * 1e3


def measure(steps: int, paths: tuple[str, ...] = PATHS) -> dict:
    """{"path|rows|prompt|stop": ms per step} for every case, on the `ttc` imported now, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {key: ms for path in paths for key, ms in _measure_path(path, steps).items()}
    finally:
        torch.set_num_threads(threads)


def _measure_path(path: str, steps: int) -> dict:
    engine = engine_for(path, max(rows for rows, _, _ in CASES))
    return {f"{path}|{rows}|{prompt}|{bool(stop)}": ms_per_step(engine, rows, prompt, stop, steps)
            for rows, prompt, stop in CASES}


def measure_at(rev: str, steps: int) -> dict:
    """measure() in a child process, on the ttc of git revision `rev`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    with tempfile.TemporaryDirectory(prefix=f"ttc-{rev}-") as folder:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        child = subprocess.run([sys.executable, __file__, "--root", folder, "--steps", str(steps), "--json"],
                               check=True, capture_output=True, text=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None, help="a git revision whose engine to time beside today's")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)  # a checkout to import ttc from (the child)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one JSON line (the --before child)
    args = ap.parse_args(argv)
    if args.root:
        bootstrap_ttc(pathlib.Path(args.root))  # else the installed ttc, as every benchmark
    now = measure(args.steps)
    if args.json:
        print(json.dumps(now))
        return
    before = measure_at(args.before, args.steps) if args.before else None
    header = ["path", "rows", "context", "stop string", "ms / step"] + (["before", "before / now"] if before else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key, ms in now.items():
        path, rows, prompt, stop = key.split("|")
        row = [path, rows, f"{prompt} + {args.steps} drawn", "yes" if stop == "True" else "no", f"{ms:.2f}"]
        if before:
            then = before.get(key)
            row += [f"{then:.2f}", f"{then / ms:.2f}x"] if then else ["-", "-"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
