"""A fake OpenAI-compatible server for the remote backend's tests (tests/test_remote*.py): `EngineServer` is a
small /v1/completions server on the tiny model's engine with `ttc serve`'s seed rule (an n=1 sample is drawn
with the request's seed), reachable in process (httpx's MockTransport) or over HTTP on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from ttc.budget import Ledger
from ttc.decoder.sampling import SamplingParams, child_seed

MODEL = "tiny"


class EngineServer:
    """An OpenAI /v1/completions server on a ttc engine, with ttc serve's seed rule. Options: report the
    prefix cache or not, leave EOS out of the tokens, give text instead of token ids."""

    def __init__(self, model, report_cache: bool = True, drop_eos: bool = False):
        self.model, self.report_cache, self.drop_eos = model, report_cache, drop_eos
        self.bodies: list[dict] = []
        self.fail_when = None  # body -> an (status, json) answer instead of the completion, or None
        self._lock = threading.Lock()  # the engine is not thread-safe

    def respond(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        if path.endswith("/models"):
            return 200, {"data": [{"id": MODEL, "max_model_len": self.model.config.max_position}]}
        with self._lock:
            self.bodies.append(body)
            failure = self.fail_when(body) if self.fail_when else None
            if failure is not None:
                return failure
            return 200, (self._echo(body) if body.get("echo") or body.get("prompt_logprobs") else self._sample(body))

    def _usage(self, prompt: int, cached: int, completion: int) -> dict:
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self.report_cache:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage

    def _sample(self, body: dict) -> dict:
        engine, ledger = self.model.engine, Ledger()
        prompt, n, seed = body["prompt"], body.get("n", 1), body.get("seed", 0)
        parent = engine.new_sequence(prompt, ledger, seed=seed)
        cached = ledger.reused_tokens
        seeds = [seed] if n == 1 else [child_seed(seed, i) for i in range(n)]
        children = engine.fork(parent, n, seeds=seeds)
        params = SamplingParams(body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("top_k", 0),
                                body.get("min_p", 0.0))
        try:
            outs = engine.generate(children, params, body["max_tokens"], stop=body.get("stop"))
        finally:
            engine.release(children + [parent])
        choices = []
        for i, out in enumerate(outs):
            ids, lps = list(out.token_ids), list(out.logprobs)
            if self.drop_eos and out.finish_reason == "eos":
                ids, lps = ids[:-1], lps[:-1]
            text = out.text + (out.stop if out.stop and body.get("include_stop_str_in_output") else "")
            tokens = [f"token_id:{t}" for t in ids] if body.get("return_tokens_as_token_ids") else \
                [self.model.tokenizer.decode([t]) for t in ids]
            choices.append({"index": i, "text": text, "finish_reason": "length" if out.finish_reason == "length"
                            else "stop", "stop_reason": out.stop,
                            "logprobs": {"tokens": tokens, "token_logprobs": lps}})
        return {"choices": choices, "usage": self._usage(len(prompt), cached, sum(len(o.token_ids) for o in outs))}

    def _echo(self, body: dict) -> dict:
        """Prompt logprobs (echo or vLLM's prompt_logprobs) and the top-k after the prompt, one greedy token."""
        engine, prompt, k = self.model.engine, body["prompt"], body["logprobs"]
        seq = engine.new_sequence(prompt[:1], Ledger())
        try:
            engine.forward([seq])
            (r,) = engine.score([(seq, prompt[1:])])
        finally:
            engine.release([seq])
        values, ids = r.last_logprobs.topk(k)
        top = {f"token_id:{i}": v for i, v in zip(ids.tolist(), values.tolist())}
        token = int(ids[0])
        choice = {"index": 0, "finish_reason": "length", "stop_reason": None}
        if body.get("echo"):
            choice["logprobs"] = {"tokens": [f"token_id:{t}" for t in prompt + [token]],
                                  "token_logprobs": [None] + r.logprobs.tolist() + [float(values[0])],
                                  "top_logprobs": [None] * len(prompt) + [top]}
        else:
            choice["prompt_logprobs"] = [None] + [{str(t): {"logprob": v, "rank": 1}}
                                                  for t, v in zip(prompt[1:], r.logprobs.tolist())]
            choice["logprobs"] = {"tokens": [f"token_id:{token}"], "token_logprobs": [float(values[0])],
                                  "top_logprobs": [top]}
        return {"choices": [choice], "usage": self._usage(len(prompt), 0, 1)}

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            status, data = self.respond(request.method, request.url.path,
                                        json.loads(request.content) if request.content else None)
            return httpx.Response(status, json=data)

        return httpx.MockTransport(handle)

    @contextlib.contextmanager
    def serve(self):
        """The same server over HTTP on 127.0.0.1 (a free port); yields its base URL."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body):
                status, data = server.respond(self.command, self.path, body)
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._answer(None)

            def do_POST(self):
                self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def log_message(self, *args):
                pass

        http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=http.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{http.server_address[1]}/v1"
        finally:
            http.shutdown()
            http.server_close()
