"""Decode speed (issue 14): ttc's modes against HF transformers, vLLM-CPU and llama.cpp, on the same prompts.

Workloads (EOS ignored, so every run makes exactly the tokens asked for), on one 74-token chat prompt:
  1 stream, greedy;  N=16 and N=64 samples at temperature 0.8;  --new-tokens (128) new tokens each;
  prefill: one --prefill-tokens (1,000) token prompt, one new token, reported as prompt tokens/s.
Engines, one after the other (never two at once on a 2-core machine):
  ttc, one row per --modes entry: bf16 | fp32 | int8 | int4 (the GGUF's own Q4_1 blocks) | w4a8 (int4 with int8
      activations, AVX512-VNNI CPUs), with -invariant
      (batch_invariant=True), -compile (compile=True) and/or -eager (int4's layers eager and its decode
      attention gathered: the twins of the fused C++ layer and the in-place attention, for an A/B); a mode
      that does not load prints one line;
  HF transformers `generate`, fp32 and bf16, in this process;
  vLLM-CPU (its OpenAI server from .venv-vllm, one server per --vllm-dtypes entry; default: bf16 on a CPU
      with AVX512-BF16 or AMX, else float32) and llama.cpp (the GGUF's Q4_1, llama-cpp-python
      built without AMX in .venv-llama, in a child process): see decode_peers.py. Their venvs are made on
      first use (minutes); a peer that cannot run prints one line and the run goes on.
Prints tok/s per engine and workload, greedy agreement with ttc bf16 on the one-stream tokens (common
prefix / positionwise fraction), and each ttc mode's ratio to vLLM-CPU, llama.cpp and HF.
--record appends the tables to docs/benchmarks.md with the date, machine and command; --profile adds a
torch.profiler table (top 15 ops by self CPU time) of ttc in the CPU's native dtype (dtype=auto): one decode
step at N=1 and N=64, and the prefill workload.

    python benchmarks/decode.py [--modes bf16,int8,int4,bf16-invariant,bf16-compile] [--peers hf,vllm,llama.cpp]
                                [--workloads 1,16,64,prefill] [--new-tokens 128] [--prefill-tokens 1000]
                                [--vllm-dtypes auto|float32,bfloat16] [--profile] [--record]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import ttc
from ttc.decoder.tokenizer import load_tokenizer
from ttc.decoder.weights import cache_root, resolve

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_peers

NAME = "smollm2-135m"
PROMPT = [{"role": "user", "content": "A baker makes 48 muffins in the morning and 36 in the afternoon. She sells "
           "three quarters of them and gives 5 to her neighbours. How many muffins are left? Think step by step"}]
WORKLOADS = {"1": ("1 stream", 1), "16": ("N=16", 16), "64": ("N=64", 64), "prefill": ("prefill", 0)}
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "int8": "int8", "int4": "int4", "w4a8": "w4a8"}
RATIO_PEERS = ("vLLM-CPU", "llama.cpp", "HF bf16", "HF fp32")  # what each ttc mode is divided by


def long_prompt(tokenizer, tokens: int) -> list[int]:
    """A chat prompt of at most `tokens` tokens (as close as whole notes allow): the prefill workload."""
    notes, ids = [], tokenizer.chat(PROMPT)
    while True:
        i = len(notes)
        notes.append(f"Day {i + 1}: the bakery made {40 + 7 * i % 53} muffins and {12 + 5 * i % 31} loaves, "
                     f"sold {30 + 3 * i % 41} and gave {i % 6} away.")
        longer = tokenizer.chat([{"role": "user", "content": "Ledger:\n" + "\n".join(notes) + "\n"
                                  + PROMPT[0]["content"]}])
        if len(longer) > tokens:
            return ids
        ids = longer


def mode_kwargs(mode: str) -> dict:
    """'bf16-invariant-compile' -> ttc.load keyword arguments (-eager is applied after loading: `load_mode`)."""
    dtype, *flags = mode.split("-")
    kw = {"dtype": DTYPES.get(dtype, dtype)}
    for flag in flags:
        if flag not in ("invariant", "compile", "eager"):
            raise ValueError(f"unknown mode suffix {flag!r} (invariant, compile, eager)")
        if flag != "eager":
            kw["batch_invariant" if flag == "invariant" else "compile"] = True
    return kw


def load_mode(mode: str):
    """ttc.load for a --modes entry; -eager turns off the fused C++ layers and the in-place decode attention."""
    model = ttc.load(NAME, **mode_kwargs(mode))
    if "eager" in mode.split("-")[1:]:
        model.engine.model.fused = None
        model.engine.model.private_attention = None
    return model


def run_ttc(model, prompt: list[int], n: int, new: int) -> dict:
    """One workload, after an untimed short run of the same shape (compiled modes compile there)."""
    def go(tokens: int):
        model.engine.clear_prefix_cache()  # every run prefills its prompt from scratch
        ledger = ttc.Ledger()
        t = time.perf_counter()
        outs = model.generate(prompt, n=max(n, 1), max_new_tokens=tokens, temperature=0.0 if n <= 1 else 0.8,
                              seed=0, ignore_eos=True, ledger=ledger)
        return time.perf_counter() - t, outs, ledger

    go(1 if n == 0 else min(new, 4))
    wall, outs, ledger = go(1 if n == 0 else new)
    made = len(prompt) if n == 0 else sum(len(o.token_ids) for o in outs)
    return {"tok_s": made / wall, "ids": list(outs[0].token_ids) if n == 1 else None, "kv": ledger.peak_kv_bytes}


def run_hf(hf_model, prompt: list[int], n: int, new: int) -> dict:
    ids = torch.tensor([prompt]).repeat(max(n, 1), 1)  # HF has no fork: the prompt is prefilled per row

    def go(tokens: int):
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=n > 1,
                                    temperature=0.8 if n > 1 else None, top_p=None, top_k=None,
                                    max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=2)
        return time.perf_counter() - t, out

    go(1 if n == 0 else min(new, 4))
    wall, out = go(1 if n == 0 else new)
    made = len(prompt) if n == 0 else (out.shape[1] - len(prompt)) * ids.shape[0]
    cfg = hf_model.config  # a dense (rows, layers, 2, kv heads, T, head dim) cache
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return {"tok_s": made / wall, "ids": out[0, len(prompt):].tolist() if n == 1 else None,
            "kv": kv * hf_model.dtype.itemsize * out.shape[0] * out.shape[1]}


def agreement_counts(ids, ref) -> tuple[int, int]:
    """(tokens equal before the first divergence, tokens equal position by position) of two token sequences."""
    prefix = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))
    return prefix, sum(a == b for a, b in zip(ids, ref))


def agreement(ids: list[int] | None, ref: list[int] | None) -> str:
    """'prefix / positionwise': the fraction of ref's tokens matched before the first divergence, and in all."""
    if not ids or not ref:
        return "-"
    prefix, same = agreement_counts(ids, ref)
    return f"{prefix / len(ref):.2f} / {same / len(ref):.2f}"


