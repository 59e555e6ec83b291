"""One command that checks ttc's decoder on a GPU: parity with transformers, attention bandwidth, decode speed.

    python benchmarks/gpu_check.py OUT_DIR [--smoke] [--only SECTION ...]

For a bare GPU machine with a copy of this repository (not pip-installed), torch, triton, transformers and
tokenizers, and no network: ttc's folders are imported without running ttc/__init__.py (the check needs none
of the search layer it imports), and every model has random weights made on the device, saved as a Hugging Face folder with an
offline word-level tokenizer (prompts are token ids). Sections, timed, the longest late (the deadline cuts it):
environment; kernels (norm, rotary and sampling against their references on the GPU: gpu_check_kernels.py);
parity (greedy tokens equal transformers', float32, TF32 off, Llama and Qwen2, prompts and forked
branches in one batch; bfloat16's agreement); attention (the Triton kernel against the memory floor at the copy
bandwidth measured here, and against the reference); throughput (tok/s of N samples of one prompt against
transformers' generate, ~0.5B and ~1.5B Llamas in bfloat16; cuda_graphs off against on); host step (the engine's
host work per decode step on this machine's CPU, step_host.py's "gpu host" path: seconds); gpu tests (pytest on
the `gpu`-marked test files in a child process that imports the whole checkout as ttc: gpu_check_tests.py; it
needs pytest, which the GPU machine has, and not math-verify, which it lacks). What would not fit
before the deadline (440 s) is reported as skipped; an exception is written to the report and the run goes on.
OUT_DIR/report.md and report.json are rewritten after every section. Exit status 1 if a parity or correctness
check failed, anything raised or the deadline cut a section; 2 without a GPU. --smoke: every section on the CPU
with tiny models, well under a minute (CI's check of this script's logic).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

# the harness first: its clock is the deadline's, and it sets HF_HUB_OFFLINE before transformers is imported.
# Found beside this file however the script was started (`python benchmarks/gpu_check.py`, runpy, an import);
# bootstrap_ttc takes this folder off sys.path again.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_harness import (Ctx, Deadline, Report, bootstrap_ttc, check, free, guarded, load_ttc,  # noqa: E402
                               log, make_model, random_ids, table)
from gpu_check_kernels import kernels_section  # noqa: E402
from gpu_check_tests import gpu_tests  # noqa: E402
import step_host  # noqa: E402  (imports only torch and the harness until measured)

import torch  # noqa: E402
import transformers  # noqa: E402


# -------------------------------------------------------------------------------------------------
# Sizes: the GPU run and the CPU smoke run differ only here

PARITY_GPU = {  # small, GQA, head_dim 64, a real vocabulary size
    "llama": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000),
    "qwen2": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=32000),  # Qwen2: q/k/v carry a bias
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000)
MODELS_GPU = {  # Llama shapes, untied 32k vocabulary; the report gives each one's parameter count
    "llama-0.5b": dict(hidden_size=1024, intermediate_size=5120, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=32000),  # 506M; head_dim 64, G=4
    "llama-1.5b": dict(hidden_size=1536, intermediate_size=9728, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=32000),  # 1.51B; head_dim 128, G=6 (Qwen2.5-1.5B's)
}


@dataclass(frozen=True)
class Sizes:
    parity: dict  # arch -> config
    prompt_lengths: tuple  # one longer than 2 KV blocks (block size 16)
    branch_prompt: int  # the prompt 4 branches fork from, each then extended by 1..4 tokens of its own
    greedy_tokens: int
    models: dict  # throughput models: name -> config
    ns: tuple  # samples per prompt
    prompt_tokens: int
    new_tokens: int
    attention: tuple  # (B, shared prefix, own tokens per row, Hq, Hkv, D) cases
    deadline_s: float  # from process start
    model_min_s: float  # a throughput model is skipped with less time left than this
    kv_cache_gb: float  # throughput's pool: N=256 x 272 tokens x 28 KB (the 1.5B) is ~2 GB


GPU = Sizes(PARITY_GPU, (5, 16, 40, 300), 50, 48, MODELS_GPU, (1, 16, 64, 256), 128, 128,
            ((64, 1024, 64, 16, 4, 64), (256, 1024, 64, 16, 4, 64), (64, 1024, 64, 16, 8, 128),
             (256, 1024, 64, 16, 8, 128), (256, 4096, 512, 16, 8, 128)),  # the last: long reasoning chains
            440.0, 60.0, 6.0)
SMOKE = Sizes({"llama": TINY, "qwen2": TINY}, (3, 16, 37), 34, 8, {"tiny-llama": TINY}, (1, 4), 16, 8,
              ((4, 64, 16, 4, 2, 32),), 120.0, 5.0, 0.25)


# -------------------------------------------------------------------------------------------------
# 1. environment

def environment(ctx: Ctx, sec: dict) -> None:
    import ttc.api

    triton = importlib.util.find_spec("triton") and importlib.metadata.version("triton")
    gpu = torch.cuda.get_device_name() if ctx.device == "cuda" else "none (CPU smoke run)"
    table(sec, "environment", ["what", "value"]).extend([
        ["date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")], ["GPU", gpu],
        ["torch", torch.__version__], ["CUDA (torch)", torch.version.cuda], ["triton", triton or "not installed"],
        ["transformers", transformers.__version__], ["python", platform.python_version()],
        ["CPU cores", os.cpu_count()], ["ttc imported from", str(Path(ttc.api.__file__).parent)]])


# -------------------------------------------------------------------------------------------------
# 2. parity

def ttc_greedy(model, prompts: list[list[int]], branch_prompt: list[int], new: int):
    """Greedy tokens of every prompt and of 4 branches forked from branch_prompt (branch i extended by i + 1 tokens
    of its own), all in one generate call. Returns (the full input of each, its new tokens)."""
    from ttc.decoder.sampling import SamplingParams

    engine = model.engine
    seqs = [engine.new_sequence(p) for p in prompts]
    root = engine.new_sequence(branch_prompt)
    engine.forward([root])
    kids = engine.fork(root, 4, seeds=[0, 1, 2, 3])
    tails = [random_ids(i + 1, model.config.vocab_size, seed=100 + i) for i in range(4)]
    for kid, tail in zip(kids, tails):
        engine.extend(kid, tail)
    try:
        outs = engine.generate(seqs + kids, SamplingParams(temperature=0), max_new_tokens=new, ignore_eos=True)
    finally:
        engine.release(seqs + kids + [root])
    return prompts + [branch_prompt + t for t in tails], [list(o.token_ids) for o in outs]


def hf_greedy(ctx: Ctx, hf, inputs: list[list[int]], new: int) -> list[list[int]]:
    outs = []
    for ids in inputs:  # one at a time: no padding, so nothing but the model decides
        x = torch.tensor([ids], device=ctx.device)
        y = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new)
        outs.append(y[0, len(ids):].tolist())
    return outs


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """The mean common prefix of paired sequences, as a fraction of their length."""
    return sum(common_prefix(a, b) / len(b) for a, b in zip(ours, theirs)) / len(theirs)


def exact_float32() -> None:
    """TF32 rounds float32 matmul inputs to 10-bit mantissas: exact greedy parity needs it off on both sides."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def parity(ctx: Ctx, sec: dict) -> None:
    exact_float32()
    rows = table(sec, f"float32 greedy, {ctx.sizes.greedy_tokens} new tokens",
                 ["config", "input", "match", "first difference"])
    bf16 = table(sec, "bfloat16 agreement (informational; mean common prefix, as a fraction of the new tokens, "
                 "unless named)", ["config", "identical sequences", "positionwise", "ttc vs HF", "HF vs HF float32",
                                   "ttc vs HF float32"])
    for i, (arch, cfg) in enumerate(ctx.sizes.parity.items()):
        with guarded(sec, f"parity {arch}"):
            parity_one(ctx, sec, rows, bf16, i, arch, cfg)
        free(ctx)


