"""A pure Llama-family transformer (Llama, Mistral, Qwen2, SmolLM): tokens in, logits out.

No sampling, no I/O, no cache policy: the caller passes the KV pool tensors, the slots where the new
tokens' K/V go, and an attention plan (decode or prefill) built once per step. Tokens of every
sequence in a step are flattened into one (T, H) batch, so each weight matmul runs once per step.

Options, each with the plain path as its twin (tests/test_decode_modes.py):
- `weights`: "int8" / "int4" run the layer linears weight-only quantized (kernels/quant.py; activations
  and the KV cache stay in `dtype`); int4 takes a GGUF's own Q4_1 blocks when given (`q4_1`).
- `batch_invariant`: linears and attention whose per-row results do not depend on the batch
  (kernels/invariant.py), so a sequence's tokens do not depend on what shares its decode steps.
- int4 where ttc's C++ CPU kernels build (float32 or bfloat16 activations): the work between two attention
  calls as two C++ calls per layer (`fused`; kernels/int4_cpu.py's FusedLayer), the same arithmetic as the
  eager layer, and decode attention's private part read in place (`private_attention`).
- `compile`: the work between two attention calls (o-proj, MLP, norms, the next qkv-proj and rotary)
  runs as one torch.compile'd (inductor) function of the layer's tensors, so one graph serves every
  layer; attention and the KV writes stay eager. See `ttc/decoder/compiled.py`.

`device`: where the weights and the rotary tables live (the engine puts the KV pool and every index tensor
beside them). On CUDA with Triton (`kernels.uses_triton`), norms run fused with the residual add before them
and rotary runs in place in the qkv output; the plain eager layer is their twin.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ttc import kernels
from ttc.kernels import DecodePlan, PrefillSeq, invariant
from ttc.kernels import int4_cpu
from ttc.kernels.int4_cpu import Int8HeadLinear
from ttc.kernels.invariant import InvariantLinear
from ttc.kernels.linear import Linear
from ttc.kernels.quant import quantize_linear

from .config import ModelConfig, rope_inv_freq

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("plain", "int8", "int4", "w4a8")  # plain: the weights in the model's dtype


def check_device_options(device: torch.device, weights: str, batch_invariant: bool, compile: bool) -> None:
    """One-line errors for what runs only on the CPU: quantized weights (ttc's CPU kernels), batch_invariant and
    compile. `ttc.load` calls it before reading any weight; the model again when built."""
    if device.type == "cpu":
        return
    if weights != "plain":
        raise ValueError(f"dtype={weights} runs on ttc's CPU kernels; on {device.type} use bfloat16, float16 or "
                         "float32")
    if batch_invariant or compile:
        raise ValueError(f"{'batch_invariant' if batch_invariant else 'compile'}=true is a CPU path; on "
                         f"{device.type} decode steps replay CUDA graphs instead (cuda_graphs=true)")


class Transformer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 weights: str = "plain", q4_1: dict | None = None, batch_invariant: bool = False,
                 compile: bool = False, device: torch.device | str = "cpu"):
        super().__init__()
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, not {weights!r}")
        self.device = torch.device(device)
        check_device_options(self.device, weights, batch_invariant, compile)
        self.cfg, self.dtype, self.weights, self.batch_invariant = cfg, dtype, weights, batch_invariant
        self.scale = cfg.head_dim ** -0.5
        q4_1 = q4_1 or {}

        def w(name):
            return state[name].to(device=self.device, dtype=dtype).contiguous()

        def norm(name):  # norms stay float32: they are tiny
            return state[name].to(device=self.device, dtype=torch.float32)

        def linear(name, bias_name=None):
            bias = w(bias_name) if bias_name in state else None
            if weights == "plain":
                lin = Linear(w(name), bias)
            else:  # quantized from the float32 weights (or the GGUF's own blocks), not from their dtype copy
                lin = quantize_linear(state[name], bias, weights, q4_1.get(name), activations=dtype)
            return InvariantLinear(lin, state[name].shape[1], dtype) if batch_invariant else lin

        self.embed = w("embed")  # (V, H)
        # tied embeddings share the plain weight; a packed head (if any) is the only extra copy. The head stays in
        # the model's dtype in every weight format: it is where near-ties between tokens are decided.
        head = Linear(self.embed if state["lm_head"] is state["embed"] else w("lm_head"))
        self.rms_norm = kernels.rms_norm
        self.private_attention = None  # decode attention's private part: gathered, then ATen's flash kernel
        self.min_shared_tokens = 16  # a prefix shared by rows shorter than this is read per row (plan_decode)
        own_kernels = weights in ("int4", "w4a8") and not batch_invariant and int4_cpu.available()  # ttc's C++ CPU kernels
        if own_kernels and dtype == torch.float32:
            # int4 on ttc's float32 kernels: the head as int8 codes where that is its exact weight (a Q8_0 head
            # in the GGUF, as the embedded model's); kernels/int4_cpu.py says why and when
            head = Int8HeadLinear.exact_from_float(head.weight, w4a8=weights == "w4a8") or head
        if own_kernels and dtype in (torch.float32, torch.bfloat16):
            self.rms_norm = int4_cpu.rms_norm  # one C++ pass instead of ~3-7 ops; rounds unlike PyTorch's
            if cfg.head_dim % 8 == 0:  # read in place: one call, not two gathers and the flash kernel
                self.private_attention = int4_cpu.paged_partial
                # a shared segment costs ~8 ops a layer (its gathers, the flash kernel, the merge): reading a
                # short one in place with each row's own keys is cheaper (a 64-token prompt at 16 and 64 rows,
                # W4A8 on an AMX Xeon: 25.6 -> 24.8 and 88.7 -> 86.8 ms a step)
                self.min_shared_tokens = 128
        self.lm_head = InvariantLinear(head, cfg.hidden_size, dtype) if batch_invariant else head
        self.norm = norm("norm")
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            self.layers.append({
                "attn_norm": norm(p + "attn_norm"),
                "qkv": linear(p + "qkv", p + "qkv_bias"),  # H -> (Hq+2Hkv)*D
                "o": linear(p + "o"),  # Hq*D -> H
                "mlp_norm": norm(p + "mlp_norm"),
                "gate_up": linear(p + "gate_up"),  # H -> 2*I
                "down": linear(p + "down"),  # I -> H
            })
        # int4 where ttc's C++ kernels build: each layer's work between attention calls as two C++ calls (their
        # twin: the eager forward, which `fused = None` runs; kernels/int4_cpu.py's FusedLayer)
        self.fused = None
        if own_kernels:
            self.fused = int4_cpu.FusedLayer.build_all(self.layers, self.norm, cfg.num_heads, cfg.num_kv_heads,
                                                       cfg.rms_norm_eps, dtype)
        self.compiled = None
        if compile:
            from .compiled import CompiledLayers

            self.compiled = CompiledLayers.build(self)  # None where torch.compile is unavailable
        # (max_position, D/2) tables; float64 angles, float32 storage
        inv = rope_inv_freq(cfg)
        angles = torch.outer(torch.arange(cfg.max_position, dtype=torch.float64), inv)
        self.rope_cos = angles.cos().float().to(self.device)
        self.rope_sin = angles.sin().float().to(self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                new_slots: torch.Tensor, attn: DecodePlan | list[PrefillSeq], logits_rows: torch.Tensor | None = None,
                return_hidden: bool = False):
        """tokens, positions, new_slots: (T,). k_cache, v_cache: (L, S, Hkv, D).

        Returns (logits (R, V) float32 for `logits_rows` (all rows if None), hidden (T, H) or None),
        where hidden is the final-norm hidden state the head reads.
        """
        if self.compiled is not None:
            try:
                return self._forward_compiled(tokens, positions, k_cache, v_cache, new_slots, attn, logits_rows,
                                              return_hidden)
            except Exception as e:  # inductor could not build or run it: eager from now on (same slots rewritten)
                log.warning("torch.compile failed (%s: %s); the model runs eager", type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
                self.compiled = None
        if self.fused is not None:
            return self._forward_fused(tokens, positions, k_cache, v_cache, new_slots, attn, logits_rows, return_hidden)
        cfg = self.cfg
        T = tokens.shape[0]
        Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        on_triton = kernels.uses_triton(tokens) and self.rms_norm is kernels.rms_norm
        tables = None if on_triton else kernels.rotary_tables(cos, sin)  # once, for all layers
        decode = not isinstance(attn, list)  # a DecodePlan, or a CUDA graph's static table (ttc/decoder/graphs.py)
        x = self.embed[tokens]  # (T, H)
        h = self.rms_norm(x, self.layers[0]["attn_norm"], cfg.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            qkv = layer["qkv"](h)  # (T, (Hq + 2Hkv) * D)
            # Triton rotates q and k in place in the qkv output; the reference makes a rotated copy
            qk = kernels.apply_rotary(qkv[:, : (Hq + Hkv) * D].view(T, Hq + Hkv, D), cos, sin, inplace=on_triton,
                                      tables=tables)
            q, k = qk[:, :Hq], qk[:, Hq:]
            v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
            k_cache[i].index_copy_(0, new_slots, k)
            v_cache[i].index_copy_(0, new_slots, v)
            a = self._attention(q, k_cache[i], v_cache[i], attn, decode)
            next_norm = self.layers[i + 1]["attn_norm"] if i + 1 < len(self.layers) else self.norm
            if on_triton:  # each residual add fused into the norm after it: (norm(x + r), x + r) in one kernel
                h, x = kernels.rms_norm(layer["o"](a.reshape(T, Hq * D)), layer["mlp_norm"], cfg.rms_norm_eps, residual=x)
                gate, up = layer["gate_up"](h).chunk(2, dim=-1)
                h, x = kernels.rms_norm(layer["down"](F.silu(gate) * up), next_norm, cfg.rms_norm_eps, residual=x)
                continue
            x = x + layer["o"](a.reshape(T, Hq * D))
            h = self.rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
            gate, up = layer["gate_up"](h).chunk(2, dim=-1)
            x = x + layer["down"](F.silu(gate) * up)
            h = self.rms_norm(x, next_norm, cfg.rms_norm_eps)
        return self._head(h, logits_rows, return_hidden)

    def _forward_compiled(self, tokens, positions, k_cache, v_cache, new_slots, attn, logits_rows, return_hidden):
        """`forward` with the work between attention calls in compiled graphs (ttc/decoder/compiled.py)."""
        cfg, c = self.cfg, self.compiled
        T, Hq, Hkv, D = tokens.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        decode = isinstance(attn, DecodePlan)
        x = self.embed[tokens]  # (T, H)
        h = kernels.rms_norm(x, self.layers[0]["attn_norm"], cfg.rms_norm_eps)
        qk, v = c.first(h, cos, sin, Hq, Hkv, c.parts[0]["qkv"])
        for i, (layer, parts) in enumerate(zip(self.layers, c.parts)):
            k_cache[i].index_copy_(0, new_slots, qk[:, Hq:])
            v_cache[i].index_copy_(0, new_slots, v)
            a = self._attention(qk[:, :Hq], k_cache[i], v_cache[i], attn, decode)
            last = i + 1 == len(self.layers)
            next_norm = self.norm if last else self.layers[i + 1]["attn_norm"]
            x, h, qk, v = c.between(a.reshape(T, Hq * D), x, cos, sin, cfg.rms_norm_eps, Hq, Hkv, parts["o"],
                                    layer["mlp_norm"], parts["gate_up"], parts["down"], next_norm,
                                    None if last else c.parts[i + 1]["qkv"])
        return self._head(h, logits_rows, return_hidden)

    def _forward_fused(self, tokens, positions, k_cache, v_cache, new_slots, attn, logits_rows, return_hidden):
        """`forward` with each layer's work between attention calls in two C++ calls (kernels/int4_cpu.py)."""
        T, Hq, D = tokens.shape[0], self.cfg.num_heads, self.cfg.head_dim
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, D/2) each
        decode = isinstance(attn, DecodePlan)
        x = self.embed[tokens]  # (T, H)
        h = self.rms_norm(x, self.layers[0]["attn_norm"], self.cfg.rms_norm_eps)
        for layer, k_layer, v_layer in zip(self.fused, k_cache, v_cache):  # (S, Hkv, D) views of layer i's KV
            q = layer.before_attention(h, cos, sin, k_layer, v_layer, new_slots)
            a = self._attention(q, k_layer, v_layer, attn, decode)
            x, h = layer.after_attention(a.reshape(T, Hq * D), x)
        return self._head(h, logits_rows, return_hidden)

    def _attention(self, q, k_cache, v_cache, attn, decode: bool):
        """q (T, Hq, D) -> (T, Hq, D) for one layer, by the plan's kind (decode or prefill)."""
        if self.batch_invariant:
            if decode:
                return invariant.decode_attention(q, k_cache, v_cache, attn, self.scale)
            return invariant.prefill_attention(q, k_cache, v_cache, attn, self.scale)
        if decode:
            return kernels.decode_attention(q, k_cache, v_cache, attn, self.scale, self.private_attention)
        return kernels.prefill_attention(q.contiguous(), k_cache, v_cache, attn, self.scale)

    def _head(self, h, logits_rows, return_hidden: bool):
        rows = h if logits_rows is None else h[logits_rows]
        logits = self.lm_head(rows).float()
        return logits, (h if return_hidden else None)
