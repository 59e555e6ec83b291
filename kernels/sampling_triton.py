"""Triton twin of `sampling.sample_reference`: temperature, top-k, top-p, min-p sampling without a sort.

Why: the reference sorts every row of the vocabulary (49152 entries for SmolLM2) to cut a prefix of
the descending order and to walk its cumulative distribution. Every one of those cuts is a
threshold on the tempered weight w = exp((x - max) / T) in (0, 1]:
- min-p keeps w >= min_p (the most likely token has w = 1);
- top-k keeps w >= the k-th largest w, which is the smallest t with count(w > t) < k;
- top-p keeps w >= the smallest t with sum(w > t) < top_p * sum(w);
- the draw picks the kept token whose interval in the descending-order cumulative distribution
  holds u * (kept mass): the smallest t with sum(kept w > t) <= u * (kept mass).
Each "smallest t" is found by a many-way bisection on the bit pattern of t (positive floats order
like their bits): every pass over the row tests NT thresholds at once, so 2^30 candidates take
ceil(30 / log2(NT)) passes of plain streaming reads, with no sort and no scratch memory. One
program handles one row; the row stays in L2 across passes.

Reference: `sampling.sample_reference` (same contract; greedy rows take the first maximal logit).
The randomness is the caller's: one uniform per row (drawn from that row's own seeded generator).
Limits: ties at a threshold keep every tied token (the reference keeps exactly k) and a draw that
lands in a group of equal weights returns its lowest token id; float32 sums in another order than
the reference's can move a cut or a draw at an exact boundary (probability ~1e-6 per row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
ONE_BITS = 0x3F800000  # the bit pattern of 1.0f


@triton.jit
def _smallest_threshold(row_ptr, V, m, c, tau, goal, COUNT: tl.constexpr, INCLUSIVE: tl.constexpr,
                        BLOCK_V: tl.constexpr, NT: tl.constexpr):
    """Smallest t in [0, 1] with stat(t) < goal (<= goal if INCLUSIVE), stat(t) = sum over w > t of
    (1 if COUNT else w), counting only weights w >= tau. stat is non-increasing in t, and stat(1) = 0."""
    lo = tl.zeros((), tl.int32)
    hi = tl.full((), ONE_BITS, tl.int32)
    j = tl.arange(0, NT)
    while lo < hi:
        step = (hi - lo + NT - 1) // NT
        cand = tl.minimum(lo + j * step, hi)  # (NT,) bit patterns
        t = cand.to(tl.float32, bitcast=True)
        stat = tl.zeros((NT,), tl.float32)
        for start in range(0, V, BLOCK_V):
            i = start + tl.arange(0, BLOCK_V)
            w = tl.exp2((tl.load(row_ptr + i, mask=i < V, other=float("-inf")).to(tl.float32) - m) * c)
            w = tl.where(w >= tau, w, 0.0)
            if COUNT:
                f = tl.where(w > 0, 1.0, 0.0)
            else:
                f = w
            stat += tl.sum(tl.where(w[:, None] > t[None, :], f[:, None], 0.0), 0)
        if INCLUSIVE:
            ok = stat <= goal
        else:
            ok = stat < goal
        hi = tl.min(tl.where(ok, cand, hi), 0)
        lo = tl.max(tl.where(ok, lo, cand + 1), 0)
    return hi.to(tl.float32, bitcast=True)


@triton.jit
def _sample_kernel(logits_ptr, stride_b, V, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, u_ptr, token_ptr, logprob_ptr,
                   BLOCK_V: tl.constexpr, NT: tl.constexpr):
    b = tl.program_id(0)
    row_ptr = logits_ptr + b.to(tl.int64) * stride_b

    # pass 1: max, first argmax, and the temperature-1 normalizer for the logprob
    m = tl.full((), -3.0e38, tl.float32)  # finite: a tile of masked (-inf) logits must not make NaNs
    z = tl.zeros((), tl.float32)
    best = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK_V):
        i = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + i, mask=i < V, other=float("-inf")).to(tl.float32)
        tile_max = tl.max(x, 0)
        best = tl.where(tile_max > m, start + tl.argmax(x, 0), best)  # strict: the first maximum wins
        m_new = tl.maximum(m, tile_max)
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new

    temperature = tl.load(temp_ptr + b)
    token = best
    if temperature > 0:
        c = LOG2E / temperature
        total = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            i = start + tl.arange(0, BLOCK_V)
            w = tl.exp2((tl.load(row_ptr + i, mask=i < V, other=float("-inf")).to(tl.float32) - m) * c)
            total += tl.sum(w, 0)
        # the kept set is {w >= tau}; the most likely token (w = 1) always stays
        tau = tl.load(min_p_ptr + b).to(tl.float32)
        k = tl.load(top_k_ptr + b)
        if (k > 0) & (k < V):
            tau = tl.maximum(tau, _smallest_threshold(row_ptr, V, m, c, 0.0, k.to(tl.float32), True, False,
                                                      BLOCK_V, NT))
        top_p = tl.load(top_p_ptr + b).to(tl.float32)
        if top_p < 1.0:
            tau = tl.maximum(tau, _smallest_threshold(row_ptr, V, m, c, 0.0, top_p * total, False, False,
                                                      BLOCK_V, NT))
        tau = tl.minimum(tau, 1.0)
        kept = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            i = start + tl.arange(0, BLOCK_V)
            w = tl.exp2((tl.load(row_ptr + i, mask=i < V, other=float("-inf")).to(tl.float32) - m) * c)
            kept += tl.sum(tl.where(w >= tau, w, 0.0), 0)
        target = tl.load(u_ptr + b).to(tl.float32) * kept
        v = _smallest_threshold(row_ptr, V, m, c, tau, target, False, True, BLOCK_V, NT)
        # the drawn token: the smallest kept weight >= v (v is one of the weights), lowest id on ties;
        # v > 0 even when u * kept rounds up to kept, so a zero-weight token is never drawn
        v = tl.maximum(v, tl.maximum(tau, 1.1754944e-38))
        w_min = tl.full((), float("inf"), tl.float32)
        for start in range(0, V, BLOCK_V):
            i = start + tl.arange(0, BLOCK_V)
            w = tl.exp2((tl.load(row_ptr + i, mask=i < V, other=float("-inf")).to(tl.float32) - m) * c)
            w = tl.where(w >= v, w, float("inf"))
            tile_min = tl.min(w, 0)
            token = tl.where(tile_min < w_min, start + tl.argmin(w, 0), token)
            w_min = tl.minimum(w_min, tile_min)

    x_token = tl.load(row_ptr + token).to(tl.float32)
    tl.store(token_ptr + b, token.to(tl.int64))
    tl.store(logprob_ptr + b, x_token - m - tl.log(z))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, uniforms: torch.Tensor, block_v: int = 1024, nt: int = 16):
    """Same contract as `sampling.sample_reference`: logits (B, V), per-row parameters (B,), uniforms (B,).

    Returns (tokens (B,) long, logprobs (B,) float32).
    """
    B, V = logits.shape
    assert logits.stride(-1) == 1, "the vocabulary dim must be contiguous"
    dev = logits.device
    tokens = torch.empty(B, dtype=torch.long, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    # u < 1 after the cast too, so the draw's target stays inside the kept mass
    u = uniforms.to(device=dev, dtype=torch.float32).clamp(0.0, 1.0 - 2 ** -24)
    _sample_kernel[(B,)](logits, logits.stride(0), V, temperature.to(dev, torch.float32),
                         top_k.to(dev, torch.int32), top_p.to(dev, torch.float32), min_p.to(dev, torch.float32), u,
                         tokens, logprobs, BLOCK_V=min(block_v, triton.next_power_of_2(V)), NT=nt, num_warps=8)
    return tokens, logprobs


# -------------------------------------------------------------------------------------------------
# Benchmark: python -m ttc.kernels.sampling_triton (do_bench on CUDA; on CPU it times the reference)

def _bench():
    from ._timing import copy_bandwidth, floor_ms, time_ms
    from .sampling import sample_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth() if device == "cuda" else None
    V = 49152  # SmolLM2
    for B in (1, 64):
        g = torch.Generator().manual_seed(0)
        logits = (torch.randn(B, V, generator=g) * 4).to(device)
        u = torch.rand(B, generator=g, dtype=torch.float64).to(device)
        for label, (tk, tp) in {"temperature only": (0, 1.0), "top-k 50": (50, 1.0), "top-p 0.9": (0, 0.9),
                                "top-k 50 + top-p 0.9": (50, 0.9)}.items():
            args = (logits, torch.full((B,), 0.8, device=device), torch.full((B,), tk, device=device),
                    torch.full((B,), tp, device=device), torch.zeros(B, device=device), u)
            fns = {"reference": lambda: sample_reference(*args)}
            if device == "cuda":
                fns["triton"] = lambda: sample(*args)
            for name, fn in fns.items():
                print(f"B={B:3d} {label:22s} {name:10s} {time_ms(fn, device):8.4f} ms")
        if bandwidth:
            print(f"B={B:3d} {'floor (one read)':22s} {'':10s} {floor_ms(logits.numel() * 4, bandwidth):8.4f} ms")


if __name__ == "__main__":
    _bench()
