"""A thin wrapper over Hugging Face tokenizers and chat templates.

For a GGUF file, transformers rebuilds the tokenizer from the file's vocabulary and merges, which
takes seconds; the result is saved once under the user's cache folder and loaded from there after.
"""

from __future__ import annotations

import json
import os

from .weights import ModelSource, cache_root, file_key


class Tokenizer:
    def __init__(self, hf_tokenizer, extra_eos: tuple[int, ...] = ()):
        self.hf = hf_tokenizer
        eos = {i for i in extra_eos if i is not None}
        if hf_tokenizer.eos_token_id is not None:
            eos.add(hf_tokenizer.eos_token_id)
        self.eos_ids = tuple(sorted(eos))
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
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
