"""fuse_projections: the q/k/v projections of each attention layer, and the gate/up projections of each
dense MLP, become one GEMM each, so a decode step launches fewer, larger GEMMs.

    q = view(q_proj(x)), k = view(k_proj(x)), v = view(v_proj(x))
 -> qkv = qkv_proj(x)                                         one [T, Nq + 2 Nkv] GEMM
    q = view(narrow(qkv, -1, 0, Nq)), k = view(narrow(qkv, -1, Nq, Nkv)), v = ...

and likewise swiglu(gate_proj(x), up_proj(x)) -> swiglu(narrow(gu, -1, 0, I), narrow(gu, -1, I, I)) with
gu = gate_up_proj(x). Each projection's users read its narrow instead: strided views (rows of the fused
output), which fxforge::rope, fxforge::swiglu, fxforge::kv_write and fxforge::rmsnorm (QK-norm) accept.

Weights: `layers.{i}.attn.qkv_proj` / `layers.{i}.mlp.gate_up_proj` is an ir.modules.FusedLinear whose
weight (bias) is the row-concatenation of the parts', held as a non-persistent buffer. The parts keep
their modules and parameter names; their parameters become views into those rows: one storage, a
state dict (and weights.safetensors) with the original names and sizes, and loading a state dict into
the parts writes the fused weight. Tied depths (layer-tying) keep sharing: one fused weight per tied
group of tensors, and every module holding a fused tensor is pointed at its view.

IR contract (see ir/capture.py): the fused call_module node has role `qkv_proj` or `mlp_gate_up` and
NodeMeta.parts = (ProjectionPart(role, module, start, stop), ...) in column order, e.g. for llama-gqa
  (ProjectionPart("q_proj", "layers.0.attn.q_proj", 0, 128), ProjectionPart("k_proj", ..., 128, 192),
   ProjectionPart("v_proj", ..., 192, 256)).
annotate() reads the parts from the module, so they survive re-annotation; ir.cost costs each part as
the projection it replaced (totals and per-role tables unchanged), ir.verify counts parts as
projections and checks the views.

Not fused (one record each, with the reason): MoE layers' experts (one fxforge::moe over stacked
weights, no gate/up projections), a projection whose output feeds fxforge::lora (the per-depth LoRA of
a layer-tied graph; the other projections of the group are still fused when two or more remain), a
projection module called more than once, and groups whose projections read different inputs or
disagree on bias, dtype, device or input width.

Requires: role/layer metadata; runs on a lowered graph (`lower`; it works before lowering too).
Restorable: structural, deterministic, needs no data (artifacts replay it, then load the parts'
weights into the views). Writes no tensor it shares with another model: the fused weights are new
tensors and the parts get new Parameter objects, so a pass config declares no rewrites.
"""

from __future__ import annotations

import itertools

import torch
import torch.fx as fx
from torch import nn

from fxforge.ir.capture import ATTENTION_PARTS, META_KEY, MLP_PARTS, NodeMeta, annotate, meta, spec_of
from fxforge.ir.modules import FusedLinear, ProjectionPart
from fxforge.ir.ops import LORA

NOTES_KEY = "fuse_projections"
# kind -> (block inside a layer, part roles in column order, fused module name)
KINDS = {"qkv": ("attn", ATTENTION_PARTS, "qkv_proj"), "gate_up": ("mlp", MLP_PARTS, "gate_up_proj")}


