"""A pure Llama-family transformer (Llama, Mistral, Qwen2, SmolLM): tokens in, logits out.

No sampling, no I/O, no cache policy: the caller passes the KV pool tensors, the slots where the new
tokens' K/V go, and an attention plan (decode or prefill) built once per step. Tokens of every
sequence in a step are flattened into one (T, H) batch, so each weight matmul runs once per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttc import kernels
from ttc.kernels import DecodePlan, PrefillSeq
from ttc.kernels.linear import Linear

from .config import ModelConfig, rope_inv_freq


class Transformer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.scale = cfg.head_dim ** -0.5

        def w(name):
            return state[name].to(dtype).contiguous()

        self.embed = w("embed")  # (V, H)
        # tied embeddings share the plain weight; a packed head (if any) is the only extra copy
        self.lm_head = Linear(self.embed if state["lm_head"] is state["embed"] else w("lm_head"))
        self.norm = state["norm"].float()
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            self.layers.append({
                "attn_norm": state[p + "attn_norm"].float(),  # norms stay float32: they are tiny
                "qkv": Linear(w(p + "qkv"), w(p + "qkv_bias") if p + "qkv_bias" in state else None),  # H -> (Hq+2Hkv)*D
                "o": Linear(w(p + "o")),  # Hq*D -> H
                "mlp_norm": state[p + "mlp_norm"].float(),
                "gate_up": Linear(w(p + "gate_up")),  # H -> 2*I
                "down": Linear(w(p + "down")),  # I -> H
            })
        # (max_position, D/2) tables; float64 angles, float32 storage
        inv = rope_inv_freq(cfg)
        angles = torch.outer(torch.arange(cfg.max_position, dtype=torch.float64), inv)
        self.rope_cos = angles.cos().float()
        self.rope_sin = angles.sin().float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                new_slots: torch.Tensor, attn: DecodePlan | list[PrefillSeq], logits_rows: torch.Tensor | None = None,
                return_hidden: bool = False):
        """tokens, positions, new_slots: (T,). k_cache, v_cache: (L, S, Hkv, D).

        Returns (logits (R, V) float32 for `logits_rows` (all rows if None), hidden (T, H) or None),
        where hidden is the final-norm hidden state the head reads.
        """
        cfg = self.cfg
        T = tokens.shape[0]
        Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        tables = None if kernels.uses_triton(tokens) else kernels.rotary_tables(cos, sin)  # once, for all layers
        decode = isinstance(attn, DecodePlan)
        x = self.embed[tokens]  # (T, H)
        h = kernels.rms_norm(x, self.layers[0]["attn_norm"], cfg.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            qkv = layer["qkv"](h)  # (T, (Hq + 2Hkv) * D)
            qk = kernels.apply_rotary(qkv[:, : (Hq + Hkv) * D].view(T, Hq + Hkv, D), cos, sin, tables=tables)
            q, k = qk[:, :Hq], qk[:, Hq:]
            v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
            k_cache[i].index_copy_(0, new_slots, k)
            v_cache[i].index_copy_(0, new_slots, v)
            if decode:
                a = kernels.decode_attention(q, k_cache[i], v_cache[i], attn, self.scale)
            else:
                a = kernels.prefill_attention(q.contiguous(), k_cache[i], v_cache[i], attn, self.scale)
            x = x + layer["o"](a.reshape(T, Hq * D))
            h = kernels.rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
            gate, up = layer["gate_up"](h).chunk(2, dim=-1)
            x = x + layer["down"](F.silu(gate) * up)
            next_norm = self.layers[i + 1]["attn_norm"] if i + 1 < len(self.layers) else self.norm
            h = kernels.rms_norm(x, next_norm, cfg.rms_norm_eps)
        rows = h if logits_rows is None else h[logits_rows]
        logits = self.lm_head(rows).float()
        return logits, (h if return_hidden else None)
