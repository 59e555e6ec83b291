"""A plain (no search) completion request on the engine, run in a worker thread.

    result = run_sampling(view, job, emit=None)    # view: a RequestEngine; emit(list[Delta]) streams

It is `Model.generate` with the server's seed rule, step by step: the prompt gets a sequence (the
radix prefix cache serves what it has seen: `cached_tokens`), one forward computes the rest, the
parent is forked into n children with their seeds, the children are generated (in chunks, see
`ttc.serve.chunked`), and everything is released (by the RequestEngine) when the request ends.

Seeds: with n == 1 the sample is drawn with `seed` itself, with n > 1 sample i uses
`child_seed(seed, i)`, as `Model.generate` does. So a client holding the parent of a prompt can
reproduce a local `engine.fork(parent, 1, seeds=[s])` + `engine.generate` token for token, and an
n > 1 request equals `Model.generate(prompt, n, seed=seed)`.

Logprobs: each sampled token's logprob is the engine's (temperature 1, before any filtering, as
vLLM's default "raw" logprobs). The engine does not keep each step's whole distribution, so top-k
alternatives are recovered by replaying the sampled tokens on a scratch fork of the prompt (one
fork per sample, fed a chunk at a time with all-logits forwards): charged to the request's ledger as
verifier tokens, since it is work the sampling itself did not need. Prompt logprobs (vLLM's
`prompt_logprobs`, or `echo` with logprobs) replay the prompt the same way on a fresh sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ttc.budget import Ledger
from ttc.decoder.cache import blocks_needed
from ttc.decoder.sampling import SamplingParams, child_seed
from ttc.serve.chunked import Progress, completion_of

__all__ = ["SampleJob", "Sample", "SampleResult", "Delta", "PromptInfo", "run_sampling", "sample_seeds",
           "kv_blocks_needed", "TopLogprobs"]

REPLAY_SLICE = 64  # tokens per all-logits forward when replaying (bounds the (tokens, vocab) logits tensor)
TopLogprobs = list[tuple[int, float]]  # (token id, logprob), best first


def sample_seeds(seed: int, n: int) -> list[int]:
    """The server's seed rule: the seed itself for one sample, child seeds (as Model.generate) for several."""
    return [seed] if n == 1 else [child_seed(seed, i) for i in range(n)]


@dataclass(frozen=True)
class SampleJob:
    prompt_ids: tuple[int, ...]
    n: int
    seed: int
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    include_stop: bool = False  # keep the matched stop string at the end of the text (vLLM's flag)
    top_logprobs: int = 0  # alternatives per sampled token (0: only the sampled token's own logprob)
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob and its top k
    skip_draws: int = 0  # uniforms each sample's stream skips first (ttc_skip_draws)


@dataclass
class Sample:
    token_ids: list[int]  # every sampled token, the EOS or the token that completed a stop string included
    logprobs: list[float]
    text: str
    finish: str  # "eos", "stop" or "length" (the engine's words; the API maps eos -> "stop")
    stop: str | None
    top: list[TopLogprobs] | None = None


@dataclass
class SampleResult:
    samples: list[Sample]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served by the prefix cache
    ledger: Ledger
    prompt_logprobs: list[tuple[float, int, TopLogprobs] | None] | None = None  # (logprob, rank, top); first None


@dataclass
class PromptInfo:
    """The first streamed event: what the prompt cost and, if asked, its logprobs."""

    cached_tokens: int
    prompt_logprobs: list | None = None


@dataclass
class Delta:
    """What a streamed chunk adds to sample `index`."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top: list[TopLogprobs] | None = None
    finish: str | None = None
    stop: str | None = None


def kv_blocks_needed(block_size: int, max_position: int, prompt_tokens: int, n: int, max_tokens: int,
                     copies: int = 1, prompt_replay: bool = False) -> int:
    """Worst-case KV blocks of a request: the prompt, and `copies` x n samples grown to their limit
    (full prompt blocks are shared; copies=2 when top logprobs are replayed beside the samples)."""
    per_sample = blocks_needed(min(prompt_tokens + max_tokens, max_position), block_size) - prompt_tokens // block_size
    prompt = blocks_needed(prompt_tokens, block_size)
    return prompt * (2 if prompt_replay else 1) + copies * n * per_sample


class _Replay:
    """A scratch sequence fed given tokens to recover, for each, the distribution that predicted it."""

    def __init__(self, seq):
        self.seq, self.unfed = seq, []  # unfed: the last token given, fed with the next slice


def _replay(view, items: list[tuple[_Replay, list[int]]]) -> list[torch.Tensor]:
    """Per item, (len(ids), V) log-distributions: row i is the one ids[i] was drawn from. One batched
    all-logits forward feeds every replay the tokens before its ids (it lags one token behind)."""
    prev = [r.seq.logits[None] for r, _ in items]  # what predicted each item's first token
    fed = []
    for r, ids in items:
        feed = r.unfed + ids[:-1]
        if feed:
            view.extend(r.seq, feed, charge="verifier")
            fed.append(r)
    logits = iter(view.forward([r.seq for r in fed], all_logits=True, cache_prefix=False) or [])
    out = []
    for (r, ids), first in zip(items, prev):
        rows = torch.cat([first, next(logits)[0]]) if r in fed else first  # rows: unfed + ids
        r.unfed = ids[-1:]
        out.append(torch.log_softmax(rows[-len(ids):].float(), -1))
    return out


def _top(logprobs: torch.Tensor, k: int) -> list[TopLogprobs]:
    values, ids = logprobs.topk(k, dim=-1)
    return [list(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]


def _prompt_logprobs(view, prompt: list[int], k: int, ledger: Ledger):
    """Each prompt token's (logprob, rank, top k) given the tokens before it; None for the first."""
    seq = view.new_sequence(prompt[:1], ledger, charge="verifier")  # one token: nothing to reuse
    view.forward([seq])
    replay, out = _Replay(seq), [None]
    rest = prompt[1:]
    for i in range(0, len(rest), REPLAY_SLICE):
        ids = rest[i:i + REPLAY_SLICE]
        (lp,) = _replay(view, [(replay, ids)])
        own = lp.gather(1, torch.tensor(ids, device=lp.device)[:, None])[:, 0]
        ranks = (lp > own[:, None]).sum(-1) + 1
        tops = _top(lp, k) if k else [[] for _ in ids]
        out.extend(zip(own.tolist(), ranks.tolist(), tops))
    view.release([seq])
    return out


