"""benchmarks/gpu_check.py's logic on the CPU (--smoke), as on the bare GPU machine it is made for.

There the repository is a copy, not installed, and math_verify and gguf are absent: the smoke run here
blocks both and removes the editable install's finder, so only the script's own bootstrap can import ttc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"

# Run the script as the GPU machine would see it: no math_verify, no gguf (None in sys.modules makes their import
# fail), no installed ttc (the editable install's meta-path finder removed). Afterwards, say whether
# ttc/__init__.py ran: the bootstrap must register a bare package instead.
BARE_MACHINE = f"""
import runpy, sys
sys.modules["math_verify"] = None
sys.modules["gguf"] = None
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
try:
    runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
finally:
    print("ttc/__init__.py ran:", hasattr(sys.modules.get("ttc"), "__version__"), flush=True)
"""


def test_the_smoke_run_passes_parity_on_both_configs_without_math_verify_gguf_or_an_installed_ttc(tmp_path):
    out = tmp_path / "report"
    # TRITON_INTERPRET=1: the kernels section runs the Triton kernels through the interpreter
    done = subprocess.run([sys.executable, "-c", BARE_MACHINE, str(out), "--smoke"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=os.environ | {"TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ttc/__init__.py ran: False" in done.stdout
    report = json.loads((out / "report.json").read_text())
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == ["environment", "kernels", "parity", "attention", "throughput", "host step", "gpu tests"]
    kernel_checks = sections["kernels"]["checks"]
    assert len(kernel_checks) == 7 and all(c["passed"] and c["must"] for c in kernel_checks)
    assert all(s["status"] == "ok" for s in sections.values()), [(s["name"], s["error"]) for s in sections.values()]
    parity = {c["name"].split(":")[0]: c["passed"] for c in sections["parity"]["checks"]}
    assert parity == {"llama": True, "qwen2": True}
    env = dict(sections["environment"]["tables"][0]["rows"])
    assert Path(env["ttc imported from"]) == SCRIPT.parents[1] / "ttc"
    throughput = sections["throughput"]["tables"][0]["rows"]
    assert [row[2] for row in throughput] == [1, 4] and all(row[3] > 0 and row[4] > 0 for row in throughput)
    host = sections["host step"]["tables"][0]["rows"]
    assert len(host) == 5 and all(row[3] > 0 for row in host)
    # the gpu tests' child: on the CPU test_gpu.py skips and the Triton kernels' tests run interpreted
    [[passed, failed, errors, skipped, status]] = sections["gpu tests"]["tables"][0]["rows"]
    assert passed >= 40 and (failed, errors, status) == (0, 0, 0) and skipped >= 3
    markdown = (out / "report.md").read_text()
    assert "check PASS: llama: float32 greedy tokens equal transformers'" in markdown
    assert f"`python {SCRIPT} {out} --smoke`" in markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_and_without_smoke_it_exits_2_with_one_line_suggesting_smoke(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "report")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "--smoke" in done.stderr, done.stderr
    assert not (tmp_path / "report").exists()


def test_the_kernels_section_fails_a_norm_kernel_that_is_off_by_one_percent():
    """The section's checks can fail: a kernel 1% off is reported FAIL (checked on the CPU interpreter)."""
    script = f"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, {str(SCRIPT.parent)!r})
import gpu_check_harness, gpu_check_kernels
from ttc import kernels
from ttc.kernels import norm_triton
right = norm_triton.rms_norm
norm_triton.rms_norm = lambda x, w, eps, r=None: (lambda y: (y[0] * 1.01, y[1]) if r is not None else y * 1.01)(
    right(x, w, eps, r))
sec = dict(tables=[], checks=[], notes=[])
ctx = gpu_check_harness.Ctx("cpu", None, None)
with kernels.triton_on_cpu():
    gpu_check_kernels.norm_checks(ctx, sec, [], "tiny", gpu_check_kernels.SMOKE_SHAPES["tiny"])
print([c["passed"] for c in sec["checks"]])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[False, False, False]"


