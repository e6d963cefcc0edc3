"""ir.verify(gm): the metadata contract every pass may rely on, checked between passes in debug mode.

A fused projection (role qkv_proj / mlp_gate_up, passes/fuse_projections.py) counts as each of its
parts, whose columns must tile its output and whose modules' parameters must be views into its rows."""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from fxforge.ir.capture import META_KEY, ROLES, meta, node_roles, spec_of
from fxforge.ir.modules import FusedLinear
from fxforge.ir.ops import ATTENTION, LORA, MOE, ROPE, ROPE_KV_WRITE
from fxforge.ir.capture import KV_WRITES, kv_format_args
from fxforge.ir.recursive import tying_plan
from fxforge.kernels.bfp import parse_kv_format

_PER_LAYER = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 1, "rope": 2, "attention": 1, "kv_write": 1}


class IRVerificationError(AssertionError):
    pass


def verify(gm: fx.GraphModule) -> None:
    """Raise IRVerificationError listing every broken rule; return None when the graph is sound."""
    problems: list[str] = []
    spec = gm.meta.get("spec")
    if spec is None:
        raise IRVerificationError("gm.meta['spec'] is missing: capture the model with fxforge.ir.capture")
    try:
        gm.graph.lint()
    except Exception as exc:  # fx's own structural checks
        problems.append(f"graph lint: {exc}")
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if META_KEY not in node.meta:
            problems.append(f"node {node.name} has no fxforge metadata")
            continue
        m = meta(node)
        if m.role not in ROLES:
            problems.append(f"node {node.name} has unknown role {m.role!r}")
        if m.layer is not None and not 0 <= m.layer < spec.num_layers:
            problems.append(f"node {node.name} has layer {m.layer} outside 0..{spec.num_layers - 1}")
        for role in node_roles(node):
            if role in _PER_LAYER:
                counts[(role, m.layer)] += 1
                if m.heads is None:
                    problems.append(f"node {node.name} ({role}) has no head layout")
        problems += _check_op(gm, node, m) + _check_fused(gm, node, m)
    pre_rope, rotated_on_write = _pre_rope_layers(gm), _rope_kv_write_layers(gm)
    for layer in range(spec.num_layers):
        for role, want in _PER_LAYER.items():
            if role == "rope" and (layer in pre_rope or layer in rotated_on_write):
                want = 1  # keys are rotated inside attention, or by rope_kv_write: only q's rope remains
            if counts[(role, layer)] != want:
                problems.append(f"layer {layer} has {counts[(role, layer)]} {role} nodes, expected {want}")
    problems += _check_order(gm) + _check_tying(gm) + _check_experts(gm)
    if problems:
        raise IRVerificationError("IR contract broken:\n  " + "\n  ".join(problems))


