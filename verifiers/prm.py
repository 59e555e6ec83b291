"""A process reward model (PRM) from a Hugging Face folder, run on ttc's own decoder with KV reuse.

Two checkpoint formats are common, and both score a solution step by step, at a marker written
after each step:

- "step-tag" (Math-Shepherd): a causal LM. The solution is written `question step1 ки\\nstep2 ки`;
  a step's score is P(good) / (P(good) + P(bad)) of the next-token distribution at its tag, with
  good/bad tokens "+" / "-".
- "classifier" (Qwen2.5-Math-PRM, `Qwen2ForProcessRewardModel`): a base model plus a small head
  `score = Linear(H, H) -> ReLU -> Linear(H, 2)` on the final-norm hidden state at a separator
  (`<extra_0>`) written after each step; the score is the probability of class 1. ttc's decoder
  loads the base model; this file loads the head (`score.*` tensors) from the same safetensors.

The PRM may have a different tokenizer from the policy, so step text is re-tokenized. A branch's
Steps are split into PRM steps at blank lines (a whole solution from best-of-N is scored paragraph
by paragraph; a step-wise search step is one PRM step).

KV reuse: the verifier keeps one PRM-side engine sequence per scored branch (by `branch.id`). A
child's sequence is a fork of its nearest scored ancestor's, extended by the child's new step tokens
and tags, so every prefix is computed once and a new step costs only its own tokens. Sequences are
returned to the PRM's pool by `release(branches)` (strategies call `verifier.release` on what they
prune, when the verifier has one), automatically once the policy's handle of a branch is garbage
collected (swept at the next call), and all at once by `close()`.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch

from ttc.graph import Branch, Meter, backend_of

__all__ = ["PRMVerifier", "PRMFormat", "MATH_SHEPHERD", "QWEN_PRM", "prompt_question", "load_head"]

_SENTINEL = "\u2063TTC_CONTENT\u2063"  # invisible separator: never in real text
_COST_SAMPLE = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether?\n\nIn May she sold 48 / 2 = 24 clips.\n\n"
                "Altogether she sold $48 + 24 = 72$ clips, so the answer is \\boxed{72}.")


@dataclass(frozen=True)
class PRMFormat:
    """How a PRM expects a solution to be written, and where it is read.

    The PRM text is `prompt`, then for each step `(first_prefix | joiner) + step + tag`; a step is
    scored at the last token of its tag. `prompt` is a template with `{question}`, or None to use
    the PRM tokenizer's chat template (optional `system_prompt`, then the question as the user turn,
    then the assistant's turn opened).
    """

    kind: str  # "step-tag" or "classifier"
    tag: str
    prompt: str | None = "{question}"
    system_prompt: str | None = None
    first_prefix: str = ""  # before the first step
    joiner: str = ""  # before every later step (after the previous tag)
    good: str | int = "+"  # step-tag: tokens whose probabilities are compared (plain encoding, one token)
    bad: str | int = "-"
    positive_class: int = 1  # classifier: the head's "correct" output


MATH_SHEPHERD = PRMFormat(kind="step-tag", tag=" ки", prompt="{question}", first_prefix=" ", joiner="\n")
QWEN_PRM = PRMFormat(kind="classifier", tag="<extra_0>", prompt=None,
                     system_prompt="Please reason step by step, and put your final answer within \\boxed{}.")
_PRESETS = {"step-tag": MATH_SHEPHERD, "classifier": QWEN_PRM}
_AGGREGATES: dict[str, Callable[[tuple[float, ...]], float]] = {
    "last": lambda s: s[-1],
    "min": min,
    "mean": lambda s: sum(s) / len(s),
    "prod": math.prod,
}


# -------------------------------------------------------------------------------------------------
# text helpers


def prompt_question(tokenizer, prompt_ids) -> str:
    """The question in a policy prompt: its last user message when the prompt is a chat, else its text.

    The chat template is rendered around a sentinel to learn what comes before and after a user
    message; whatever the rendered prompt holds between the last user-turn opener and that tail is
    the question. Prompts that match no pattern come back as their text, special tokens removed.
    """
    text = tokenizer.decode(prompt_ids)
    hf = tokenizer.hf
    if getattr(hf, "chat_template", None):
        try:
            rendered = hf.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
                                              tokenize=False)
        except Exception:  # a template that refuses a lone user message
            rendered = ""
        if _SENTINEL in rendered:
            head, tail = rendered.split(_SENTINEL, 1)
            if text.endswith(tail):
                body = text[: len(text) - len(tail)]
                opener = _user_opener(head, _special_tokens(hf))
                if opener and opener in body:
                    return body[body.rindex(opener) + len(opener):].strip()
                if body.startswith(head):
                    return body[len(head):].strip()
    return tokenizer.decode(prompt_ids, skip_special_tokens=True).strip()


def _special_tokens(hf) -> list[str]:
    specials = set(hf.all_special_tokens)
    specials.update(t.content for t in getattr(hf, "added_tokens_decoder", {}).values() if t.special)
    return [t for t in specials if t]


def _user_opener(head: str, specials: list[str]) -> str:
    """The text that opens a user turn: from the special token before the last "user" to the end."""
    i = head.rfind("user")
    if i < 0:
        return ""
    start = max((head.rfind(t, 0, i) for t in specials), default=-1)
    return head[start if start >= 0 else i:]


def encode_piece(tokenizer, text: str) -> list[int]:
    """Token ids of text as it tokenizes in the middle of a document.

    SentencePiece tokenizers prepend a word boundary to every encoded string; encoding after a
    newline anchor and dropping the anchor's tokens gives the in-context ids. Byte-level BPE
    tokenizers are unaffected (the anchor splits off on its own).
    """
    if not text:
        return []
    anchor = tokenizer.encode("\n", add_special_tokens=False)
    ids = tokenizer.encode("\n" + text, add_special_tokens=False)
    if anchor and ids[: len(anchor)] == anchor:
        return ids[len(anchor):]
    return tokenizer.encode(text, add_special_tokens=False)


def _single_token(tokenizer, token: str | int, what: str) -> int:
    if isinstance(token, int):
        return token
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the PRM's {what} token {token!r} encodes to {len(ids)} tokens {ids}; give one token "
                         "(or its id)")
    return ids[0]


def split_steps(text: str, split: str | None) -> list[str]:
    """PRM steps in a Step's text: its paragraphs, stripped, empty ones dropped."""
    parts = text.split(split) if split else [text]
    return [p.strip() for p in parts if p.strip()]


