"""fx capture of the canonical decoder, with typed metadata on every node.

`capture(module)` traces a DecoderLM with torch.fx.symbolic_trace semantics (nn.Linear and RMSNorm
stay leaf modules; the custom ops, the MoE experts' fxforge::moe among them, stay opaque) and
annotates each node with `node.meta["fxforge"] = NodeMeta(role, layer, heads)`.

Fused projections (passes/fuse_projections.py): a call of an ir.modules.FusedLinear has role
`qkv_proj` (parts among q_proj / k_proj / v_proj) or `mlp_gate_up` (mlp_gate, mlp_up), and
NodeMeta.parts lists its ProjectionParts (role, module, columns [start, stop)) in column order;
annotate() reads them from the module, so they survive re-annotation. Each part is read through a
`torch.narrow(fused, -1, start, stop - start)` node (role `op`); `sliced_part(node)` names the part
such a node reads, `node_roles(node)` gives a node's role plus its parts' roles. The parts' own roles
(q_proj, ...) then have no call_module node: count or cost them through the parts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from fxforge.ir.modules import DecoderLM, FusedLinear, ProjectionPart, RMSNorm
from fxforge.ir.ops import ATTENTION, CUSTOM_OP_ROLES, KV_WRITE, LORA, ROPE, ROPE_KV_WRITE
from fxforge.ir.spec import ModelSpec

META_KEY = "fxforge"
ROLES = ("embed", "q_proj", "k_proj", "v_proj", "o_proj", "rope", "attention", "kv_write", "norm",
         "mlp_gate", "mlp_up", "mlp_act", "mlp_down", "router", "expert", "lm_head", "lora", "input", "output", "op",
         "qkv_proj", "mlp_gate_up")
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj")  # the roles a fused attention projection (qkv_proj) may hold
MLP_PARTS = ("mlp_gate", "mlp_up")  # ... and a fused MLP projection (mlp_gate_up)
_HEAD_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "rope", "attention", "kv_write")

_MODULE_ROLES = {
    "embed": "embed", "lm_head": "lm_head", "norm": "norm", "attn_norm": "norm", "mlp_norm": "norm",
    "attn.q_proj": "q_proj", "attn.k_proj": "k_proj", "attn.v_proj": "v_proj", "attn.o_proj": "o_proj",
    "attn.q_norm": "norm", "attn.k_norm": "norm", "mlp.gate_proj": "mlp_gate", "mlp.up_proj": "mlp_up",
    "mlp.down_proj": "mlp_down", "mlp.router": "router",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)(?:\.|$)")
KV_WRITES = (KV_WRITE, ROPE_KV_WRITE)  # the ops that write a layer's cache (the second rotates K first)
_K_FORMAT_ARG = {KV_WRITE: 7, ROPE_KV_WRITE: 11, ATTENTION: 8}  # v_format is the argument after k_format


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass
class NodeMeta:
    """What a pass may rely on for one node.

    `parts` is set on a fused projection only (role qkv_proj / mlp_gate_up): one ProjectionPart per
    projection it computes, (role, module, start, stop), columns [start, stop) of its output, in order,
    e.g. (ProjectionPart("q_proj", "layers.0.attn.q_proj", 0, 2048), ProjectionPart("k_proj", ...), ...).
    """

    role: str
    layer: int | None = None
    heads: HeadLayout | None = None
    tensor: str | None = None  # for rope: "q" or "k"
    notes: dict = field(default_factory=dict)  # passes record what they did here
    parts: tuple[ProjectionPart, ...] = ()  # a fused projection's parts, in column order


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, RMSNorm) or super().is_leaf_module(m, qualname)


def capture(module: DecoderLM) -> fx.GraphModule:
    """Trace the canonical decoder into an annotated GraphModule (spec in gm.meta['spec'])."""
    if isinstance(module, fx.GraphModule):
        return module
    if not isinstance(module, DecoderLM):
        raise TypeError(f"capture expects a canonical DecoderLM, got {type(module).__name__}; "
                        "load the model with fxforge.load(...) first")
    graph = _Tracer().trace(module)
    gm = fx.GraphModule(module, graph, class_name="FxforgeDecoder")
    gm.meta["spec"] = module.spec
    annotate(gm, module.spec)
    return gm


def spec_of(gm: fx.GraphModule) -> ModelSpec:
    return gm.meta["spec"]


def meta(node: fx.Node) -> NodeMeta:
    return node.meta[META_KEY]


def annotate(gm: fx.GraphModule, spec: ModelSpec) -> None:
    """(Re)compute role / layer / head layout for every node."""
    heads = HeadLayout(spec.num_heads, spec.num_kv_heads, spec.head_dim)
    for node in gm.graph.nodes:
        old = node.meta.get(META_KEY)
        role, layer = _role_and_layer(node)
        m = NodeMeta(role=role, layer=layer, notes=old.notes if old else {})
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, FusedLinear):
            m.parts = module.parts
            m.role = "qkv_proj" if all(p.role in ATTENTION_PARTS for p in module.parts) else "mlp_gate_up"
        if m.role in _HEAD_ROLES:
            m.heads = heads
        if role == "rope":
            m.tensor = _rope_source(node)
        node.meta[META_KEY] = m


def _role_and_layer(node: fx.Node) -> tuple[str, int | None]:
    if node.op == "placeholder":
        return "input", None
    if node.op == "output":
        return "output", None
    if node.op == "call_module":
        match = _LAYER_RE.match(node.target)
        local = node.target[match.end():] if match else node.target
        return _MODULE_ROLES.get(local, "op"), int(match.group(1)) if match else None
    layer = None
    for path in node.meta.get("nn_module_stack", {}):
        match = _LAYER_RE.match(path)
        if match:
            layer = int(match.group(1))
    if node.op == "get_attr":
        match = _LAYER_RE.match(node.target)
        layer = int(match.group(1)) if match else layer
    return CUSTOM_OP_ROLES.get(node.target, "op"), layer


def _rope_source(node: fx.Node) -> str | None:
    """Walk back from a rope input to the projection that made it: 'q' or 'k'."""
    current = node.args[0]
    while isinstance(current, fx.Node):
        if current.op == "call_module" and current.target.endswith(("q_proj", "k_proj")):
            return current.target[-6]
        part = sliced_part(current)
        if part is not None:
            return part.role[0] if part.role in ("q_proj", "k_proj") else None
        # a LoRA node's base (args[1]) is the projection's output; every other op passes args[0] on
        current = current.args[1] if current.target is LORA else (current.args[0] if current.args else None)
    return None


def sliced_part(node: fx.Node) -> ProjectionPart | None:
    """The part of a fused projection that `node` reads, when node is its narrow; else None."""
    if node.op != "call_function" or node.target is not torch.narrow or len(node.args) != 4:
        return None
    source, dim, start, length = node.args
    if not isinstance(source, fx.Node) or META_KEY not in source.meta or dim != -1:
        return None
    return next((p for p in meta(source).parts if (p.start, p.stop) == (start, start + length)), None)


def node_roles(node: fx.Node) -> tuple[str, ...]:
    """A node's role followed by the roles of its parts (a fused projection's q_proj, k_proj, ...)."""
    m = meta(node)
    return (m.role, *(p.role for p in m.parts))


def nodes_by_role(gm: fx.GraphModule, role: str, layer: int | None = None) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if META_KEY in n.meta and meta(n).role == role
            and (layer is None or meta(n).layer == layer)]


def kv_formats(module: nn.Module, num_layers: int) -> list[tuple[str, str]]:
    """Per-layer (k_format, v_format) of an eager DecoderLM or a captured graph."""
    if isinstance(module, fx.GraphModule):
        found = {}
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target in KV_WRITES:
                found[meta(node).layer] = kv_format_args(node)
        return [found[i] for i in range(num_layers)]
    return [(layer.attn.k_format, layer.attn.v_format) for layer in module.layers]


def kv_format_args(node: fx.Node) -> tuple[str, str]:
    """(k_format, v_format) arguments of a kv_write, rope_kv_write or attention node."""
    if node.target not in _K_FORMAT_ARG:
        raise ValueError(f"node {node.name} is not a kv_write, rope_kv_write or attention op")
    i = _K_FORMAT_ARG[node.target]
    return node.args[i], node.args[i + 1]


def set_kv_format_args(node: fx.Node, k_format: str, v_format: str) -> None:
    """Rewrite the format arguments of a kv_write, rope_kv_write or attention node."""
    if node.target not in _K_FORMAT_ARG:
        raise ValueError(f"node {node.name} is not a kv_write, rope_kv_write or attention op")
    args = list(node.args)
    i = _K_FORMAT_ARG[node.target]
    args[i], args[i + 1] = k_format, v_format
    node.args = tuple(args)


__all__ = ["capture", "annotate", "meta", "NodeMeta", "HeadLayout", "nodes_by_role", "kv_formats", "traced_in",
           "set_kv_format_args", "spec_of", "ROPE", "ATTENTION", "KV_WRITE", "ROLES", "META_KEY", "sliced_part",
           "node_roles", "ProjectionPart", "ATTENTION_PARTS", "MLP_PARTS"]


def traced_in(node: fx.Node, module_type: type) -> bool:
    """Whether the innermost module a node was traced in (its nn_module_stack) is a module_type."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return False
    innermost = list(stack.values())[-1]
    owner = innermost[1] if isinstance(innermost, tuple) else innermost
    return isinstance(owner, type) and issubclass(owner, module_type)
