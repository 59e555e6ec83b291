"""Triton twin of `sampling.sample_reference`: temperature, top-k, top-p, min-p sampling without a sort.

Why: a sort of every row of the vocabulary (49152 entries for SmolLM2) is the slow part of the
reference. Every cut is instead a threshold on the tempered weight w = exp((x - max) / T) in (0, 1]:
- min-p keeps w >= min_p (the most likely token has w = 1);
- top-k keeps w >= the k-th largest w, which is the smallest t with count(w > t) < k;
- top-p keeps w >= the smallest t with sum(w > t) < top_p * sum(w).
Each "smallest t" is found by a many-way bisection on the bit pattern of t (positive floats order
like their bits): every pass over the row tests NT thresholds at once, so 2^30 candidates take
ceil(30 / log2(NT)) passes of plain streaming reads, with no sort and no scratch memory.
The draw is in VOCABULARY order, like the reference's: the first token index i whose running sum
of kept weights exceeds u * (kept mass), found in one more pass over the row in BLOCK_V chunks
(tl.cumsum inside a chunk plus the carry of the chunks before it); if rounding at the top end
leaves no crossing, the last kept token. One program handles one row; the row stays in L2 across
passes. Passes: max/normalizer, total, the bisections (top-k, top-p, only when asked), kept mass,
the draw.

Reference: `sampling.sample_reference` (same contract; greedy rows take the first maximal logit).
The randomness is the caller's: one uniform per row (drawn from that row's own seeded generator),
so the same seed picks the same token here and on a CPU.
Limits: the weights here are unnormalized exp2 values and the sums run in float32 in another
order (chunked scan + carry) than the reference's (softmax, then a cumsum of probabilities), so a
draw whose target sits at a boundary (within ~1e-6 of the kept mass) may move to the neighbouring
kept token, and a cut may move by one token where a weight sits exactly on a threshold; ties at a
threshold keep every tied token (the reference keeps exactly k, in torch.topk's order); and a
row without top-k / top-p keeps its whole tail, while the reference, when another row of the
batch sorts, also drops the tokens below float32 resolution of the mass (< ~1e-7 of it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# globals a kernel reads must be constexpr: the compiler refuses plain ones (the interpreter does not)
LOG2E = tl.constexpr(1.4426950408889634)
ONE_BITS = tl.constexpr(0x3F800000)  # the bit pattern of 1.0f


@triton.jit
def _smallest_threshold(row_ptr, V, m, c, goal, COUNT: tl.constexpr, BLOCK_V: tl.constexpr, NT: tl.constexpr):
    """Smallest t in [0, 1] with stat(t) < goal, stat(t) = sum over w > t of (1 if COUNT else w).
    stat is non-increasing in t, and stat(1) = 0."""
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
            if COUNT:
                f = tl.where(w > 0, 1.0, 0.0)
            else:
                f = w
            stat += tl.sum(tl.where(w[:, None] > t[None, :], f[:, None], 0.0), 0)
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
            tau = tl.maximum(tau, _smallest_threshold(row_ptr, V, m, c, k.to(tl.float32), True, BLOCK_V, NT))
        top_p = tl.load(top_p_ptr + b).to(tl.float32)
        if top_p < 1.0:
            tau = tl.maximum(tau, _smallest_threshold(row_ptr, V, m, c, top_p * total, False, BLOCK_V, NT))
        tau = tl.minimum(tau, 1.0)
        kept = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            i = start + tl.arange(0, BLOCK_V)
            w = tl.exp2((tl.load(row_ptr + i, mask=i < V, other=float("-inf")).to(tl.float32) - m) * c)
            kept += tl.sum(tl.where(w >= tau, w, 0.0), 0)
        # the draw, in vocabulary order: the first kept token whose running sum of kept weights
        # exceeds u * (kept mass); a block's prefix sums are its tl.cumsum plus the carry of the
        # blocks before it. If rounding at the top end leaves no crossing, the last kept token.
        target = tl.load(u_ptr + b).to(tl.float32) * kept
        carry = tl.zeros((), tl.float32)
        first = tl.zeros((), tl.int32) + V  # V: no crossing yet
        last_kept = tl.zeros((), tl.int32)  # the most likely token is kept, so one exists
        for start in range(0, V, BLOCK_V):
            i = start + tl.arange(0, BLOCK_V)
            w = tl.exp2((tl.load(row_ptr + i, mask=i < V, other=float("-inf")).to(tl.float32) - m) * c)
            w = tl.where(w >= tau, w, 0.0)  # (BLOCK_V,); masked and out-of-row entries weigh 0
            cdf = carry + tl.cumsum(w, 0)
            # w > 0: a scan's rounding must not let a zero-weight token be the crossing
            first = tl.minimum(first, tl.min(tl.where((cdf > target) & (w > 0), i, V), 0))
            last_kept = tl.maximum(last_kept, tl.max(tl.where(w > 0, i, -1), 0))
            carry += tl.sum(w, 0)
        token = tl.where(first < V, first, last_kept)

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
    # cast like the reference's; a u that rounds up to 1.0 finds no crossing and takes the last kept token
    u = uniforms.to(device=dev, dtype=torch.float32).clamp(0.0, 1.0)
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
