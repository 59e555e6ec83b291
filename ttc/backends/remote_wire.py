"""What goes over the wire to an OpenAI-compatible `/v1/completions` server, and what comes back.

Request bodies (`sample_body`, `score_body`) and the parsing of answers (`parse_sample`,
`parse_continuation`, `parse_usage`), as plain functions of the server's `ServerFeatures`; the
backend (ttc.backends.remote) owns the tokenizer, the ledger and the HTTP client.

Field names are OpenAI's, plus vLLM's extensions where `features.extensions` allows them
(`include_stop_str_in_output`, `return_tokens_as_token_ids`, `top_k`, `min_p`, `prompt_logprobs`,
`add_special_tokens`). vLLM's `stop_reason` tells a stop string (a str) from EOS (None); a server
without it only says "stop" for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ttc.backends.remote_http import RemoteError
from ttc.decoder.sampling import SamplingParams

__all__ = ["ServerFeatures", "RemoteHandle", "Sample", "Usage", "sample_body", "score_body", "parse_sample",
           "parse_continuation", "parse_usage", "token_ids_of", "top_confidences"]


@dataclass(frozen=True)
class ServerFeatures:
    """What the server accepts beyond the plain OpenAI completions API (the defaults suit vLLM and `ttc serve`).

    token_ids: the prompt may be a list of token ids (else the rendered text is sent).
    seeds: a per-request `seed` (false for vLLM on CPU, whose generator rejects per-request seeds).
    n: one request with `n` samples per parent instead of one n=1 request per child: fewer requests, but
        the children's seeds are the server's (sample i of seed s is `child_seed(s, i)` on `ttc serve`),
        not the local proposer's.
    extensions: vLLM's extra parameters (above); false for a server that rejects unknown fields.
    prompt_logprobs: how a continuation's logprobs are asked for: "prompt_logprobs" (vLLM's, one or two
        entries per prompt token), "echo" (OpenAI's echo + logprobs, for servers without vLLM's fields; the
        server then sends its top-k at every prompt position), or null where the server has neither (no
        LOGPROBS capability).
    top_logprobs: the top-k of the next-token distribution a verifier gets (vLLM allows 20 by default).
    cache_block: the granularity of the server's prefix cache, for the budget's estimate of the prompt
        tokens a request will make it compute (vLLM and `ttc serve` cache blocks of 16 tokens).
    skip_draws: the server takes `ttc_skip_draws` (`ttc serve`'s extension: a sample's random stream skips
        that many draws first), so completing a branch that has sampled already continues its own stream
        exactly; the handshake turns it on for a server whose /models says `owned_by: ttc`.
    confidence_k: ask for the top-k logprobs of every sampled token and record its confidence (DeepConf's:
        minus the mean of the k largest), the TOKEN_CONFIDENCE capability; 0 (the default): not asked, since
        `ttc serve` replays a sample to find its alternatives. The engine's own k is 20 (vLLM's default cap).
    """

    token_ids: bool = True
    seeds: bool = True
    n: bool = False
    extensions: bool = True
    prompt_logprobs: str | None = "prompt_logprobs"
    top_logprobs: int = 20
    cache_block: int = 16
    skip_draws: bool = False
    confidence_k: int = 0

    def __post_init__(self):
        if self.prompt_logprobs not in ("echo", "prompt_logprobs", None):
            raise ValueError(f"features.prompt_logprobs is echo, prompt_logprobs or null, not {self.prompt_logprobs!r}")
        if self.top_logprobs < 1 or self.cache_block < 1:
            raise ValueError("features.top_logprobs and features.cache_block must be at least 1")
        if self.confidence_k < 0:
            raise ValueError("features.confidence_k is a number of top logprobs, 0 to ask for none")


@dataclass(frozen=True)
class RemoteHandle:
    """A branch on a server: the token ids so far (prompt + every step), its random stream, and, for the
    budget's estimate, how much of it the server has been sent as a prompt. Not slotted: verifiers may
    hold weak references to handles."""

    token_ids: tuple[int, ...]
    stream_seed: int  # where the branch's own stream starts (the local engine: its Sequence's BranchRng seed)
    draws: int = 0  # tokens sampled at temperature > 0 on that stream so far
    sent: int = 0  # leading tokens the server has received as a prompt (its prefix cache may hold them)


@dataclass(frozen=True)
class Sample:
    """One choice of a completion, in the local engine's terms."""

    token_ids: tuple[int, ...]  # EOS included, as the local engine keeps it
    logprobs: tuple[float, ...]  # each token's logprob under the model (0.0 where the server gave none)
    text: str  # the server's text
    reason: str  # "step" (a stop string), "eos" or "length"
    stop: str | None  # the stop string that ended it
    retokenized: bool  # the server gave no token ids: they are its text, encoded here
    confidences: tuple[float, ...] = ()  # each token's confidence, with features.confidence_k; () without


