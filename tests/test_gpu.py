"""The engine on a CUDA GPU (marker `gpu`; skipped without one): the same tokens, ledger and pool behaviour as
the CPU reference, with the Triton kernels in the hot path and CUDA graphs replaying decode steps.

float32 runs with TF32 off, so the GPU's tokens must equal the CPU's; bfloat16 runs compare graphs against
eager steps on the same GPU. tests/test_engine_device.py checks the same paths on the CPU (interpreter).
"""

from __future__ import annotations

import pytest
import torch

import ttc
from ttc.decoder.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _run(model, params=SamplingParams(temperature=0), n_branches=5, new_tokens=12):
    engine = model.engine
    engine.clear_prefix_cache()
    ledger = ttc.Ledger()
    root = engine.new_sequence(list(range(100, 140)), ledger)
    branches = engine.fork(root, n_branches, seeds=list(range(n_branches)))
    for i, b in enumerate(branches):
        engine.extend(b, [200 + j for j in range(i + 1)])
    outs = engine.generate(branches, params, max_new_tokens=new_tokens, ignore_eos=True)
    scores = engine.score([(root, [5, 6, 7])])[0]
    engine.release(branches + [root])
    return [o.token_ids for o in outs], ledger, scores, engine.free_blocks()


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_greedy_tokens_ledger_and_scores_on_cuda_equal_the_cpu_reference(tiny_llama_dir, cuda_graphs):
    cpu = ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.05)
    gpu = ttc.load(str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.05, device="cuda", cuda_graphs=cuda_graphs)
    assert gpu.engine.pool.k.is_cuda and (gpu.engine.graphs is not None) == cuda_graphs
    with ttc.kernels.reference():
        expected, ref_ledger, ref_scores, _ = _run(cpu)
    free_before = gpu.engine.free_blocks()
    tokens, ledger, scores, free_after = _run(gpu)
    assert tokens == expected
    assert ledger.as_dict() | {"wall_s": 0, "peak_kv_bytes": 0} == ref_ledger.as_dict() | {"wall_s": 0, "peak_kv_bytes": 0}
    assert scores.logprobs.device.type == "cpu"  # what leaves the engine is on the host
    torch.testing.assert_close(scores.logprobs, ref_scores.logprobs, rtol=1e-4, atol=1e-4)
    assert free_after == free_before
    if cuda_graphs:
        assert gpu.engine.graphs.replays > 0 and gpu.engine.graphs.graphs  # captured and replayed


def test_a_bfloat16_decode_step_replayed_from_a_graph_gives_the_eager_steps_logits(tiny_llama_dir):
    """One decode step of 20 branches (padded to the bucket of 32) against the same step run eagerly: the logits
    agree to bfloat16's rounding (a padded bucket may round a product differently; sampled tokens are not
    compared, since one flipped draw changes everything after it)."""
    def step(model):
        engine = model.engine
        root = engine.new_sequence(list(range(100, 140)))
        branches = engine.fork(root, 20, seeds=list(range(20)))
        for i, b in enumerate(branches):
            engine.extend(b, [200 + i])
        engine.forward(branches)
        logits = torch.stack([b.logits for b in branches]).float().cpu()
        engine.release(branches + [root])
        return logits

    graphed = ttc.load(str(tiny_llama_dir), dtype="bfloat16", kv_cache_gb=0.05, device="cuda")
    eager = ttc.load(str(tiny_llama_dir), dtype="bfloat16", kv_cache_gb=0.05, device="cuda", cuda_graphs=False)
    ours, theirs = step(graphed), step(eager)
    assert graphed.engine.graphs.replays == 1
    torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.05 * theirs.abs().max().item())


def test_qwen2_greedy_tokens_on_cuda_equal_transformers_on_cuda(tmp_path):
    import transformers

    from conftest import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "qwen2", "qwen2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).cuda().eval()
    model = ttc.load(str(folder), dtype="float32", kv_cache_gb=0.05, device="cuda")
    prompt = list(range(300, 345))
    ours = model.generate(prompt, n=1, max_new_tokens=24, temperature=0, ignore_eos=True)[0].token_ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=24,
                          min_new_tokens=24)
    assert list(ours) == out[0, len(prompt):].tolist()
