"""The engine: sequences whose computed KV catches up with their tokens, one batched forward per step.

A `Sequence` is one branch: its token ids, its KV handle, its random stream and the logits for its
next token. There are no prefill/decode phases, only a count of computed tokens catching up with
the total (as in vLLM v1): `forward` computes every pending token of every given sequence in one
model call, `generate` alternates sampling and forwarding, `fork` shares KV, `score` runs given
tokens without sampling (for verifiers), `release` returns blocks. Every computed and every reused
token is charged to the sequence's Ledger.

The engine runs where its model's weights are (`model.device`): the KV pool and every step's tokens, positions
and slots are made there (one copy a step); the cascade plan is built on the host and reaches the device as
the Triton kernel's work table (or, for the reference kernels, moved itself: `DecodePlan.to`). On CUDA with
`cuda_graphs`, plain decode steps replay CUDA graphs (`graphs.DecodeGraphs`). What leaves the engine (scores,
completions) is on the CPU; a sequence's next-token logits stay on the device.
"""

from __future__ import annotations

import contextlib

import torch

from ttc.budget import CannotAttempt, Ledger
from ttc.kernels import GatherWorkspace, GroupCache, PrefillBatch, PrefillSeq, plan_decode, uses_triton
from ttc.kernels.decode_plan import move_by_dtype

from . import cache
from .batch import GenerationBatch
from .cache import KVPool, KVSequence, PoolExhausted
from .model import Transformer
from .prefix import PrefixCache
from .sampling import BranchRng, SamplingParams, child_seed
from .sequence import CONFIDENCE_K, Completion, ConfidenceStop, ScoreResult, Sequence, charge_given
from .tokenizer import Tokenizer


def to_host(tensors: list[torch.Tensor | None], device: torch.device | str = "cpu") -> list[torch.Tensor | None]:
    """Results leaving the engine, moved to the CPU (where verifiers and callers compute) in one copy per dtype,
    not one per tensor: each copy off a GPU waits for it (a score of 64 continuations would wait ~190 times).
    Tensors already there are returned as they are; `device` is for tests (a CPU-to-CPU move takes the same path)."""
    device = torch.device(device)
    moving = [i for i, t in enumerate(tensors) if t is not None and t.device != device]
    out = list(tensors)
    for i, t in zip(moving, move_by_dtype([tensors[i] for i in moving], device)):
        out[i] = t
    return out