def parity_one(ctx: Ctx, sec: dict, rows: list, bf16: list, i: int, arch: str, cfg: dict) -> None:
    """One config: float32 greedy tokens against transformers' (a check), then bfloat16's agreement (rows only)."""
    s = ctx.sizes
    log(f"parity: {arch} {cfg}")
    folder, hf = make_model(ctx, f"parity-{arch}", arch, cfg, torch.float32, sharpen=True, seed=i)
    prompts = [random_ids(n, cfg["vocab_size"], seed=10 * i + j) for j, n in enumerate(s.prompt_lengths)]
    branch = random_ids(s.branch_prompt, cfg["vocab_size"], seed=10 * i + 9)
    model = load_ttc(ctx, folder, "float32", kv_cache_gb=0.25)
    inputs, ours = ttc_greedy(model, prompts, branch, s.greedy_tokens)
    note_graphs(sec, f"parity {arch}", model)
    del model
    exact_float32()  # again: loading must not have turned TF32 on for transformers' side
    theirs = exact = hf_greedy(ctx, hf, inputs, s.greedy_tokens)
    labels = [f"prompt {len(p)}" for p in prompts] + [f"branch {k} ({len(branch)}+{k + 1})" for k in range(4)]
    for label, a, b in zip(labels, ours, theirs):
        rows.append([arch, label, a == b, None if a == b else f"at token {common_prefix(a, b)}"])
    check(sec, f"{arch}: float32 greedy tokens equal transformers' on {len(ours)} sequences", ours == theirs)
    if ours != theirs:
        sec["notes"] += parity_diagnosis(ctx, arch, folder, prompts, branch, theirs)

    model = load_ttc(ctx, folder, "bfloat16", kv_cache_gb=0.25)
    _, ours = ttc_greedy(model, prompts, branch, s.greedy_tokens)
    del model
    theirs = hf_greedy(ctx, hf.to(torch.bfloat16), inputs, s.greedy_tokens)
    same = sum(x == y for a, b in zip(ours, theirs) for x, y in zip(a, b)) / sum(len(b) for b in theirs)
    bf16.append([arch, f"{sum(a == b for a, b in zip(ours, theirs))}/{len(ours)}", same, agreement(ours, theirs),
                 agreement(theirs, exact), agreement(ours, exact)])  # the last two: bfloat16's own noise


