"""Compile, for a GPU, every Triton kernel launch the GPU check makes, on a machine without one.

    python benchmarks/gpu_compile.py [--arch 90] [--smoke] [--specs FILE]

Why: on a machine without a GPU the kernels run only under Triton's interpreter, which accepts programs the
compiler refuses (a tile shape `tl.dot` cannot take, a type it will not cast, shared memory past the limit), and a
GPU run is rare and short. Triton's compiler itself needs no GPU (ptxas ships with it), so this compiles each
launch's exact specialization ahead of time.

1. Record (a child process, TRITON_INTERPRET=1): the GPU check's models (benchmarks/gpu_check.py: the parity
   configs in float32 and bfloat16, the ~0.5B and ~1.5B Llamas in bfloat16; their shapes, one layer each) run on
   the CPU through the CUDA hot path (`kernels.triton_on_cpu()`), with and without the CUDA graphs' fixed
   buffers: prompts and forked branches greedy, N samples of one prompt for every N of the throughput section,
   a score; then the attention section's cases and the kernels section's checks (gpu_check_kernels.py). Each
   launch's specialization is recorded the way Triton's launcher makes it (argument types, 16-byte alignment,
   ints equal to 1, the constexprs, num_warps), with INTERPRETED=False: the GPU's value.
2. Compile (this process, no interpreter): each one with `triton.compile` for cuda sm_ARCH (90: H100/H200), its
   shared memory checked against the architecture's limit. A table per kernel; exit status 1 if any failed.

--smoke: the tiny model only (CI's check, ~1 minute). Limits: a GPU run may still fail where only a GPU can
(launch resources counted by the driver, races, numerics); the record uses this machine's Triton to specialize.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# shared memory a block may opt in to, per compute capability (CUDA programming guide, "technical specifications")
SHARED_LIMIT = {75: 64 << 10, 80: 163 << 10, 86: 99 << 10, 89: 99 << 10, 90: 227 << 10, 100: 227 << 10}


# -------------------------------------------------------------------------------------------------
# 1. Record: run in the child, under the interpreter

def specialization(fn, args: tuple, kwargs: dict) -> dict:
    """One launch of an interpreted kernel as Triton's launcher would specialize it for the compiler:
    {"kernel": module:name, "types": {arg: type}, "constants": {arg: value}, "aligned": [arg...], "options"}."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    params = inspect.signature(fn.fn).parameters
    values = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k in params}
    types, constants, aligned = {}, {}, []
    for name in fn.arg_names:
        value = values[name]
        if "constexpr" in str(params[name].annotation):
            types[name], constants[name] = "constexpr", False if name == "INTERPRETED" else value
            continue
        # (type, "D" when 16-byte aligned or divisible by 16); an int equal to 1 comes back as a constexpr
        kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        types[name] = kind
        if kind == "constexpr":
            constants[name] = attr
        elif attr == "D" and not isinstance(value, float):
            aligned.append(name)
    options = {k: v for k, v in kwargs.items() if k not in params}
    return {"kernel": f"{fn.fn.__module__}:{fn.fn.__name__}", "types": types, "constants": constants,
            "aligned": aligned, "options": options}


def record_launches() -> dict[str, dict]:
    """Patch the interpreter's launch so every launch's specialization is kept (deduplicated); returns the dict."""
    import triton.runtime.interpreter as interpreter

    seen: dict[str, dict] = {}
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = specialization(self, args, kwargs)
        seen.setdefault(json.dumps(spec, sort_keys=True), spec)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run
    return seen


