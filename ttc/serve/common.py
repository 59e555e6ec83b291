"""What the completions and chat endpoints share: request checks, the job they run, usage, and the SSE
stream that turns a worker's events into `data:` lines.

Usage: `prompt_tokens` is the rendered prompt, `completion_tokens` every sampled token (an EOS that
ended a sample included, as ttc's ledger counts `generated_tokens`, and as vLLM counts), and
`prompt_tokens_details.cached_tokens` the prompt tokens the radix prefix cache served (the ledger's
`reused_tokens` of the prompt).
"""

from __future__ import annotations

import json
import secrets
from typing import Callable, Iterable

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ttc.serve import testtime
from ttc.serve.errors import bad_request, error_json
from ttc.serve.protocol import PromptTokensDetails, Usage, _SamplingRequest
from ttc.serve.request_engine import ClientGone
from ttc.serve.runtime import Running, Runtime
from ttc.serve.sampler import SampleJob, SampleResult, run_sampling

__all__ = ["resolve_seed", "sample_job", "run_plain", "start_plain", "run_ttc", "usage", "finish_reason", "sse",
           "check_ttc", "sse_chunks"]


def resolve_seed(seed: int | None) -> int:
    """The request's seed, or a random one (48 bits: what child_seed mixes)."""
    return seed if seed is not None else secrets.randbits(48)


def finish_reason(engine_reason: str) -> str:
    """The engine's "eos" / "stop" / "length" in the API's words (EOS and stop strings are both "stop")."""
    return "length" if engine_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def _check_k(runtime: Runtime, name: str, k: int | None) -> None:
    if k is not None and k > runtime.settings.max_logprobs:
        raise bad_request(f"{name}: at most {runtime.settings.max_logprobs} (the server's --max-logprobs)", param=name)


def sample_job(runtime: Runtime, body: _SamplingRequest, prompt_ids: list[int], max_tokens: int,
               top_logprobs: int = 0, prompt_logprobs: int | None = None) -> tuple[SampleJob, int]:
    """The job a plain request runs, and its worst-case KV blocks (400 when over one request's share)."""
    if body.n > runtime.settings.max_n:
        raise bad_request(f"n: at most {runtime.settings.max_n}", param="n")
    _check_k(runtime, "logprobs", top_logprobs)
    _check_k(runtime, "prompt_logprobs", prompt_logprobs)
    try:
        params = body.sampling_params()
    except ValueError as e:
        raise bad_request(str(e)) from None
    job = SampleJob(tuple(prompt_ids), body.n, resolve_seed(body.seed), params, max_tokens, body.stop_strings,
                    body.ignore_eos, body.include_stop_str_in_output, top_logprobs, prompt_logprobs,
                    body.ttc_skip_draws)
    blocks = runtime.kv_blocks_for(len(prompt_ids), body.n, max_tokens, copies=2 if top_logprobs else 1,
                                   prompt_replay=prompt_logprobs is not None)
    return job, blocks


async def run_plain(runtime: Runtime, request: Request, job: SampleJob, blocks: int) -> SampleResult:
    return await runtime.run(request, blocks, lambda view, emit: run_sampling(view, job))


async def start_plain(runtime: Runtime, request: Request, job: SampleJob, blocks: int) -> Running:
    return await runtime.start(request, blocks, lambda view, emit: run_sampling(view, job, emit))


def check_ttc(body: _SamplingRequest, wants_logprobs: bool) -> None:
    if body.n != 1:
        raise bad_request("n: a ttc request returns its strategy's one chosen answer; set the breadth with ttc.n",
                          param="n")
    if wants_logprobs or body.prompt_logprobs is not None:
        raise bad_request("logprobs are not available with a ttc strategy", param="logprobs")


async def run_ttc(runtime: Runtime, request: Request, body: _SamplingRequest, prompt_ids: list[int],
                  max_tokens: int | None):
    """Run the request's `ttc` strategy; returns (Result, cached prompt tokens). KV: the strategy's breadth
    x (prompt + max_tokens) is reserved, capped at one request's share (the engine admits the rest)."""
    plan = testtime.plan(body.ttc, body, max_tokens)
    blocks = runtime.kv_blocks_for(len(prompt_ids), plan.breadth, plan.max_tokens, reject=False)
    seed = resolve_seed(body.seed)
    return await runtime.run(request, blocks, lambda view, emit: testtime.run_plan(
        view, runtime.shared_model(view), plan, prompt_ids, seed))


def _data(chunk: BaseModel | dict) -> str:
    text = chunk.model_dump_json() if isinstance(chunk, BaseModel) else json.dumps(chunk)
    return f"data: {text}\n\n"


def sse(request: Request, running: Running, on_event: Callable[[object], Iterable[BaseModel]],
        on_end: Callable[[object], Iterable[BaseModel]], first: Iterable[BaseModel] = ()) -> StreamingResponse:
    """A text/event-stream of `first`, then on_event(event) for each worker event, then on_end(result),
    then [DONE]. A client that leaves (noticed between chunks) cancels the work; an error after the
    stream began is sent as an `error` event."""

    async def body():
        try:
            for chunk in first:
                yield _data(chunk)
            async for event in running.stream(request):
                for chunk in on_event(event):
                    yield _data(chunk)
            for chunk in on_end(running.result):
                yield _data(chunk)
        except ClientGone:
            return
        except Exception as e:  # the 200 is sent already: report in band, as vLLM does
            yield f"data: {error_json(e)}\n\n"
        finally:
            running.cancel.set()  # no-op once the work ended; stops it if the client left
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def sse_chunks(chunks: Iterable[BaseModel]) -> StreamingResponse:
    """A stream of chunks computed already (a ttc request answers when its search is done)."""

    async def body():
        for chunk in chunks:
            yield _data(chunk)
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")