def fuse_projections(gm: fx.GraphModule, qkv: bool = True, gate_up: bool = True) -> list[dict]:
    """Fuse in place; one record per layer and kind: {"layer", "kind", "fused": True, "module", "roles",
    "in_features", "out_features", "bias", "parts": [{"role", "module", "start", "stop"}, ...],
    "left_out": {role: reason}} for a fusion, {"layer", "kind", "fused": False, "reason"} otherwise."""
    for name, value in (("qkv", qkv), ("gate_up", gate_up)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be true or false")
    spec = spec_of(gm)
    kinds = [kind for kind, on in (("qkv", qkv), ("gate_up", gate_up)) if on]
    calls: dict[tuple[str, int], list[fx.Node]] = {}  # (role, layer) -> call_module nodes of that projection
    for node in gm.graph.nodes:
        if node.op == "call_module" and META_KEY in node.meta:
            calls.setdefault((meta(node).role, meta(node).layer), []).append(node)
    views: dict[tuple[int, ...], tuple] = {}  # ids of the parts' (view) tensors -> fused (weight, bias)
    records = [_fuse(gm, kind, layer, calls, views) for kind in kinds for layer in range(spec.num_layers)]
    if any(r["fused"] for r in records):
        gm.graph.lint()
        gm.recompile()
        annotate(gm, spec)
    return records


def _fuse(gm: fx.GraphModule, kind: str, layer: int, calls: dict, views: dict) -> dict:
    block, roles, name = KINDS[kind]
    record = {"layer": layer, "kind": kind}
    if kind == "gate_up" and spec_of(gm).is_moe:
        return {**record, "fused": False, "reason": "MoE layer: its experts run as one fxforge::moe over stacked "
                                                    "w_gate / w_up, there are no gate / up projections to fuse"}
    found = {role: calls.get((role, layer), []) for role in roles}
    if not any(found.values()):
        return {**record, "fused": False, "reason": f"no {' / '.join(roles)} projection call in this layer "
                                                    "(already fused, or rewritten by another pass)"}
    nodes, left_out = [], {}
    for role, role_calls in found.items():
        if len(role_calls) > 1:
            left_out[role] = f"its module is called {len(role_calls)} times"
        elif role_calls and any(user.target is LORA for user in role_calls[0].users):
            left_out[role] = "its output feeds fxforge::lora (per-depth LoRA of a layer-tied graph)"
        elif role_calls:
            nodes.append(role_calls[0])
    target = f"layers.{layer}.{block}.{name if not left_out else _short_name(nodes)}"
    reason = _mismatch(gm, nodes, target, views) if len(nodes) >= 2 else "fewer than two projections left to fuse"
    if reason is not None:
        details = "; ".join(f"{role}: {why}" for role, why in left_out.items())
        return {**record, "fused": False, "reason": reason + (f" ({details})" if details else "")}
    parts = _rewrite(gm, nodes, target, views)
    module = gm.get_submodule(target)
    return {**record, "fused": True, "module": target, "roles": [p.role for p in parts],
            "in_features": module.in_features, "out_features": module.out_features, "bias": module.bias is not None,
            "parts": [p.to_dict() for p in parts], "left_out": left_out}


def _short_name(nodes: list[fx.Node]) -> str:
    """Name of a partial fusion: "kv_proj" for k and v, "qk_proj" for q and k."""
    return "".join(meta(n).role.removesuffix("_proj") for n in nodes) + "_proj"


def _mismatch(gm: fx.GraphModule, nodes: list[fx.Node], target: str, views: dict) -> str | None:
    """Why these projection calls cannot be one GEMM at `target`, or None."""
    modules = [gm.get_submodule(n.target) for n in nodes]
    names = ", ".join(n.target for n in nodes)
    if any(type(m) is not nn.Linear for m in modules):
        return f"not all of {names} are nn.Linear"
    if any(len(n.args) != 1 or n.kwargs for n in nodes) or len({n.args[0] for n in nodes}) != 1:
        return f"{names} read different inputs"
    if len({m.bias is None for m in modules}) != 1:
        return f"bias mismatch: some of {names} have a bias, some do not"
    if len({(m.in_features, m.weight.dtype, m.weight.device) for m in modules}) != 1:
        return f"{names} differ in input width, dtype or device"
    if _key(modules) not in views and any(id(m.weight) in key for m in modules for key in views):
        return f"a weight of {names} is already part of another fusion (tied with a depth fused differently)"
    parent, _, attr = target.rpartition(".")
    if hasattr(gm.get_submodule(parent), attr):
        return f"{target} exists already"
    return None


def _key(modules: list[nn.Linear]) -> tuple[int, ...]:
    """Identity of the parts' tensors: tied depths hold the same Parameter objects."""
    return tuple(id(t) for m in modules for t in (m.weight, m.bias) if t is not None)


def _rewrite(gm: fx.GraphModule, nodes: list[fx.Node], target: str, views: dict) -> tuple[ProjectionPart, ...]:
    """One call of a new FusedLinear at `target`, a narrow per part; the projection calls are erased."""
    modules = [gm.get_submodule(n.target) for n in nodes]
    weight, bias = _fused_tensors(gm, modules, views)
    bounds = [0, *itertools.accumulate(m.out_features for m in modules)]
    parts = tuple(ProjectionPart(meta(n).role, n.target, start, stop)
                  for n, start, stop in zip(nodes, bounds, bounds[1:]))
    gm.add_submodule(target, FusedLinear(weight, bias, parts))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min(nodes, key=order.__getitem__)
    with gm.graph.inserting_before(first):
        fused = gm.graph.call_module(target, (first.args[0],))
        slices = [gm.graph.call_function(torch.narrow, (fused, -1, p.start, p.stop - p.start)) for p in parts]
    _adopt(fused, first, {"parts": [p.to_dict() for p in parts]})
    fused.meta["nn_module_stack"] = {**fused.meta.get("nn_module_stack", {}), target: (target, FusedLinear)}
    for node, piece, part in zip(nodes, slices, parts):
        _adopt(piece, node, {"slice_of": part.module})
        node.replace_all_uses_with(piece)
        gm.graph.erase_node(node)
    return parts


def _fused_tensors(gm: fx.GraphModule, modules: list[nn.Linear], views: dict
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused weight and bias of these modules: the ones made for a tied depth holding the same
    tensors, or new ones, the modules' parameters (and every other holder's) becoming views into them."""
    key = _key(modules)
    if key in views:
        return views[key]
    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in modules])
        bias = torch.cat([m.bias.detach() for m in modules]) if modules[0].bias is not None else None
    replaced, start = {}, 0
    for m in modules:
        stop = start + m.out_features
        for old, fused in ((m.weight, weight), (m.bias, bias)):
            if old is not None:
                replaced[id(old)] = (old, nn.Parameter(fused[start:stop], old.requires_grad))
        start = stop
    for holder in gm.modules():  # the module itself and, in a layer-tied graph, every depth sharing the tensor
        for name, param in list(holder._parameters.items()):
            hit = replaced.get(id(param))
            if hit is not None and hit[0] is param:
                holder._parameters[name] = hit[1]
    views[_key(modules)] = (weight, bias)
    return weight, bias


def _adopt(new: fx.Node, old: fx.Node, notes: dict) -> None:
    """Give a new node the provenance of the projection call it replaces, less that projection's own
    module (annotate() recomputes its role and layer from it), and a note."""
    stack = dict(old.meta.get("nn_module_stack") or {})
    stack.pop(old.target, None)
    new.meta["nn_module_stack"] = stack
    if "stack_trace" in old.meta:
        new.meta["stack_trace"] = old.meta["stack_trace"]
    new.meta[META_KEY] = NodeMeta(role="op", notes={NOTES_KEY: notes})
