"""The engine's device path, checked on the CPU: the CUDA hot path (Triton kernels, the CUDA graphs' fixed
buffers) run through Triton's interpreter on a tiny model against the PyTorch reference, device threading
(the plan, the pool, load's errors) and the static work table's capacity rules.

Without a GPU, `kernels.triton_on_cpu()` sends CPU tensors to the Triton kernels (TRITON_INTERPRET is set
here, before any kernel module is imported), and `DecodeGraphs` runs its fixed-buffer forward uncaptured
(capture is the only CUDA-only step). tests/test_gpu.py runs the same on a GPU (marker `gpu`).
"""

from __future__ import annotations

import os
import pathlib
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import ttc  # noqa: E402
from ttc import kernels  # noqa: E402
from ttc.api import resolve_device  # noqa: E402
from ttc.decoder.engine import Engine  # noqa: E402
from ttc.decoder.graphs import DecodeGraphs  # noqa: E402
from ttc.decoder.model import check_device_options  # noqa: E402
from ttc.decoder.sampling import SamplingParams  # noqa: E402
from ttc.kernels.decode_plan import plan_decode  # noqa: E402

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="CPU tensors reach Triton only through its interpreter")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _engine(model, cuda_graphs: bool, **graph_options) -> Engine:
    engine = Engine(model.engine.model, model.tokenizer, kv_cache_bytes=50 << 20, cuda_graphs=cuda_graphs)
    if cuda_graphs and graph_options:
        engine.graphs = DecodeGraphs(engine.model, engine.pool, capture=False, **graph_options)
    return engine


def _branches_run(engine: Engine, params: SamplingParams, n_branches: int = 3, new_tokens: int = 5):
    """A 40-token prompt (two full shared blocks and a partial one), forked into branches each extended by
    different tokens, then decoded together. Returns the tokens, the ledger and the pool's free count after."""
    ledger = ttc.Ledger()
    root = engine.new_sequence(list(range(100, 140)), ledger)
    branches = engine.fork(root, n_branches, seeds=[7 + i for i in range(n_branches)])
    for i, b in enumerate(branches):
        engine.extend(b, [200 + j for j in range(i + 1)])
    outs = engine.generate(branches, params, max_new_tokens=new_tokens, ignore_eos=True)
    engine.release(branches + [root])
    return [o.token_ids for o in outs], ledger, engine.free_blocks()


@needs_interpreter
def test_the_graph_buffers_forward_on_the_triton_kernels_makes_the_reference_greedy_tokens(tiny_model):
    with kernels.reference():
        expected, ref_ledger, _ = _branches_run(_engine(tiny_model, cuda_graphs=False), SamplingParams(temperature=0))
    engine = _engine(tiny_model, cuda_graphs=True)
    free_before = engine.free_blocks()
    with kernels.triton_on_cpu():
        tokens, ledger, free_after = _branches_run(engine, SamplingParams(temperature=0))
    assert tokens == expected
    assert engine.graphs.replays == 4 and engine.graphs.eager_steps == 0  # 3 rows padded to the bucket of 4
    assert ledger.as_dict() | {"wall_s": 0} == ref_ledger.as_dict() | {"wall_s": 0}
    assert free_after == free_before  # the scratch block is outside the pool's count, and every block came back


@needs_interpreter
def test_sampled_tokens_through_the_graph_buffers_equal_the_eager_triton_steps(tiny_model):
    params = SamplingParams(temperature=0.9, top_p=0.9)
    with kernels.triton_on_cpu():
        eager, _, _ = _branches_run(_engine(tiny_model, cuda_graphs=False), params, n_branches=5)
        graphed, _, _ = _branches_run(_engine(tiny_model, cuda_graphs=True), params, n_branches=5)
    assert graphed == eager


