"""The public entry points: `ttc.load(...)` and `Model.generate(...)`."""

from __future__ import annotations

import time

import torch

from ttc import kernels
from ttc.backends.local import LocalBackend
from ttc.budget import Ledger
from ttc.decoder.cache import PoolExhausted, blocks_needed
from ttc.decoder.engine import Completion, Engine
from ttc.decoder.model import Transformer, check_device_options
from ttc.decoder.sampling import SamplingParams, child_seed
from ttc.decoder.tokenizer import Tokenizer, load_tokenizer
from ttc.decoder.weights import (
    EMBEDDED_MODEL,
    ModelSource,
    load_gguf_q4_1,
    load_weights,
    resolve,
)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run 2-4x faster than float32 on such CPUs."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

QUANTIZED = ("int8", "int4", "w4a8")  # quantized formats (ttc.kernels.quant); w4a8 also rounds activations


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda") or cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}, {', '.join(QUANTIZED)}")
    return _DTYPES[dtype]


def activation_dtype(dtype: str | torch.dtype, weights: str, device: str) -> torch.dtype:
    """The activations' (and KV cache's) dtype: the asked dtype for plain weights; for int4 on a CPU without
    fast bfloat16, float32 on ttc's own int4 kernel where it builds (kernels/int4_cpu.py); else bfloat16,
    which PyTorch's int8 and int4 CPU kernels take."""
    if weights == "plain":
        return resolve_dtype(dtype, device)
    if weights == "w4a8":
        from ttc.kernels import int4_cpu

        if not int4_cpu.w4a8_available():
            raise ValueError("dtype=w4a8 needs x86-64 with AVX512-VNNI and ttc's CPU kernels built; this machine "
                             "lacks them (dtype=int4 runs here)")
        return torch.float32
    if weights == "int4" and not cpu_has_fast_bf16():
        from ttc.kernels import int4_cpu

        if int4_cpu.available():
            return torch.float32
    return torch.bfloat16