def note_graphs(sec: dict, what: str, model) -> None:
    """A note where the engine's CUDA graph capture failed (its decode steps then ran eagerly)."""
    graphs = getattr(model.engine, "graphs", None)
    if getattr(graphs, "disabled", None):
        sec["notes"].append(f"{what}: CUDA graphs disabled after a failed capture ({graphs.disabled}); "
                            "its decode steps ran eagerly")


def parity_diagnosis(ctx: Ctx, arch: str, folder: Path, prompts: list, branch: list, theirs: list) -> list[str]:
    """Where float32 parity failed, the same run twice more, to say which part differs: decode steps run eagerly
    (cuda_graphs=False), then eagerly on the PyTorch references (`kernels.reference()`: no Triton kernel)."""
    from ttc import kernels

    notes = []
    for label, graphs, reference in [("cuda_graphs=False", False, False),
                                     ("cuda_graphs=False and the PyTorch references", False, True)]:
        with kernels.reference() if reference else contextlib.nullcontext():
            model = load_ttc(ctx, folder, "float32", kv_cache_gb=0.25, cuda_graphs=graphs)
            _, ours = ttc_greedy(model, prompts, branch, ctx.sizes.greedy_tokens)
        del model
        equal = sum(a == b for a, b in zip(ours, theirs))
        notes.append(f"{arch} diagnosis: with {label}, {equal} of {len(theirs)} sequences equal transformers'")
        log(notes[-1])
    return notes