class _TextStream:
    """Streamed text of one sample: what is safe to send now, never more than the final text will hold.

    Held back: the last (longest stop - 1) characters, which may begin a stop string, and a trailing
    incomplete UTF-8 character (decoded as U+FFFD)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.sent = tokenizer, 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids).rstrip("\ufffd")
        safe = len(text) - self.hold
        if safe <= self.sent:
            return ""
        delta, self.sent = text[self.sent:safe], safe
        return delta

    def finish(self, final: str) -> str:
        delta, self.sent = final[self.sent:], len(final)
        return delta


def _final_text(sample_text: str, stop: str | None, include_stop: bool) -> str:
    return sample_text + stop if include_stop and stop is not None else sample_text


def run_sampling(view, job: SampleJob, emit: Callable[[list[Delta]], None] | None = None,
                 ledger: Ledger | None = None) -> SampleResult:
    """Run `job` on `view` (a RequestEngine); with `emit`, stream a Delta per sample and chunk."""
    ledger = ledger if ledger is not None else Ledger()
    prompt = list(job.prompt_ids)
    parent = view.new_sequence(prompt, ledger, seed=job.seed)
    cached = ledger.reused_tokens
    view.forward([parent])
    prompt_lp = _prompt_logprobs(view, prompt, job.prompt_logprobs, ledger) if job.prompt_logprobs is not None \
        else None
    if emit is not None:
        emit(PromptInfo(cached, prompt_lp))
    children = view.fork(parent, job.n, seeds=sample_seeds(job.seed, job.n))
    for child in children:  # continue a stream where a client's branch left it
        for _ in range(job.skip_draws):
            child.rng.uniform()
    replays = [_Replay(s) for s in view.fork(parent, job.n, seeds=[0] * job.n)] if job.top_logprobs else None
    tops: list[list[TopLogprobs]] = [[] for _ in range(job.n)]
    streams = [_TextStream(view.tokenizer, job.stop) for _ in range(job.n)]

    def on_chunk(progress: list[Progress]) -> None:
        new_tops = {}
        if replays is not None:
            advanced = [p for p in progress if p.new]
            lps = _replay(view, [(replays[p.index], p.token_ids[-p.new:]) for p in advanced])
            for p, lp in zip(advanced, lps):
                new_tops[p.index] = _top(lp, job.top_logprobs)
                tops[p.index].extend(new_tops[p.index])
        if emit is None:
            return
        deltas = []
        for p in progress:
            ids = p.token_ids[len(p.token_ids) - p.new:]
            if p.finish is None:
                text = streams[p.index].push(p.token_ids)
            else:
                final = completion_of(view.tokenizer, p)
                text = streams[p.index].finish(_final_text(final.text, final.stop, job.include_stop))
            deltas.append(Delta(p.index, text, ids, p.logprobs[len(p.logprobs) - p.new:],
                                new_tops.get(p.index), p.finish, p.stop))
        emit(deltas)

    view.on_chunk = on_chunk
    try:
        outs = view.generate(children, job.params, job.max_tokens, stop=list(job.stop), ignore_eos=job.ignore_eos)
    finally:
        view.on_chunk = None
    samples = [Sample(list(o.token_ids), list(o.logprobs), _final_text(o.text, o.stop, job.include_stop),
                      o.finish_reason, o.stop, tops[i] if replays is not None else None)
               for i, o in enumerate(outs)]
    return SampleResult(samples, len(prompt), cached, ledger, prompt_lp)
