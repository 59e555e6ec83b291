"""The decoder computes what Hugging Face transformers computes, on the same weights, in float32."""

from __future__ import annotations

import pytest
import torch

import ttc
from ttc.decoder.sampling import SamplingParams

from conftest import make_tiny_folder


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm())


def _full_logits(model, ids: list[int]) -> torch.Tensor:
    engine = model.engine
    seq = engine.new_sequence(ids)
    try:
        (logits, _), = engine.forward([seq], all_logits=True, cache_prefix=False)
        return logits.clone()
    finally:
        engine.release([seq])


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
               "rope_theta": 500000.0}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {}),
    ("mistral", {}),
])
def test_tiny_model_logits_match_transformers_on_100_tokens(tmp_path, arch, overrides):
    import transformers

    folder = make_tiny_folder(tmp_path, arch, **overrides)
    model = ttc.load(str(folder), dtype="float32", kv_cache_gb=0.01)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (100,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert _relative_error(_full_logits(model, ids.tolist()), ref) < 1e-4


def test_cached_decoding_equals_full_recomputation(tiny_model):
    engine = tiny_model.engine
    prompt = tiny_model.tokenizer.encode("The quick brown fox")
    seq = engine.new_sequence(prompt)
    (out,) = engine.generate([seq], SamplingParams(temperature=0), max_new_tokens=40, ignore_eos=True)
    engine.release([seq])
    full = _full_logits(tiny_model, prompt + list(out.token_ids[:-1]))
    # every generated token is the argmax of the full recomputation at its position
    assert full[len(prompt) - 1:].argmax(-1).tolist() == list(out.token_ids)
    logprobs = torch.log_softmax(full[len(prompt) - 1:], -1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert torch.allclose(logprobs, torch.tensor(out.logprobs), atol=1e-4)


def test_decode_through_shared_blocks_equals_decode_without_sharing(tiny_model):
    """Forked children attend to shared prefix blocks via the cascade; a lone sequence does not."""
    engine = tiny_model.engine
    prompt = tiny_model.tokenizer.encode("word " * 40)  # several full blocks to share
    parent = engine.new_sequence(prompt, seed=0)
    children = engine.fork(parent, 3, seeds=[5, 6, 7])
    outs = engine.generate(children, SamplingParams(temperature=1.0), max_new_tokens=24, ignore_eos=True)
    engine.release(children + [parent])
    engine.clear_prefix_cache()
    for seed, shared in zip([5, 6, 7], outs):
        lone = engine.new_sequence(prompt, seed=0)
        (alone,) = engine.fork(lone, 1, seeds=[seed])
        engine.release([lone])
        (solo,) = engine.generate([alone], SamplingParams(temperature=1.0), max_new_tokens=24, ignore_eos=True)
        engine.release([alone])
        assert solo.token_ids == shared.token_ids
        assert torch.allclose(torch.tensor(solo.logprobs), torch.tensor(shared.logprobs), atol=1e-4)
    engine.clear_prefix_cache()


@pytest.fixture(scope="module")
def embedded_pair():
    import transformers

    from ttc.decoder.weights import resolve

    src = resolve("smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name,
                                                           dtype=torch.float32).eval()
    return ttc.load("smollm2-135m", dtype="float32", kv_cache_gb=0.25), hf


@pytest.mark.slow
def test_embedded_model_logits_match_transformers_on_100_tokens(embedded_pair):
    model, hf = embedded_pair
    text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " * 4
    ids = model.tokenizer.encode(text)[:100]
    assert len(ids) == 100
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert _relative_error(_full_logits(model, ids), ref) < 1e-4


@pytest.mark.slow
def test_embedded_model_greedy_64_tokens_equal_transformers(embedded_pair):
    model, hf = embedded_pair
    prompt = [{"role": "user", "content": "Write a short poem about the sea."}]
    ids = model.tokenizer.encode_prompt(prompt)
    (ours,) = model.generate(prompt, n=1, max_new_tokens=64, temperature=0, ignore_eos=True)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=64, min_new_tokens=64, pad_token_id=2)
    assert list(ours.token_ids) == ref[0, len(ids):].tolist()


def test_fast_gguf_dequantization_equals_the_gguf_package_bit_for_bit():
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from ttc.decoder.weights import _dequantize_fast, resolve

    reader = GGUFReader(str(resolve("smollm2-135m").path))
    seen = set()
    for t in reader.tensors:
        if t.tensor_type in seen:
            continue
        seen.add(t.tensor_type)
        fast = _dequantize_fast(t.data, t.tensor_type)
        slow = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        assert torch.equal(fast.reshape(slow.shape), slow), t.name
    assert len(seen) == 3  # Q8_0 embeddings, Q4_1 matrices, F32 norms
