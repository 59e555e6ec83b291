"""A short demo: sample several answers to one GSM8K question on the embedded model, print them and the ledger.

    python -m ttc.demo [--data ../shared/data/gsm8k/test.jsonl] [--index 0] [--n 8]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import ttc

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"
FALLBACK_QUESTION = ("A baker makes 48 muffins in the morning and 36 in the afternoon. She sells three quarters "
                     "of them and gives 5 to her neighbours. How many muffins are left?")


def _question(path: Path, index: int) -> tuple[str, str | None]:
    if not path.is_file():
        print(f"(no GSM8K file at {path}; using a built-in question)")
        return FALLBACK_QUESTION, "16"
    with path.open() as f:
        for i, line in enumerate(f):
            if i == index:
                row = json.loads(line)
                return row["question"], row["answer"].split("####")[-1].strip()
    raise SystemExit(f"{path} has fewer than {index + 1} rows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    question, reference = _question(args.data, args.index)
    t = time.perf_counter()
    model = ttc.load("smollm2-135m", dtype=args.dtype)
    print(f"{model}  (loaded in {time.perf_counter() - t:.1f}s)\n\nQ: {question}\nreference answer: {reference}\n")
    ledger = ttc.Ledger()
    prompt = [{"role": "user", "content": question + "\nThink step by step, then give the final number."}]
    outs = model.generate(prompt, n=args.n, max_new_tokens=args.max_new_tokens, temperature=0.8, seed=0,
                          ledger=ledger)
    finals = []
    for i, out in enumerate(outs):
        numbers = [w.strip(".,$") for w in out.text.replace("\n", " ").split() if w.strip(".,$").replace(".", "", 1).isdigit()]
        finals.append(numbers[-1] if numbers else None)
        print(f"--- sample {i} ({len(out.token_ids)} tokens, {out.finish_reason}), last number: {finals[-1]}")
        print(out.text.strip()[:400])
    vote = Counter(a for a in finals if a is not None).most_common(1)
    print(f"\nmajority answer: {vote[0][0] if vote else None}   reference: {reference}")
    tok_s = ledger.generated_tokens / ledger.wall_s if ledger.wall_s else 0.0
    print(f"ledger: {json.dumps(ledger.as_dict())}\n{tok_s:.0f} generated tokens/s")


if __name__ == "__main__":
    main()
