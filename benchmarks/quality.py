"""What each decode mode costs in quality: perplexity on a fixed text, and greedy agreement with bfloat16.

Modes: float32 (the reference), bfloat16, int8, int4 (the GGUF's own Q4_1 blocks), w4a8 (those blocks with the
activations rounded to int8 per group; AVX512-VNNI CPUs, else one line says it was skipped), bfloat16
batch-invariant; --modes picks some (float32 and bfloat16, the references, always run).
- perplexity: the first `--texts` GSM8K train solutions (question + worked answer, as plain text), each scored
  from its first token, all tokens pooled; the difference to float32 and to bfloat16 is printed;
- greedy agreement: `--prompts` chain_sum chat prompts, 128 greedy tokens each; the share of positions equal to
  bfloat16's, and the mean length of the common prefix (after a first difference the texts drift apart).

    python benchmarks/quality.py [--data ../shared/data/gsm8k/train.jsonl] [--modes int4,w4a8] [--record]

The train split, never a reported problem. Prints a markdown table; --record appends it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import sys
from pathlib import Path

import torch

import ttc
from ttc.decoder import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import agreement_counts  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

MODES = {"float32": {"dtype": "float32"}, "bfloat16": {"dtype": "bfloat16"}, "int8": {"dtype": "int8"},
         "int4 (Q4_1 blocks)": {"dtype": "int4"}, "w4a8": {"dtype": "w4a8"},
         "bfloat16 batch-invariant": {"dtype": "bfloat16", "batch_invariant": True}}
NEW_TOKENS = 128


def texts(path: Path, count: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:count]]
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]


def perplexity(model, docs: list[str]) -> tuple[float, int]:
    """exp(mean negative log-likelihood) over every token after each document's first."""
    engine, total, count = model.engine, 0.0, 0
    for doc in docs:
        ids = model.tokenizer.encode(doc)
        seq = engine.new_sequence(ids[:1])
        engine.forward([seq])
        (scored,) = engine.score([(seq, ids[1:])], charge="prefill")
        total -= float(scored.logprobs.double().sum())
        count += len(ids) - 1
        engine.release([seq])
    return math.exp(total / count), count


def greedy(model, prompts) -> list[tuple[int, ...]]:
    engine = model.engine
    seqs = [engine.new_sequence(model.tokenizer.encode_prompt(p)) for p in prompts]
    engine.forward(seqs)
    outs = engine.generate(seqs, SamplingParams(temperature=0.0), NEW_TOKENS, ignore_eos=True)
    engine.release(seqs)
    return [o.token_ids for o in outs]


def agreement(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> tuple[float, float]:
    """(share of positions equal, mean common-prefix length) of paired greedy texts (all of one length)."""
    counts = [agreement_counts(s, t) for s, t in zip(a, b)]
    return sum(same for _, same in counts) / sum(len(s) for s in a), sum(prefix for prefix, _ in counts) / len(counts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/gsm8k/train.jsonl"))
    ap.add_argument("--texts", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--modes", default="all", help="comma-separated MODES keys' first words (int4, w4a8, ...), or all")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    chosen = [name for name in MODES if name in ("float32", "bfloat16") or args.modes == "all"
              or name.split()[0] in args.modes.split(",")]
    import reasoning_gym

    docs = texts(Path(args.data), args.texts)
    gym = reasoning_gym.create_dataset("chain_sum", seed=9001, size=args.prompts)  # not an eval seed
    prompts = [[{"role": "user", "content": row["question"]}] for row in gym]
    rows = {}
    for name in chosen:
        try:
            model = ttc.load("smollm2-135m", kv_cache_gb=1, **MODES[name])
        except ValueError as e:  # w4a8 on a CPU without AVX512-VNNI: one line, the other modes go on
            print(f"{name} skipped: {e}")
            continue
        ppl, tokens = perplexity(model, docs)
        rows[name] = {"ppl": ppl, "tokens": tokens, "greedy": greedy(model, prompts)}
        del model
        gc.collect()
    ref, bf = rows["float32"], rows["bfloat16"]
    lines = ["| mode | perplexity | vs float32 | vs bfloat16 | greedy tokens equal to bf16 | common prefix (of 128) |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        same, prefix = agreement(r["greedy"], bf["greedy"])
        lines.append(f"| {name} | {r['ppl']:.3f} | {r['ppl'] - ref['ppl']:+.3f} | {r['ppl'] - bf['ppl']:+.3f} | "
                     f"{same:.1%} | {prefix:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        doc = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        with doc.open("a") as f:
            f.write(f"\n### decode modes: quality, {datetime.date.today().isoformat()}\n\nCommand: `python "
                    f"benchmarks/quality.py --modes {args.modes} --record`. Perplexity over {rows['float32']['tokens']} tokens of the first "
                    f"{args.texts} GSM8K train solutions; greedy agreement over {args.prompts} chain_sum prompts "
                    f"(seed 9001), {NEW_TOKENS} tokens each.\n\n{table}\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
