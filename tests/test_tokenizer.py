"""The tokenizer's decode through the `tokenizers` backend (the fast path) gives transformers' text (the twin)."""

import random

from ttc.decoder.tokenizer import Tokenizer, plain_backend


def test_the_embedded_tokenizer_decodes_through_its_backend_with_transformers_text(embedded_tokenizer):
    tok = Tokenizer(embedded_tokenizer)
    assert tok.backend is not None
    rng = random.Random(1)
    specials = embedded_tokenizer.all_special_ids
    for _ in range(2000):  # random ids: split multi-byte characters, specials, spaces at either end
        ids = [rng.choice(specials) if rng.random() < 0.05 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(1, 12))]
        for skip in (False, True):
            assert tok.decode(ids, skip) == embedded_tokenizer.decode(ids, skip_special_tokens=skip), ids


def test_a_tokenizer_that_cleans_up_spaces_decodes_through_transformers(embedded_tokenizer):
    embedded_tokenizer.clean_up_tokenization_spaces = True
    try:
        assert plain_backend(embedded_tokenizer) is None
    finally:
        embedded_tokenizer.clean_up_tokenization_spaces = False


class _Rewriting:
    """A transformers-like tokenizer whose decode post-processes the backend's text (as a subclass may)."""

    def __init__(self, hf):
        self.hf, self.backend_tokenizer, self.all_special_ids = hf, hf.backend_tokenizer, hf.all_special_ids

    def __len__(self):
        return len(self.hf)

    def encode(self, text, add_special_tokens=True):
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens=False):
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens).replace(" ,", ",")


def test_a_tokenizer_whose_decode_rewrites_the_text_decodes_through_transformers(embedded_tokenizer):
    assert plain_backend(_Rewriting(embedded_tokenizer), samples=0) is None  # the probe text has " ,"


class _Failing(_Rewriting):
    def decode(self, ids, skip_special_tokens=False):
        raise ValueError("cannot decode")


def test_a_tokenizer_whose_decode_raises_on_a_probe_loads_and_decodes_through_transformers(embedded_tokenizer):
    assert plain_backend(_Failing(embedded_tokenizer), samples=0) is None
