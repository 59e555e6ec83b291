"""POST /v1/chat/completions: messages rendered with the model's chat template, then sampled (or
answered by a ttc strategy).

Rendering: `add_generation_prompt` (default true) opens the assistant's turn; vLLM's
`continue_final_message` instead leaves the last message, an assistant's, open so the model continues
it (the two are exclusive). Without `max_tokens` (or `max_completion_tokens`) a sample may run to the
end of the context, as in vLLM.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from ttc.serve import testtime
from ttc.serve.common import (check_ttc, finish_reason, run_plain, run_ttc, sample_job, sse, sse_chunks, start_plain,
                              usage)
from ttc.serve.errors import bad_request
from ttc.serve.logprobs import TokenWriter, chat_logprobs, prompt_logprobs_json
from ttc.serve.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                ChatMessageOut, ChatStreamChoice, DeltaMessage, new_id, now)
from ttc.serve.runtime import Runtime
from ttc.serve.sampler import PromptInfo, SampleResult

router = APIRouter()


def render(tokenizer, body: ChatCompletionRequest) -> list[int]:
    """The messages as token ids, by the model's own template (the same ids `Tokenizer.chat` gives)."""
    if not getattr(tokenizer.hf, "chat_template", None):
        raise bad_request("this model has no chat template; use /v1/completions with a text prompt")
    messages = [m.as_dict() for m in body.messages]
    if not body.continue_final_message:
        return tokenizer.chat(messages, add_generation_prompt=body.add_generation_prompt)
    if body.add_generation_prompt and "add_generation_prompt" in body.model_fields_set:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                          param="continue_final_message")
    if messages[-1]["role"] != "assistant":
        raise bad_request("continue_final_message needs the last message to be the assistant's",
                          param="continue_final_message")
    text = tokenizer.hf.apply_chat_template(messages, continue_final_message=True, add_generation_prompt=False,
                                            tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    runtime: Runtime = request.app.state.runtime
    runtime.check_model(body.model)
    prompt_ids = render(runtime.tokenizer, body)
    runtime.check_prompt(prompt_ids)
    if body.ttc is not None:
        check_ttc(body, body.logprobs)
        result, cached = await run_ttc(runtime, request, body, prompt_ids, body.token_limit)
        reason = "stop" if result.answer is not None else "length"
        info, use = testtime.summary(result), usage(len(prompt_ids), result.ledger.generated_tokens, cached)
        if body.stream:
            rid, created = new_id("chatcmpl"), now()

            def chunk(**kw):
                return ChatCompletionChunk(id=rid, created=created, model=body.model, **kw)

            return sse_chunks([chunk(choices=[ChatStreamChoice(index=0, delta=DeltaMessage(role="assistant",
                                                                                         content=""))]),
                               chunk(choices=[ChatStreamChoice(index=0, delta=DeltaMessage(content=result.text),
                                                               finish_reason=reason)],
                                     ttc=info, usage=use if body.include_usage else None)])
        return ChatCompletionResponse(model=body.model, usage=use, ttc=info, choices=[
            ChatChoice(index=0, message=ChatMessageOut(content=result.text), finish_reason=reason)])

    if body.top_logprobs and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    k = (body.top_logprobs or 0) if body.logprobs else 0
    max_tokens = body.token_limit or runtime.max_position - len(prompt_ids)
    job, blocks = sample_job(runtime, body, prompt_ids, max_tokens, top_logprobs=k,
                             prompt_logprobs=body.prompt_logprobs)
    write = TokenWriter(runtime.tokenizer, body.return_tokens_as_token_ids)
    if body.stream:
        running = await start_plain(runtime, request, job, blocks)
        return sse(request, running, *_Stream(body, prompt_ids, write, k).handlers())
    result = await run_plain(runtime, request, job, blocks)
    choices = [ChatChoice(index=i, message=ChatMessageOut(content=s.text),
                          logprobs=chat_logprobs(write, s.token_ids, s.logprobs, s.top, k) if body.logprobs else None,
                          finish_reason=finish_reason(s.finish), stop_reason=s.stop if s.finish == "stop" else None)
               for i, s in enumerate(result.samples)]
    plp = None
    if body.prompt_logprobs is not None:
        plp = prompt_logprobs_json(write, prompt_ids, result.prompt_logprobs, body.prompt_logprobs)
    return ChatCompletionResponse(model=body.model, choices=choices, prompt_logprobs=plp,
                                  usage=usage(result.prompt_tokens, sum(len(s.token_ids) for s in result.samples),
                                              result.cached_tokens))


class _Stream:
    """Turns a sampling worker's events into chat chunks: each choice opens with its role, then content."""

    def __init__(self, body: ChatCompletionRequest, prompt_ids: list[int], write: TokenWriter, k: int):
        self.body, self.prompt_ids, self.write, self.k = body, prompt_ids, write, k
        self.id, self.created = new_id("chatcmpl"), now()
        self.tokens = 0

    def handlers(self):
        return self.on_event, self.on_end

    def _chunk(self, choice: ChatStreamChoice, **kw) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.body.model, choices=[choice], **kw)

    def on_event(self, event):
        body = self.body
        if isinstance(event, PromptInfo):
            plp = None
            if body.prompt_logprobs is not None:
                plp = prompt_logprobs_json(self.write, self.prompt_ids, event.prompt_logprobs, body.prompt_logprobs)
            for i in range(body.n):
                yield self._chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")),
                                  prompt_logprobs=plp if i == 0 else None)
            return
        for d in event:
            self.tokens += len(d.token_ids)
            if not d.text and d.finish is None and not body.logprobs:
                continue
            lp = chat_logprobs(self.write, d.token_ids, d.logprobs, d.top, self.k) if body.logprobs else None
            yield self._chunk(ChatStreamChoice(index=d.index, delta=DeltaMessage(content=d.text), logprobs=lp,
                                               finish_reason=finish_reason(d.finish) if d.finish else None,
                                               stop_reason=d.stop if d.finish == "stop" else None))

    def on_end(self, result: SampleResult):
        if self.body.include_usage:
            yield ChatCompletionChunk(id=self.id, created=self.created, model=self.body.model, choices=[],
                                      usage=usage(result.prompt_tokens, self.tokens, result.cached_tokens))