# -------------------------------------------------------------------------------------------------
# 3. attention kernel bandwidth

def shared_prefix_case(ctx: Ctx, B: int, prefix: int, own: int, hq: int, hkv: int, d: int, dtype: torch.dtype):
    """B rows sharing `prefix` tokens (blocks 0..), each with `own` tokens in blocks of its own; block size 16.
    Returns q (B, Hq, D), k, v (S, Hkv, D), the plan and the block tables."""
    from ttc.kernels.decode_plan import plan_decode
    from ttc.kernels.bench_shared_prefix import forked_tables, pool_slots

    bs = 16
    tables, lengths = forked_tables(B, prefix, own, bs)
    plan = plan_decode(tables, lengths, bs, dtype=dtype).to(ctx.device)  # where the engine keeps it
    slots = pool_slots(tables, bs)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(slots, hkv, d, generator=g).to(dtype).to(ctx.device) for _ in range(2))
    q = torch.randn(B, hq, d, generator=g).to(dtype).to(ctx.device)
    return q, k, v, plan, tables


def attention(ctx: Ctx, sec: dict) -> None:
    bw = None
    if ctx.device == "cuda":
        from ttc.kernels._timing import copy_bandwidth, launch_floor_ms

        bw = copy_bandwidth()
        ctx.launch_ms = launch_floor_ms(3)  # the kernel is three launches: two partial passes and the merge
        sec["notes"] += [f"copy bandwidth (1 GiB device-to-device, read + write): {bw / 1e9:,.0f} GB/s",
                         "'kernel ms' replays the call from a CUDA graph (triton's do_bench_cudagraph), as the "
                         "engine's decode steps run; 'eager ms' launches it from Python each time, which for a case of "
                         "a few MB is the host's time, not the GPU's",
                         "graph replays do not flush the L2 (50 MB on an H100/H200), so a case smaller than it reads "
                         "partly from cache and can beat the floor; the floor leaves out launch latency (3 launches)",
                         "the kernel's work table is memoized per plan; its CPU cost per step is 'plan ms'",
                         f"three one-element kernels replayed from a graph take {ctx.launch_ms * 1e3:.1f} us: 'x "
                         "(floor + launches)' divides the kernel's time by the floor plus that"]
    else:
        sec["notes"].append("CPU run: no Triton kernel and no bandwidth floor; the PyTorch reference is timed")
    rows = table(sec, f"{'bfloat16' if bw else 'float32'} decode attention, block size 16 (bytes: the shared prefix "
                 "once, each row's own tokens, K and V, + q + out)",
                 ["B", "prefix", "own", "Hq", "Hkv", "D", "MB", "kernel ms (graph)", "eager ms", "floor ms", "x floor",
                  "x (floor + launches)", "GB/s", "reference ms", "plan ms (CPU)", "max err", "reference err"])
    for case in ctx.sizes.attention:
        with guarded(sec, f"attention {case}"):
            attention_case(ctx, sec, rows, bw, *case)
        free(ctx)


