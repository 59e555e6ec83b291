"""benchmarks/gpu_compile.py: every Triton launch of the engine, recorded under the interpreter, compiles for a
GPU (sm_90) on this machine; a kernel the interpreter runs but the compiler refuses is reported as failed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_compile.py"
KERNELS = {"_partial_kernel", "_merge_kernel", "_rms_norm_kernel", "_rotary_kernel", "_sample_kernel"}


def _module():
    spec = importlib.util.spec_from_file_location("gpu_compile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compiler_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@triton.jit
def _example_kernel(x_ptr, n, one, scale, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * scale * one, mask=i < n)


def test_a_launch_is_specialized_as_tritons_launcher_does_with_the_gpus_interpreted_flag():
    specialization = _module().specialization
    x = torch.zeros(64)  # a fresh allocation: 16-byte aligned
    spec = specialization(_example_kernel, (x, 32, 1, 0.5), dict(BLOCK=64, INTERPRETED=True, num_warps=2))
    assert spec == {"kernel": f"{__name__}:_example_kernel",
                    "types": {"x_ptr": "*fp32", "n": "i32", "one": "constexpr", "scale": "fp32",
                              "BLOCK": "constexpr", "INTERPRETED": "constexpr"},
                    "constants": {"one": 1, "BLOCK": 64, "INTERPRETED": False},
                    "aligned": ["x_ptr", "n"], "options": {"num_warps": 2}}
    unaligned = specialization(_example_kernel, (x[1:], 33, 2, 0.5), dict(BLOCK=64, INTERPRETED=True))
    assert unaligned["aligned"] == [] and unaligned["types"]["one"] == "i32" and "one" not in unaligned["constants"]


@pytest.mark.slow
def test_every_kernel_the_engine_launches_on_the_tiny_model_compiles_for_sm90(tmp_path):
    specs = tmp_path / "specs.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--specs", str(specs)], capture_output=True,
                          text=True, timeout=600, env=_compiler_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    recorded = json.loads(specs.read_text())
    assert {s["kernel"].split(":")[1] for s in recorded} == KERNELS
    assert all(s["constants"]["INTERPRETED"] is False for s in recorded if "INTERPRETED" in s["constants"])
    assert f"{len(recorded)} of {len(recorded)} compiled\n" in done.stdout


def test_a_kernel_reading_a_plain_global_runs_interpreted_but_is_reported_failed_for_the_gpu(tmp_path):
    # the mistake the sampling kernel had until gpu_compile found it: the interpreter reads any global
    (tmp_path / "plain_global.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        SCALE = 2.0

        @triton.jit
        def _scale_kernel(x_ptr, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            tl.store(x_ptr + i, tl.load(x_ptr + i) * SCALE)
    """))
    interpreted = f"""
import torch, plain_global
x = torch.ones(16)
plain_global._scale_kernel[(1,)](x, BLOCK=16)
print(x.tolist() == [2.0] * 16)
"""
    env = _compiler_env() | {"PYTHONPATH": str(tmp_path)}
    ran = subprocess.run([sys.executable, "-c", interpreted], capture_output=True, text=True, timeout=120,
                         env=env | {"TRITON_INTERPRET": "1"})
    assert ran.stdout.strip() == "True", ran.stderr[-2000:]
    spec = {"kernel": "plain_global:_scale_kernel", "types": {"x_ptr": "*fp32", "BLOCK": "constexpr"},
            "constants": {"BLOCK": 16}, "aligned": ["x_ptr"], "options": {}}
    (tmp_path / "specs.json").write_text(json.dumps([spec]))
    done = subprocess.run([sys.executable, str(SCRIPT), "--recorded", str(tmp_path / "specs.json")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1
    assert "_scale_kernel" in done.stdout and "FAILED" in done.stdout and "0 of 1 compiled; 1 FAILED" in done.stdout
    assert "Cannot access global variable SCALE" in done.stdout  # the compiler's reason, not only where
