"""POST /v1/completions: a prompt (text or token ids) continued n times, or answered by a ttc strategy.

`echo` prepends the prompt to each choice's text (and, with `logprobs`, the prompt's tokens to its
logprobs, the first with a null logprob, as OpenAI does). `max_tokens` beyond the context is not an
error: the sample stops at the context's end with finish_reason "length".
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from ttc.serve import testtime
from ttc.serve.common import (check_ttc, finish_reason, run_plain, run_ttc, sample_job, sse, sse_chunks, start_plain,
                              usage)
from ttc.serve.errors import bad_request
from ttc.serve.logprobs import TokenWriter, completion_logprobs, prompt_logprobs_json
from ttc.serve.protocol import CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse, new_id, now
from ttc.serve.runtime import Runtime
from ttc.serve.sampler import Delta, PromptInfo, Sample, SampleResult

router = APIRouter()


def _prompt_ids(runtime: Runtime, body: CompletionRequest) -> tuple[list[int], str]:
    """The prompt's token ids and the text `echo` repeats."""
    if isinstance(body.prompt, str):
        ids = runtime.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        runtime.check_prompt(ids)
        return ids, body.prompt
    ids = list(body.prompt)
    runtime.check_prompt(ids)  # before decoding: ids outside the vocabulary cannot be decoded
    text = runtime.tokenizer.decode(ids)
    return ids, text


def _prompt_part(prompt_lp, k: int | None):
    """The prompt's (logprobs, tops) for an echo: the first token has neither."""
    return [e[0] if e else None for e in prompt_lp], [(e[2][:k] if k else []) if e else None for e in prompt_lp]


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    runtime: Runtime = request.app.state.runtime
    runtime.check_model(body.model)
    if body.best_of not in (None, body.n):
        raise bad_request("best_of: only best_of == n is supported (use a ttc strategy to choose)", param="best_of")
    prompt_ids, prompt_text = _prompt_ids(runtime, body)
    echo_text = prompt_text if body.echo else ""
    if body.ttc is not None:
        check_ttc(body, body.logprobs is not None)
        given = body.max_tokens if "max_tokens" in body.model_fields_set else None
        result, cached = await run_ttc(runtime, request, body, prompt_ids, given)
        choice = CompletionChoice(index=0, text=echo_text + result.text,
                                  finish_reason="stop" if result.answer is not None else "length")
        info, use = testtime.summary(result), usage(len(prompt_ids), result.ledger.generated_tokens, cached)
        if body.stream:
            rid, created = new_id("cmpl"), now()
            return sse_chunks([CompletionChunk(id=rid, created=created, model=body.model, choices=[choice], ttc=info,
                                               usage=use if body.include_usage else None)])
        return CompletionResponse(model=body.model, choices=[choice], usage=use, ttc=info)

    k = body.logprobs
    prompt_k = body.prompt_logprobs
    if body.echo and k is not None:
        prompt_k = max(prompt_k or 0, k)
    max_tokens = body.max_tokens or runtime.max_position - len(prompt_ids)
    job, blocks = sample_job(runtime, body, prompt_ids, max_tokens, top_logprobs=k or 0, prompt_logprobs=prompt_k)
    write = TokenWriter(runtime.tokenizer, body.return_tokens_as_token_ids)
    if body.stream:
        running = await start_plain(runtime, request, job, blocks)
        return sse(request, running, *_Stream(body, prompt_ids, echo_text, write).handlers())
    result = await run_plain(runtime, request, job, blocks)
    choices = [_choice(i, s, body, prompt_ids, echo_text, result, write) for i, s in enumerate(result.samples)]
    return CompletionResponse(model=body.model, choices=choices,
                              usage=usage(result.prompt_tokens, sum(len(s.token_ids) for s in result.samples),
                                          result.cached_tokens))


def _choice(i: int, s: Sample, body: CompletionRequest, prompt_ids: list[int], echo_text: str, result: SampleResult,
            write: TokenWriter) -> CompletionChoice:
    logprobs = None
    if body.logprobs is not None:
        ids, lps, tops = s.token_ids, s.logprobs, s.top
        if body.echo:
            plps, ptops = _prompt_part(result.prompt_logprobs, body.logprobs)
            ids, lps, tops = prompt_ids + ids, plps + lps, ptops + (tops or [[] for _ in s.token_ids])
        logprobs = completion_logprobs(write, ids, lps, tops, body.logprobs)
    prompt_lp = None
    if body.prompt_logprobs is not None:
        prompt_lp = prompt_logprobs_json(write, prompt_ids, result.prompt_logprobs, body.prompt_logprobs)
    return CompletionChoice(index=i, text=echo_text + s.text, logprobs=logprobs, finish_reason=finish_reason(s.finish),
                            stop_reason=s.stop if s.finish == "stop" else None, prompt_logprobs=prompt_lp)


class _Stream:
    """Turns a sampling worker's events into completion chunks (one choice per chunk, as vLLM)."""

    def __init__(self, body: CompletionRequest, prompt_ids: list[int], echo_text: str, write: TokenWriter):
        self.body, self.prompt_ids, self.echo_text, self.write = body, prompt_ids, echo_text, write
        self.id, self.created = new_id("cmpl"), now()
        self.offsets = [0] * body.n  # text offset of each choice's next token
        self.tokens = 0
        self.cached = 0

    def handlers(self):
        return self.on_event, self.on_end

    def _chunk(self, **choice) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.body.model,
                               choices=[CompletionChoice(**choice)])

    def _logprobs(self, i: int, ids, lps, tops):
        lp = completion_logprobs(self.write, ids, lps, tops, self.body.logprobs, self.offsets[i])
        if lp.tokens:
            self.offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1])
        return lp

    def on_event(self, event):
        body = self.body
        if isinstance(event, PromptInfo):
            self.cached = event.cached_tokens
            if not body.echo and body.prompt_logprobs is None:
                return
            plp = None
            if body.prompt_logprobs is not None:
                plp = prompt_logprobs_json(self.write, self.prompt_ids, event.prompt_logprobs, body.prompt_logprobs)
            for i in range(body.n):
                lp = None
                if body.echo and body.logprobs is not None:
                    lp = self._logprobs(i, self.prompt_ids, *_prompt_part(event.prompt_logprobs, body.logprobs))
                yield self._chunk(index=i, text=self.echo_text, logprobs=lp, prompt_logprobs=plp)
            return
        for d in event:
            d: Delta
            self.tokens += len(d.token_ids)
            if not d.text and d.finish is None and body.logprobs is None:
                continue  # held back (a possible stop string) and nothing else to say
            lp = self._logprobs(d.index, d.token_ids, d.logprobs, d.top) if body.logprobs is not None else None
            yield self._chunk(index=d.index, text=d.text, logprobs=lp,
                              finish_reason=finish_reason(d.finish) if d.finish else None,
                              stop_reason=d.stop if d.finish == "stop" else None)

    def on_end(self, result: SampleResult):
        if self.body.include_usage:
            yield CompletionChunk(id=self.id, created=self.created, model=self.body.model, choices=[],
                                  usage=usage(result.prompt_tokens, self.tokens, result.cached_tokens))