def attention_case(ctx: Ctx, sec: dict, rows: list, bw: float | None, B: int, prefix: int, own: int, hq: int,
                   hkv: int, d: int) -> None:
    """One case: time the kernel (the Triton one on CUDA; on the CPU the reference is the fast path) and check its
    error against float64 at most ~twice the reference's own (the STYLE rule), + 1e-3."""
    from ttc.kernels import attention as ref
    from ttc.kernels._timing import floor_ms, graph_ms, time_ms
    from ttc.kernels.decode_plan import plan_decode

    q, k, v, plan, tables = shared_prefix_case(ctx, B, prefix, own, hq, hkv, d, torch.bfloat16 if bw else torch.float32)
    scale = d ** -0.5
    kernel, plan_ms = ref.decode_attention, None
    if bw:
        from ttc.kernels import attention_triton as tri

        kernel = tri.decode_attention
        t = time.perf_counter()  # the engine's per-step CPU cost: the plan, then the kernel's work table
        p = plan_decode(tables, [prefix + own] * B, 16, dtype=q.dtype).to(ctx.device)
        tri.build_work_table(p, tri.BLOCK_M // (hq // hkv), tri.CHUNK, q.device)
        plan_ms = (time.perf_counter() - t) * 1e3
    ms = eager_ms = time_ms(lambda: kernel(q, k, v, plan, scale), ctx.device)
    if bw:  # the engine replays decode steps as CUDA graphs: time the kernel so, the eager figure beside it
        ms = graph_ms(lambda: kernel(q, k, v, plan, scale))
    ref_ms = time_ms(lambda: ref.decode_attention(q, k, v, plan, scale), ctx.device)
    exact = ref.decode_attention_naive(q.double(), k.double(), v.double(), plan, scale)
    err = (kernel(q, k, v, plan, scale).double() - exact).abs().max().item()
    ref_err = (ref.decode_attention(q, k, v, plan, scale).double() - exact).abs().max().item()
    nbytes = ((prefix + B * own) * hkv * d * 2 + 2 * B * hq * d) * k.element_size()
    floor = floor_ms(nbytes, bw) if bw else None
    with_launches = floor and ms / (floor + ctx.launch_ms)
    rows.append([B, prefix, own, hq, hkv, d, nbytes / 1e6, ms, eager_ms if bw else None, floor, floor and ms / floor,
                 with_launches, nbytes / ms / 1e6, ref_ms, plan_ms, err, ref_err])
    name = f"B={B} prefix={prefix} own={own} Hq={hq} Hkv={hkv} D={d}"
    check(sec, f"{name}: error within 2x the reference's (+1e-3)", err <= 2 * ref_err + 1e-3)
    if bw:
        check(sec, f"{name}: within 2x of the bandwidth floor ({ms / floor:.2f}x)", ms <= 2 * floor, must=False)


# -------------------------------------------------------------------------------------------------
# 4. throughput

def ttc_tok_s(ctx: Ctx, model, prompt: list[int], n: int, new: int) -> float:
    """N samples of `new` tokens from one prompt, prefilled once and forked: (N * new) / seconds, prefill included."""
    from ttc.decoder.sampling import SamplingParams

    engine = model.engine
    engine.clear_prefix_cache()  # every run prefills its prompt, as transformers does
    ctx.sync()
    t = time.perf_counter()
    root = engine.new_sequence(prompt)
    engine.forward([root])
    kids = engine.fork(root, n, seeds=list(range(n)))
    try:
        outs = engine.generate(kids, SamplingParams(temperature=0.8), max_new_tokens=new, ignore_eos=True)
    finally:
        engine.release(kids + [root])
    ctx.sync()
    assert all(len(o.token_ids) == new for o in outs), "ttc stopped early"
    return n * new / (time.perf_counter() - t)


def hf_tok_s(ctx: Ctx, hf, prompt: list[int], n: int, new: int) -> float:
    """transformers' generate on the prompt repeated N times (it prefills every copy), the same sampling."""
    x = torch.tensor([prompt], device=ctx.device).repeat(n, 1)
    ctx.sync()
    t = time.perf_counter()
    y = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=0.8, top_k=0, top_p=1.0,
                    max_new_tokens=new, min_new_tokens=new)
    ctx.sync()
    assert y.shape == (n, len(prompt) + new), y.shape
    return n * new / (time.perf_counter() - t)


def warm_and_time(fn) -> float:
    """tok/s of the second call: the first compiles kernels and captures graphs."""
    fn()
    return fn()


