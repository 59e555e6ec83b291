"""Decode speed: ttc against Hugging Face `generate` (and llama.cpp when importable), in one process.

Workloads (EOS ignored, so every run makes exactly the tokens asked for):
  1 stream, greedy, 128 new tokens;  N=16 and N=64 samples of one 74-token chat prompt, 128 new tokens each.
Prints a table of tokens/s, the ratio to each peer, prompt tokens computed and peak KV bytes, and
with --record appends it to docs/benchmarks.md with the date and machine.

    python benchmarks/decode.py [--dtypes float32,bfloat16] [--skip-hf] [--record]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import time
from pathlib import Path

import torch

import ttc
from ttc.decoder.weights import resolve

PROMPT = [{"role": "user", "content": "A baker makes 48 muffins in the morning and 36 in the afternoon. She sells "
           "three quarters of them and gives 5 to her neighbours. How many muffins are left? Think step by step"}]
NEW_TOKENS = 128
WORKLOADS = [("1 stream greedy", 1), ("N=16 samples", 16), ("N=64 samples", 64)]


def run_ttc(model, n: int) -> dict:
    model.engine.clear_prefix_cache()  # every workload prefills its prompt from scratch
    ledger = ttc.Ledger()
    t = time.perf_counter()
    outs = model.generate(PROMPT, n=n, max_new_tokens=NEW_TOKENS, temperature=0.0 if n == 1 else 0.8, seed=0,
                          ignore_eos=True, ledger=ledger)
    wall = time.perf_counter() - t
    made = sum(len(o.token_ids) for o in outs)
    return {"tok_s": made / wall, "prefill": ledger.prefill_tokens, "kv": ledger.peak_kv_bytes}


def run_hf(hf_model, ids: torch.Tensor, n: int) -> dict:
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(ids.repeat(n, 1), attention_mask=torch.ones_like(ids).repeat(n, 1),
                                do_sample=n > 1, temperature=0.8 if n > 1 else None, top_p=None, top_k=None,
                                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=2)
    wall = time.perf_counter() - t
    made = (out.shape[1] - ids.shape[1]) * n
    # HF keeps a dense (n, layers, heads, T, D) cache: prompt computed n times, KV for every row
    cfg = hf_model.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return {"tok_s": made / wall, "prefill": ids.shape[1] * n, "kv": kv * 4 * n * out.shape[1]}


def run_llama_cpp(llm, ids: list[int], n: int) -> dict | None:
    """One stream through llama-cpp-python's high-level API; batched N is not exposed there."""
    if n != 1:
        return None
    llm.reset()
    t = time.perf_counter()
    made = 0
    for tok in llm.generate(ids, temp=0.0, reset=True):
        made += 1
        if made >= NEW_TOKENS:
            break
    wall = time.perf_counter() - t
    return {"tok_s": made / wall, "prefill": len(ids), "kv": None}


def llama_cpp_works(ids: list[int]) -> tuple[bool, str]:
    """Probe llama-cpp-python in a child process: a broken build segfaults, which must not end this run."""
    import subprocess
    import sys

    # the benchmark's own prompt and length: the build seen here decodes a 1-token prompt but
    # segfaults on a multi-token one (its batched prompt path)
    probe = ("from llama_cpp import Llama; import itertools; "
             f"llm = Llama(model_path={str(resolve('smollm2-135m').path)!r}, n_ctx=512, verbose=False); "
             f"list(itertools.islice(llm.generate({list(ids)!r}, temp=0.0), {NEW_TOKENS}))")
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False, "llama-cpp-python hung in a probe"
    if done.returncode == 0:
        return True, ""
    if b"ModuleNotFoundError" in done.stderr:
        return False, "llama-cpp-python is not installed"
    return False, f"llama-cpp-python crashed in a {NEW_TOKENS}-token probe (exit {done.returncode})"


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--workloads", default="1,16,64", help="comma-separated N values to run")
    ap.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    args = ap.parse_args()
    wanted = {int(x) for x in args.workloads.split(",")}
    workloads = [(name, n) for name, n in WORKLOADS if n in wanted]

    rows: dict[str, dict[int, dict]] = {}
    for dtype in args.dtypes.split(","):
        model = ttc.load("smollm2-135m", dtype=dtype)
        model.generate(PROMPT, n=2, max_new_tokens=8, ignore_eos=True)  # warm-up
        ids = model.tokenizer.encode_prompt(PROMPT)
        assert len(ids) == 74, f"benchmark prompt should be 74 tokens, is {len(ids)}"
        rows[f"ttc {dtype}"] = {n: run_ttc(model, n) for _, n in workloads}
        del model
        gc.collect()

    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        src = resolve("smollm2-135m")
        hf = AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name, dtype=torch.float32)
        hf_ids = torch.tensor([ids])
        rows["HF generate float32"] = {n: run_hf(hf, hf_ids, n) for _, n in workloads}
        del hf
        gc.collect()
    notes = []
    llama_ok, why = llama_cpp_works(ids)
    if llama_ok:
        from llama_cpp import Llama

        llm = Llama(model_path=str(resolve("smollm2-135m").path), n_ctx=512, n_threads=torch.get_num_threads(),
                    verbose=False)
        rows["llama.cpp Q4_1 (1 stream)"] = {n: r for _, n in workloads if (r := run_llama_cpp(llm, ids, n))}
    else:
        notes.append(f"llama.cpp not measured: {why}")

    peers = [k for k in rows if not k.startswith("ttc")]
    header = ["engine", *[f"{name} tok/s" for name, _ in workloads]] + [f"x {p.split()[0]} ({name.split()[0]})"
                                                                       for p in peers for name, _ in workloads[:2]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for engine, res in rows.items():
        cells = [engine] + [f"{res[n]['tok_s']:.0f}" if n in res else "-" for _, n in workloads]
        for p in peers:
            for _, n in workloads[:2]:
                ok = n in res and n in rows[p]
                cells.append(f"{res[n]['tok_s'] / rows[p][n]['tok_s']:.2f}" if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| engine | workload | prompt tokens computed | peak KV bytes |")
    lines.append("|---|---|---|---|")
    for engine, res in rows.items():
        for name, n in workloads:
            if n in res:
                kv = res[n]["kv"]
                lines.append(f"| {engine} | {name} | {res[n]['prefill']} | {kv / 1e6:.1f} MB |" if kv else
                             f"| {engine} | {name} | {res[n]['prefill']} | - |")
    lines.extend(f"\n{n}" for n in notes)
    table = "\n".join(lines)
    print(table)
    if args.record:
        doc = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        stamp = datetime.date.today().isoformat()
        with doc.open("a") as f:
            f.write(f"\n### decode, {stamp}\n\nMachine: {machine()}. Command: `python benchmarks/decode.py"
                    f" --record`. 74-token chat prompt, {NEW_TOKENS} new tokens per sample, EOS ignored.\n\n"
                    f"{table}\n")


if __name__ == "__main__":
    main()
