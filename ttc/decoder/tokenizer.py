"""A thin wrapper over Hugging Face tokenizers and chat templates.

For a GGUF file, transformers rebuilds the tokenizer from the file's vocabulary and merges, which
takes seconds; the result is saved once under the user's cache folder and loaded from there after.
"""

from __future__ import annotations

import json
import os
import random

from .weights import ModelSource, cache_root, file_key


class Tokenizer:
    def __init__(self, hf_tokenizer, extra_eos: tuple[int, ...] = ()):
        self.hf = hf_tokenizer
        eos = {i for i in extra_eos if i is not None}
        if hf_tokenizer.eos_token_id is not None:
            eos.add(hf_tokenizer.eos_token_id)
        self.eos_ids = tuple(sorted(eos))
        self.vocab_size = len(hf_tokenizer)
        self.backend = plain_backend(hf_tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of token ids. Through the `tokenizers` backend itself where it gives transformers' text (the
        decode step checks every row's last tokens for stop strings: 0.6 against 2.3 us a call); else transformers'."""
        if self.backend is not None:
            return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of chat messages rendered with the model's own template."""
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass a text prompt instead")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return self.encode(text, add_special_tokens=False)

    def encode_prompt(self, prompt) -> list[int]:
        """A prompt as text, chat messages (list of {role, content}) or token ids -> token ids."""
        if isinstance(prompt, str):
            return self.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            return self.chat(list(prompt))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise TypeError("a prompt is a string, a list of chat messages ({'role', 'content'}) or a list of token ids")


# what decoders' clean-up and post-processing steps rewrite, for plain_backend's check
POST_PROCESSED = ("Hello , world ! Is it ? Yes . It 's n't I 'm we 've they 're - a ; b : c ( d ) [ e ] { f } "
                  "\"q\" 'r' x=1,2  three   spaces\n\nnew paragraph\t tab  Ünïcödé 数学 ∑ 🙂 ")


def plain_backend(hf_tokenizer, samples: int = 256, seed: int = 0):
    """The `tokenizers.Tokenizer` under a transformers tokenizer when transformers' decode adds nothing to it, else
    None. Adds nothing: no clean-up of spaces asked, and the same text for every special token alone, for a text
    holding what post-processing rewrites (spaces before punctuation and contractions, runs of spaces and newlines,
    non-ASCII) and for `samples` random id sequences (1-8 tokens, specials among them), with and without
    skip_special_tokens. The check stands in for reading transformers' decode, whose post-processing differs
    between versions and tokenizer classes (a subclass may override it)."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(hf_tokenizer, "clean_up_tokenization_spaces", False):
        return None
    rng = random.Random(seed)
    vocab = len(hf_tokenizer)
    special = list(getattr(hf_tokenizer, "all_special_ids", []))
    probe = hf_tokenizer.encode(POST_PROCESSED, add_special_tokens=False)
    cases = [[i] for i in special] + [probe, probe[1:]] + [[rng.choice(special) if special and rng.random() < 0.1 else rng.randrange(vocab)
                                       for _ in range(rng.randint(1, 8))] for _ in range(samples)]
    try:
        for ids in cases:
            for skip in (False, True):
                if backend.decode(ids, skip_special_tokens=skip) != hf_tokenizer.decode(ids, skip_special_tokens=skip):
                    return None
    except Exception:  # noqa: BLE001 - a tokenizer that cannot decode a probe: transformers' decode it is
        return None
    return backend


def load_tokenizer(source: ModelSource, extra_eos: tuple[int, ...] = ()) -> Tokenizer:
    from transformers import AutoTokenizer

    if source.kind == "hf":
        hf = AutoTokenizer.from_pretrained(str(source.path))
        gen = source.path / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            extra_eos += tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return Tokenizer(hf, extra_eos)
    cached = cache_root() / "tokenizers" / f"{source.path.stem}-{file_key(source.path)}"
    if (cached / "tokenizer_config.json").is_file():
        try:
            return Tokenizer(AutoTokenizer.from_pretrained(str(cached)), extra_eos)
        except Exception:
            pass  # a stale or partial cache entry: rebuild it below
    hf = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    try:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        hf.save_pretrained(str(tmp))
        os.replace(tmp, cached) if not cached.exists() else None
    except OSError:
        pass  # an unwritable cache only costs speed
    return Tokenizer(hf, extra_eos)
