"""The checkout's top-level folders are ttc's subpackages, never other distributions' names."""

import subprocess
import sys
from pathlib import Path

import ttc.kernels

CHECKOUT = Path(__file__).resolve().parent.parent

# `python -c` puts the working directory first on sys.path, as `python -m pytest` and `python -m ttc...` do.

def test_a_bare_import_of_kernels_at_the_checkout_root_gets_the_installed_package_not_ttc_kernels():
    # transformers >= 5.25 imports Hugging Face's `kernels`; this checkout's kernels/ must not stand in for it.
    code = "import kernels; print(kernels.__file__, hasattr(kernels, 'decode_attention'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True, check=True)
    path, has_ttc_names = done.stdout.split()
    assert Path(path).resolve().parent != CHECKOUT / "kernels" and has_ttc_names == "False"
    assert Path(ttc.kernels.__file__).resolve().parent == CHECKOUT / "kernels"


def test_where_no_other_kernels_is_installed_the_bare_name_is_an_empty_module_not_an_error():
    # An older transformers (vLLM's venv) probes `kernels` by importing it: that import must not raise.
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
            "import kernels; print(sorted(n for n in vars(kernels) if not n.startswith('_')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_transformers_model_classes_import_from_the_checkout_root():
    # The failure this guards against: hub_kernels' `from kernels import ...` reading ttc.kernels.
    code = "from transformers import LlamaForCausalLM; import ttc.kernels; print(ttc.kernels.rms_norm.__module__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ttc.kernels.dispatch"