class PromptTooLong(CannotAttempt, ValueError):
    """A prompt that leaves no room in the model's context window."""


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, kv_cache_bytes: int = 2 << 30,
                 block_size: int = 16, prefix_caching: bool = True, confidence_k: int = CONFIDENCE_K,
                 cuda_graphs: bool = False):
        cfg = model.cfg
        self.confidence_k = confidence_k  # top-k of each drawn token's confidence (Completion.confidences)
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.device = model.device
        per_block = cfg.kv_bytes_per_token(model.dtype) * block_size
        num_blocks = max(4, kv_cache_bytes // per_block)
        self.pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks, block_size, model.dtype,
                           device=self.device, scratch_blocks=1 if cuda_graphs else 0)
        self.graphs = None
        if cuda_graphs:
            from .graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.pool, capture=self.device.type == "cuda")
        self.prefix = PrefixCache(self.pool) if prefix_caching else None
        self.attention_workspace = GatherWorkspace()  # decode gathers write into kept buffers (see its docstring)
        self.plan_groups = GroupCache()  # a decode step's shared segments, reused while the rows' blocks allow
        self.eos_ids = set(tokenizer.eos_ids) | set(cfg.eos_token_ids)
        self._params_flops = cfg.params_per_token_flops()
        self._attention_flops_per_key = cfg.attention_flops(1)  # linear in the keys: one query, one key, all layers

    def on_device(self):
        """The engine's GPU as the current one (Triton launches and CUDA graphs use the current device, not their
        tensors'; a thread starts on device 0): a no-op on the CPU."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    # ---------------------------------------------------------------------------------------------
    # sequences

    def new_sequence(self, token_ids, ledger: Ledger | None = None, seed: int = 0, charge: str = "prefill"):
        """A sequence holding token_ids, with the longest cached prefix reused and the rest pending."""
        token_ids = list(token_ids)
        if not token_ids:
            raise ValueError("a sequence needs at least one token")
        if len(token_ids) >= self.cfg.max_position:
            raise PromptTooLong(
                f"prompt of {len(token_ids)} tokens leaves no room in the model's context of "
                f"{self.cfg.max_position} tokens; shorten it to at most {self.cfg.max_position - 1}")
        ledger = ledger if ledger is not None else Ledger()
        charge_given(None, charge, 0)  # an unknown kind fails here, not at the forward
        seq = Sequence(token_ids, KVSequence(), BranchRng(seed), ledger)
        if self.prefix is not None:
            # keep at least one token to compute: its logits are the first sample's distribution
            blocks = self.prefix.match(token_ids, max_tokens=len(token_ids) - 1)
            self.pool.incref(blocks)
            seq.kv.blocks, seq.kv.num_tokens = blocks, len(blocks) * self.pool.block_size
            ledger.charge_reused(seq.kv.num_tokens)
        seq.uncharged[charge] = seq.num_pending
        return seq

    def extend(self, seq: Sequence, token_ids, charge: str = "prefill") -> None:
        """Append given tokens (computed by the next forward, charged to `charge`)."""
        if len(seq.token_ids) + len(token_ids) >= self.cfg.max_position:
            raise PromptTooLong(f"extending to {len(seq.token_ids) + len(token_ids)} tokens exceeds the context "
                                f"of {self.cfg.max_position}")
        seq.token_ids.extend(token_ids)
        seq.uncharged[charge] = seq.uncharged.get(charge, 0) + len(token_ids)
        seq.logits = None

    def fork(self, seq: Sequence, n: int, seeds: list[int] | None = None, ledger: Ledger | None = None):
        """n children sharing seq's KV; each child has its own random stream from its first token on."""
        if seq.num_pending:
            self.forward([seq])
        seeds = seeds if seeds is not None else [child_seed(seq.rng.seed, i) for i in range(n)]
        children = []
        try:
            for s in seeds:
                kv = self._with_eviction(lambda: cache.fork(self.pool, seq.kv))
                child = Sequence(list(seq.token_ids), kv, BranchRng(s), ledger if ledger is not None else seq.ledger,
                                 logits=seq.logits)
                child.ledger.charge_reused(kv.num_tokens)
                children.append(child)
        except PoolExhausted:
            self.release(children)
            raise
        return children

    def release(self, seqs) -> None:
        for s in seqs:
            cache.release(self.pool, s.kv)
            s.logits = None

    def clear_prefix_cache(self) -> None:
        if self.prefix is not None:
            self.prefix.clear()

    def free_blocks(self) -> int:
        """Blocks available to new work: free now, or held only by the prefix cache."""
        return self.pool.num_free + (self.prefix.evictable_blocks() if self.prefix is not None else 0)

    def _with_eviction(self, allocate):
        try:
            return allocate()
        except PoolExhausted as e:
            if self.prefix is None or self.prefix.evict(e.needed_blocks - e.free_blocks) == 0:
                raise
            return allocate()

    # ---------------------------------------------------------------------------------------------
    # forward

    def forward(self, seqs: list[Sequence], all_logits: bool = False, hidden: bool = False,
                cache_prefix: bool = True):
        """Compute every pending token of seqs in one model call.

        Sets each seq's next-token logits. With all_logits/hidden, returns per seq the logits (n, V)
        and hidden states (n, H) of its pending tokens (n = its pending count); else the (B, V) next-token logits
        of the sequences that had pending tokens, in order (each one's row is its `logits`), or None if none had.
        Prompt-like forwards (several tokens) enter the prefix cache unless cache_prefix is False.
        """
        counts = [len(s.token_ids) - s.kv.num_tokens for s in seqs]  # each one's pending tokens
        if all_logits or hidden:
            if not all(counts):
                raise ValueError("all_logits/hidden need pending tokens on every sequence")
        elif not all(counts):
            seqs, counts = [s for s, n in zip(seqs, counts) if n], [n for n in counts if n]
        if not seqs:
            return None
        bs = self.pool.block_size
        for s, n in zip(seqs, counts):
            if cache.blocks_short(self.pool, s.kv, n):  # checked first: most decode rows need no block
                self._with_eviction(lambda s=s, n=n: cache.reserve(self.pool, s.kv, n))
        decode = all(n == 1 for n in counts)
        if decode:  # one token each: written out, as this runs for every row of every step
            positions = [s.kv.num_tokens for s in seqs]
            tokens = [s.token_ids[p] for s, p in zip(seqs, positions)]
            slots = [s.kv.blocks[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
        else:
            tokens, positions, slots = [], [], []
            for s, n in zip(seqs, counts):
                start = s.kv.num_tokens
                tokens.extend(s.token_ids[start:])
                positions.extend(range(start, start + n))
                slots.extend(s.kv.slots(start, start + n, bs))
        dev = self.device
        logits = None
        if decode:
            # planned on the host; moved to the device only for an eager step (a graph's table is refilled in place)
            attn = plan_decode([s.kv.blocks for s in seqs], [p + 1 for p in positions], bs,
                               min_shared_tokens=self.model.min_shared_tokens, dtype=self.model.dtype,
                               workspace=self.attention_workspace, groups=self.plan_groups)
            if self.graphs is not None and not hidden:
                with self.on_device():
                    logits = self.graphs.run(tokens, positions, slots, attn)
            if logits is None and not uses_triton(self.pool.k):
                attn = attn.to(dev)  # the reference reads the plan on the device; Triton's work table is built from
                # the host plan and moved in one copy of its own (kernels/attention_triton.py)
        else:
            # every sequence's whole context, new tokens last: one copy to the device, then a view per sequence
            contexts = [s.kv.slots(0, s.kv.num_tokens + n, bs) for s, n in zip(seqs, counts)]
            views = torch.tensor([slot for c in contexts for slot in c], device=dev).split([len(c) for c in contexts])
            attn, row = PrefillBatch(), 0
            for n, view in zip(counts, views):
                attn.append(PrefillSeq(row, row + n, view))
                row += n
        h = None
        if logits is None:
            # logits rows: one per sequence (its last token), or every token when all_logits is asked
            rows = None if (decode or all_logits) else torch.tensor(counts, device=dev).cumsum(0) - 1
            inputs = torch.tensor([tokens, positions, slots], device=dev)  # (3, T): one host-to-device copy
            with self.on_device():
                logits, h = self.model(inputs[0], inputs[1], self.pool.k, self.pool.v, inputs[2], attn,
                                       logits_rows=rows, return_hidden=hidden)
        outputs = [] if (all_logits or hidden) else None
        next_logits = None if all_logits else logits.unbind(0)  # row i's views in one call, not B indexings
        row = 0
        for i, (s, n) in enumerate(zip(seqs, counts)):
            s.kv.num_tokens += n
            s.logits = logits[row + n - 1] if all_logits else next_logits[i]
            if outputs is not None:
                outputs.append((logits[row:row + n] if all_logits else None, h[row:row + n] if hidden else None))
            self._charge(s, n)
            row += n
        for ledger in {id(s.ledger): s.ledger for s in seqs}.values():
            ledger.charge_forward(self.pool.live_bytes)
        if cache_prefix and not decode and self.prefix is not None:
            for s in seqs:
                self.prefix.insert(s.token_ids[: s.kv.num_tokens], s.kv.blocks)
        return outputs if outputs is not None else logits

    def _charge(self, s: Sequence, n: int) -> None:
        start = s.kv.num_tokens - n
        # attention over context start+1 .. start+n: sum of an arithmetic series
        context = n * start + n * (n + 1) // 2
        s.ledger.charge_flops(n * self._params_flops + self._attention_flops_per_key * context)
        if s.uncharged:  # sampled tokens were charged as generated when they were drawn
            for kind, count in s.uncharged.items():
                charge_given(s.ledger, kind, count)
            s.uncharged.clear()

    # ---------------------------------------------------------------------------------------------
    # generation and scoring

    def generate(self, seqs: list[Sequence], params: SamplingParams | list[SamplingParams],
                 max_new_tokens: int | list[int], stop: list[str] | tuple[str, ...] | None = None,
                 ignore_eos: bool = False, stop_when: ConfidenceStop | None = None,
                 shared_tokens: int | None = None) -> list[Completion]:
        """Advance every sequence until its own stop string, EOS or token limit (or, with `stop_when`, until its
        confidence window falls below the threshold: that sequence's KV is released at once); one forward per step.
        With `shared_tokens`, the sequences also draw at most that many new tokens together: what one that ended
        early did not draw, the others may (when the pool runs short, the last sequences end first).

        Raises PoolExhausted before starting if the worst case (every sequence at its limit) cannot fit."""
        batch = GenerationBatch(self)
        request = batch.add(seqs, params, max_new_tokens, stop, ignore_eos, stop_when, shared_tokens)
        while not request.done:
            batch.step()
        return request.completions

    def score(self, items: list[tuple[Sequence, list[int]]], hidden: bool = False,
              charge: str = "verifier", ledger: Ledger | None = None, logprobs: bool = True) -> list[ScoreResult]:
        """Logprobs (and hidden states) of given continuations, without sampling or changing the branches.

        Each continuation runs on a temporary fork of its branch, so the branch's prefix is not
        recomputed: only the continuation's tokens are charged (to `charge`), then the fork is released.
        `logprobs=False` (with hidden=True): hidden states only; the vocabulary head then runs for one row
        per continuation instead of every token (a probe's ~25-token question: a tenth of a beam+probe
        eval's time went to that head), and `logprobs`/`last_logprobs` are None.
        """
        if not logprobs and not hidden:
            raise ValueError("score without logprobs is only for hidden states (hidden=True)")
        forks = []
        try:
            for seq, ids in items:
                if not ids:
                    raise ValueError("score needs at least one continuation token")
                (child,) = self.fork(seq, 1, seeds=[0], ledger=ledger)  # the prefix counts as reused
                forks.append(child)
                self.extend(child, ids, charge=charge)
            if not logprobs:
                outputs = self.forward(forks, hidden=True, cache_prefix=False)
                return [ScoreResult(None, None, h) for h in to_host([h for _, h in outputs])]
            outputs = self.forward(forks, all_logits=True, hidden=hidden, cache_prefix=False)
            on_device = []  # per item: its given tokens' logprobs, the distribution after them, its hidden states
            given = torch.tensor([t for _, ids in items for t in ids], device=self.device)
            given = given.split([len(ids) for _, ids in items])
            for (seq, ids), tokens, (logits, h) in zip(items, given, outputs):
                # logits row j predicts token j+1; the first given token is predicted by the branch's logits
                prev = torch.cat([seq.logits[None], logits[:-1]])  # fork() computed seq's pending tokens
                on_device += [torch.log_softmax(prev, -1).gather(1, tokens[:, None])[:, 0],
                              torch.log_softmax(logits[-1], -1), h]
            moved = to_host(on_device)
            return [ScoreResult(*moved[i:i + 3]) for i in range(0, len(moved), 3)]
        finally:
            self.release(forks)
