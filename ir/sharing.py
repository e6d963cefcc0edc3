"""Copy-on-write sharing of weights between a model and the graphs optimised from it.

`fxforge.optimize` never deep-copies weights: `share(gm)` gives a GraphModule with its own graph,
metadata, module objects and Parameter objects whose storage is the original's. (Own Parameter
objects: `.to()`/`.cuda()` assign `param.data`, so moving the optimised model leaves the original
where it was; tied parameters stay tied.) Before a pass runs, the pass manager clones the tensors
that pass declares it rewrites (`own`); `TensorGuard` then checks after each pass that no storage
still shared with the original was written (a strided sample of its values: writes through `.data`
bypass version counters), so a pass that forgot to declare a rewrite fails loudly instead of
silently corrupting the model it was given. Runtime-state buffers (ir/modules.py RUNTIME_BUFFERS,
written by every forward pass) are not shared: each copy gets its own, and no pass owns or guards them.
"""

from __future__ import annotations

import copy
import fnmatch

import torch
import torch.fx as fx
from torch import nn

from fxforge.ir.capture import META_KEY
from fxforge.ir.modules import is_runtime_buffer


def share(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of gm's graph and module tree that shares every tensor with gm."""
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:  # node.meta is copied shallowly: give each copy its own fxforge metadata
        if META_KEY in node.meta:
            node.meta[META_KEY] = copy.deepcopy(node.meta[META_KEY])
    aliases: dict[int, nn.Parameter] = {}
    root = nn.Module()
    for name, child in gm.named_children():
        root.add_module(name, _module_copy(child, aliases))
    for name, tensor in gm._parameters.items():
        setattr(root, name, _alias(tensor, aliases))
    for name, tensor in gm._buffers.items():
        setattr(root, name, tensor)
    out = fx.GraphModule(root, graph, class_name=type(gm).__name__)
    for name, child in root.named_children():  # fx copied only what the graph reads: keep the whole tree
        setattr(out, name, child)  # (the parts of a fused projection hold parameters no node reads)
    out.meta = dict(gm.meta)
    return out


def _module_copy(module: nn.Module, aliases: dict[int, nn.Parameter]) -> nn.Module:
    """A new module object (and new children) whose parameters alias the originals' storage."""
    new = copy.copy(module)
    new._parameters = {key: _alias(p, aliases) for key, p in module._parameters.items()}
    new._buffers = {key: torch.zeros_like(b) if b is not None and is_runtime_buffer(key) else b
                    for key, b in module._buffers.items()}
    new._modules = {name: _module_copy(child, aliases) for name, child in module._modules.items()}
    return new


def _alias(param: nn.Parameter | None, aliases: dict[int, nn.Parameter]) -> nn.Parameter | None:
    """A new Parameter over param's storage, one per original (so tied parameters stay one object)."""
    if param is None:
        return None
    if id(param) not in aliases:
        aliases[id(param)] = nn.Parameter(param.data, param.requires_grad)
    return aliases[id(param)]


def _tensors(module: nn.Module):
    """(qualified name, owning module, key, tensor) for every parameter and buffer but runtime state, tied
    ones once per place."""
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for store in (owner._parameters, owner._buffers):
            for key, tensor in store.items():
                if tensor is not None and not (store is owner._buffers and is_runtime_buffer(key)):
                    yield (f"{prefix}.{key}" if prefix else key), owner, store, key, tensor


def own(gm: fx.GraphModule, patterns: tuple[str, ...]) -> list[str]:
    """Replace every tensor whose qualified name matches a glob in `patterns` by a clone (tied
    tensors stay tied: one clone serves every place that held the tensor); returns the names."""
    clones: dict[int, torch.Tensor] = {}
    names = []
    for name, _, store, key, tensor in list(_tensors(gm)):
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if id(tensor) not in clones:
            data = tensor.detach().clone()
            clones[id(tensor)] = nn.Parameter(data, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else data
        names.append(name)
    if clones:
        for _, _, store, key, tensor in list(_tensors(gm)):
            if id(tensor) in clones:
                store[key] = clones[id(tensor)]
    return names


class TensorGuard:
    """Remembers the storage a graph shares with another model and checks its values stay untouched.

    It keeps an alias of each storage (`detach()`), so a pass that gives the graph's own Parameter
    new data (`param.data = ...`, harmless to the original) is not flagged, while a write into the
    shared storage is, however it was made.
    """

    def __init__(self, gm: fx.GraphModule):
        self._shared = {id(t): (name, t.detach(), _sample(t)) for name, _, _, _, t in _tensors(gm)}

    def release(self, gm: fx.GraphModule) -> None:
        """Forget tensors gm no longer holds (cloned by `own`): changing those is the pass's right."""
        held = {id(t) for *_, t in _tensors(gm)}
        self._shared = {key: value for key, value in self._shared.items() if key in held}

    def changed(self) -> list[str]:
        """Names of shared tensors whose storage was written since the guard was made."""
        return [name for name, storage, sample in self._shared.values() if not _same(_sample(storage), sample)]


_SAMPLE_VALUES = 4096  # per tensor: cheap for an 8B model, and any row permutation or scaling shows


def _sample(tensor: torch.Tensor) -> torch.Tensor | None:
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return None
    flat = tensor.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // _SAMPLE_VALUES)].clone()


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None and b is None or (a is not None and b is not None and torch.equal(a, b))

