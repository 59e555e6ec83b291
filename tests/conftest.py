"""Shared fixtures: tiny random Llama-family models saved as real Hugging Face folders.

The tiny models use the embedded model's tokenizer (so prompts, chat templates and stop strings
behave as in real use) with random weights small enough that a forward takes milliseconds.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            pad_token_id=2)


def _embedded_tokenizer():
    """The embedded model's tokenizer; TTC_TEST_TOKENIZER may name a folder it was saved to (save_pretrained),
    for a machine without the 100 MB GGUF, e.g. a GPU machine running the `gpu` tests."""
    from ttc.decoder.tokenizer import load_tokenizer
    from ttc.decoder.weights import resolve

    if os.environ.get("TTC_TEST_TOKENIZER"):
        import transformers

        return transformers.AutoTokenizer.from_pretrained(os.environ["TTC_TEST_TOKENIZER"])
    return load_tokenizer(resolve("smollm2-135m")).hf


def require_data(path) -> None:
    """Skip the calling test when the data file `path` (e.g. ../shared/data/gsm8k/test.jsonl) is missing;
    under CI (CI=true) fail instead, so that a missing data set cannot pass as a green run."""
    if os.path.isfile(path):
        return
    message = f"data file {path} is missing (the tests expect ../shared/data next to the repository)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def embedded_tokenizer():
    return _embedded_tokenizer()


def make_tiny_folder(path, arch: str = "llama", seed: int = 0, **overrides):
    """Save a random HF model of the given architecture with the embedded tokenizer into `path`."""
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    if arch == "mistral":
        kwargs.setdefault("sliding_window", None)
    model = model_cls(cfg_cls(**kwargs)).to(torch.float32).eval()
    with torch.no_grad():  # random init gives near-uniform logits; sharpen them so greedy decoding is decisive
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(str(path), safe_serialization=True)
    _embedded_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_dir):
    import ttc

    return ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.05)


@pytest.fixture
def engine_server(tiny_model):
    """An OpenAI completions server on the tiny model's engine (tests/remote_fakes.py)."""
    from remote_fakes import EngineServer

    return EngineServer(tiny_model)


@pytest.fixture
def remote(engine_server, tiny_llama_dir):
    """A RemoteBackend on `engine_server`, in process, one request at a time."""
    from remote_fakes import MODEL
    from ttc.backends.remote import RemoteBackend

    return RemoteBackend("http://fake/v1", MODEL, tokenizer=str(tiny_llama_dir), max_concurrency=1,
                         transport=engine_server.transport())


def q4_1_blocks(n, k, seed):
    """Random Q4_1 blocks like a GGUF's: q (N, K) in 0..15, d > 0 and m < 0 per group of 32."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3
    m = -8 * d + torch.randn(n, k // 32, generator=g) * 1e-3
    return q, d, m