@dataclass(frozen=True)
class Usage:
    prompt: int
    cached: int | None  # None: the server does not report its prefix cache
    completion: int
    reported: bool  # False: the server sent no usage; the counts are the client's


# -- requests --------------------------------------------------------------------------------------------

def _prompt(features: ServerFeatures, ids: Sequence[int], decode: Callable) -> dict:
    body = {"prompt": list(ids) if features.token_ids else decode(list(ids))}
    if features.extensions and not features.token_ids:
        body["add_special_tokens"] = False  # the rendered text already holds the template's special tokens
    return body


def sample_body(features: ServerFeatures, model: str, ids: Sequence[int], decode: Callable, max_tokens: int,
                params: SamplingParams, stop: Sequence[str], seed: int | None, n: int = 1, skip_draws: int = 0) -> dict:
    """A step (or to-the-end) request: the exact sampled token ids and their logprobs come back. `logprobs: 0`
    asks for each sampled token's own logprob and no alternatives (which `ttc serve` would replay to find);
    `logprobs: k` with features.confidence_k, for the tokens' confidences."""
    body = {"model": model, **_prompt(features, ids, decode), "max_tokens": max_tokens, "n": n,
            "temperature": params.temperature, "top_p": params.top_p, "logprobs": features.confidence_k}
    if stop:
        body["stop"] = list(stop)
    if features.seeds and seed is not None:
        body["seed"] = seed
    if skip_draws:
        body["ttc_skip_draws"] = skip_draws
    if features.extensions:
        body.update(include_stop_str_in_output=True, return_tokens_as_token_ids=True)
        body.update({k: v for k, v in (("top_k", params.top_k), ("min_p", params.min_p)) if v})
    elif params.top_k or params.min_p:
        raise RemoteError("top_k and min_p are vLLM extensions, which this server does not take "
                          "(features.extensions is false): set proposer.top_k=0 proposer.min_p=0")
    return body


def score_body(features: ServerFeatures, model: str, ids: Sequence[int], decode: Callable) -> dict:
    """Prompt logprobs of `ids`, and the top-k next-token logprobs after them (a one-token greedy completion)."""
    body = {"model": model, **_prompt(features, ids, decode), "max_tokens": 1, "temperature": 0.0,
            "logprobs": features.top_logprobs}
    if features.prompt_logprobs == "echo":
        body["echo"] = True
    else:
        body["prompt_logprobs"] = 1
    if features.extensions:
        body["return_tokens_as_token_ids"] = True
    return body


# -- answers ---------------------------------------------------------------------------------------------

def token_ids_of(tokens: Sequence) -> list[int] | None:
    """Ids from logprob tokens written as "token_id:N" (vLLM's return_tokens_as_token_ids); None otherwise."""
    out = []
    for t in tokens:
        if not isinstance(t, str) or not t.startswith("token_id:"):
            return None
        out.append(int(t[len("token_id:"):]))
    return out


def parse_usage(response: dict, prompt_len: int, completion_len: int) -> Usage:
    usage = response.get("usage")
    if not usage:
        return Usage(prompt_len, None, completion_len, reported=False)
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    completion = usage.get("completion_tokens")
    return Usage(prompt, None if cached is None else min(int(cached), prompt),
                 completion_len if completion is None else int(completion), reported=True)


def choices(response: dict, count: int, where: str) -> list[dict]:
    out = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(out) != count:
        raise RemoteError(f"asked {where} for {count} samples and got {len(out)}"
                          + (": the server ignores n (set model.features.n=false)" if count > 1 else ""))
    return out


