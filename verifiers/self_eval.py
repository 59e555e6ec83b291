"""Self-evaluation: the policy model judges its own branch, costing only the question's tokens.

On a scratch fork of the branch (the backend's `score_continuations`: the LOGPROBS capability), a
short question is appended, e.g.
"\\n\\nIs the reasoning above correct so far? Answer Yes or No.\\nAnswer:" (or, for a model with a chat
template, the assistant turn is closed, the question asked as a user turn and the assistant's turn
opened), and the score is P(yes) / (P(yes) + P(no)) of the next-token distribution, where P(yes)
sums every token that reads "yes" in any case, with or without a leading space. The branch itself
is unchanged: its KV is shared by the fork, which is released after.
"""

from __future__ import annotations

import weakref

import torch

from ttc.graph import LOGPROBS, Branch, Meter, backend_of, require

__all__ = ["SelfEvalVerifier", "judge_suffix_text", "word_token_ids", "DEFAULT_QUESTION", "DEFAULT_FINAL_QUESTION",
           "PLAIN_TEMPLATE"]

DEFAULT_QUESTION = "Is the reasoning above correct so far? Answer Yes or No."
DEFAULT_FINAL_QUESTION = "Is the solution above correct? Answer Yes or No."
PLAIN_TEMPLATE = "\n\n{question}\nAnswer:"
_SENTINEL = "\u2063TTC_REPLY\u2063"

_VOCAB_TEXT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Tokenizer -> decoded single tokens


def uses_chat(tokenizer, chat: bool | None) -> bool:
    """chat=None means: ask in a chat turn when the tokenizer has a chat template."""
    return bool(getattr(tokenizer.hf, "chat_template", None)) if chat is None else chat


def judge_suffix_text(tokenizer, question: str, template: str = PLAIN_TEMPLATE, chat: bool = False) -> str:
    """The text appended to a solution to ask `question` about it.

    Plain: `template` with {question}. Chat: what the model's template writes after an assistant
    reply to close it, ask `question` as the user, and open the assistant's answer.
    """
    if not chat:
        return template.replace("{question}", question)
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _SENTINEL},
                {"role": "user", "content": question}]
    rendered = tokenizer.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if _SENTINEL not in rendered:
        raise ValueError("the chat template drops assistant messages; use chat=False with a plain template")
    return rendered[rendered.index(_SENTINEL) + len(_SENTINEL):]


def word_token_ids(tokenizer, word: str) -> list[int]:
    """Ids of the single tokens that read `word` (any case), with or without one leading space."""
    texts = _VOCAB_TEXT.get(tokenizer)
    if texts is None:
        texts = tokenizer.hf.batch_decode([[i] for i in range(len(tokenizer.hf))])
        _VOCAB_TEXT[tokenizer] = texts
    word = word.lower()
    return [i for i, t in enumerate(texts) if t.lower() in (word, " " + word, "\u2581" + word)]


class SelfEvalVerifier:
    """The policy's own P(yes) that a branch is correct so far (or, for a finished branch, correct).

    model: the policy (the eval CLI passes it). question / final_question: asked of unfinished /
    finished branches. template: the plain-text framing, with {question}. chat: ask in a chat turn
    (None: when the tokenizer has a chat template). yes_word / no_word: the answer words.

    Cost: `cost_per_branch` = the longest question's tokens; nothing per generated token.
    """

    def __init__(self, model, question: str = DEFAULT_QUESTION, final_question: str = DEFAULT_FINAL_QUESTION,
                 template: str = PLAIN_TEMPLATE, chat: bool | None = None, yes_word: str = "yes",
                 no_word: str = "no", batch_size: int = 64):
        self.backend = backend_of(model)
        require(self.backend, LOGPROBS, "verifier=self_eval")
        self.tokenizer = self.backend.tokenizer
        self.chat = uses_chat(self.tokenizer, chat)
        self.texts = {False: judge_suffix_text(self.tokenizer, question, template, self.chat),
                      True: judge_suffix_text(self.tokenizer, final_question, template, self.chat)}
        vocab = self.backend.vocab_size
        self.yes_ids = torch.tensor([i for i in word_token_ids(self.tokenizer, yes_word) if i < vocab])
        self.no_ids = torch.tensor([i for i in word_token_ids(self.tokenizer, no_word) if i < vocab])
        if not len(self.yes_ids) or not len(self.no_ids):
            raise ValueError(f"no single token reads {yes_word!r} or {no_word!r} in this tokenizer")
        self.batch_size = batch_size
        self._ids: dict[str, list[int]] = {}
        self.cost_per_branch = float(max(len(self._encode(t)) for t in self.texts.values()))
        self.cost_per_token = 0.0

    def suffix_ids(self, branch: Branch) -> list[int]:
        """The question's tokens for this branch.

        Whitespace the branch already ends with is not repeated (a step ending in a blank line gets
        no second one), nor an end-of-turn token the chat suffix would write again after EOS.
        """
        text = self.texts[branch.finished]
        last = branch.steps[-1].token_ids[-1] if branch.steps and branch.steps[-1].token_ids else None
        if last is not None and last in self.backend.eos_ids:
            eos = self.tokenizer.decode([last])
            if eos and text.startswith(eos):
                text = text[len(eos):]
        else:
            lead = len(text) - len(text.lstrip())
            tail = branch.text
            k = next((k for k in range(lead, 0, -1) if tail.endswith(text[:k])), 0)
            text = text[k:]
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = self.tokenizer.encode(text, add_special_tokens=False)
        return self._ids[text]

    def score(self, branches: list[Branch], meter: Meter) -> list[float]:
        if not branches:
            return []
        suffixes = [self.suffix_ids(b) for b in branches]
        meter.check(sum(len(s) for s in suffixes))
        results = self.backend.score_continuations(list(zip(branches, suffixes)), meter, batch_size=self.batch_size)
        return [self.yes_probability(r.last_logprobs) for r in results]

    def yes_probability(self, logprobs: torch.Tensor) -> float:
        """P(yes) / (P(yes) + P(no)) from a next-token log-distribution (V,); 0.5 when neither word has any
        mass in it (a remote backend's distribution is -inf outside the server's top-k)."""
        yes = torch.logsumexp(logprobs[self.yes_ids], 0)
        no = torch.logsumexp(logprobs[self.no_ids], 0)
        if torch.isneginf(yes) and torch.isneginf(no):
            return 0.5
        return float(torch.sigmoid(yes - no))