@needs_interpreter
def test_a_step_beyond_the_table_capacity_or_the_largest_bucket_runs_eager_with_the_same_tokens(tiny_model):
    with kernels.reference():
        expected, _, _ = _branches_run(_engine(tiny_model, cuda_graphs=False), SamplingParams(temperature=0))
    small_table = _engine(tiny_model, cuda_graphs=True, part_capacity=2)  # 3 rows need 3+ partial states
    small_buckets = _engine(tiny_model, cuda_graphs=True, buckets=(1, 2))
    with kernels.triton_on_cpu():
        assert _branches_run(small_table, SamplingParams(temperature=0))[0] == expected
        assert _branches_run(small_buckets, SamplingParams(temperature=0))[0] == expected
    assert small_table.graphs.replays == 0 and small_table.graphs.eager_steps == 4
    assert small_buckets.graphs.replays == 0 and small_buckets.graphs.eager_steps == 4


@needs_interpreter
def test_the_static_table_gives_padded_rows_no_parts_and_refuses_a_plan_beyond_its_capacity():
    tables = [[0, 1, 2], [0, 1, 3]]  # two rows share blocks 0-1 (32 tokens), each has one block of its own
    plan = plan_decode(tables, [40, 37], 16)
    static = kernels.static_work_table(4, 4, 2, 16, "cpu", max_context=64, slot_capacity=128)
    assert static.fill(plan)
    ptr = static.table.part_ptr[:5].tolist()
    assert ptr[2] == ptr[3] == ptr[4]  # rows 2 and 3 (padding up to the bucket of 4) own no partial state
    assert static.table.counts[:2].tolist() == [1, 2]  # one shared item (2 rows x 32 slots), one private item a row
    assert not kernels.static_work_table(4, 4, 2, 16, "cpu", max_context=64, slot_capacity=40).fill(plan)


def test_a_plan_moved_to_another_device_keeps_every_tensor_there_and_its_host_twin():
    tables = [[0, 1, 2, 3], [0, 1, 4], [0, 5]]
    plan = plan_decode(tables, [60, 40, 20], 16, min_shared_tokens=16)
    assert plan.host is None and plan.to("cpu") is plan
    moved = plan.to("meta")  # a device with shapes and no data: what a GPU run does, checkable anywhere
    assert moved.host is plan
    pairs = [(moved.private_slots, plan.private_slots), (moved.private_bias, plan.private_bias),
             (moved.block_table, plan.block_table), (moved.lengths, plan.lengths)]
    pairs += [(a.slots, b.slots) for a, b in zip(moved.segments, plan.segments)]
    pairs += [(a.rows, b.rows) for a, b in zip(moved.segments, plan.segments) if b.rows is not None]
    assert len(moved.segments) == len(plan.segments) == 2
    for new, old in pairs:
        assert new.device.type == "meta" and new.shape == old.shape and new.dtype == old.dtype


def test_the_kv_pool_and_the_step_tensors_live_on_the_models_device(tiny_model, monkeypatch):
    engine = tiny_model.engine
    seen = []
    forward = type(engine.model).forward
    monkeypatch.setattr(type(engine.model), "forward",
                        lambda self, tokens, positions, k, v, slots, attn, **kw:
                        seen.append((tokens.device, positions.device, slots.device)) or
                        forward(self, tokens, positions, k, v, slots, attn, **kw))
    tiny_model.generate("Hello", n=2, max_new_tokens=3, seed=1)
    assert engine.device == tiny_model.engine.model.device == torch.device("cpu")
    assert engine.pool.k.device == engine.model.embed.device
    assert seen and all(d == engine.model.embed.device for devices in seen for d in devices)


def test_load_refuses_a_device_it_cannot_run_on_in_one_line():
    for device, says in [("mps", "cpu or cuda"), ("nonsense!", "not a device name")]:
        with pytest.raises(ValueError, match=says) as e:
            resolve_device(device)
        assert "\n" not in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU") as e:
            ttc.load("/nonexistent/model", device="cuda")
        assert "\n" not in str(e.value)