def throughput(ctx: Ctx, sec: dict) -> None:
    s = ctx.sizes
    dtype = "bfloat16" if ctx.device == "cuda" else "float32"
    rows = table(sec, f"decode tok/s, {dtype}: N samples of one {s.prompt_tokens}-token prompt, {s.new_tokens} new "
                 "tokens each, temperature 0.8, EOS ignored, prefill included, warmed up",
                 ["model", "params", "N", "ttc tok/s", "HF tok/s", "ttc / HF"])
    graphs = table(sec, "cuda_graphs off vs on (default)", ["model", "N", "cuda_graphs", "ttc tok/s"])
    sec["notes"].append("ttc prefills the prompt once and forks N branches; transformers gets it repeated N times")
    for i, (name, cfg) in enumerate(s.models.items()):
        if ctx.left() < s.model_min_s:
            rows.append([name, None, None, "skipped", f"{ctx.left():.0f} s left", None])
            continue
        with guarded(sec, f"throughput {name}"):
            throughput_model(ctx, sec, rows, graphs if i == 0 else None, name, cfg, dtype, seed=i)
        free(ctx)


def throughput_model(ctx: Ctx, sec: dict, rows: list, graphs: list | None, name: str, cfg: dict, dtype: str,
                     seed: int) -> None:
    """One model at every N (while time is left), then (graphs given) cuda_graphs off against on."""
    s = ctx.sizes
    log(f"throughput: {name} {cfg}")
    folder, hf = make_model(ctx, name, "llama", cfg, getattr(torch, dtype), sharpen=False, seed=seed)
    params = sum(p.numel() for p in hf.parameters())
    model = load_ttc(ctx, folder, dtype, kv_cache_gb=s.kv_cache_gb)
    prompt = random_ids(s.prompt_tokens, cfg["vocab_size"], seed=7)
    last = 10.0 if ctx.device == "cuda" else 1.0  # seconds the previous N took (a guess for the first)
    for n in s.ns:
        if ctx.left() < 2.5 * last:  # the next N runs longer
            rows.append([name, params, n, "skipped", f"needs ~{2.5 * last:.0f} s, {ctx.left():.0f} s left", None])
            continue
        t = time.monotonic()
        row = [name, params, n, "did not finish", None, None]  # what stays where a run raises or is cut
        rows.append(row)
        with guarded(sec, f"{name} N={n}"):
            row[3] = ours = warm_and_time(lambda: ttc_tok_s(ctx, model, prompt, n, s.new_tokens))
            row[4] = theirs = warm_and_time(lambda: hf_tok_s(ctx, hf, prompt, n, s.new_tokens))
            row[5] = ours / theirs
            log(f"{name} N={n}: ttc {ours:,.0f} tok/s, HF {theirs:,.0f} tok/s ({ours / theirs:.2f}x)")
            if n == 64:
                check(sec, f"{name} N=64: ttc >= 3x transformers ({ours / theirs:.2f}x)", ours >= 3 * theirs,
                      must=False)
        last = time.monotonic() - t
    note_graphs(sec, f"throughput {name}", model)
    del hf
    free(ctx)
    if graphs is not None:
        graphs_off_vs_on(ctx, graphs, name, folder, model, prompt, dtype)


def graphs_off_vs_on(ctx: Ctx, rows: list, name: str, folder: Path, model, prompt: list[int], dtype: str) -> None:
    """The model at N = 64 (or the largest N below) loaded again with `cuda_graphs=False`, beside the default."""
    s = ctx.sizes
    n = max(x for x in s.ns if x <= 64)
    if ctx.left() < (30 if ctx.device == "cuda" else 2):
        rows.append([name, n, "skipped", f"{ctx.left():.0f} s left"])
        return
    try:
        off = load_ttc(ctx, folder, dtype, kv_cache_gb=s.kv_cache_gb, cuda_graphs=False)
    except TypeError as e:  # the keyword is new; an older ttc.load refuses it
        rows.append([name, n, "False", f"not available ({e})"])
        return
    rows.append([name, n, "False", warm_and_time(lambda: ttc_tok_s(ctx, off, prompt, n, s.new_tokens))])
    rows.append([name, n, "default", warm_and_time(lambda: ttc_tok_s(ctx, model, prompt, n, s.new_tokens))])


