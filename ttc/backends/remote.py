"""A backend over any OpenAI-compatible `/v1/completions` server: vLLM, SGLang, llama.cpp, `ttc serve`.

    backend = RemoteBackend("http://localhost:8000/v1", "Qwen/Qwen2.5-0.5B-Instruct", tokenizer="/models/qwen")
    proposer = RemoteProposer(backend, seed=0, answer_fn=dataset.extract)

The prompt is rendered here with the model's own chat template (`tokenizer`: the embedded model's name,
a .gguf file, or a Hugging Face folder with at least the tokenizer files) and sent as token ids. A
branch's handle is an immutable record of its token ids: every request sends the whole context again,
so nothing is held on the server.

`RemoteProposer` (ttc.backends.remote_proposer) is `LocalProposer` over HTTP: the same children, seeds,
step and finish rules and budget shrinking; on `ttc serve`, which draws an n=1 sample with the request's
seed as the local engine draws a child, it writes the local proposer's tokens.

The ledger is the server's own `usage`: the prompt tokens it computed are prefill (verifier tokens for
a verifier's request), those its prefix cache served are reused, completion tokens are generated.
`ledger_note` says where the run's numbers came from; `record_notes()` says it for one record (the work
its thread did since `begin_record()`), which the eval copies into the record as `ledger_source`.

Modules: remote_http (the HTTP client: retries, concurrency, errors), remote_wire (request bodies and
the parsing of answers), remote_proposer (the proposer), this one (the backend).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Sequence

import torch

from ttc.backends.remote_http import HttpClient, RemoteError
from ttc.backends.remote_proposer import RemoteProposer
from ttc.backends.remote_wire import (RemoteHandle, Sample, ServerFeatures, choices, parse_continuation, parse_sample,
                                      parse_usage, sample_body, score_body)
from ttc.budget import Ledger
from ttc.decoder.config import ModelConfig, UnsupportedModelError
from ttc.decoder.engine import PromptTooLong
from ttc.decoder.sampling import SamplingParams
from ttc.decoder.tokenizer import Tokenizer, load_tokenizer
from ttc.decoder.weights import ModelNotFoundError, ModelSource, resolve
from ttc.graph import LOGPROBS, TOKEN_CONFIDENCE, Branch, ContinuationScore, Meter, MissingCapability

__all__ = ["RemoteBackend", "RemoteProposer", "RemoteHandle", "ServerFeatures", "RemoteError", "model_files"]

SERVER_USAGE = "server usage"
NO_CACHE_REPORT = "server usage, no cache report"  # every prompt token is counted as computed
NO_USAGE = "client count, no usage report"  # no usage at all: the tokens sent and received are counted
SERVER_IDS = "server token ids"
RETOKENIZED = "re-tokenized text"  # the server gave text, not token ids: it was encoded again here


def model_files(spec: str) -> tuple[Tokenizer, ModelConfig | None]:
    """The tokenizer of `spec`, and its model config where the files hold one ttc understands: the embedded
    model's name, a .gguf file, a Hugging Face folder, or a folder of tokenizer files (perhaps with
    config.json): a served model's weights need not be here."""
    try:
        source = resolve(spec)
    except ModelNotFoundError:
        path = Path(spec).expanduser()
        if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
            raise
        source = ModelSource("hf", path)
    config = None
    try:
        if source.kind == "gguf":
            from ttc.decoder.weights import _gguf_index  # its cached JSON: reading the file takes seconds

            raw = _gguf_index(source.path)["config"]
            config = ModelConfig(**{**raw, "eos_token_ids": tuple(raw["eos_token_ids"])})
        elif (source.path / "config.json").is_file():
            config = ModelConfig.from_hf(json.loads((source.path / "config.json").read_text()))
    except UnsupportedModelError:
        config = None  # an architecture ttc does not run: no FLOPs estimate or context length, the rest works
    # EOS as the local engine has it: the tokenizer's and the config's
    return load_tokenizer(source, extra_eos=config.eos_token_ids if config else ()), config