def drive(engine, vocab: int, ns: tuple, new_tokens: int) -> None:
    """The GPU check's workloads on one engine: parity's batch (prompts of several lengths and branches forked
    from a shared prompt), throughput's (N branches of one prompt, for each N), a sampled run, and a score.
    Sampling is one kernel whatever the temperature (a branch inside it) and the interpreter runs it slowly
    (~0.2 s a row at a 32k vocabulary), so the N runs are greedy and the sampled one has 4 rows."""
    from ttc.decoder.sampling import SamplingParams
    from gpu_check_harness import random_ids

    root = engine.new_sequence(random_ids(40, vocab, seed=1))
    engine.forward([root])
    seqs = [engine.new_sequence(random_ids(n, vocab, seed=n)) for n in (5, 17)]
    kids = engine.fork(root, 4, seeds=[0, 1, 2, 3])
    for i, kid in enumerate(kids):
        engine.extend(kid, random_ids(i + 1, vocab, seed=100 + i))
    engine.generate(seqs + kids, SamplingParams(temperature=0), max_new_tokens=new_tokens, ignore_eos=True)
    engine.release(seqs + kids)
    for n, temperature in [(n, 0.0) for n in ns] + [(4, 0.8)]:
        kids = engine.fork(root, n, seeds=list(range(n)))
        engine.generate(kids, SamplingParams(temperature=temperature), max_new_tokens=new_tokens, ignore_eos=True)
        engine.release(kids)
    engine.score([(root, random_ids(6, vocab, seed=2))])
    engine.release([root])


def record(smoke: bool) -> list[dict]:
    import gpu_check
    import gpu_check_harness as harness

    gpu_check.bootstrap_ttc()
    import torch
    import transformers

    from ttc import kernels
    from ttc.api import load
    from ttc.decoder.engine import Engine

    seen = record_launches()
    sizes = gpu_check.SMOKE if smoke else gpu_check.GPU
    one_layer = lambda cfg: cfg | {"num_hidden_layers": 1}  # the kernels' shapes do not depend on the depth
    from ttc.kernels import attention_triton

    models = [(f"parity-{arch}", arch, cfg, ("float32", "bfloat16")) for arch, cfg in sizes.parity.items()]
    models += [(name, "llama", cfg, ("bfloat16",)) for name, cfg in sizes.models.items()]
    new_tokens = 2  # a first step and one more: every kernel of a decode step has run
    # N up to BLOCK_M fills every attention tile (rows x G >= BLOCK_M); larger N launch the same specializations
    ns = tuple(n for n in sizes.ns if n <= attention_triton.BLOCK_M)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="gpu_compile_") as tmp, kernels.triton_on_cpu():
        ctx = harness.Ctx("cpu", sizes, Path(tmp))
        for name, arch, cfg, dtypes in models:
            folder, _ = harness.make_model(ctx, name, arch, one_layer(cfg), torch.float32, sharpen=False)
            for dtype in dtypes:
                t = time.monotonic()
                model = load(str(folder), dtype=dtype, device="cpu", kv_cache_gb=0.5)
                for graphs in (True, False):  # on CPU, the graphs' fixed-buffer forward runs uncaptured
                    engine = Engine(model.engine.model, model.tokenizer, kv_cache_bytes=256 << 20, cuda_graphs=graphs)
                    drive(engine, cfg["vocab_size"], ns, new_tokens)
                print(f"recorded {name} {dtype} ({time.monotonic() - t:.0f} s, {len(seen)} launches so far)",
                      flush=True)
                del model, engine
                harness.free(ctx)
        # the attention section's kernel calls, prefixes cut to 256 tokens (the interpreter is slow; a launch's
        # specialization does not depend on the context's length)
        for case in sizes.attention:
            B, prefix, own, hq, hkv, d = case
            q, k, v, plan, _ = gpu_check.shared_prefix_case(ctx, B, min(prefix, 256), own, hq, hkv, d, torch.bfloat16)
            attention_triton.decode_attention(q, k, v, plan, d ** -0.5)
        print(f"recorded the attention cases ({len(seen)} launches)", flush=True)
        # the kernels section's own launches (a qkv view, float64 uniforms...), sampling on 2 rows (the grid
        # does not enter a specialization; the interpreter takes ~0.2 s a row at a 32k vocabulary)
        import gpu_check_kernels

        shapes = gpu_check_kernels.SMOKE_SHAPES if smoke else gpu_check_kernels.model_shapes(sizes.models)
        gpu_check_kernels.check_kernels(ctx, dict(tables=[], checks=[], notes=[], error=None), shapes, sample_rows=2)
        print(f"recorded the kernels section ({len(seen)} launches)", flush=True)
    return list(seen.values())


