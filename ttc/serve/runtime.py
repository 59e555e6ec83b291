"""The server's one engine, its worker threads, and who may use them.

    runtime = Runtime(model, Settings(model_name="smollm2-135m"))
    result = await runtime.run(request, kv_blocks, work)          # work(view) runs in a worker thread
    running = await runtime.start(request, kv_blocks, work)       # the same, streaming: `async for` its events

Every request runs in a worker thread on one `ConcurrentEngine`, so the decode steps of all running
requests share batches. Before it runs, a request is admitted:
  - its worst-case KV (n samples grown to max_tokens, see `kv_blocks_needed`) must fit in a share of
    the pool (`kv_share`), else 400: one request cannot hold the whole cache;
  - it waits (first come, first served) until a worker is free and its worst case fits beside the
    running requests' reservations, so admitted requests never run out of KV;
  - at most `max_queue` requests wait; one more gets a 503 with Retry-After, as does any request
    once the server is draining (SIGTERM).
Admission state lives on the event loop (no locks); a worker gives its slot back when its thread ends,
not when its HTTP handler does, so a cancelled request holds its reservation until its KV is released.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import Request

from ttc.backends.local import SharedModel
from ttc.decoder.concurrent import ConcurrentEngine
from ttc.serve.errors import bad_request, not_found, overloaded
from ttc.serve.request_engine import ClientGone, RequestEngine
from ttc.serve.sampler import kv_blocks_needed

__all__ = ["Settings", "Runtime", "Running", "Admission"]

POLL_S = 0.1  # how often a waiting or running non-streaming request checks that its client is still there


@dataclass(frozen=True)
class Settings:
    model_name: str
    max_concurrency: int = 64  # worker threads: requests running at once (their decode steps are batched)
    max_queue: int = 256  # requests waiting for a worker or for KV; one more is refused with 503
    kv_share: float = 0.5  # the largest fraction of the KV pool one request may reserve
    chunk_tokens: int = 16  # tokens per generate call: the streaming and cancellation granularity
    max_logprobs: int = 20  # the largest top-k of logprobs / top_logprobs / prompt_logprobs
    max_n: int = 256
    retry_after_s: int = 1


class Admission:
    """Worker slots and KV reservations, first come first served; lives on the event loop."""

    def __init__(self, workers: int, max_queue: int, kv_blocks: int, retry_after_s: int = 1):
        self.workers, self.max_queue, self.kv_blocks, self.retry_after_s = workers, max_queue, kv_blocks, retry_after_s
        self.running = 0
        self.reserved = 0
        self.waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        self.draining = False

    def _fits(self, blocks: int) -> bool:
        return self.running < self.workers and self.reserved + blocks <= self.kv_blocks

    def _take(self, blocks: int) -> None:
        self.running += 1
        self.reserved += blocks

    async def enter(self, blocks: int, client_gone: Callable[[], Any]) -> None:
        if self.draining:
            raise overloaded("the server is shutting down", self.retry_after_s)
        if not self.waiting and self._fits(blocks):
            self._take(blocks)
            return
        if len(self.waiting) >= self.max_queue:
            raise overloaded(f"the server is busy: {self.running} requests running and {len(self.waiting)} "
                             "waiting; retry later", self.retry_after_s)
        ticket = asyncio.get_running_loop().create_future()
        entry = (blocks, ticket)
        self.waiting.append(entry)
        try:
            while not ticket.done():
                await asyncio.wait([ticket], timeout=POLL_S)
                if not ticket.done() and await client_gone():
                    raise ClientGone("the client disconnected while waiting")
        except BaseException:
            if ticket.done() and not ticket.cancelled() and ticket.exception() is None:
                self.leave(blocks)  # admitted just as it gave up
            elif entry in self.waiting:
                self.waiting.remove(entry)
                ticket.cancel()
            raise
        ticket.result()  # a drain fails the waiting with 503

    def leave(self, blocks: int) -> None:
        self.running -= 1
        self.reserved -= blocks
        while self.waiting and self._fits(self.waiting[0][0]):
            blocks, ticket = self.waiting.popleft()
            self._take(blocks)
            ticket.set_result(None)

    def drain(self) -> None:
        """Refuse new requests and fail the waiting ones with 503 (running ones finish)."""
        self.draining = True
        while self.waiting:
            _, ticket = self.waiting.popleft()
            ticket.set_exception(overloaded("the server is shutting down", self.retry_after_s))


@dataclass(frozen=True)
class _Done:
    result: Any
    error: BaseException | None


class Running:
    """A request admitted and running in a worker: its events (streaming), its cancel flag, its future."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cancel: threading.Event):
        self.loop, self.cancel = loop, cancel
        self.events: asyncio.Queue = asyncio.Queue()
        self.future: Future | None = None
        self.result: Any = None

    def emit(self, item) -> None:
        """From the worker thread: hand an event to the handler (in order)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    async def stream(self, request: Request):
        """The worker's events until it ends (then `self.result` is set, or its error raised); a client
        that disconnects meanwhile raises ClientGone (the caller sets `cancel`)."""
        while True:
            try:
                item = await asyncio.wait_for(self.events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone("the client disconnected") from None
                continue
            if isinstance(item, _Done):
                if item.error is not None:
                    raise item.error
                self.result = item.result
                return
            yield item


class Runtime:
    def __init__(self, model, settings: Settings):
        self.model, self.settings = model, settings
        self.engine = ConcurrentEngine(model.engine)
        self.tokenizer = model.tokenizer
        self.max_position = model.config.max_position
        pool = model.engine.pool
        self.block_size, self.kv_blocks = pool.block_size, pool.num_blocks
        self.admission = Admission(settings.max_concurrency, settings.max_queue, pool.num_blocks,
                                   settings.retry_after_s)
        self.executor = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="ttc-serve")
        self.served = 0  # requests whose work ended (finished, failed or cancelled)
        self.cancelled = 0  # ... of which cancelled because their client left

    # -- checks at the edge ----------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise not_found(f"The model `{name}` does not exist; this server serves `{self.settings.model_name}`.")

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise bad_request("the prompt is empty", param="prompt")
        if len(prompt_ids) >= self.max_position:
            raise bad_request(f"This model's maximum context length is {self.max_position} tokens, but the prompt "
                              f"has {len(prompt_ids)}: shorten it to at most {self.max_position - 1}.", param="prompt")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")

    def kv_blocks_for(self, prompt_tokens: int, n: int, max_tokens: int, copies: int = 1,
                      prompt_replay: bool = False, reject: bool = True) -> int:
        """A request's worst-case KV blocks; over the per-request share: 400 (reject) or capped to it."""
        need = kv_blocks_needed(self.block_size, self.max_position, prompt_tokens, n, max_tokens, copies,
                                prompt_replay)
        share = max(1, int(min(1.0, self.settings.kv_share) * self.kv_blocks))
        if need > share:
            if not reject:
                return share
            bs = self.block_size
            raise bad_request(f"this request may need {need * bs} tokens of KV cache (n={n} samples of up to "
                              f"{prompt_tokens} + {max_tokens} tokens), more than the {share * bs} one request may "
                              "hold; lower n or max_tokens", param="max_tokens")
        return need

    # -- running work ----------------------------------------------------------------------------

    def _submit(self, work: Callable[[RequestEngine, Callable], Any], blocks: int, running: Running) -> None:
        view = RequestEngine(self.engine, running.cancel, self.settings.chunk_tokens)

        def call():
            result, error = None, None
            try:
                result = work(view, running.emit)
            except BaseException as e:
                error = e
            finally:
                # KV back and the slot freed before the handler hears that the work ended
                view.release_all()
                running.loop.call_soon_threadsafe(self._ended, blocks, error)
                running.emit(_Done(result, error))
            if error is not None:
                raise error
            return result

        running.future = self.executor.submit(call)

    def _ended(self, blocks: int, error: BaseException | None) -> None:
        self.admission.leave(blocks)
        self.served += 1
        if isinstance(error, ClientGone):
            self.cancelled += 1

    async def start(self, request: Request, blocks: int, work: Callable[[RequestEngine, Callable], Any]) -> Running:
        """Admit (waiting in the queue if need be) and start `work(view, emit)` in a worker thread."""
        await self.admission.enter(blocks, request.is_disconnected)
        running = Running(asyncio.get_running_loop(), threading.Event())
        self._submit(work, blocks, running)
        return running

    async def run(self, request: Request, blocks: int, work: Callable[[RequestEngine, Callable], Any]):
        """`start`, then wait for the result; a client that disconnects cancels the work (its KV is released)."""
        running = await self.start(request, blocks, work)
        waiter = asyncio.wrap_future(running.future)
        try:
            while True:
                done, _ = await asyncio.wait([waiter], timeout=POLL_S)
                if done:
                    return waiter.result()
                if await request.is_disconnected():
                    running.cancel.set()
                    raise ClientGone("the client disconnected")
        except BaseException:
            running.cancel.set()  # a cancelled handler (server shutdown, client gone) stops the work
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits its end now
            raise

    def stats(self) -> dict:
        a = self.admission
        pool, prefix = self.model.engine.pool, self.model.engine.prefix
        return {"running": a.running, "waiting": len(a.waiting), "served": self.served, "cancelled": self.cancelled,
                "reserved_kv_blocks": a.reserved,
                "kv_blocks": pool.num_blocks, "free_kv_blocks": pool.num_free,
                "cached_kv_blocks": prefix.num_cached_blocks if prefix is not None else 0}

    def shared_model(self, view: RequestEngine) -> SharedModel:
        """The model as a strategy's proposer and verifiers see it: every engine call through `view`."""
        return SharedModel(self.model, view)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