def test_a_failed_parity_is_diagnosed_eager_and_on_the_references(tmp_path):
    """parity_diagnosis reruns ttc eagerly and on the PyTorch references and counts the sequences that match."""
    script = f"""
import sys, pathlib
sys.path.insert(0, {str(SCRIPT.parent)!r})
import gpu_check
ctx = gpu_check.Ctx("cpu", gpu_check.SMOKE, pathlib.Path({str(tmp_path)!r}))
folder, hf = gpu_check.make_model(ctx, "tiny", "llama", gpu_check.TINY, gpu_check.torch.float32, sharpen=True)
prompts = [gpu_check.random_ids(n, 1000, seed=n) for n in (3, 16)]
branch = gpu_check.random_ids(20, 1000, seed=9)
model = gpu_check.load_ttc(ctx, folder, "float32", kv_cache_gb=0.05)
inputs, ours = gpu_check.ttc_greedy(model, prompts, branch, ctx.sizes.greedy_tokens)
theirs = gpu_check.hf_greedy(ctx, hf, inputs, ctx.sizes.greedy_tokens)
assert ours == theirs
for note in gpu_check.parity_diagnosis(ctx, "llama", folder, prompts, branch, theirs):
    print("NOTE", note)
for note in gpu_check.parity_diagnosis(ctx, "llama", folder, prompts, branch, [t[::-1] for t in theirs]):
    print("NOTE", note)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    notes = [line[5:] for line in done.stdout.splitlines() if line.startswith("NOTE ")]
    assert notes == ["llama diagnosis: with cuda_graphs=False, 6 of 6 sequences equal transformers'",
                     "llama diagnosis: with cuda_graphs=False and the PyTorch references, 6 of 6 sequences equal "
                     "transformers'",
                     "llama diagnosis: with cuda_graphs=False, 0 of 6 sequences equal transformers'",
                     "llama diagnosis: with cuda_graphs=False and the PyTorch references, 0 of 6 sequences equal "
                     "transformers'"]


def test_the_attention_cases_gpu_branch_runs_on_the_interpreter_with_the_timers_stubbed(tmp_path):
    """The lines only a GPU takes (the plan and work table timed, the graph replay, the floor columns) run on CPU
    tensors through the interpreter with both timers stubbed: the smoke run never takes them, and the first GPU
    run found a wrong import there."""
    script = f"""
import os, sys, json, pathlib
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, {str(SCRIPT.parent)!r})
import gpu_check
from ttc.kernels import _timing
_timing.graph_ms = lambda fn: (fn(), 2.0)[1]
_timing.time_ms = lambda fn, device, reps=10: (fn(), 3.0)[1]
ctx = gpu_check.Ctx("cpu", gpu_check.SMOKE, pathlib.Path({str(tmp_path)!r}))
ctx.launch_ms = 0.5
sec, rows = dict(tables=[], checks=[], notes=[]), []
gpu_check.attention_case(ctx, sec, rows, 1e9, 4, 64, 16, 4, 2, 32)
print(json.dumps([rows[0][7:13], rows[0][14] > 0, [(c["passed"], c["must"]) for c in sec["checks"]]]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    timings, planned, checks = json.loads(done.stdout.strip().splitlines()[-1])
    nbytes = ((64 + 4 * 16) * 2 * 32 * 2 + 2 * 4 * 4 * 32) * 2  # K and V (bfloat16), + q and out
    floor = nbytes / 1e9 * 1e3
    assert timings == pytest.approx([2.0, 3.0, floor, 2.0 / floor, 2.0 / (floor + 0.5), nbytes / 2.0 / 1e6])
    assert planned  # the plan and its work table were built and timed
    assert checks == [[True, True], [False, False]]  # the error check, then the floor target (2 ms is far off)


def test_only_reruns_the_named_section_after_the_environment(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), "--smoke", "--only", "attention"],
                          capture_output=True, text=True, timeout=180, env=os.environ | {"TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [(s["name"], s["status"]) for s in report["sections"]] == [("environment", "ok"), ("attention", "ok")]


def test_pytests_summary_line_is_read_into_counts():
    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_check_tests import summary_counts

    assert summary_counts("x\n== 2 failed, 44 passed, 1 skipped, 3 errors in 34.95s ==\n") == {
        "passed": 44, "failed": 2, "errors": 3, "skipped": 1}
    assert summary_counts("== 1 error in 0.2s ==") == {"passed": 0, "failed": 0, "errors": 1, "skipped": 0}
    assert summary_counts("ImportError: no module named x") == {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}


def test_the_whole_package_imports_without_math_verify_as_on_the_gpu_machine():
    """The gpu tests import `ttc` itself: math-verify (absent there) is imported only when an answer is parsed."""
    script = f"""
import sys
sys.modules["math_verify"] = None
sys.path.insert(0, {str(SCRIPT.parent)!r})
from gpu_check_harness import import_ttc
import_ttc()
import ttc
print(callable(ttc.load), callable(ttc.solve), ttc.__file__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded, solve, where = done.stdout.split()
    assert (loaded, solve) == ("True", "True") and Path(where) == SCRIPT.parents[1] / "ttc" / "__init__.py"