def _check_op(gm: fx.GraphModule, node: fx.Node, m) -> list[str]:
    spec = spec_of(gm)
    out = []
    if node.target is ROPE:
        if m.tensor not in ("q", "k"):
            out.append(f"rope node {node.name} does not trace back to q_proj or k_proj")
        perm = node.args[4]
        if perm is not None:
            heads = spec.num_heads if m.tensor == "q" else spec.num_kv_heads
            value = gm.get_buffer(perm.target) if isinstance(perm, fx.Node) else perm
            if tuple(value.shape) != (heads, spec.head_dim):
                out.append(f"rope node {node.name} channel_perm shape {tuple(value.shape)}, "
                           f"expected {(heads, spec.head_dim)}")
    if node.target is ROPE_KV_WRITE and node.args[10] is not None:
        perm = node.args[10]
        value = gm.get_buffer(perm.target) if isinstance(perm, fx.Node) else perm
        if tuple(value.shape) != (spec.num_kv_heads, spec.head_dim):
            out.append(f"rope_kv_write node {node.name} channel_perm shape {tuple(value.shape)}, "
                       f"expected {(spec.num_kv_heads, spec.head_dim)}")
    if node.target is ATTENTION and node.args[12] is not None:
        table = node.args[12]
        value = gm.get_buffer(table.target) if isinstance(table, fx.Node) else table
        want = (spec.num_kv_heads, 3, spec.head_dim // 2)
        if tuple(value.shape) != want:
            out.append(f"attention node {node.name} key_rope shape {tuple(value.shape)}, expected {want}")
    if node.target in (*KV_WRITES, ATTENTION):
        for fmt in kv_format_args(node):
            try:
                parse_kv_format(fmt).check_head_dim(spec.head_dim)
            except ValueError as exc:
                out.append(f"node {node.name}: {exc}")
    return out


def _check_fused(gm: fx.GraphModule, node: fx.Node, m) -> list[str]:
    """A FusedLinear call: its parts tile its output, and each part's parameters are views of its rows."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if not isinstance(module, FusedLinear):
        return [f"node {node.name} has parts {m.parts} but is no FusedLinear call"] if m.parts else []
    bounds = [0] + [b for p in m.parts for b in (p.start, p.stop)] + [module.out_features]
    if m.parts != module.parts or any(a != b for a, b in zip(bounds[::2], bounds[1::2])):
        return [f"fused projection {node.name}: parts {m.parts} do not tile its {module.out_features} outputs"]
    out = []
    for part in m.parts:
        owner = gm.get_submodule(part.module)
        for name in ("weight", "bias"):
            fused, own = getattr(module, name), getattr(owner, name, None)
            if fused is None or fused.device.type == "meta":
                continue
            rows = fused[part.start:part.stop]
            if own is None or (own.shape, own.stride(), own.data_ptr()) != (rows.shape, rows.stride(), rows.data_ptr()):
                out.append(f"fused projection {node.name}: {part.module}.{name} is not a view of its rows "
                           f"{part.start}:{part.stop} (replaced or moved after fusion); fuse again")
    return out


def _check_experts(gm: fx.GraphModule) -> list[str]:
    """An MoE model runs one fxforge::moe per layer (a dense one none), each filling an int32 [E] buffer."""
    spec, out = spec_of(gm), []
    layers: Counter = Counter()
    for node in gm.graph.nodes:
        if node.target is not MOE or META_KEY not in node.meta:
            continue
        layers[meta(node).layer] += 1
        counts = node.args[6]
        value = gm.get_buffer(counts.target) if isinstance(counts, fx.Node) and counts.op == "get_attr" else None
        if value is None or value.dtype != torch.int32 or tuple(value.shape) != (spec.num_experts,):
            out.append(f"moe node {node.name}: expert_counts must be an int32 [{spec.num_experts}] buffer, got {counts}")
    want = 1 if spec.is_moe else 0
    return out + [f"layer {layer} has {layers[layer]} moe nodes, expected {want}"
                  for layer in range(spec.num_layers) if layers[layer] != want]


def _pre_rope_layers(gm: fx.GraphModule) -> set[int]:
    """Layers whose attention reads pre-RoPE keys (a key_rope table)."""
    return {meta(n).layer for n in gm.graph.nodes
            if n.target is ATTENTION and META_KEY in n.meta and n.args[12] is not None}


def _rope_kv_write_layers(gm: fx.GraphModule) -> set[int]:
    """Layers whose K rope is fused into the cache write (fxforge::rope_kv_write)."""
    return {meta(n).layer for n in gm.graph.nodes if n.target is ROPE_KV_WRITE and META_KEY in n.meta}


def _check_tying(gm: fx.GraphModule) -> list[str]:
    """A layer-tied graph: every depth of a block holds the block's tensors (aliasing intact), no rope
    carries a channel permutation (tied depths share W_q / W_k, so no depth may reorder them alone),
    and every LoRA slot indexes its stacked factors."""
    plan = tying_plan(gm)
    if plan is None:
        return []
    out = []
    for depth, block in enumerate(plan.block_of_depth):
        owner = dict(gm.get_submodule(f"layers.{plan.owner(block)}").named_parameters())
        for name, param in gm.get_submodule(f"layers.{depth}").named_parameters():
            if param.dim() > 1 and param is not owner[name]:
                out.append(f"depth {depth} runs block {block} but its {name} is not the block's tensor")
    for node in gm.graph.nodes:
        if (node.target is ROPE and node.args[4] is not None) or (node.target is ROPE_KV_WRITE
                                                                  and node.args[10] is not None):
            out.append(f"rope node {node.name} carries a channel permutation in a layer-tied graph (ksort cannot "
                       "run after layer-tying: tied depths share W_q and W_k)")
        if node.target is LORA and not 0 <= node.args[5] < gm.get_parameter(node.args[2].target).shape[0]:
            out.append(f"lora node {node.name} reads slot {node.args[5]} outside its stacked factors")
    return out


def _check_order(gm: fx.GraphModule) -> list[str]:
    """kv_write must precede the attention of its layer, and both must agree on the formats."""
    writes, out = {}, []
    for node in gm.graph.nodes:
        if META_KEY not in node.meta:  # reported already; its layer is unknown
            continue
        if node.target in KV_WRITES:
            writes[meta(node).layer] = kv_format_args(node)
        elif node.target is ATTENTION:
            layer = meta(node).layer
            if layer not in writes:
                out.append(f"layer {layer}: attention {node.name} runs before its kv_write")
            elif writes[layer] != tuple(node.args[8:10]):
                out.append(f"layer {layer}: kv_write formats {writes[layer]} != attention formats "
                           f"{tuple(node.args[8:10])}")
    return out
