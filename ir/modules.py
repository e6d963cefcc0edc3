"""The canonical decoder, in plain PyTorch, written so that torch.fx.symbolic_trace gives a clean graph.

The forward is runtime-shaped: flat tokens [T], their positions [T], the cache slot of each token
[T], and the paged-attention metadata (page_table [S, P], query_start [S+1], seq_lens [S]); the KV
cache is a flat list of tensors, four per layer (k_data, k_scale, v_data, v_scale; see
kernels/kv_cache.py). Logits are computed for the rows in logits_indices only.

Parameter names (the canonical state dict every importer produces):
  embed.weight, norm.weight, lm_head.weight (shares embed.weight when tied)
  layers.{i}.attn_norm.weight, layers.{i}.mlp_norm.weight
  layers.{i}.attn.{q,k,v,o}_proj.weight, layers.{i}.attn.{q,k,v}_proj.bias (attention_bias)
  layers.{i}.attn.{q,k}_norm.weight (qk_norm), layers.{i}.attn.inv_freq (buffer)
  dense:  layers.{i}.mlp.{gate,up,down}_proj.weight
  MoE:    layers.{i}.mlp.router.weight [E, H], layers.{i}.mlp.experts.w_gate / w_up [E, I, H], w_down [E, H, I]
Runtime state (RUNTIME_BUFFERS: in no artifact, each model its own, see ir/sharing.py):
  MoE:    layers.{i}.mlp.experts.expert_counts int32 [E], the pairs routed to each expert by the last forward
Fused projections (passes/fuse_projections.py) add modules but no names to the state dict:
  layers.{i}.attn.qkv_proj, layers.{i}.mlp.gate_up_proj (FusedLinear): weight / bias are non-persistent
  buffers, the row-concatenation of the parts; the parts' own parameters above become views into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxforge.ir.ops import ATTENTION, KV_WRITE, MOE, REFERENCE, ROPE
from fxforge.ir.spec import ModelSpec

TENSORS_PER_LAYER = 4  # k_data, k_scale, v_data, v_scale
EXPERT_COUNTS = "expert_counts"
# Buffers that hold a model's runtime state, not weights (known by name: fx's GraphModule re-registers
# every buffer as persistent): no artifact stores them, every optimised copy gets its own, passes never own them.
RUNTIME_BUFFERS = frozenset({EXPERT_COUNTS})


def is_runtime_buffer(name: str) -> bool:
    """True for the qualified name of a runtime-state buffer (RUNTIME_BUFFERS)."""
    return name.rsplit(".", 1)[-1] in RUNTIME_BUFFERS


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; weight [D] (or [H, D] for per-head norms after a KSort)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        h, d = spec.hidden_size, spec.head_dim
        self.q_proj = nn.Linear(h, spec.num_heads * d, bias=spec.attention_bias)
        self.k_proj = nn.Linear(h, spec.num_kv_heads * d, bias=spec.attention_bias)
        self.v_proj = nn.Linear(h, spec.num_kv_heads * d, bias=spec.attention_bias)
        self.o_proj = nn.Linear(spec.num_heads * d, h, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        self.register_buffer("inv_freq", spec.rope_inv_freq())
        self.rope_interleaved = spec.rope_interleaved
        self.sliding_window = spec.sliding_window
        self.scale = d ** -0.5
        self.k_format = self.v_format = "float32"  # set to the model dtype by the builder

    def forward(self, x, positions, slot_mapping, page_table, query_start, seq_lens, k_data, k_scale, v_data, v_scale):
        q = self.q_proj(x).view(-1, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = ROPE(q, positions, self.inv_freq, self.rope_interleaved, None, REFERENCE)
        k = ROPE(k, positions, self.inv_freq, self.rope_interleaved, None, REFERENCE)
        KV_WRITE(k, v, k_data, k_scale, v_data, v_scale, slot_mapping, self.k_format, self.v_format, REFERENCE)
        o = ATTENTION(q, k_data, k_scale, v_data, v_scale, page_table, query_start, seq_lens,
                      self.k_format, self.v_format, self.scale, self.sliding_window, None, REFERENCE)
        return self.o_proj(o.view(-1, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass(frozen=True)
class ProjectionPart:
    """One projection inside a FusedLinear: its role (q_proj, k_proj, v_proj, mlp_gate, mlp_up), the
    qualified name of the module whose parameters are views into the fused weight, and the output
    columns [start, stop) it occupies (rows of the fused weight)."""

    role: str
    module: str
    start: int
    stop: int

    def to_dict(self) -> dict:
        return {"role": self.role, "module": self.module, "start": self.start, "stop": self.stop}


class FusedLinear(nn.Module):
    """Linear projections of one input run as one GEMM: y = x W^T + b, W (b) the row-concatenation of
    the parts' weights (biases) in `parts` order, so part p is y[..., p.start:p.stop].

    W and b are non-persistent buffers: each part keeps its own module and parameter names, its
    parameters views into W and b (one storage; the state dict, artifacts and optimisers see the
    original parameters). torch moves a module tree tensor by tensor, so `.to()` / `.cuda()` after
    fusion gives the parts copies of their own (the forward, which reads W, stays right; ir.verify
    reports the broken views): fuse on the device the model runs on. The graph calls only this module,
    so a GraphModule rebuilt from the graph alone drops the parts (ir.sharing.share keeps the whole tree)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, parts: tuple[ProjectionPart, ...]):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.parts = tuple(parts)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{p.role}[{p.start}:{p.stop}]" for p in self.parts)
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, parts: {parts}"


