"""A differentiable forward of a canonical decoder, for training (distillation, recovery).

The inference forward runs custom ops over a paged KV cache (in-place cache writes, no autograd).
Training scores whole sequences at once, so `causal_logits(module, spec, input_ids)` runs the same
model - the module's own parameters (an eager DecoderLM or a captured, rewritten graph, read by
their canonical names) and, for a layer-tied graph, each depth's LoRA slot - on dense [B, T]
batches with causal attention, in plain torch: gradients reach every parameter. It equals the
inference logits up to float rounding (tests/ir/test_training.py); KV cache formats are not
simulated and K-sorted graphs (rope channel permutations) are not supported.

`decoder_layer(module, spec, depth, x, positions)` is one depth of it, for students that choose per
position which depths run (a skip-decode schedule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxforge.ir.recursive import tying_plan
from fxforge.ir.spec import ModelSpec
from fxforge.kernels.moe import fused_moe_ref, moe_route
from fxforge.kernels.norm import rmsnorm_ref
from fxforge.kernels.rope import rope_ref


def causal_logits(module: nn.Module, spec: ModelSpec, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [B, T] -> logits [B, T, V] (module's dtype), every depth in order."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    x = module.get_submodule("embed")(input_ids)
    for depth in range(spec.num_layers):
        x = decoder_layer(module, spec, depth, x, positions)
    return head(module, spec, x)


def head(module: nn.Module, spec: ModelSpec, x: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head: hidden [B, T, H] -> logits [B, T, V]."""
    return module.get_submodule("lm_head")(_norm(module.get_submodule("norm"), x, spec))


def decoder_layer(module: nn.Module, spec: ModelSpec, depth: int, x: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """One depth: x [B, T, H] at `positions` [T] -> x [B, T, H]."""
    layer = module.get_submodule(f"layers.{depth}")
    lora = _lora_of(module, depth)
    x = x + _attention(layer.attn, spec, _norm(layer.attn_norm, x, spec), positions, lora)
    h = _norm(layer.mlp_norm, x, spec)
    if spec.is_moe:
        return x + _moe(layer.mlp, spec, h)
    mlp = layer.mlp
    gate, up = _linear(mlp.gate_proj, h, lora.get("gate_proj")), _linear(mlp.up_proj, h, lora.get("up_proj"))
    return x + _linear(mlp.down_proj, F.silu(gate) * up, lora.get("down_proj"))


def _moe(mlp: nn.Module, spec: ModelSpec, h: torch.Tensor) -> torch.Tensor:
    """The MoE block in differentiable torch (its fxforge::moe op has no autograd): MoE.forward's routing,
    then the experts' float32 reference, reading the weights by their canonical names."""
    flat = h.reshape(-1, h.shape[-1])
    weights, expert_ids = moe_route(mlp.router(flat), spec.num_experts_per_tok, spec.norm_topk_prob)
    experts = mlp.get_submodule("experts")
    out = fused_moe_ref(flat, experts.w_gate, experts.w_up, experts.w_down, weights.to(flat.dtype), expert_ids)
    return out.view_as(h)


def _lora_of(module: nn.Module, depth: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{projection: (A_d [r, in], B_d [out, r])} of a relaxed depth of a tied graph; {} otherwise."""
    plan = tying_plan(module)
    slot = plan.lora_slot_of_depth[depth] if plan is not None else None
    if slot is None:
        return {}
    stacks = module.get_submodule("lora")
    return {name: (getattr(stacks, name).A[slot], getattr(stacks, name).B[slot]) for name in plan.lora_targets}


def _linear(linear: nn.Linear, x: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    y = linear(x)
    if lora is None:
        return y
    a, b = lora
    return y + F.linear(F.linear(x, a), b)


def _norm(norm: nn.Module, x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    # spec, not the module: a captured graph keeps only the tensors of modules lowering replaced
    return rmsnorm_ref(x, norm.weight, spec.rms_norm_eps)


def _attention(attn: nn.Module, spec: ModelSpec, x: torch.Tensor, positions: torch.Tensor, lora: dict) -> torch.Tensor:
    batch, length, _ = x.shape
    heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q = _linear(attn.q_proj, x, lora.get("q_proj")).view(batch * length, heads, dim)
    k = _linear(attn.k_proj, x, lora.get("k_proj")).view(batch * length, kv_heads, dim)
    v = _linear(attn.v_proj, x, lora.get("v_proj")).view(batch, length, kv_heads, dim)
    if spec.qk_norm:
        q, k = _norm(attn.q_norm, q, spec), _norm(attn.k_norm, k, spec)
    flat_positions = positions.repeat(batch)
    q = rope_ref(q, flat_positions, attn.inv_freq, spec.rope_interleaved).view(batch, length, heads, dim)
    k = rope_ref(k, flat_positions, attn.inv_freq, spec.rope_interleaved).view(batch, length, kv_heads, dim)
    group = heads // kv_heads
    q, k, v = (t.transpose(1, 2) for t in (q, k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)))
    if spec.sliding_window:
        offset = positions[:, None] - positions[None, :]  # query minus key position
        visible = (offset >= 0) & (offset < spec.sliding_window)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=dim ** -0.5)
    else:  # positions are 0..T-1: the causal mask, which lets SDPA pick its fused kernels
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=dim ** -0.5)
    return _linear(attn.o_proj, o.transpose(1, 2).reshape(batch, length, heads * dim), lora.get("o_proj"))
