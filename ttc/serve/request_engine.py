"""One request's view of the server's shared engine: it remembers every sequence the request made, so
that they are all released when the request ends (finished, failed or cancelled), and it refuses
new engine work once the request is cancelled (its client went away, or the server is stopping).

    view = RequestEngine(shared, cancel)          # shared: the ConcurrentEngine; cancel: threading.Event
    try:
        ... new_sequence / forward / fork / generate on view, as on an Engine ...
    finally:
        view.release_all()

`generate` runs in chunks (`ttc.serve.chunked`): the same tokens as one call, with the cancel flag
checked between chunks. A strategy's proposer and verifiers get the view through a SharedModel, so
test-time compute requests are cancelled and cleaned up the same way.
"""

from __future__ import annotations

import threading

from ttc.serve.chunked import chunked_generate

__all__ = ["RequestEngine", "ClientGone"]


class ClientGone(RuntimeError):
    """The request was cancelled (its client disconnected): its engine work stops here."""


class RequestEngine:
    def __init__(self, engine, cancel: threading.Event | None = None, chunk_tokens: int = 16):
        self._engine = engine
        self.cancel = cancel or threading.Event()
        self.chunk_tokens = chunk_tokens
        self.on_chunk = None  # optional callback(progress) after every chunk of generate (streaming)
        self._held: list = []
        self.prompt_cached: int | None = None  # tokens of the first sequence (the prompt) found in the prefix cache

    def __getattr__(self, name):  # pool, prefix, cfg, tokenizer, eos_ids, free_blocks, release, ...
        return getattr(self._engine, name)

    def check(self) -> None:
        if self.cancel.is_set():
            raise ClientGone("the request was cancelled")

    def new_sequence(self, *args, **kwargs):
        self.check()
        seq = self._engine.new_sequence(*args, **kwargs)
        self._held.append(seq)
        if self.prompt_cached is None:
            self.prompt_cached = seq.kv.num_tokens
        return seq

    def fork(self, *args, **kwargs):
        self.check()
        children = self._engine.fork(*args, **kwargs)
        self._held.extend(children)
        return children

    def forward(self, *args, **kwargs):
        self.check()
        return self._engine.forward(*args, **kwargs)

    def extend(self, *args, **kwargs):
        self.check()
        return self._engine.extend(*args, **kwargs)

    def score(self, *args, **kwargs):
        self.check()
        return self._engine.score(*args, **kwargs)

    def generate(self, seqs, params, max_new_tokens, stop=None, ignore_eos: bool = False, stop_when=None,
                 shared_tokens=None):
        if stop_when is not None or shared_tokens is not None:  # chunked decoding keeps neither across its chunks
            raise ValueError("ttc serve decodes in chunks: early stopping (deepconf) and share_budget are not served; "
                             "run them with ttc-eval or from Python")

        def between(progress):
            if self.on_chunk is not None:
                self.on_chunk(progress)
            self.check()

        self.check()
        return chunked_generate(self._engine, seqs, params, max_new_tokens, stop, ignore_eos,
                                chunk=self.chunk_tokens, between=between)

    def release_all(self) -> None:
        """Release every sequence this request made (already released ones are skipped by the pool)."""
        held, self._held = self._held, []
        self._engine.release(held)
