"""The checkout's top-level folders are ttc's subpackages, never other distributions' names."""

import subprocess
import sys
from pathlib import Path

import ttc.kernels

CHECKOUT = Path(__file__).resolve().parent.parent


def _bare_import_from_the_checkout_root(name: str) -> subprocess.CompletedProcess:
    # `python -c` puts the working directory first on sys.path, as `python -m pytest` and `python -m ttc...` do.
    code = f"import importlib, sys\ntry:\n    print(importlib.import_module({name!r}).__file__)\n" \
           f"except ModuleNotFoundError as e:\n    print('missing', e.name)"
    return subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True, check=True)


def test_a_bare_import_of_kernels_at_the_checkout_root_never_gets_ttc_kernels():
    # transformers >= 5.25 imports Hugging Face's `kernels`; this checkout's kernels/ must not stand in for it.
    printed = _bare_import_from_the_checkout_root("kernels").stdout.strip()
    assert printed == "missing kernels" or Path(printed).resolve().parent != CHECKOUT / "kernels"
    assert Path(ttc.kernels.__file__).resolve().parent == CHECKOUT / "kernels"


def test_transformers_model_classes_import_from_the_checkout_root():
    # The failure this guards against: hub_kernels' `from kernels import ...` reading ttc.kernels.
    code = "from transformers import LlamaForCausalLM; import ttc.kernels; print(ttc.kernels.rms_norm.__module__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ttc.kernels.dispatch"