class MoEExperts(nn.Module):
    """E SwiGLU experts with stacked weights, run by one fxforge::moe node (role `expert`).

    The op fills `expert_counts` (int32 [E]) with each forward's routing, on the device: a buffer at a
    fixed address, so a CUDA-graph replay refreshes it too; the runtime reads it (Model.expert_counts)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.register_buffer(EXPERT_COUNTS, torch.zeros(num_experts, dtype=torch.int32), persistent=False)
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=0.02)

    def forward(self, x, expert_ids, expert_weights):
        """x [T, H], expert_ids / expert_weights [T, k] -> sum_k w * expert_k(x)."""
        return MOE(x, self.w_gate, self.w_up, self.w_down, expert_weights, expert_ids, self.expert_counts, REFERENCE)


class MoE(nn.Module):
    """Mixtral-style block: router -> softmax -> top-k (renormalised) -> experts."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.top_k, self.norm_topk_prob = spec.num_experts_per_tok, spec.norm_topk_prob
        self.router = nn.Linear(spec.hidden_size, spec.num_experts, bias=False)
        self.experts = MoEExperts(spec.num_experts, spec.hidden_size, spec.moe_intermediate_size)

    def forward(self, x):
        probs = self.router(x).float().softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(x, ids, weights.to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.attn = Attention(spec, layer)
        self.mlp_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MoE(spec) if spec.is_moe else MLP(spec.hidden_size, spec.intermediate_size)

    def forward(self, x, positions, slot_mapping, page_table, query_start, seq_lens, k_data, k_scale, v_data, v_scale):
        x = x + self.attn(self.attn_norm(x), positions, slot_mapping, page_table, query_start, seq_lens,
                          k_data, k_scale, v_data, v_scale)
        return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nn.Module):
    """The canonical decoder language model (Llama family, optionally MoE)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def set_kv_format(self, fmt: str) -> None:
        for layer in self.layers:
            layer.attn.k_format = layer.attn.v_format = fmt

    def forward(self, input_ids, positions, slot_mapping, page_table, query_start, seq_lens, logits_indices,
                kv_cache: list[torch.Tensor]):
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            base = TENSORS_PER_LAYER * i
            x = layer(x, positions, slot_mapping, page_table, query_start, seq_lens,
                      kv_cache[base], kv_cache[base + 1], kv_cache[base + 2], kv_cache[base + 3])
        x = self.norm(x)
        return self.lm_head(x.index_select(0, logits_indices))