def test_cpu_only_options_are_refused_on_cuda_before_any_weight_is_read():
    cuda = torch.device("cuda", 0)
    for kwargs, says in [({"weights": "int4"}, "CPU kernels"), ({"weights": "w4a8"}, "CPU kernels"),
                         ({"batch_invariant": True}, "CUDA graphs"), ({"compile": True}, "CUDA graphs")]:
        args = {"weights": "plain", "batch_invariant": False, "compile": False, **kwargs}
        with pytest.raises(ValueError, match=says):
            check_device_options(cuda, **args)
    check_device_options(torch.device("cpu"), "int4", True, True)  # all fine on the CPU


def test_no_module_moves_tensors_with_cuda_calls_the_device_comes_from_load():
    offenders = []
    for folder in ("ttc", "kernels", "search", "verifiers", "evals"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\.cuda\(\)|device=['\"]cuda['\"]", line.split("#")[0]):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_a_cpu_run_resumes_a_folder_from_before_the_device_keys_and_a_cuda_run_does_not(tmp_path):
    from ttc.evals.results import ResumeError, check_resumable

    old = {"model": {"spec": "smollm2-135m", "dtype": "auto"}, "seed": 1}
    check_resumable(old, tmp_path / "run.json", has_records=False)
    cpu = {**old, "model": {**old["model"], "device": "cpu", "cuda_graphs": True}}
    check_resumable(cpu, tmp_path / "run.json", has_records=True)  # the same experiment
    with pytest.raises(ResumeError, match="model.device"):
        check_resumable({**old, "model": {**old["model"], "device": "cuda"}}, tmp_path / "run.json", has_records=True)


def test_a_prm_run_on_the_cpu_resumes_a_folder_from_before_the_verifiers_device_key(tmp_path):
    from ttc.evals.results import check_resumable

    old = {"model": {"spec": "smollm2-135m"}, "verifier": {"_target_": "ttc.verifiers.prm.PRMVerifier", "path": "x"}}
    check_resumable(old, tmp_path / "run.json", has_records=False)
    check_resumable({**old, "verifier": {**old["verifier"], "device": "cpu"}}, tmp_path / "run.json", has_records=True)


def test_results_leave_the_engine_in_one_copy_per_dtype_with_their_values_shapes_and_nones():
    from ttc.decoder.engine import to_host

    tensors = [torch.arange(6.0).view(2, 3), None, torch.tensor([7, 8]), torch.full((4,), 0.5), torch.ones(0)]
    moved = to_host(tensors, device=torch.device("cpu", 0))  # "another device": the move's path on a CPU
    assert moved[1] is None
    for before, after in zip(tensors, moved):
        assert before is None or (torch.equal(before, after) and after.dtype == before.dtype)
    storages = {t.untyped_storage().data_ptr() for t in moved if t is not None and t.dtype == torch.float32}
    assert len(storages) == 1  # the three float32 tensors came over together
    assert to_host(tensors)[0] is tensors[0]  # already on the CPU: nothing moves


@needs_interpreter
def test_a_capture_that_fails_leaves_every_step_eager_with_the_same_tokens_and_one_warning(tiny_model, caplog):
    """On the CPU a capture fails for want of CUDA, as one would on a GPU whose driver or ops refuse it."""
    with kernels.reference():
        expected, _, _ = _branches_run(_engine(tiny_model, cuda_graphs=False), SamplingParams(temperature=0))
    engine = _engine(tiny_model, cuda_graphs=True)
    engine.graphs.capture = True
    with kernels.triton_on_cpu(), caplog.at_level("WARNING", logger="ttc.decoder.graphs"):
        tokens, _, _ = _branches_run(engine, SamplingParams(temperature=0))
    assert tokens == expected
    assert engine.graphs.replays == 0 and engine.graphs.eager_steps == 4 and engine.graphs.disabled
    assert len([r for r in caplog.records if "could not capture" in r.message]) == 1
