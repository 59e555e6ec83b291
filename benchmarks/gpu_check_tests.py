"""The GPU check's last section: the `gpu`-marked tests, run with pytest in a child process on this machine.

Why here: the GPU machine has a copy of the repository, not an install, and no pip or network, so `pytest -m gpu`
cannot run there as it does on a developer's machine. The child imports the checkout as the `ttc` package
(`gpu_check_harness.import_ttc`), and where the embedded model's GGUF is absent (it is too large to bring along),
the tests' tiny models get a word-level tokenizer of the embedded model's vocabulary size, saved to a folder
named by TTC_TEST_TOKENIZER (tests/conftest.py reads it): those tests feed token ids, not text. Without CUDA
(the CPU smoke run), test_gpu.py skips and test_kernels_triton.py runs the kernels under Triton's interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from gpu_check_harness import ROOT, Ctx, check, table, word_level_tokenizer

TEST_FILES = ("tests/test_gpu.py", "tests/test_kernels_triton.py")
EMBEDDED_VOCAB = 49152  # SmolLM2's: the tests' tiny models (tests/conftest.py TINY) are made with it

# the child: the checkout as `ttc`, then pytest on the files given on its command line
CHILD = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from gpu_check_harness import import_ttc
import_ttc()
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-rfE", *sys.argv[1:]]))
"""


def gpu_tests(ctx: Ctx, sec: dict) -> None:
    if importlib.util.find_spec("pytest") is None:
        sec["notes"].append("pytest is not installed on this machine: the gpu tests did not run")
        return
    env = dict(os.environ)
    if "TTC_TEST_TOKENIZER" not in env and not _embedded_model_here():
        folder = ctx.tmp / "test_tokenizer"
        word_level_tokenizer(EMBEDDED_VOCAB).save_pretrained(str(folder))
        env["TTC_TEST_TOKENIZER"] = str(folder)
        sec["notes"].append(f"no embedded model here: the tests' tiny models use a word-level tokenizer of "
                            f"{EMBEDDED_VOCAB:,} tokens (TTC_TEST_TOKENIZER)")
    if ctx.device != "cuda":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", CHILD, *TEST_FILES], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=max(10.0, ctx.left()))
    output = done.stdout + done.stderr
    counts = summary_counts(output)
    rows = table(sec, "pytest " + " ".join(TEST_FILES), ["passed", "failed", "errors", "skipped", "exit status"])
    rows.append([counts["passed"], counts["failed"], counts["errors"], counts["skipped"], done.returncode])
    sec["notes"] += [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))][:30]
    if done.returncode not in (0, 1):  # 1: tests failed; anything else: pytest itself could not run them
        sec["notes"].append("pytest's last lines:\n" + "\n".join(output.splitlines()[-15:]))
    check(sec, f"the gpu tests pass ({counts['passed']} passed, {counts['failed']} failed, {counts['errors']} "
               f"errors)", done.returncode == 0 and counts["passed"] > 0)


def summary_counts(output: str) -> dict[str, int]:
    """{"passed", "failed", "errors", "skipped"} from pytest's last summary line ("3 passed, 1 skipped in 2s")."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    found = dict.fromkeys(("passed", "failed", "errors", "skipped"), 0)
    for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped)", lines[-1] if lines else ""):
        found["errors" if kind.startswith("error") else kind] = int(n)
    return found


def _embedded_model_here() -> bool:
    from ttc.decoder.weights import resolve

    try:
        resolve("smollm2-135m")
        return True
    except Exception:  # ModelNotFoundError, or gguf missing on a bare machine
        return False