def parse_sample(choice: dict, stop: Sequence[str], eos_ids: frozenset, eos_id: int | None,
                 encode: Callable[[str], list[int]], where: str, confidence_k: int = 0) -> Sample:
    """A choice as the local engine would report it: its token ids (EOS kept), their logprobs, and why it
    ended. Token ids come from the server's `token_ids` or its "token_id:N" logprob tokens; where it gives
    neither, its text (with the stop string, if the server cut it) is encoded again. With `confidence_k`, each
    token's confidence from its `top_logprobs`."""
    text, finish = choice.get("text") or "", choice.get("finish_reason")
    lp = choice.get("logprobs") or {}
    ids = choice.get("token_ids")
    if ids is None and lp.get("tokens") is not None:
        ids = token_ids_of(lp["tokens"])
    reason, hit = "length", None
    if finish == "stop":
        said = choice.get("stop_reason")  # vLLM, ttc serve: the stop string; a stop token id or None at EOS
        if isinstance(said, str):
            reason, hit = "step", said
        elif ids and ids[-1] in eos_ids:
            reason = "eos"
        elif "stop_reason" not in choice and any(s in text for s in stop):  # a server that does not say
            reason, hit = "step", next(s for s in stop if s in text)
        else:
            reason = "eos"
    elif finish != "length":
        raise RemoteError(f"{where} ended a sample with finish_reason {finish!r}")
    retokenized = ids is None
    if retokenized:
        ids = encode(text + (hit if hit is not None and hit not in text else ""))
    values = [float(v) if v is not None else 0.0 for v in (lp.get("token_logprobs") or [])]
    values = values if len(values) == len(ids) else [0.0] * len(ids)
    confidences = top_confidences(lp.get("top_logprobs"), len(ids), confidence_k, where) if confidence_k else []
    if reason == "eos" and (not ids or ids[-1] not in eos_ids):  # the server left EOS out; the engine keeps it
        said = choice.get("stop_reason")
        eos = said if isinstance(said, int) and not isinstance(said, bool) else eos_id
        if eos is not None:
            ids, values = list(ids) + [eos], values + [0.0]
            # no distribution came for it: it gets its predecessor's confidence (one token of a window)
            confidences = confidences + confidences[-1:] if confidence_k else []
    return Sample(tuple(ids), tuple(values), text, reason, hit, retokenized, tuple(confidences))


def top_confidences(tops: list | None, count: int, k: int, where: str) -> list[float]:
    """Each sampled token's confidence from the completions API's `top_logprobs` (one {token: logprob} per
    token; vLLM adds the sampled token to its top k when it is not among them, so the k largest are taken).
    -9999.0, OpenAI's -inf, is kept as it came: such a server's confidences are not the engine's."""
    if not tops or len(tops) != count or any(not t for t in tops):
        raise RemoteError(f"{where} returned top_logprobs for {sum(1 for t in tops or [] if t)} of {count} sampled "
                          "tokens; token confidences need every one (model.features.confidence_k): set it to 0 to "
                          "do without")
    out = []
    for top in tops:
        values = sorted((float(v["logprob"] if isinstance(v, dict) else v) for v in top.values()), reverse=True)[:k]
        out.append(-sum(values) / len(values))
    return out


def _top_ids(top: dict | None, encode: Callable[[str], list[int]]) -> tuple[list[tuple[int, float]], bool]:
    """(token id, logprob) of a top-logprobs dict keyed by "token_id:N" (or, failing that, by token text:
    kept where the text encodes to one token). The flag: some keys were text."""
    out, by_text = [], False
    for key, value in (top or {}).items():
        ids = token_ids_of([key])
        if ids is None:
            by_text, ids = True, encode(key)
            if len(ids) != 1:
                continue
        out.append((ids[0], float(value["logprob"] if isinstance(value, dict) else value)))
    return out, by_text


def parse_continuation(response: dict, features: ServerFeatures, ids: Sequence[int], encode: Callable[[str], list[int]],
                       where: str) -> tuple[list[float], list[tuple[int, float]], bool]:
    """(the logprobs of `ids`, the prompt's last tokens; the top-k (id, logprob) after them; whether some of
    those ids were read from token text)."""
    (choice,) = choices(response, 1, where)
    n = len(ids)
    lp = choice.get("logprobs") or {}
    if features.prompt_logprobs == "echo":
        values, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
        if len(values) < n + 1 or not tops or tops[-1] is None:
            raise RemoteError(f"{where} did not echo the prompt's logprobs (model.features.prompt_logprobs=echo): "
                              "try prompt_logprobs, or null to do without")
        given, top = values[-1 - n:-1], tops[-1]  # counted from the end: the one sampled token is last
    else:
        prompt, tops = choice.get("prompt_logprobs"), lp.get("top_logprobs") or []
        if not prompt or len(prompt) < n or not tops:
            raise RemoteError(f"{where} returned no prompt_logprobs (model.features.prompt_logprobs=prompt_logprobs): "
                              "try echo, or null to do without")
        given, top = [_entry_logprob(e, t) for e, t in zip(prompt[-n:], ids)], tops[0]
    if any(v is None for v in given):
        raise RemoteError(f"{where} gave no logprob for a continuation token")
    found, by_text = _top_ids(top, encode)
    return [float(v) for v in given], found, by_text


def _entry_logprob(entry, token: int) -> float | None:
    """The given token's logprob in one vLLM prompt_logprobs entry ({id: {"logprob", "rank", ...}}; JSON
    makes the ids strings)."""
    value = (entry or {}).get(str(token), (entry or {}).get(token))
    return None if value is None else float(value["logprob"] if isinstance(value, dict) else value)