class RemoteBackend:
    """A model behind an OpenAI-compatible server. `capabilities` = {LOGPROBS} (none without a
    `features.prompt_logprobs`), plus TOKEN_CONFIDENCE with a `features.confidence_k`; `features` says what
    the server accepts (remote_wire.ServerFeatures).

    What a remote run cannot do that a local one can:
    - no hidden states (`verifier=probe`, ETS with coverage) and no shared KV: each request sends the
      branch's whole context, and the server's prefix cache, if any, decides what is computed again;
    - no EARLY_STOP: a sample cannot be stopped mid-generation on its confidence (`strategy=deepconf`);
    - a verifier's next-token distribution is the server's top-`top_logprobs`: other tokens are -inf;
    - `forward_passes` counts request rounds (one per propose, complete or score call), not model
      forwards; `flops` is estimated from the model config (0 without one); `peak_kv_bytes` stays 0;
    - the budget is kept on an estimate of the prompt tokens each round makes the server compute (see
      RemoteProposer._reserve); a server that recomputes more (evictions, concurrent requests that do not
      share a prefix) can take a problem past its budget, and the ledger shows it. A verifier's request
      also computes what the server has not cached of the branch (its latest step, at least), which a
      local verifier gets from the branch's KV.
    """

    kind = "remote"

    def __init__(self, base_url: str, name: str, tokenizer: str = "smollm2-135m", api_key: str | None = None,
                 features: ServerFeatures | dict | None = None, max_concurrency: int = 8, timeout_s: float = 300.0,
                 retries: int = 4, transport=None):
        self.base_url, self.name = base_url.rstrip("/"), name
        self.features = features if isinstance(features, ServerFeatures) else ServerFeatures(**(features or {}))
        self.tokenizer, self.config = model_files(tokenizer)
        self.capabilities = frozenset({LOGPROBS} if self.features.prompt_logprobs else ()) | \
            frozenset({TOKEN_CONFIDENCE} if self.features.confidence_k else ())
        self.vocab_size = self.config.vocab_size if self.config else len(self.tokenizer.hf)
        self.max_position = self.config.max_position if self.config else None
        self.eos_ids = frozenset(self.tokenizer.eos_ids) | frozenset(self.config.eos_token_ids if self.config else ())
        primary = self.tokenizer.hf.eos_token_id
        self.eos_id = primary if primary in self.eos_ids else min(self.eos_ids, default=None)
        self.ledger_note, self.token_note = SERVER_USAGE, SERVER_IDS  # the weakest seen in the whole run
        self._lock = threading.Lock()
        # per thread: the notes of the work it did since its last record (an eval solves one problem per worker
        # thread at a time, and parses every answer in that thread), starting from what the handshake learned
        self._record = threading.local()
        self.client = HttpClient(self.base_url, api_key, max_concurrency, timeout_s, retries, transport=transport)
        self._handshake()
        self._baseline = (self.ledger_note, self.token_note)

    def __repr__(self) -> str:
        return f"RemoteBackend({self.name!r} at {self.base_url})"

    # -- the Backend protocol --------------------------------------------------------------------------

    def holds_context(self, branch: Branch) -> bool:
        return True  # the context is sent again with every request

    def prompt_ids(self, branch: Branch) -> list[int]:
        """The token ids of the prompt a branch grew from (its problem, rendered)."""
        ids = branch.handle.token_ids
        return list(ids[: len(ids) - branch.num_tokens])

    def score_continuations(self, items: Sequence[tuple[Branch, Sequence[int]]], meter: Meter,
                            hidden: bool = False, batch_size: int = 64,
                            logprobs: bool = True) -> list[ContinuationScore]:
        """Logprobs of each item's tokens appended to its branch, and the next-token distribution after
        them: one request per item, at most `max_concurrency` at once (`batch_size` is not used).

        The given tokens' logprobs are the server's prompt logprobs (`echo` or vLLM's `prompt_logprobs`).
        The next-token distribution is the top-`top_logprobs` of a one-token greedy completion, as a (V,)
        tensor that is -inf outside the returned top-k. The prompt tokens the server computed are charged
        as verifier tokens, those its cache served as reused; the sampled token is never computed."""
        if hidden:
            raise MissingCapability("hidden states are not provided by the remote backend")
        if LOGPROBS not in self.capabilities:
            raise MissingCapability("logprobs of a continuation are not provided by this remote backend "
                                    "(model.features.prompt_logprobs is null)")
        if any(not ids for _, ids in items):
            raise ValueError("score needs at least one continuation token")
        if not items:
            return []
        prompts = [list(b.handle.token_ids) + list(ids) for b, ids in items]
        bodies = [score_body(self.features, self.name, p, self.tokenizer.decode) for p in prompts]
        responses = self.client.post_all("completions", bodies)
        out = []
        for (_, ids), prompt, response in zip(items, prompts, responses):
            given, top, by_text = parse_continuation(response, self.features, list(ids), self._encode, self.base_url)
            if by_text:
                self._note_tokens(RETOKENIZED)
            self.charge(meter.ledger, response, len(prompt), 1, verifier=True)
            last = torch.full((self.vocab_size,), float("-inf"))
            for token, value in top:
                if 0 <= token < self.vocab_size:
                    last[token] = value
            out.append(ContinuationScore(torch.tensor(given), last))
        meter.ledger.charge_forward(0)
        return out

    # -- what the proposer asks ------------------------------------------------------------------------

    def sample(self, requests: list[tuple[Sequence[int], int, int, int | None]], params: SamplingParams,
               stop: Sequence[str], meter: Meter) -> list[list[Sample]]:
        """For each request (token ids, max tokens, n, seed[, draws to skip]), its n samples; one request round,
        charged."""
        bodies = [sample_body(self.features, self.name, ids, self.tokenizer.decode, limit, params, stop, seed, n,
                              *skip) for ids, limit, n, seed, *skip in requests]
        responses = self.client.post_all("completions", bodies)
        out = []
        for (ids, _, n, *_), response in zip(requests, responses):
            samples = [parse_sample(c, stop, self.eos_ids, self.eos_id, self._encode, self.base_url,
                                    self.features.confidence_k) for c in choices(response, n, self.base_url)]
            if any(s.retokenized for s in samples):
                self._note_tokens(RETOKENIZED)
            self.charge(meter.ledger, response, len(ids), sum(len(s.token_ids) for s in samples))
            out.append(samples)
        meter.ledger.charge_forward(0)
        return out

    def check_prompt(self, ids: Sequence[int]) -> None:
        if self.max_position is not None and len(ids) >= self.max_position:
            raise PromptTooLong(f"prompt of {len(ids)} tokens leaves no room in the model's context of "
                                f"{self.max_position} tokens; shorten it to at most {self.max_position - 1}")

    # -- the ledger ------------------------------------------------------------------------------------

    def charge(self, ledger: Ledger, response: dict, prompt_len: int, completion_len: int,
               verifier: bool = False) -> None:
        """Charge one response's work from its `usage`: computed prompt tokens as prefill (or verifier),
        cached ones as reused, completion tokens as generated (a verifier's one sampled token is not)."""
        usage = parse_usage(response, prompt_len, completion_len)
        if not usage.reported:
            self._note_ledger(NO_USAGE)
        elif usage.cached is None:
            self._note_ledger(NO_CACHE_REPORT)
        cached = usage.cached or 0
        computed = usage.prompt - cached
        (ledger.charge_verifier if verifier else ledger.charge_prefill)(computed)
        ledger.charge_reused(cached)
        flops = self.flops(computed, cached)
        if not verifier:
            ledger.charge_generated(usage.completion)
            # each sampled token but the last is fed back; the last is computed by the next request
            flops += self.flops(usage.completion - 1, usage.prompt)
        ledger.charge_flops(flops)

    def flops(self, tokens: int, start: int) -> float:
        """`tokens` computed at positions start.., as the engine counts them; 0 without a model config."""
        if self.config is None or tokens <= 0:
            return 0.0
        context = tokens * start + tokens * (tokens + 1) // 2
        return tokens * self.config.params_per_token_flops() + self.config.attention_flops(1) * context

    @property
    def reports_cache(self) -> bool:
        return self.ledger_note == SERVER_USAGE

    def begin_record(self) -> None:
        """Start this thread's record notes afresh (the eval calls it as a problem starts)."""
        self._record.notes = self._baseline

    def record_notes(self) -> dict:
        """Where the numbers of this thread's record came from, `ledger_source` and `token_source`: the
        weakest of what the handshake learned and what every answer since `begin_record` reported. A
        problem another thread solves at the same time does not change them. In a thread that began no record:
        the run's notes (the weakest seen by any thread)."""
        notes = getattr(self._record, "notes", None)  # None: no record begun in this thread, so the run's notes
        ledger_note, token_note = notes or (self.ledger_note, self.token_note)
        return {"ledger_source": ledger_note, "token_source": token_note}

    def _note_ledger(self, note: str) -> None:
        self._note(note, 0)

    def _note_tokens(self, note: str) -> None:
        self._note(note, 1)

    def _note(self, note: str, which: int) -> None:
        """The weakest report wins, in the run's notes and in this thread's record: usage without a cache report,
        then no usage; re-tokenized text over the server's token ids."""
        order = (SERVER_USAGE, NO_CACHE_REPORT, NO_USAGE) if which == 0 else (SERVER_IDS, RETOKENIZED)
        weaker = lambda a, b: a if order.index(a) > order.index(b) else b  # noqa: E731
        with self._lock:
            if which == 0:
                self.ledger_note = weaker(note, self.ledger_note)
            else:
                self.token_note = weaker(note, self.token_note)
        notes = getattr(self._record, "notes", None)
        if notes is not None:  # a record begun in this thread
            notes = list(notes)
            notes[which] = weaker(note, notes[which])
            self._record.notes = tuple(notes)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- lifetime --------------------------------------------------------------------------------------

    def _handshake(self) -> None:
        """Fail now, in one line, if the server is unreachable, serves another model or rejects what we send;
        and learn from a one-token completion what its usage reports."""
        try:
            models = self.client.get("models").get("data") or []
            served = [m.get("id") for m in models]
        except RemoteError as e:
            if "HTTP 404" not in str(e):
                raise
            models, served = [], None  # no model list (some servers): the completion below still names the model
        if served is not None and self.name not in served:
            raise RemoteError(f"{self.base_url} serves {served}, not {self.name!r}: set model.name")
        if any(m.get("id") == self.name and m.get("owned_by") == "ttc" for m in models):
            self.features = dataclasses.replace(self.features, skip_draws=True)  # `ttc serve`: streams continue
        ids = self._encode("Hello")[:1] or [0]
        try:
            self.sample([(ids, 1, 1, None)], SamplingParams(temperature=0.0), (), Meter())
        except RemoteError as e:
            hint = " (if the server rejects vLLM's extra parameters, set model.features.extensions=false)" \
                if self.features.extensions and "HTTP 4" in str(e) else ""
            raise RemoteError(f"{e}{hint}") from None

    def cancel(self, reason: BaseException | None = None) -> None:
        """Fail every waiting and later request (the eval's Ctrl-C, or a failed problem in another thread)."""
        self.client.cancel(reason)

    def reopen(self) -> None:
        """Take requests again after cancel() (the eval builds each run on the process's kept backend)."""
        self.client.reopen()

    def close(self) -> None:
        self.client.close()
