"""fuse_elementwise: fold two op pairs of a lowered graph into one op each (a launch and a round trip
through memory fewer per layer and decode step).

  fuse_add_rmsnorm(gm)   residual = operator.add(residual, branch_out) read by fxforge::rmsnorm(residual,
                         w, eps, impl) becomes fxforge::add_rmsnorm(branch_out, residual, w, eps, impl)
                         -> (sum, normed); getitem 0 replaces the add everywhere (the next residual add
                         reads it), getitem 1 replaces the norm. Only the residual adds of a decoder
                         layer are taken (two hidden-state operands of one shape), never a broadcast.
  fuse_rope_kv_write(gm) k_rot = fxforge::rope(k, ...) read only by fxforge::kv_write(k_rot, v, ...)
                         becomes fxforge::rope_kv_write(k, v, caches, slot_mapping, positions, inv_freq,
                         interleaved, channel_perm, k_format, v_format, impl). A pre-RoPE cache
                         (bfp-kv pre_rope=True) writes K before any rope: nothing to fuse there.
  unfuse_elementwise(graph) the inverse, node for node (ONNX export maps the unfused ops).

Each rewrites the graph in place and returns one record per fused site. The fused node takes the
binding (`impl`) of the nodes it replaces (pairs bound differently are left alone), the provenance
and fxforge metadata of the node whose work it ends in (the norm: role "norm" and its layer; the
kv_write: role "kv_write", its layer and head layout), and remembers the replaced nodes' metadata
under node.meta["fused_from"] so that unfusing restores them. The fused ops compute exactly what
the pairs compute under the same binding, so logits and cache bytes do not change.

across_layers=False keeps each fusion inside one decoder layer (the add and its norm in one layer):
a graph that is later cut into per-layer modules (ir/skip.split_layers for skip-decode, the
layer-tying loop runner) needs one hidden state crossing each layer boundary, and the add of a
layer's MLP residual fused with the next layer's attention norm would make it two.

Requires: a graph after `lower` (fxforge::rmsnorm nodes) with fxforge metadata. Not a registered pass of
its own: meant to run on `lower`'s output, as options of that pass.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxforge.ir import ops
from fxforge.ir.capture import META_KEY, NodeMeta, traced_in
from fxforge.ir.modules import DecoderLayer

FUSED_FROM = "fused_from"  # node.meta key: [(target, args, meta)] of the nodes a fused node replaced
NOTE = "fuse_elementwise"
_ADDS = (operator.add, torch.add)
_PROVENANCE = ("nn_module_stack", "stack_trace")


def fuse_add_rmsnorm(gm: fx.GraphModule, across_layers: bool = True) -> list[dict]:
    """Fold each residual add and the rmsnorm reading it into fxforge::add_rmsnorm (in place)."""
    fused = []
    for norm in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.RMSNORM]:
        add = norm.args[0]
        if not _is_residual_add(add) or not _users_follow(add, norm):
            continue
        if not across_layers and (_layer(add) is None or _layer(add) != _layer(norm)):
            continue
        residual, branch = add.args
        _, weight, eps, impl = norm.args
        with gm.graph.inserting_before(norm):
            node = gm.graph.call_function(ops.ADD_RMSNORM, (branch, residual, weight, eps, impl))
            total = gm.graph.call_function(operator.getitem, (node, 0))
            normed = gm.graph.call_function(operator.getitem, (node, 1))
        _take_over(node, norm, [add, norm])
        _copy_meta(total, add, role="op")
        _copy_meta(normed, norm, role="op")
        norm.replace_all_uses_with(normed)
        gm.graph.erase_node(norm)
        add.replace_all_uses_with(total)
        gm.graph.erase_node(add)
        if not total.users:  # the final norm's sum is read by nothing else
            gm.graph.erase_node(total)
        fused.append({"node": node.name, "replaced": [add.name, norm.name], "layer": _layer(norm)})
    _finish(gm, fused)
    return fused


def fuse_rope_kv_write(gm: fx.GraphModule) -> list[dict]:
    """Fold each K rope read only by its layer's kv_write into fxforge::rope_kv_write (in place)."""
    fused = []
    for write in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.KV_WRITE]:
        rope = write.args[0]
        if not (isinstance(rope, fx.Node) and rope.op == "call_function" and rope.target is ops.ROPE
                and len(rope.users) == 1 and not rope.kwargs and not write.kwargs and rope.args[5] == write.args[9]):
            continue
        k, positions, inv_freq, interleaved, channel_perm, _ = rope.args
        v, k_data, k_scale, v_data, v_scale, slot_mapping, k_format, v_format, impl = write.args[1:]
        with gm.graph.inserting_before(write):
            node = gm.graph.call_function(ops.ROPE_KV_WRITE, (
                k, v, k_data, k_scale, v_data, v_scale, slot_mapping, positions, inv_freq, interleaved, channel_perm,
                k_format, v_format, impl))
        _take_over(node, write, [rope, write])
        gm.graph.erase_node(write)
        gm.graph.erase_node(rope)
        fused.append({"node": node.name, "replaced": [rope.name, write.name], "layer": _layer(write)})
    _finish(gm, fused)
    return fused