# -------------------------------------------------------------------------------------------------
# 2. Compile: in this process, compiled for the target

def compile_one(spec: dict, arch: int) -> dict:
    """triton.compile of one recorded specialization for cuda sm_arch: {"shared", "warps", "seconds"}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = spec["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    index = {arg: i for i, arg in enumerate(fn.arg_names)}
    constants = {(index[arg],): value for arg, value in spec["constants"].items()}
    attrs = {(index[arg],): [["tt.divisibility", 16]] for arg in spec["aligned"]}
    source = ASTSource(fn, spec["types"], constants, attrs)
    t = time.monotonic()
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=spec["options"])
    return {"shared": kernel.metadata.shared, "warps": kernel.metadata.num_warps, "seconds": time.monotonic() - t}


def describe(spec: dict) -> str:
    """The launch in one line: its pointers' element types and its constexprs."""
    pointers = sorted({t[1:] for t in spec["types"].values() if t.startswith("*")})
    constants = " ".join(f"{k}={v}" for k, v in spec["constants"].items() if k != "INTERPRETED")
    return f"{'/'.join(pointers)} {constants}".strip()


def compile_all(specs: list[dict], arch: int) -> int:
    limit = SHARED_LIMIT.get(arch)
    failures = 0
    print(f"\n{len(specs)} launch specializations, compiled for cuda sm_{arch}"
          f" (shared memory limit {limit // 1024 if limit else '?'} KiB)")
    print(f"{'kernel':16s} {'warps':>5s} {'shared KiB':>10s} {'s':>5s}  status  launch")
    for spec in sorted(specs, key=lambda s: (s["kernel"], describe(s))):
        name = spec["kernel"].split(":")[1]
        try:
            out = compile_one(spec, arch)
        except Exception as e:  # the compiler's message: where (its first line) and what (its last)
            failures += 1
            lines = str(e).strip().splitlines() or [type(e).__name__]
            print(f"{name:16s} {'':>5s} {'':>10s} {'':>5s}  FAILED  {describe(spec)}\n    "
                  + " ... ".join(dict.fromkeys([lines[0], lines[-1]])))
            continue
        over = limit is not None and out["shared"] > limit
        failures += over
        status = "OVER" if over else "ok"
        print(f"{name:16s} {out['warps']:5d} {out['shared'] / 1024:10.1f} {out['seconds']:5.1f}  {status:6s}  "
              f"{describe(spec)}")
    print(f"\n{len(specs) - failures} of {len(specs)} compiled" + (f"; {failures} FAILED" if failures else ""))
    return int(failures > 0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200; 80: A100)")
    parser.add_argument("--smoke", action="store_true", help="the tiny model only (CI)")
    parser.add_argument("--specs", type=Path, help="keep the recorded launches in this JSON file")
    parser.add_argument("--recorded", type=Path, help="compile the launches recorded in this file (from --specs), "
                        "without recording: e.g. with another Triton version than the one that recorded them")
    parser.add_argument("--record-to", type=Path, help=argparse.SUPPRESS)  # the child's stage
    args = parser.parse_args(argv[1:])
    sys.path.insert(0, str(HERE))  # gpu_check
    if args.record_to:
        args.record_to.write_text(json.dumps(record(args.smoke), indent=1))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":  # refused before minutes of recording, not after
        print("gpu_compile: unset TRITON_INTERPRET (the compile stage needs Triton's compiler)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        specs_file = args.recorded or args.specs or Path(tmp) / "specs.json"
        if not args.recorded:
            child = [sys.executable, __file__, "--record-to", str(specs_file)] + (["--smoke"] if args.smoke else [])
            done = subprocess.run(child, env=os.environ | {"TRITON_INTERPRET": "1"})
            if done.returncode:
                print(f"gpu_compile: recording the launches failed (exit {done.returncode})", file=sys.stderr)
                return 1
        specs = json.loads(specs_file.read_text())
    import gpu_check

    gpu_check.bootstrap_ttc()
    return compile_all(specs, args.arch)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
