"""A running generation batch: requests join and leave between decode steps (continuous batching).

    batch = GenerationBatch(engine)
    request = batch.add(seqs, params, max_new_tokens, stop)   # PoolExhausted if the pool can never hold it
    while not request.done:
        batch.step()                                          # one forward + one sampled token per active sequence
    request.completions                                       # one Completion per sequence

Every drawn token's confidence (DeepConf's: minus the mean of the top-k logprobs, `token_confidence`) is
recorded beside its logprob, from the same logits. A request may carry a `ConfidenceStop`: a sequence whose
last window of confidences falls below its threshold ends with finish_reason "stopped" and its KV is
released in that step, so the blocks are free for the rest of the batch at once.

`Engine.generate` is one request in its own batch. `ttc.decoder.concurrent.ConcurrentEngine` keeps one
batch for several threads, so requests of different problems share each decode step's forward.

Admission is by worst case: a request is admitted only if every sequence of every admitted request can
grow to its token limit in the blocks the pool has free, so a running batch never runs out of KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import PoolExhausted, blocks_needed
from .sampling import SamplingParams, sample, token_confidence
from .sequence import Completion, ConfidenceStop


@dataclass(eq=False)
class Request:
    """One generate() call: its sequences advance together with every other admitted request's."""

    seqs: list
    params: list[SamplingParams]
    limits: list[int]
    stop: list[str]
    ignore_eos: bool = False
    tail_tokens: int = 0  # tokens whose text is searched for a stop string (a stop of m chars spans <= m)
    new: list[list[int]] = field(default_factory=list)  # per sequence: sampled token ids
    logprobs: list[list[float]] = field(default_factory=list)
    confidences: list[list[float]] = field(default_factory=list)  # per sequence: each sampled token's confidence
    stop_when: ConfidenceStop | None = None
    finish: list[tuple[str, str | None]] = field(default_factory=list)  # per sequence: (reason, stop hit)
    active: list[int] = field(default_factory=list)  # indices of sequences still generating
    shared_tokens: int | None = None  # new tokens all of its sequences may draw together (None: only their limits)
    completions: list | None = None  # set when done
    error: BaseException | None = None  # set if the batch failed while this request was in it

    @property
    def done(self) -> bool:
        return self.completions is not None or self.error is not None


def stacked_logits(seqs) -> torch.Tensor:
    """The sequences' logits rows as one (B, V) tensor: a view of the forward's own (T, V) output when the rows lie
    one after another in its storage in this order (every plain decode step), else a stacked copy. Why: at 64
    rows the copy is 12.6 MB a step (~1.2 ms here); the sampler and the confidence only read it. (Storage, not
    `_base`: under inference mode a row carries no `_base`.)"""
    rows = [s.logits for s in seqs]
    first = rows[0]
    if first.dim() == 1 and first.stride(0) == 1:
        # one storage (each row lies inside it, so the view does too), rows back to back in order
        row_bytes = first.shape[0] * first.element_size()
        storage = first.untyped_storage().data_ptr()
        if all(r.dtype == first.dtype and r.shape == first.shape and r.stride(0) == 1
               and r.untyped_storage().data_ptr() == storage
               and r.data_ptr() == first.data_ptr() + i * row_bytes for i, r in enumerate(rows)):
            return first.as_strided((len(rows), first.shape[0]), (first.shape[0], 1))
    return torch.stack(rows)