# -------------------------------------------------------------------------------------------------
# 5. the host's side of a step

def host_step(ctx: Ctx, sec: dict) -> None:
    """The engine's host work per decode step on this machine's CPU (benchmarks/step_host.py, "gpu host": the
    plan, the graphs' buffers refilled, the draw's bookkeeping, with a no-cost stand-in model): what each step
    in the throughput table pays in series besides the GPU's own time."""
    steps = 16 if ctx.device == "cuda" else 2
    rows = table(sec, f"host ms per decode step, one CPU thread ({steps} steps, best of 3)",
                 ["rows", "context", "stop string", "ms / step"])
    for key, ms in step_host.measure(steps, paths=("gpu host",)).items():
        _, n, prompt, stop = key.split("|")
        rows.append([int(n), f"{prompt} + {steps} drawn", stop == "True", ms])


# -------------------------------------------------------------------------------------------------
# The run

SECTIONS = [("environment", environment, 1), ("kernels", kernels_section, 5), ("parity", parity, 20),
            ("attention", attention, 15), ("throughput", throughput, 60),
            ("host step", host_step, 10), ("gpu tests", gpu_tests, 60)]  # (name, function, seconds it needs on a GPU)


def run_section(ctx: Ctx, fn, sec: dict) -> None:
    """fn(ctx, sec), then its status and seconds; an exception or the deadline is written into sec, not raised."""
    log(f"section {sec['name']}")
    t = time.monotonic()
    try:
        ctx.armed = True
        try:
            fn(ctx, sec)
        finally:
            ctx.armed = False
        failed = any(c["must"] and not c["passed"] for c in sec["checks"])
        sec["status"] = "error" if sec["error"] else "failed" if failed else "ok"
    except Deadline:
        sec["status"] = "cut"
        sec["notes"].append(f"cut by the deadline ({ctx.sizes.deadline_s:.0f} s); the rows above are complete")
    except Exception:  # written to the report; the next section still runs
        sec["status"], sec["error"] = "error", (sec["error"] or "") + traceback.format_exc()
        log(traceback.format_exc())
    sec["seconds"] = time.monotonic() - t
    free(ctx)


def run(ctx: Ctx, report: Report, only: set[str] | None = None) -> int:
    def alarm(*_):
        if ctx.armed:
            raise Deadline()

    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(ctx.left(), 0.001))
    for name, fn, need in SECTIONS:
        if only and name not in only and name != "environment":  # the environment always heads the report
            continue
        sec = report.section(name)
        need = need if ctx.device == "cuda" else 0.5
        if ctx.left() < need:
            sec["status"] = "skipped"
            sec["notes"].append(f"needs ~{need} s; {max(ctx.left(), 0):.0f} s were left before the deadline")
        else:
            run_section(ctx, fn, sec)
        log(f"section {name}: {sec['status']}" + (f" ({sec['seconds']:.1f} s)" if sec["seconds"] else ""))
        report.write()
    signal.setitimer(signal.ITIMER_REAL, 0)
    return int(any(s["status"] in ("failed", "error", "cut") for s in report.sections))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="where report.md and report.json are written")
    parser.add_argument("--smoke", action="store_true", help="every section on the CPU with tiny models (CI)")
    parser.add_argument("--only", action="append", choices=[name for name, _, _ in SECTIONS],
                        help="run just this section (repeatable), after the environment: a rerun of one that failed")
    args = parser.parse_args(argv[1:])
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (torch sees none); `--smoke` checks this script on the CPU",
              file=sys.stderr)
        return 2
    bootstrap_ttc()
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bars would bury the progress lines
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Ctx("cuda" if not args.smoke else "cpu", GPU if not args.smoke else SMOKE, Path(tmp))
        report = Report(args.out_dir, ctx, argv)
        report.write()
        rc = run(ctx, report, set(args.only or ()))
    log(f"report: {args.out_dir / 'report.md'}; exit {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