def rate(tok_s: float) -> str:
    return f"{tok_s:.0f}" if tok_s >= 10 else f"{tok_s:.1f}"


def tables(rows: dict[str, dict], keys: list[str], prefill_len: int) -> str:
    names = [f"{WORKLOADS[k][0]} tok/s" if k != "prefill" else f"prefill {prefill_len} tok/s" for k in keys]
    ref = rows.get("ttc bf16", {}).get("1", {}).get("ids")
    out = ["| engine | " + " | ".join(names) + " | greedy agreement with ttc bf16 (prefix / all) | peak KV at N=64 |",
           "|---|" + "---|" * (len(keys) + 2)]
    for engine, res in rows.items():
        cells = [rate(res[k]["tok_s"]) if k in res else "-" for k in keys]
        kv = res.get("64", {}).get("kv")
        cells += [agreement(res.get("1", {}).get("ids"), ref), f"{kv / 1e6:.0f} MB" if kv else "-"]
        out.append(f"| {engine} | " + " | ".join(cells) + " |")
    peers = [(p, e) for p in RATIO_PEERS for e in rows if e.startswith(p)]
    if peers and any(e.startswith("ttc") for e in rows):
        out += ["", "| ttc mode | / peer | " + " | ".join(WORKLOADS[k][0] for k in keys) + " |",
                "|---|---|" + "---|" * len(keys)]
        for engine, res in rows.items():
            if not engine.startswith("ttc"):
                continue
            for _, peer in peers:
                cells = [f"{res[k]['tok_s'] / rows[peer][k]['tok_s']:.2f}x" if k in res and k in rows[peer] else "-"
                         for k in keys]
                out.append(f"| {engine} | {peer} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def profile_step(model, n: int, prompt: list[int]) -> str:
    """torch.profiler of one decode step (forward + sampling) of `model` with n sequences of `prompt`."""
    from torch.profiler import ProfilerActivity, profile

    from ttc.decoder.batch import GenerationBatch

    engine = model.engine
    parent = engine.new_sequence(prompt)
    children = engine.fork(parent, n)
    batch = GenerationBatch(engine)
    batch.add(children, ttc.SamplingParams(temperature=0.0 if n == 1 else 0.8), 8, ignore_eos=True)
    batch.step()  # the first token comes from the prompt's logits: no forward
    batch.step()  # an untimed decode step
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        batch.step()
    engine.release(children + [parent])
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def profile_prefill(model, prompt: list[int]) -> str:
    """torch.profiler of the prefill workload (prompt + one new token, prefix cache cleared), after one
    untimed run of it."""
    from torch.profiler import ProfilerActivity, profile

    def go():
        model.engine.clear_prefix_cache()
        model.generate(prompt, n=1, max_new_tokens=1, temperature=0.0, seed=0, ignore_eos=True)

    go()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        go()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def quiet():
    """stderr muted: transformers' GGUF conversion progress bars. (Its warning that bf16 weights "stay
    quantized" still shows; they are dense bf16 nn.Linear weights.)"""
    return contextlib.redirect_stderr(io.StringIO())


def machine() -> str:
    cpu = "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"load average {load} when the run started")


def vllm_dtypes(spec: str) -> list[str]:
    """'auto' -> the dtype this CPU runs natively (ttc.api.cpu_has_fast_bf16), else the listed ones."""
    from peers import VLLM_DTYPES
    from ttc.api import cpu_has_fast_bf16

    if spec == "auto":
        return ["bfloat16" if cpu_has_fast_bf16() else "float32"]
    names = [d.strip() for d in spec.split(",") if d.strip()]
    unknown = [d for d in names if d not in VLLM_DTYPES]
    if unknown:
        raise SystemExit(f"--vllm-dtypes: {', '.join(unknown)} not one of auto, {', '.join(VLLM_DTYPES)}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="bf16,int8,int4,bf16-invariant,bf16-compile",
                    help="ttc modes: bf16|fp32|int8|int4|w4a8, optionally -invariant and/or -compile; 'none' for none")
    ap.add_argument("--peers", default="hf,vllm,llama.cpp", help="any of hf, vllm, llama.cpp; 'none' for none")
    ap.add_argument("--workloads", default="1,16,64,prefill", help="any of 1, 16, 64, prefill")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=1000, help="the prefill workload's prompt, at most")
    ap.add_argument("--vllm-dtypes", default="auto",
                    help="vLLM's dtypes, comma-separated (one server each): bfloat16, float32; auto = bfloat16 on a "
                         "CPU with AVX512-BF16 or AMX, else float32 (bfloat16 is emulated, and slow, without them)")
    ap.add_argument("--vllm-python", default=None, help="a vLLM-CPU venv's python (default: .ci/vllm-venv's)")
    ap.add_argument("--llama-python", default=None, help="a llama-cpp-python venv's python (default: .ci/llama-cpp-venv's)")
    ap.add_argument("--profile", action="store_true", help="also profile ttc (dtype=auto): one decode step at N=1 and N=64, and the prefill workload")
    ap.add_argument("--record", action="store_true", help="append the tables to docs/benchmarks.md")
    args = ap.parse_args()
    vllm_dtype_list = vllm_dtypes(args.vllm_dtypes)  # a bad value stops here, not after the ttc and HF rows
    started = machine()
    keys = [k for k in WORKLOADS if k in args.workloads.split(",")]
    peers = set() if args.peers == "none" else set(args.peers.split(","))
    tokenizer = load_tokenizer(resolve(NAME))
    chat = tokenizer.chat(PROMPT)
    assert len(chat) == 74, f"benchmark prompt should be 74 tokens, is {len(chat)}"
    long = long_prompt(tokenizer, args.prefill_tokens)
    work = [(k, WORKLOADS[k][1], args.new_tokens, long if k == "prefill" else chat) for k in keys]
    rows: dict[str, dict] = {}
    notes: list[str] = []

    def note(line: str) -> None:
        print(line, flush=True)
        notes.append(line)

    modes = [] if args.modes == "none" else args.modes.split(",")
    for mode in sorted(modes, key=lambda m: m != "bf16"):  # bf16 first: the agreement reference
        try:  # a mode the loader does not know (yet), or one that fails, is one line, not the end of the run
            model = load_mode(mode)
            rows[f"ttc {mode}"] = {k: run_ttc(model, p, n, new) for k, n, new, p in work}
        except Exception as e:  # noqa: BLE001
            note(f"ttc {mode} skipped: {type(e).__name__}: {e}")
            continue
        finally:
            model = None
            gc.collect()
        print(f"ttc {mode} tok/s: " + ", ".join(f"{k} {rate(r['tok_s'])}" for k, r in rows[f"ttc {mode}"].items()),
              flush=True)

    if "hf" in peers:
        src = resolve(NAME)
        for label, dtype in (("HF fp32", torch.float32), ("HF bf16", torch.bfloat16)):
            try:
                from transformers import AutoModelForCausalLM

                with quiet():
                    hf = AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name,
                                                              dtype=dtype)
                rows[label] = {k: run_hf(hf, p, n, new) for k, n, new, p in work}
            except Exception as e:  # noqa: BLE001
                note(f"{label} skipped: {type(e).__name__}: {e}")
            finally:
                hf = None
                gc.collect()

    if "vllm" in peers:
        python, why = (args.vllm_python, "") if args.vllm_python else decode_peers.make_venv("vllm-venv", ".venv-vllm")
        if python:
            try:
                from peers import export_hf_folder

                with quiet():
                    folder = export_hf_folder(cache_root() / "hf" / resolve(NAME).path.stem, spec=NAME)
            except Exception as e:  # noqa: BLE001  (a missing or broken peer is one line, not a crash)
                python, why = None, f"{type(e).__name__}: {e}"
        for dtype in vllm_dtype_list if python else []:
            try:
                label, res = decode_peers.run_vllm(python, folder, work, dtype=dtype)
                rows[label] = res
            except Exception as e:  # noqa: BLE001
                note(f"vLLM-CPU {dtype} skipped: {type(e).__name__}: {e}")
        if why:
            note(f"vLLM-CPU skipped: {why}")

    if "llama.cpp" in peers:
        python, why = ((args.llama_python, "") if args.llama_python
                       else decode_peers.make_venv("llama-cpp-venv", ".venv-llama"))
        res = {}
        if python:
            res, why = decode_peers.run_llama_cpp(python, resolve(NAME).path, work, torch.get_num_threads())
            if res:
                rows["llama.cpp Q4_1"] = res
        if why:
            note(f"llama.cpp {'stopped early' if res else 'skipped'}: {why}")

    table = tables(rows, keys, len(long))
    if notes:
        table += "\n\n" + "\n".join(f"- {n}" for n in notes)
    print("\n" + table)
    if args.profile:
        model = ttc.load(NAME, dtype="auto")  # the dtype this CPU runs natively
        name = f"ttc {str(model.engine.model.dtype).removeprefix('torch.')}"
        for n in (1, 64):
            prof = profile_step(model, n, chat)
            print(f"\n{name}, one decode step at N={n} (top 15 ops by self CPU time):\n{prof}")
            table += f"\n\n{name}, one decode step at N={n}, top 15 ops by self CPU time:\n\n```\n{prof}```"
        prof = profile_prefill(model, long)
        print(f"\n{name}, prefill of {len(long)} tokens (top 15 ops by self CPU time):\n{prof}")
        table += f"\n\n{name}, prefill of {len(long)} tokens, top 15 ops by self CPU time:\n\n```\n{prof}```"
    if args.record:
        doc = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        command = shlex.join(["python", "benchmarks/decode.py", *sys.argv[1:]])
        with doc.open("a") as f:
            f.write(f"\n### decode, {datetime.date.today().isoformat()}\n\nMachine: {started}. Command: `{command}`. "
                    f"74-token chat prompt, {args.new_tokens} new tokens per sample (EOS ignored), N=16/64 at "
                    f"temperature 0.8; prefill: a {len(long)}-token prompt, one new token.\n\n{table}\n")


if __name__ == "__main__":
    main()
