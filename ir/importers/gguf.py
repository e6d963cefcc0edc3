"""GGUF (llama.cpp) files -> ModelSpec + canonical state dict + Tokenizer.

Supported: architecture `llama` (dense, and Mixtral-style MoE stored as llama with experts), any
tensor type `gguf.quants` can dequantize (F32, F16, BF16, Q4_0/1, Q8_0, K-quants, ...).

llama.cpp's converter permutes the rows of W_q and W_k of every head from HF's half-split RoPE
layout (pairs i, i + D/2) to the interleaved one (pairs 2i, 2i+1). We undo that permutation, so the
canonical model keeps HF's layout (rope_interleaved=False) and the same weights transformers' GGUF
loader produces.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from rich.progress import track

from fxforge.ir.errors import CorruptModelFileError, UnsupportedArchitectureError
from fxforge.ir.spec import ModelSpec
from fxforge.ir.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "mlp_norm.weight",
    "attn_q.weight": "attn.q_proj.weight", "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight", "attn_output.weight": "attn.o_proj.weight",
    "attn_q.bias": "attn.q_proj.bias", "attn_k.bias": "attn.k_proj.bias", "attn_v.bias": "attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.router.weight",
    "ffn_gate_exps.weight": "mlp.experts.w_gate", "ffn_up_exps.weight": "mlp.experts.w_up",
    "ffn_down_exps.weight": "mlp.experts.w_down",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_OLD_EXPERT = re.compile(r"ffn_(gate|up|down)\.(\d+)\.weight")  # pre-2024 Mixtral files: one tensor per expert


def load_gguf(path: str | Path,
              dtype: torch.dtype = torch.float32) -> tuple[ModelSpec, dict[str, torch.Tensor], Tokenizer]:
    """Read a llama-architecture GGUF: its spec, dequantized canonical weights (in `dtype`), tokenizer."""
    path = Path(path)
    reader = open_gguf(path)
    spec = spec_from_gguf(reader, path)
    state = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for tensor in track(reader.tensors, description=f"dequantizing {path.name}", transient=True):
        weight = _dequantize(tensor, path)
        name = tensor.name
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            weight = unpermute_rope_rows(weight, spec.num_heads)
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            weight = unpermute_rope_rows(weight, spec.num_kv_heads)
        block = _BLOCK.fullmatch(name)
        old_expert = _OLD_EXPERT.fullmatch(block.group(2)) if block else None
        if old_expert:
            experts.setdefault((int(block.group(1)), old_expert.group(1)), {})[int(old_expert.group(2))] = weight
            continue
        state[_canonical_name(name, path)] = torch.from_numpy(weight).to(dtype)
    for (layer, which), per_expert in experts.items():
        stacked = np.stack([per_expert[e] for e in range(len(per_expert))])
        state[f"layers.{layer}.mlp.experts.w_{which}"] = torch.from_numpy(stacked).to(dtype)
    return spec, state, Tokenizer.from_gguf_fields(reader)


def open_gguf(path: Path) -> GGUFReader:
    """A GGUFReader over `path`, or CorruptModelFileError if the file is not a readable GGUF."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CorruptModelFileError(f"{path} is not a valid GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader fails in many ways (ValueError, IndexError, ...) on a damaged file
        raise CorruptModelFileError(f"{path} is not a valid GGUF file (truncated or damaged): {e}") from None
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:
            raise CorruptModelFileError(f"{path} is not a valid GGUF file: tensor {tensor.name} is truncated")
    return reader


def spec_from_gguf(reader: GGUFReader, path: Path) -> ModelSpec:
    """The ModelSpec stated by the llama.* metadata of a GGUF file."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path} has GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedArchitectureError(
            f"{path} carries rope_freqs (Llama 3.1-style RoPE scaling stored as a tensor); fxforge does not import it")
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        raise UnsupportedArchitectureError(f"{path} uses RoPE scaling {scaling!r}, which fxforge does not import")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    num_experts = get("expert_count", 0)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return ModelSpec(
        family="mixtral" if num_experts else "llama",
        vocab_size=get("vocab_size") or (len(tokens) if tokens else int(embed.shape[1])),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length") or get("rope.dimension_count") or hidden // heads,
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(get("rope.freq_base", 10000.0)),
        max_position_embeddings=get("context_length", 8192),
        tie_word_embeddings="output.weight" not in tensor_names,
        num_experts=num_experts,
        num_experts_per_tok=get("expert_used_count", 0),
        moe_intermediate_size=get("feed_forward_length") if num_experts else 0,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
        name=_field(reader, "general.name", path.stem),
    )


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation (half-split -> interleaved RoPE pairs) of W_q / W_k.

    llama.cpp writes row (h, 2i + j) of its output from HF row (h, j * D/2 + i), j in {0, 1}; so HF
    row (h, j, i) is read back from llama.cpp row (h, i, j).
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor, path: Path) -> np.ndarray:
    """float32 array in numpy (= torch) order: [out, in] for matrices, [E, out, in] for expert stacks."""
    try:
        w = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise CorruptModelFileError(
            f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf cannot dequantize") from None
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.array(w, dtype=np.float32, copy=True).reshape(shape)  # a copy: F32 tensors are views of the memmap


def _canonical_name(name: str, path: Path) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    block = _BLOCK.fullmatch(name)
    if block and block.group(2) in _BLOCK_NAMES:
        return f"layers.{block.group(1)}.{_BLOCK_NAMES[block.group(2)]}"
    raise UnsupportedArchitectureError(f"{path} has tensor {name!r}, which has no place in the canonical llama decoder")


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(x: float) -> float:
    """GGUF stores floats as float32; keep the shortest decimal that float32 value stands for (1e-05, not 9.99e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))
