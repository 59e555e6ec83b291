"""Timing helpers shared by the kernel files' benchmarks (`python -m ttc.kernels.<file>`)."""

from __future__ import annotations

import time

import torch


def time_ms(fn, device: str, reps: int = 10) -> float:
    """Milliseconds per call: triton.testing.do_bench on CUDA, a warmed-up wall clock mean on CPU."""
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn)
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def graph_ms(fn) -> float:
    """Milliseconds per call with the host taken out: triton.testing.do_bench_cudagraph replays calls captured in
    a CUDA graph, as the engine's decode steps run. A call of a few microseconds of GPU work is otherwise timed as
    its Python and launch overhead. Limit: no L2 flush between calls, so inputs under the L2's size run warm."""
    import triton

    return triton.testing.do_bench_cudagraph(fn)


def launch_floor_ms(launches: int, device: str | torch.device = "cuda") -> float:
    """Milliseconds for `launches` one-element kernels replayed from a CUDA graph: the time a multi-launch kernel
    takes even with no bytes to move, which the bandwidth floor leaves out."""
    x = torch.zeros(1, device=device)

    def tiny():
        for _ in range(launches):
            x.add_(1)

    return graph_ms(tiny)


def copy_bandwidth(device: str | torch.device = "cuda") -> float:
    """Achievable device memory bandwidth in bytes/s, from a 1 GiB device-to-device copy (read + write)."""
    import triton

    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def floor_ms(nbytes: int, bandwidth: float) -> float:
    """The memory-bandwidth floor: the time to move nbytes once at the measured copy bandwidth."""
    return nbytes / bandwidth * 1e3