class Model:
    """A loaded model: weights, tokenizer and the engine that runs them."""

    def __init__(self, engine: Engine, source: ModelSource, name: str):
        self.engine, self.source, self.name = engine, source, name
        self.backend = LocalBackend(self)  # what proposers and verifiers talk to

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.cfg

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.model.dtype

    def __repr__(self) -> str:
        return (f"Model({self.name!r}, {self.config.arch}, {self.config.num_layers} layers, dtype={self.dtype}, "
                f"kv_pool={self.engine.pool.num_blocks}x{self.engine.pool.block_size} tokens)")

    def generate(self, prompt, n: int = 1, max_new_tokens: int = 128, temperature: float = 0.8, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, seed: int = 0, stop: list[str] | None = None,
                 ignore_eos: bool = False, ledger: Ledger | None = None) -> list[Completion]:
        """n completions of one prompt (text, chat messages or token ids); the prompt is prefilled once.

        Sample i uses seed `child_seed(seed, i)`, so results are reproducible and independent per sample.
        If the KV pool cannot hold all n at once, they run in waves.
        """
        if n < 1 or max_new_tokens < 1:
            raise ValueError("n and max_new_tokens must be at least 1")
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
        ledger = ledger if ledger is not None else Ledger()
        started = time.perf_counter()
        engine = self.engine
        parent = engine.new_sequence(self.tokenizer.encode_prompt(prompt), ledger, seed=seed)
        outs: list[Completion] = []
        try:
            engine.forward([parent])
            bs = engine.pool.block_size
            per_child = blocks_needed(min(len(parent.token_ids) + max_new_tokens, self.config.max_position), bs)
            per_child -= len(parent.token_ids) // bs  # full prompt blocks are shared, not paid per child
            done = 0
            while done < n:
                wave = min(n - done, engine.free_blocks() // max(per_child, 1))
                if wave == 0:
                    raise PoolExhausted(per_child, engine.free_blocks(), engine.pool.num_blocks, bs)
                children = engine.fork(parent, wave, seeds=[child_seed(seed, i) for i in range(done, done + wave)])
                try:
                    outs.extend(engine.generate(children, params, max_new_tokens, stop=stop, ignore_eos=ignore_eos))
                finally:
                    engine.release(children)
                done += wave
        finally:
            engine.release([parent])
            ledger.charge_wall(time.perf_counter() - started)
        return outs


def resolve_device(device: str | torch.device) -> torch.device:
    """The device a model loads on: "cpu", or "cuda" / "cuda:N" where torch sees that GPU. One-line errors."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device name (cpu, cuda, cuda:N)") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {device!r}: the built-in decoder runs on cpu or cuda; for other hardware use "
                         "a remote backend (model=remote)")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA GPU here (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}); load with device=cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def load(spec: str = EMBEDDED_MODEL, dtype: str | torch.dtype = "auto", kv_cache_gb: float = 2.0,
         block_size: int = 16, prefix_caching: bool = True, device: str | torch.device = "cpu",
         threads: int | None = None, batch_invariant: bool = False, compile: bool = False,
         cuda_graphs: bool = True) -> Model:
    """Load a model: "smollm2-135m" (the embedded default), a .gguf path, or a Hugging Face folder.

    dtype: "float32" is the reference; "auto" picks bfloat16 where the hardware runs it fast; "int8" and "int4"
    quantize the layer linears weight-only (activations and KV in bfloat16; int4 on a CPU without fast bfloat16
    in float32, on ttc's own kernel: `activation_dtype`); int4 of a Q4_1 GGUF (the embedded model) runs the
    file's own 4-bit blocks. "w4a8" is int4 with the activations also rounded, to int8 per group of 32, on the
    way into each linear and the int8 head (llama.cpp's Q4_1 x Q8 scheme; AVX512-VNNI CPUs only): faster,
    not the same numbers.
    device: "cpu" or "cuda[:N]": the weights, the KV pool and every index tensor of a step live there; on CUDA
    the Triton kernels run decode attention, norms, rotary and sampling, and with `cuda_graphs` each decode
    step replays a CUDA graph captured for its batch-size bucket (ttc/decoder/graphs.py). Quantized dtypes,
    batch_invariant and compile are CPU paths.
    batch_invariant: a sequence's tokens do not depend on what else shares its batch (kernels/invariant.py).
    compile: torch.compile the work between attention calls (ttc/decoder/compiled.py; eager if unavailable).
    kv_cache_gb sizes the paged KV pool (pages are only touched as they are used).
    """
    if not kv_cache_gb > 0:
        raise ValueError(f"kv_cache_gb sizes the KV pool and must be positive, not {kv_cache_gb}")
    dev = resolve_device(device)
    weights = dtype if dtype in QUANTIZED else "plain"
    check_device_options(dev, weights, batch_invariant, compile)
    if threads:
        torch.set_num_threads(threads)
    source = resolve(spec)
    cfg, state = load_weights(source)
    tokenizer = load_tokenizer(source, extra_eos=cfg.eos_token_ids)
    q4_1 = load_gguf_q4_1(source.path) if weights in ("int4", "w4a8") and source.kind == "gguf" else None
    model = Transformer(cfg, state, dtype=activation_dtype(dtype, weights, dev.type), weights=weights, q4_1=q4_1,
                        batch_invariant=batch_invariant, compile=compile, device=dev)
    del state, q4_1
    # CUDA graphs only where the step's kernels are the Triton ones (their attention reads a fixed-size table)
    graphs = cuda_graphs and dev.type == "cuda" and kernels.uses_triton(model.embed)
    engine = Engine(model, tokenizer, kv_cache_bytes=int(kv_cache_gb * (1 << 30)), block_size=block_size,
                    prefix_caching=prefix_caching, cuda_graphs=graphs)
    return Model(engine, source, name=str(spec))