# -------------------------------------------------------------------------------------------------
# the classifier head


def load_head(folder: str | os.PathLike) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The `score` head of a reward-model folder as [(weight (out, in), bias (out,) or None)], in order.

    Accepts a single `score.weight` (token classification) or a `score.{i}.weight` stack
    (Qwen2ForProcessRewardModel: Linear, ReLU, Linear); ReLU is applied between consecutive layers.
    Returns [] when the folder has no head.
    """
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.startswith("score."):
                    found[name] = f.get_tensor(name).float()
    if "score.weight" in found:
        return [(found["score.weight"], found.get("score.bias"))]
    layers = sorted({int(n.split(".")[1]) for n in found if n.endswith(".weight") and n.split(".")[1].isdigit()})
    return [(found[f"score.{i}.weight"], found.get(f"score.{i}.bias")) for i in layers]


def apply_head(head, h: torch.Tensor) -> torch.Tensor:
    """Head logits (n, out) of hidden states h (n, H)."""
    x = h.float()
    for i, (w, b) in enumerate(head):
        x = torch.nn.functional.linear(x, w, b)
        if i + 1 < len(head):
            x = torch.relu(x)
    return x


# -------------------------------------------------------------------------------------------------
# the verifier


@dataclass(eq=False)
class _Entry:
    """A scored branch's PRM-side state."""

    seq: object  # the PRM engine's Sequence holding the branch's PRM text, fully computed
    depth: int  # policy steps covered (branch.depth)
    scores: tuple[float, ...]  # one per PRM step so far
    finalizer: object = None


