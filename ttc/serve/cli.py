"""`ttc serve`: the OpenAI-compatible server, on FastAPI and uvicorn.

    ttc serve --model smollm2-135m --host 127.0.0.1 --port 8000
    python -m ttc.serve.cli serve --model /models/Qwen2.5-0.5B-Instruct --dtype bfloat16 --kv-cache-gb 4

SIGTERM (or Ctrl-C) drains: the server stops listening and refuses new requests with 503, lets the
in-flight ones finish (streams included), then exits (uvicorn re-raises the signal, so the exit status
is the signal's). A second Ctrl-C exits at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main", "build_parser", "serve"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ttc", description="ttc: test-time compute reasoning")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (the embedded model), a .gguf path or a Hugging Face folder")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None,
                   help="the name clients send as `model` (None: the --model spec)")
    s.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    s.add_argument("--kv-cache-gb", type=float, default=2.0, help="the paged KV pool")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")
    s.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (the Triton kernels run the hot path on CUDA)")
    s.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on CUDA, run decode steps eagerly instead of replaying CUDA graphs")
    s.add_argument("--max-concurrency", type=int, default=64,
                   help="requests running at once (worker threads; their decode steps share batches)")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting; one more gets 503 + Retry-After")
    s.add_argument("--request-kv-share", type=float, default=0.5,
                   help="the largest fraction of the KV pool one request's worst case may take")
    s.add_argument("--chunk-tokens", type=int, default=16, help="tokens per engine call: streaming granularity")
    s.add_argument("--max-logprobs", type=int, default=20)
    s.add_argument("--log-level", default="info")
    return ap


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    import ttc
    from ttc.serve.app import create_app
    from ttc.serve.runtime import Settings

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model = ttc.load(args.model, dtype=args.dtype, kv_cache_gb=args.kv_cache_gb, threads=args.threads,
                         device=args.device, cuda_graphs=args.cuda_graphs)
    except (ValueError, FileNotFoundError) as e:  # a missing model, an unsupported checkpoint, a bad dtype/device
        sys.exit(f"ttc serve: error: {type(e).__name__}: {e}")
    settings = Settings(model_name=args.served_model_name or args.model, max_concurrency=args.max_concurrency,
                        max_queue=args.max_queue, kv_share=args.request_kv_share, chunk_tokens=args.chunk_tokens,
                        max_logprobs=args.max_logprobs)
    app = create_app(model, settings)
    runtime = app.state.runtime

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # refuse new work at once (uvicorn stops listening and waits for the in-flight requests)
            runtime.admission.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    logging.getLogger("ttc.serve").info("serving %s as %r on http://%s:%d/v1", model, settings.model_name,
                                        args.host, args.port)
    Server(config).run()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main(sys.argv[1:])
