"""Generation in chunks: a server request can stream and be cancelled between them, and still draws
exactly the tokens one `engine.generate` call would.

    outs = chunked_generate(engine, seqs, params, max_new_tokens, stop, ignore_eos, chunk=16,
                            between=lambda progress: ...)   # raise in `between` to stop early

Why it is exact: a sequence's tokens depend only on its own random stream and logits, which persist on
the Sequence across calls (the last sampled token stays pending and is computed by the next call's
first step). What a second call changes is the stop-string search: the engine looks for a stop
string in the text of a request's last `tail` sampled tokens (tail = longest stop + 2), and a new call
starts with an empty window. So the first tail - 1 steps of every chunk after the first are checked
again here on the window one call would have seen; a stop found there ends the sequence at that step
(the tokens drawn after it by the engine are dropped: they count in the ledger, not in the output).

Why chunks and not one call: `ConcurrentEngine.generate` returns when every sequence of the request is
done and offers no per-request cancel; a chunk boundary is where a client that left is noticed
(its KV is released at once) and where tokens are streamed. The price is one decode step per chunk
in which the request sits out while it re-queues. A per-step callback on the engine would remove it
(see the server's report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ttc.decoder.sampling import SamplingParams
from ttc.decoder.sequence import Completion

__all__ = ["chunked_generate", "Progress"]


@dataclass
class Progress:
    """One sequence's state after a chunk: every token so far, and how it ended (None: still going)."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    new: int = 0  # tokens added by the last chunk (the last `new` of token_ids)
    finish: str | None = None  # "eos", "stop" or "length" once done
    stop: str | None = None  # the stop string that ended it


def _stop_at(tokenizer, ids: list[int], j: int, stop: list[str], tail: int) -> str | None:
    """The stop string the engine would find after sampling token j (its window: the last `tail` tokens)."""
    window = tokenizer.decode(ids[max(0, j + 1 - tail): j + 1])
    return next((s for s in stop if s in window), None)


def completion_of(tokenizer, p: Progress) -> Completion:
    """The Completion one engine.generate call would have returned (same text rule as GenerationBatch)."""
    ids = p.token_ids
    text = tokenizer.decode(ids[:-1] if p.finish == "eos" else ids)  # the EOS token is not text
    if p.stop is not None and p.stop in text:
        text = text[: text.find(p.stop)]
    return Completion(tuple(ids), text, tuple(p.logprobs), p.finish or "length", p.stop)


def chunked_generate(engine, seqs, params: SamplingParams | list[SamplingParams], max_new_tokens: int | list[int],
                     stop: list[str] | tuple[str, ...] | None = None, ignore_eos: bool = False, chunk: int = 16,
                     between: Callable[[list[Progress]], None] | None = None) -> list[Completion]:
    """`engine.generate(seqs, params, max_new_tokens, stop, ignore_eos)`, `chunk` tokens per call.

    `between(progress)` runs after every chunk with the sequences that advanced (finished ones
    included, once); an exception raised there stops the generation and propagates."""
    n = len(seqs)
    params = params if isinstance(params, list) else [params] * n
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * n
    stop = [s for s in (stop or []) if s]
    tail = max((len(s) for s in stop), default=0) + 2
    tokenizer, max_pos = engine.tokenizer, engine.cfg.max_position
    state = [Progress(i) for i in range(n)]
    for p in state:
        if limits[p.index] <= 0:
            p.finish = "length"
    while True:
        active = [p for p in state if p.finish is None]
        if not active:
            break
        outs = engine.generate([seqs[p.index] for p in active], [params[p.index] for p in active],
                               [min(chunk, limits[p.index] - len(p.token_ids)) for p in active], stop=stop,
                               ignore_eos=ignore_eos)
        for p, out in zip(active, outs):
            start = len(p.token_ids)
            p.token_ids.extend(out.token_ids)
            p.logprobs.extend(out.logprobs)
            finish, hit = out.finish_reason, out.stop
            if stop and start > 0:
                # windows that reach back into the previous chunk: the engine saw only part of them
                last = len(p.token_ids) - (1 if finish == "eos" else 0)  # no stop search after EOS
                for j in range(start, min(start + tail - 1, last)):
                    found = _stop_at(tokenizer, p.token_ids, j, stop, tail)
                    if found is not None:
                        del p.token_ids[j + 1:], p.logprobs[j + 1:]
                        finish, hit = "stop", found
                        break
            p.new = len(p.token_ids) - start
            if finish in ("eos", "stop"):
                p.finish, p.stop = finish, hit
            elif len(p.token_ids) >= limits[p.index] or len(seqs[p.index].token_ids) >= max_pos:
                p.finish = "length"
        if between is not None:
            between(active)
    return [completion_of(tokenizer, p) for p in state]
