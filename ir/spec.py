"""ModelSpec: the architecture of a canonical decoder, as data (JSON round-trips, versioned)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

SPEC_VERSION = 1
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")


@dataclass(frozen=True)
class ModelSpec:
    """Everything the canonical decoder needs to build itself; no weights."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_interleaved: bool = False  # True: pairs (2i, 2i+1); False: half-split pairs (i, i + D/2)
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...} or None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int = 0  # 0: full causal attention
    num_experts: int = 0  # 0: dense SwiGLU MLP; >0: Mixtral-style MoE block in every layer
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k router weights (Mixtral: True; Qwen3-MoE: its config's)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not supported; expected one of {FAMILIES}")
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f}={getattr(self, f)} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE pairs")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}"
            )
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group size g)."""
        return self.num_heads // self.num_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse frequencies [head_dim/2] in float64->float32, with llama3 scaling if configured."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        sc = self.rope_scaling or {}
        kind = sc.get("rope_type", sc.get("type"))
        if kind in (None, "default"):
            return inv.float()
        if kind != "llama3":
            raise ValueError(f"rope_scaling type {kind!r} is not supported; expected 'llama3' or none")
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old / lo, old / hi
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        scaled = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
        return scaled.float()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["spec_version"] = SPEC_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        version = d.pop("spec_version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise ValueError(f"spec_version={version} is not readable by this fxforge (expects {SPEC_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelSpec keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**d)
