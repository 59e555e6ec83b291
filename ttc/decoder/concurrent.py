"""Several threads on one engine: each solves its own problem, and their generate() calls share decode steps.

    shared = ConcurrentEngine(model.engine)
    # in each worker thread: LocalProposer(ttc.backends.local.SharedModel(model, shared), ...) and a strategy, as usual

Why: a strategy is plain sequential code (propose, score, select), and one problem alone keeps few
sequences in flight (greedy: one), which leaves a CPU or GPU mostly idle; batching the sequences of
several problems in one forward is where a decoder's throughput comes from (one stream: ~20 tok/s here,
64 streams: ~470 tok/s). Threads keep the strategies unchanged: the engine work is torch ops, which
release the GIL.

How:
  - Every engine method except generate runs under one lock (the engine is not thread-safe).
  - generate() queues a request; whichever waiting thread finds no one stepping becomes the stepper:
    it admits queued requests into one running GenerationBatch (by worst-case KV need; the rest wait
    for room), runs decode steps, and hands finished completions back. When its own request is done
    it stops, and another waiting thread takes over. Between steps it lets other threads' engine
    calls (prefills, forks, scores) in, so their next requests join the batch early.
  - cancel() fails every waiting and future request with Cancelled (Ctrl-C in the eval runner).

Results do not depend on which problems share a batch: each sequence draws from its own random
stream, and its logits are its own. (In bfloat16, a matrix product's rounding can depend on the batch
shape, so near-ties may break differently from a run alone; float32 runs match, see the tests, and
`model.batch_invariant=true` makes bfloat16 runs match too: tests/test_batch_invariance.py.)
Ledgers stay per problem. Two differences from one problem at a time: a prompt prefix that problems
share is computed by whichever prefills first and counted as reused by the others (the sum of the two
is the same), and `peak_kv_bytes` is the pool's peak while the problem ran, other problems included.
"""

from __future__ import annotations

import contextlib
import threading

from .batch import GenerationBatch, Request

__all__ = ["ConcurrentEngine", "Cancelled"]


class Cancelled(RuntimeError):
    """The concurrent engine was cancelled (an interrupted run): the request was not completed."""


class ConcurrentEngine:
    def __init__(self, engine):
        self.engine = engine
        self._engine_lock = threading.RLock()  # held for every engine operation, stepping included
        self._state = threading.Condition()  # guards the fields below
        self._queue: list[Request] = []
        self._batch = GenerationBatch(engine)
        self._stepping = False
        self._waiting_for_engine = 0  # threads wanting the engine lock for a non-generate call
        self._cancelled: BaseException | None = None

    # -- everything but generate: one at a time --------------------------------------------------

    def __getattr__(self, name):
        attr = getattr(self.engine, name)
        if not callable(attr):
            return attr

        def locked(*args, **kwargs):
            with self._state:
                self._waiting_for_engine += 1
            try:
                with self._engine_lock:
                    return attr(*args, **kwargs)
            finally:
                with self._state:
                    self._waiting_for_engine -= 1
                    self._state.notify_all()

        return locked

    @contextlib.contextmanager
    def exclusive(self):
        """The wrapped engine to the caller alone inside the block: every other thread's engine call and decode
        step waits until it ends (a whole `Model.generate` of its own, say)."""
        with self._state:
            self._waiting_for_engine += 1
        try:
            with self._engine_lock:
                yield self.engine
        finally:
            with self._state:
                self._waiting_for_engine -= 1
                self._state.notify_all()

    # -- generate: shared decode steps ------------------------------------------------------------

    def generate(self, seqs, params, max_new_tokens, stop=None, ignore_eos: bool = False, stop_when=None,
                 shared_tokens: int | None = None):
        request = self._batch.request(seqs, params, max_new_tokens, stop, ignore_eos, stop_when, shared_tokens)
        with self._state:
            if self._cancelled is not None:
                raise Cancelled("the engine was cancelled") from self._cancelled
            self._queue.append(request)
            self._state.notify_all()
            while not request.done:
                if self._stepping:
                    self._state.wait()
                    continue
                self._stepping = True
                try:
                    self._step_until(request)
                finally:
                    self._stepping = False
                    self._state.notify_all()
        if request.error is not None:
            if isinstance(request.error, Cancelled):
                raise Cancelled("the engine was cancelled") from request.error
            raise request.error
        return request.completions

    def _step_until(self, mine: Request) -> None:
        """As the stepper (holding self._state): admit and step until `mine` is done."""
        while not mine.done:
            if self._cancelled is not None:
                self._fail_all(Cancelled("cancelled"))
                return
            # let other threads' engine calls in first: their next generate() joins this step
            self._state.wait_for(lambda: self._waiting_for_engine == 0, timeout=0.05)
            with self._engine_lock:
                self._admit()
                self._state.release()  # others may queue requests while the step runs
                try:
                    self._batch.step()
                except BaseException:
                    pass  # every request in the batch now holds the error, raised in its own thread
                finally:
                    self._state.acquire()
            self._state.notify_all()  # finished requests, and any that failed admission

    def _admit(self) -> None:
        """Move queued requests into the batch in arrival order while they fit (worst case). A request
        that does not fit an empty batch fails with PoolExhausted, as Engine.generate would."""
        while self._queue:
            request = self._queue[0]
            if self._batch.requests and not self._batch.fits(request):
                return
            self._queue.pop(0)
            if not self._batch.requests:
                try:
                    self._batch.check_alone(request)
                except Exception as e:
                    request.error = e
                    continue
            self._batch.admit(request)

    def _fail_all(self, error: BaseException) -> None:
        for r in self._queue + self._batch.requests:
            r.error = error
        self._queue.clear()
        self._batch.requests.clear()
        self._state.notify_all()

    def cancel(self, reason: BaseException | None = None) -> None:
        """Fail every waiting request and every later generate() with Cancelled (other calls still work,
        so workers can release their sequences on the way out)."""
        with self._state:
            self._cancelled = reason or Cancelled("cancelled")
            if not self._stepping:
                self._fail_all(Cancelled("cancelled"))
            self._state.notify_all()