@dataclass(eq=False)
class _Work:
    key: int  # the branch id this work will be stored under
    depth: int
    seq: object
    rows: list[int]  # absolute positions of the new steps' score tokens
    scores: tuple[float, ...]  # the base's scores
    root: bool
    handle: object  # what the entry's lifetime follows


class PRMVerifier:
    """Scores branches with a process reward model; higher is better.

    model: the policy (its tokenizer finds the question in a branch's prompt); may be None when
    `question_fn(branch) -> str` is given. path: the PRM's Hugging Face folder (or a loaded
    `ttc.Model`). format: "auto" (a `score.*` head in the folder means "classifier"), "step-tag",
    "classifier", or a PRMFormat; keyword `overrides` replace fields of the format (tag, prompt,
    joiner, good, bad...). aggregate: how a branch's PRM-step scores become its score ("last", "min",
    "mean", "prod"). split: what separates PRM steps inside a Step's text (None: one per Step).

    device: where the PRM's own model runs (`ttc.load`'s device; a `Model` passed as `path` keeps its own).

    Cost: `cost_per_token` PRM tokens per policy token (the tokenizers' measured ratio) plus
    `cost_per_branch` tag and joiner tokens; the first branch of a problem also pays the PRM prompt.
    """

    def __init__(self, model, path, format: str | PRMFormat = "auto", aggregate: str = "last",
                 split: str | None = "\n\n", dtype: str = "auto", kv_cache_gb: float = 1.0,
                 question_fn: Callable[[Branch], str] | None = None, device: str = "cpu", **overrides):
        from ttc.api import Model, load  # the PRM is a model of its own, on ttc's decoder

        if aggregate not in _AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(_AGGREGATES)}, not {aggregate!r}")
        self.policy = model
        self.prm = path if isinstance(path, Model) else load(str(path), dtype=dtype, kv_cache_gb=kv_cache_gb,
                                                             device=device)
        self._owns_prm = not isinstance(path, Model)
        self.engine = self.prm.engine
        self.tokenizer = self.prm.tokenizer
        folder = self.prm.source.path
        self.head = load_head(folder) if self.prm.source.kind == "hf" else []
        if isinstance(format, str):
            if format == "auto":
                format = "classifier" if self.head else "step-tag"
            if format not in _PRESETS:
                raise ValueError(f"format must be auto, step-tag, classifier or a PRMFormat, not {format!r}")
            format = _PRESETS[format]
        unknown = set(overrides) - {f.name for f in fields(PRMFormat)}
        if unknown:
            raise TypeError(f"unknown PRM option(s) {sorted(unknown)}; PRMFormat fields are "
                            f"{[f.name for f in fields(PRMFormat)]}")
        self.format = replace(format, **overrides)
        self.aggregate, self.split, self.question_fn = aggregate, split, question_fn
        if model is None and question_fn is None:
            raise ValueError("PRMVerifier needs the policy model (to read the question) or a question_fn")

        fmt, tok = self.format, self.tokenizer
        self.tag_ids = encode_piece(tok, fmt.tag)
        self.first_prefix_ids = encode_piece(tok, fmt.first_prefix)
        if not self.tag_ids:
            raise ValueError("the PRM format needs a non-empty tag")
        if fmt.kind == "classifier":
            if not self.head:
                raise ValueError(f"{folder} has no score.* head weights; use format='step-tag' for a causal-LM PRM")
            self.classes = self.head[-1][0].shape[0]
            if self.head[0][0].shape[1] != self.prm.config.hidden_size:
                raise ValueError(f"the score head reads {self.head[0][0].shape[1]} features but the PRM's hidden "
                                 f"size is {self.prm.config.hidden_size}")
        elif fmt.kind == "step-tag":
            ids = [_single_token(tok, fmt.good, "good"), _single_token(tok, fmt.bad, "bad")]
            self.candidate_ids = torch.tensor(ids)
        else:
            raise ValueError(f"PRMFormat.kind must be 'step-tag' or 'classifier', not {fmt.kind!r}")

        # What a new branch costs: its re-tokenized text, plus tag and joiner tokens per PRM step.
        ratio = 1.0
        if model is not None:
            ratio = max(1.0, len(tok.encode(_COST_SAMPLE, add_special_tokens=False))
                        / max(1, len(model.tokenizer.encode(_COST_SAMPLE, add_special_tokens=False))))
        self.cost_per_token = round(ratio, 3)
        joiner = max(len(self.first_prefix_ids), len(encode_piece(tok, fmt.joiner)))
        self.cost_per_branch = float(len(self.tag_ids) + joiner + 1)  # +1: a token split at the boundary

        self._entries: dict[int, _Entry] = {}
        self._dead: list[int] = []  # ids whose policy handles were collected; swept at the next call

    # -- the Verifier protocol ---------------------------------------------------------------------

    def score(self, branches: list[Branch], meter: Meter) -> list[float]:
        """The aggregate PRM score of each branch (0.0 for a branch with no step text yet)."""
        self._sweep()
        todo: dict[int, Branch] = {}
        questions: dict[int, str] = {}  # root id -> question, read off a descendant (a root's handle may grow)
        for b in branches:
            if self._cached(b) is not None:
                continue
            base = self._nearest_scored(b)
            if base is None and b.depth > 0:
                root = _root(b)
                if root.depth == 0 and root.id not in todo:
                    todo[root.id] = root  # the prompt gets its own entry: every sibling forks it
                    questions[root.id] = self._question(b)
            todo[b.id] = b
        while todo:  # in waves, so that a branch forks an ancestor scored in the same call
            wave = [b for b in todo.values() if not any(a.id in todo for a in _ancestors(b))]
            self._advance(wave, meter, questions)
            for b in wave:
                del todo[b.id]
        return [self._value(self._cached(b).scores) for b in branches]

    def release(self, branches=()) -> None:
        """Return the PRM sequences of these branches (and of any collected ones) to the PRM's pool."""
        for b in branches:
            self._drop(b.id)
        self._sweep()

    def close(self) -> None:
        """Free every PRM sequence (and, for a PRM this verifier loaded, its prefix cache)."""
        for key in list(self._entries):
            self._drop(key)
        self._dead.clear()
        if self._owns_prm:
            self.engine.clear_prefix_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- direct use --------------------------------------------------------------------------------

    def step_scores_of(self, branch: Branch) -> tuple[float, ...]:
        """The PRM-step scores recorded for a scored branch (its whole path), () if it is not scored."""
        entry = self._cached(branch)
        return entry.scores if entry is not None else ()

    def encode(self, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """The PRM's token ids for a question and its (already split) steps, and each step's score position."""
        ids = self.prompt_ids(question)
        rows = []
        for i, step in enumerate(steps):
            ids += self._segment(step, first=i == 0)
            rows.append(len(ids) - 1)
        return ids, rows

    def step_scores(self, question: str, steps: list[str], meter: Meter | None = None) -> list[float]:
        """Score a whole solution from scratch (no KV reuse): one score per step."""
        meter = meter or Meter()
        ids, rows = self.encode(question, steps)
        seq = self.engine.new_sequence(ids, meter.ledger, charge="verifier")
        try:
            meter.check(seq.num_pending)
            start = seq.kv.num_tokens
            ((_, h),) = self.engine.forward([seq], hidden=True, cache_prefix=False)
            return self._read(h[torch.tensor(rows, device=h.device) - start]).tolist()
        finally:
            self.engine.release([seq])

    def prompt_ids(self, question: str) -> list[int]:
        fmt, tok = self.format, self.tokenizer
        if fmt.prompt is not None:
            return tok.encode(fmt.prompt.replace("{question}", question))
        messages = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
        return tok.chat(messages + [{"role": "user", "content": question}], add_generation_prompt=True)

    # -- internals ---------------------------------------------------------------------------------

    def _segment(self, step: str, first: bool) -> list[int]:
        fmt = self.format
        return encode_piece(self.tokenizer, (fmt.first_prefix if first else fmt.joiner) + step) + self.tag_ids

    def _question(self, branch: Branch) -> str:
        if self.question_fn is not None:
            return self.question_fn(branch)
        backend = backend_of(self.policy)
        return prompt_question(backend.tokenizer, backend.prompt_ids(branch))

    def _cached(self, b: Branch) -> _Entry | None:
        e = self._entries.get(b.id)
        return e if e is not None and e.depth == b.depth else None

    def _nearest_scored(self, b: Branch) -> _Entry | None:
        for a in _ancestors(b):
            e = self._cached(a)
            if e is not None:
                return e
        return None

    def _advance(self, wave: list[Branch], meter: Meter, questions: dict[int, str]) -> None:
        """Compute the PRM text of every branch in the wave (forking scored ancestors) and store the scores."""
        work: list[_Work] = []
        try:
            for b in wave:
                base = self._nearest_scored(b)
                if base is None:
                    question = questions[b.id] if b.id in questions else self._question(b)
                    seq = self.engine.new_sequence(self.prompt_ids(question), meter.ledger, charge="verifier")
                    done, scores = 0, ()
                else:
                    (seq,) = self.engine.fork(base.seq, 1, seeds=[0], ledger=meter.ledger)
                    done, scores = base.depth, base.scores
                work.append(_Work(b.id, b.depth, seq, [], scores, root=b.depth == 0, handle=b.handle))
                n = len(scores)
                for step in b.steps[done:]:
                    for text in split_steps(step.text, self.split):
                        self.engine.extend(seq, self._segment(text, first=n == 0), charge="verifier")
                        work[-1].rows.append(len(seq.token_ids) - 1)
                        n += 1
            meter.check(sum(w.seq.num_pending for w in work))
            roots = [w.seq for w in work if w.root]
            if roots:  # a prompt may come back for another strategy or run: cache its blocks
                self.engine.forward(roots)
            steps = [w for w in work if w.rows]
            starts = [w.seq.kv.num_tokens for w in steps]
            outs = self.engine.forward([w.seq for w in steps], hidden=True, cache_prefix=False) if steps else []
            self.engine.forward([w.seq for w in work if w.seq.num_pending], cache_prefix=False)
        except BaseException:
            self.engine.release([w.seq for w in work])
            raise
        for w, start, (_, h) in zip(steps, starts, outs):
            w.scores = w.scores + tuple(self._read(h[torch.tensor(w.rows, device=h.device) - start]).tolist())
        for w in work:
            self._store(w)

    def _read(self, h: torch.Tensor) -> torch.Tensor:
        """Step scores (n,) from final-norm hidden states (n, H) at the steps' tags (on the PRM's device; the
        classifier head is read on the CPU, where it was loaded)."""
        if self.format.kind == "classifier":
            h = h.cpu()
            logits = apply_head(self.head, h)
            if self.classes == 1:
                return torch.sigmoid(logits[:, 0])
            return torch.softmax(logits, -1)[:, self.format.positive_class]
        weight = self.engine.model.lm_head.weight
        w = weight[self.candidate_ids.to(weight.device)].float()  # (2, H): good, bad
        return torch.softmax(h.float() @ w.T, -1)[:, 0]

    def _store(self, w: _Work) -> None:
        self._drop(w.key)
        entry = _Entry(w.seq, w.depth, w.scores)
        try:  # the entry lives as long as the policy's handle of the branch (shared by its score copies)
            entry.finalizer = weakref.finalize(w.handle, self._dead.append, w.key)
        except TypeError:
            pass  # a handle that takes no weak reference: only release() and close() free this entry
        self._entries[w.key] = entry

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            if entry.finalizer is not None:
                entry.finalizer.detach()
            self.engine.release([entry.seq])

    def _sweep(self) -> None:
        # Every worker thread sweeps the one shared list: pop until it is empty rather than test, then pop
        # (another thread may take the last key between the two: IndexError).
        while True:
            try:
                key = self._dead.pop()
            except IndexError:
                return
            self._drop(key)

    def _value(self, scores: tuple[float, ...]) -> float:
        return float(_AGGREGATES[self.aggregate](scores)) if scores else 0.0


def _ancestors(b: Branch):
    a = b.parent
    while a is not None:
        yield a
        a = a.parent


def _root(b: Branch) -> Branch:
    while b.parent is not None:
        b = b.parent
    return b
