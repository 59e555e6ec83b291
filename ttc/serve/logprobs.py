"""Logprobs in the API's three shapes: the completions API's parallel lists, chat's per-token objects,
and vLLM's `prompt_logprobs` (per prompt token: {token_id: {logprob, rank, decoded_token}}, first None).

A token is written as its own decoded text, or as "token_id:<id>" with `return_tokens_as_token_ids`
(vLLM's flag: exact ids for clients that re-tokenize nothing). An EOS that ended a sample is a token
like any other here (vLLM does the same), although it is not part of the text. -inf is written as
-9999.0, as OpenAI does.
"""

from __future__ import annotations

import math

from ttc.serve.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from ttc.serve.sampler import TopLogprobs

__all__ = ["TokenWriter", "completion_logprobs", "chat_logprobs", "prompt_logprobs_json"]


def _clamp(lp: float) -> float:
    return -9999.0 if math.isnan(lp) else max(lp, -9999.0)


class TokenWriter:
    def __init__(self, tokenizer, as_ids: bool):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def __call__(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.tokenizer.decode([token_id])


def completion_logprobs(write: TokenWriter, ids: list[int], lps: list[float | None],
                        tops: list[TopLogprobs | None] | None, k: int, offset: int = 0) -> CompletionLogprobs:
    """The completions API's logprobs: every token, its logprob, its top k (plus itself, as OpenAI and
    vLLM give k + 1 at most) and its text offset. A None logprob (the first prompt token) has no top."""
    tokens, token_lps, top_lps, offsets = [], [], [], []
    for i, (t, lp) in enumerate(zip(ids, lps)):
        text = write(t)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if lp is None:
            token_lps.append(None)
            top_lps.append(None)
            continue
        token_lps.append(_clamp(lp))
        top = {write(a): _clamp(b) for a, b in (tops[i] if tops else [])[:k]}
        top.setdefault(text, _clamp(lp))
        top_lps.append(top)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=top_lps, text_offset=offsets)


def chat_logprobs(write: TokenWriter, ids: list[int], lps: list[float], tops: list[TopLogprobs] | None,
                  k: int) -> ChatLogprobs:
    def item(t: int, lp: float) -> dict:
        text = write(t)
        return {"token": text, "logprob": _clamp(lp), "bytes": list(text.encode("utf-8"))}

    content = [ChatTokenLogprob(**item(t, lp), top_logprobs=[TopLogprob(**item(a, b))
                                                             for a, b in (tops[i] if tops else [])[:k]])
               for i, (t, lp) in enumerate(zip(ids, lps))]
    return ChatLogprobs(content=content)


def prompt_logprobs_json(write: TokenWriter, prompt: list[int], entries, k: int) -> list[dict | None]:
    """vLLM's prompt_logprobs from the sampler's (logprob, rank, top) per prompt token: the top k and the
    prompt's own token."""
    out: list[dict | None] = []
    for t, entry in zip(prompt, entries):
        if entry is None:
            out.append(None)
            continue
        lp, rank, top = entry
        d = {a: {"logprob": _clamp(b), "rank": r + 1, "decoded_token": write(a)} for r, (a, b) in enumerate(top[:k])}
        d.setdefault(t, {"logprob": _clamp(lp), "rank": rank, "decoded_token": write(t)})
        out.append(d)
    return out