class GenerationBatch:
    def __init__(self, engine):
        self.engine = engine
        self.requests: list[Request] = []

    # -- admission -------------------------------------------------------------------------------

    def _blocks_to_finish(self, seqs, limits) -> int:
        """Blocks these sequences may still need to reach their limits (beyond what they hold)."""
        bs, max_pos = self.engine.pool.block_size, self.engine.cfg.max_position
        return sum(max(0, blocks_needed(min(len(s.token_ids) + m, max_pos), bs) - len(s.kv.blocks))
                   for s, m in zip(seqs, limits))

    def outstanding_blocks(self) -> int:
        """Worst-case blocks the admitted requests may still take."""
        total = 0
        for r in self.requests:
            left = [max(0, r.limits[i] - len(r.new[i])) for i in r.active]
            total += self._blocks_to_finish([r.seqs[i] for i in r.active], left)
        return total

    def request(self, seqs, params: SamplingParams | list[SamplingParams], max_new_tokens: int | list[int],
                stop=None, ignore_eos: bool = False, stop_when: ConfidenceStop | None = None,
                shared_tokens: int | None = None) -> Request:
        params = params if isinstance(params, list) else [params] * len(seqs)
        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(seqs)
        n = len(seqs)
        stop = [s for s in (stop or []) if s]
        return Request(list(seqs), params, list(limits), stop, ignore_eos, max((len(s) for s in stop), default=0) + 2,
                       [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)], stop_when,
                       [("length", None)] * n, [i for i in range(n) if limits[i] > 0], shared_tokens)

    def fits(self, request: Request) -> bool:
        """Whether the request can be admitted now without risking the pool (worst case)."""
        need = self._blocks_to_finish(request.seqs, request.limits) + self.outstanding_blocks()
        return need <= self.engine.free_blocks()

    def check_alone(self, request: Request) -> None:
        """Raise PoolExhausted if the request could not fit even in an otherwise idle pool."""
        need = self._blocks_to_finish(request.seqs, request.limits)
        free = self.engine.free_blocks()
        if need > free:
            pool = self.engine.pool
            raise PoolExhausted(need, free, pool.num_blocks, pool.block_size)

    def admit(self, request: Request) -> None:
        if not request.active:
            self._complete(request)
        else:
            self.requests.append(request)

    def add(self, seqs, params, max_new_tokens, stop=None, ignore_eos: bool = False,
            stop_when: ConfidenceStop | None = None, shared_tokens: int | None = None) -> Request:
        """request + check + admit, for a single caller (Engine.generate)."""
        request = self.request(seqs, params, max_new_tokens, stop, ignore_eos, stop_when, shared_tokens)
        self.check_alone(request)
        self.admit(request)
        return request

    # -- stepping --------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """One forward (for sequences without logits) and one sampled token for every active sequence;
        returns the requests that finished. On an error every request in the batch fails with it."""
        if not self.requests:
            return []
        try:
            return self._step()
        except BaseException as e:
            failed, self.requests = self.requests, []
            for r in failed:
                r.error = e
            raise

    def _end_shared(self) -> list[Request]:
        """Requests whose shared token pool cannot give every active sequence one more token: the sequences
        beyond what is left (the last ones) end here, with "length"; returns the requests that finished so.
        A sequence that ended early (EOS, a stop string) left its unspent tokens to the others."""
        for r in self.requests:
            if r.shared_tokens is not None:
                left = r.shared_tokens - sum(len(new) for new in r.new)
                if left < len(r.active):
                    r.active = r.active[:max(0, left)]
        finished = [r for r in self.requests if not r.active]
        for r in finished:
            self._complete(r)
        self.requests = [r for r in self.requests if r.active]
        return finished

    def _step(self) -> list[Request]:
        ended = self._end_shared()
        if not self.requests:
            return ended
        engine = self.engine
        slots = [(r, i) for r in self.requests for i in r.active]
        batch = [r.seqs[i] for r, i in slots]
        todo = [s for s in batch if s.logits is None]
        computed = engine.forward(todo)
        # where every row was computed now (most steps), the forward's own (B, V) logits, rows in batch order
        logits = (computed if computed is not None and len(todo) == len(batch) == computed.shape[0]
                  else stacked_logits(batch))
        batch_params = [r.params[i] for r, i in slots]
        uniforms = [s.rng.uniform() if p.temperature > 0 else 0.0 for s, p in zip(batch, batch_params)]
        lse = torch.logsumexp(logits, dim=-1)  # (B,): the logprobs' and the confidences' normalizer, computed once
        with engine.on_device():  # the sampling kernel launches on the engine's GPU
            tokens, logprobs = sample(logits, batch_params, uniforms, lse)
        confidences = token_confidence(logits, engine.confidence_k, lse)  # read-only: the draw above is untouched
        # one read back to the host for the step (on a GPU each read waits for the device): float64 holds the
        # token ids exactly and the float32 logprobs and confidences unchanged
        drawn = torch.stack([tokens.double(), logprobs.double(), confidences.double()]).tolist()
        still: dict[int, list[int]] = {id(r): [] for r in self.requests}
        for (r, i), s, t, lp, c in zip(slots, batch, *drawn):
            t = int(t)
            s.token_ids.append(t)
            s.logits = None
            s.ledger.charge_generated(1)
            r.new[i].append(t)
            r.logprobs[i].append(lp)
            r.confidences[i].append(c)
            if not r.ignore_eos and t in engine.eos_ids:
                r.finish[i] = ("eos", None)
                continue
            if r.stop:
                tail = engine.tokenizer.decode(r.new[i][-r.tail_tokens:])
                hit = next((x for x in r.stop if x in tail), None)
                if hit is not None:
                    r.finish[i] = ("stop", hit)
                    continue
            if r.stop_when is not None and r.stop_when.stops(r.confidences[i]):
                r.finish[i] = ("stopped", None)
                engine.release([s])  # its KV goes back to the pool now, not when its caller releases it
                continue
            if len(r.new[i]) >= r.limits[i] or len(s.token_ids) >= engine.cfg.max_position:
                continue
            still[id(r)].append(i)
        finished = []
        for r in self.requests:
            r.active = still[id(r)]
            if not r.active:
                self._complete(r)
                finished.append(r)
        self.requests = [r for r in self.requests if r.active]
        return ended + finished

    def _complete(self, r: Request) -> None:
        out = []
        for ids, lp, conf, (reason, hit) in zip(r.new, r.logprobs, r.confidences, r.finish):
            text = self.engine.tokenizer.decode(ids[:-1] if reason == "eos" else ids)  # the EOS token is not text
            if hit is not None:
                text = text[: text.find(hit)]
            out.append(Completion(tuple(ids), text, tuple(lp), reason, hit, tuple(conf)))
        r.completions = out