def unfuse_elementwise(graph: fx.Graph) -> int:
    """Rewrite every fxforge::add_rmsnorm and fxforge::rope_kv_write of `graph` back into the pair it
    replaced (targets, arguments and metadata as before the fusion); returns how many. Call
    recompile() on the owning GraphModule afterwards."""
    count = 0
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in (ops.ADD_RMSNORM, ops.ROPE_KV_WRITE)]:
        first_meta, second_meta = node.meta.get(FUSED_FROM) or ({}, {})
        with graph.inserting_before(node):
            if node.target is ops.ADD_RMSNORM:
                branch, residual, weight, eps, impl = node.args
                first = graph.call_function(operator.add, (residual, branch))
                second = graph.call_function(ops.RMSNORM, (first, weight, eps, impl))
                outputs = {0: first, 1: second}
            else:
                (k, v, k_data, k_scale, v_data, v_scale, slot_mapping, positions, inv_freq, interleaved, channel_perm,
                 k_format, v_format, impl) = node.args
                first = graph.call_function(ops.ROPE, (k, positions, inv_freq, interleaved, channel_perm, impl))
                second = graph.call_function(ops.KV_WRITE, (first, v, k_data, k_scale, v_data, v_scale, slot_mapping,
                                                            k_format, v_format, impl))
                outputs = {}
        first.meta.update(first_meta)
        second.meta.update(second_meta)
        for user in list(node.users):  # add_rmsnorm's getitems
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        count += 1
    return count


# -- helpers -------------------------------------------------------------------------------------------

def _is_residual_add(node) -> bool:
    """operator.add(residual, branch) of a decoder layer: two node operands, no broadcast scalars."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ADDS
            and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)):
        return False
    return traced_in(node, DecoderLayer)


def _users_follow(add: fx.Node, norm: fx.Node) -> bool:
    """Every reader of add comes after norm (the sum is produced where the norm was)."""
    order = {node: i for i, node in enumerate(norm.graph.nodes)}
    return all(order[user] >= order[norm] for user in add.users)


def _layer(node: fx.Node) -> int | None:
    return node.meta[META_KEY].layer if META_KEY in node.meta else None


def _take_over(node: fx.Node, main: fx.Node, replaced: list[fx.Node]) -> None:
    """node takes main's provenance and fxforge metadata, its notes naming the nodes it replaced; the
    replaced nodes' metadata is kept for unfuse_elementwise."""
    for key in _PROVENANCE:
        if key in main.meta:
            node.meta[key] = main.meta[key]
    if META_KEY in main.meta:
        old = main.meta[META_KEY]
        notes = {k: v for r in replaced if META_KEY in r.meta for k, v in r.meta[META_KEY].notes.items()}
        node.meta[META_KEY] = NodeMeta(role=old.role, layer=old.layer, heads=old.heads, tensor=old.tensor,
                                       notes={**notes, NOTE: {"from": [r.name for r in replaced]}})
    node.meta[FUSED_FROM] = [_snapshot(r) for r in replaced]


def _snapshot(node: fx.Node) -> dict:
    return {key: node.meta[key] for key in (*_PROVENANCE, META_KEY) if key in node.meta}


def _copy_meta(node: fx.Node, source: fx.Node, role: str) -> None:
    for key in _PROVENANCE:
        if key in source.meta:
            node.meta[key] = source.meta[key]
    node.meta[META_KEY] = NodeMeta(role=role, layer=_layer(source))


def _finish(gm: fx.GraphModule, fused: list[dict]) -> None:
    if fused:
        gm.graph.lint()
        gm.recompile()
