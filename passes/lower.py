"""lower: bind the graph to fused kernels.

(a) Rewrites every RMSNorm module call (role `norm`: layer norms, the final norm, QK-norms with [D]
    or per-head [H, D] weights) into `fxforge::rmsnorm(x, weight, eps)` reading the module's weight
    through a get_attr node, and every `mul(silu(gate), up)` of a dense MLP into
    `fxforge::swiglu(gate, up)` (role `mlp_act`). Parameter names do not change, so artifacts keep
    their weights file layout.
(b) Binds every custom-op node (its `impl` argument, see ir/ops.py): with backend "triton" (or
    "auto" when triton imports and CUDA is available) to the Triton kernels of kernels/ for CUDA
    tensors; with backend "torch" to the torch references. CPU tensors always use the references.
    The binding is part of this graph only; other models in the process keep theirs.
(c) Reports which implementation each op uses on CPU and on CUDA (plan.json, report.md).
(d) Step fusions (issue 14; on by default since their H200 measurement, BENCHMARKS.md; each can be
    turned off):
    fuse_projections: q/k/v and gate/up projections as one GEMM each (passes/fuse_projections.py: the
    fused node keeps its parts' roles); fuse_add_norm: the residual add into the RMSNorm after it
    (fxforge::add_rmsnorm); fuse_rope_kv: K's RoPE into the KV write (fxforge::rope_kv_write)
    (passes/fuse_elementwise.py). In a layer-tied or skip-decode graph (cut into per-layer modules
    at run time) the add is fused only with the norm of its own layer.

Requires: role/layer metadata. Runs after `ksort`, `bfp-kv` and `layer-tying` (they rewrite the modules
and the op arguments this pass reads). `skip-decode` may run before or after it; after it, skip-decode
redoes the elementwise fusions within layers (its graph is cut per layer).
Restorable: the rewrite is structural and needs no data.
Guarantees: no RMSNorm call_module node is left (when fuse_norm); logits are unchanged in float32.
"""

from __future__ import annotations

import enum
import importlib.util
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxforge.ir import ops
from fxforge.ir.capture import META_KEY, NodeMeta, annotate, spec_of, traced_in
from fxforge.ir.modules import MLP, RMSNorm
from fxforge.passes.manager import PassConfig, PassResult, register_pass

# the step-fusion options of Lower (d), on by default: the names to turn them all off by
STEP_FUSIONS = ("fuse_projections", "fuse_add_norm", "fuse_rope_kv")
_SILU = (F.silu,)
_MUL = (operator.mul, torch.mul)


class Backend(str, enum.Enum):
    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"


@dataclass(frozen=True)
class Lower(PassConfig):
    """backend: auto | triton | torch (CUDA implementations); fuse_norm / fuse_swiglu: rewrites to apply;
    fuse_projections / fuse_add_norm / fuse_rope_kv: the step fusions of (d)."""

    backend: Backend = Backend.AUTO
    fuse_norm: bool = True
    fuse_swiglu: bool = True
    fuse_projections: bool = True
    fuse_add_norm: bool = True
    fuse_rope_kv: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("fuse_norm", "fuse_swiglu", *STEP_FUSIONS):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _check(config: Lower, spec) -> None:
    if config.backend is Backend.TRITON and not _triton_importable():
        raise ValueError("backend='triton' needs the triton package; install it or use backend='auto'/'torch'")


def _resolve_backend(backend: Backend) -> tuple[str, str]:
    """(backend used, why)."""
    if backend is Backend.TORCH:
        return "torch", "requested"
    if backend is Backend.TRITON:
        return "triton", "requested"
    if not _triton_importable():
        return "torch", "auto: triton is not installed"
    if not torch.cuda.is_available():
        return "torch", "auto: no CUDA device"
    return "triton", "auto: triton and CUDA available"


@register_pass("lower", Lower, after=("ksort", "bfp-kv", "layer-tying"), check=_check)
def lower(gm: fx.GraphModule, config: Lower, ctx) -> PassResult:
    """Rewrite RMSNorm and SwiGLU into fused ops; bind the CUDA kernels of every custom op; apply the
    step fusions asked for."""
    spec = spec_of(gm)
    norms = _lower_norms(gm) if config.fuse_norm else 0
    swiglus = _lower_swiglus(gm) if config.fuse_swiglu else 0
    if norms or swiglus:
        gm.graph.lint()
        gm.recompile()
    annotate(gm, spec)
    fusions = _step_fusions(gm, config)
    backend, why = _resolve_backend(config.backend)
    rebound = _bind(gm, ops.TRITON if backend == "triton" else ops.REFERENCE)
    bound = ops.bindings(gm)
    report = {"backend": backend, "backend_reason": why, "rmsnorm_nodes": norms, "swiglu_nodes": swiglus,
              "rebound_nodes": rebound, "cpu": ops.implementation_names(bound, "cpu"),
              "cuda": ops.implementation_names(bound, "cuda"), **fusions}
    fused = any(record.get("fused", True) for records in fusions.values() for record in records)
    return PassResult(gm, bool(norms or swiglus or rebound or fused), report)


def _step_fusions(gm: fx.GraphModule, config: Lower) -> dict[str, list[dict]]:
    """(d): {report key: records} of the fusions asked for (records: passes/fuse_*.py)."""
    from fxforge.ir.recursive import TYING_KEY
    from fxforge.ir.skip import SKIP_KEY
    from fxforge.passes.fuse_elementwise import fuse_add_rmsnorm, fuse_rope_kv_write
    from fxforge.passes.fuse_projections import fuse_projections

    report = {}
    if config.fuse_projections:
        report["fused_projections"] = fuse_projections(gm)
    if config.fuse_add_norm:
        split_later = TYING_KEY in gm.meta or SKIP_KEY in gm.meta  # cut per layer at run time
        report["fused_add_norm"] = fuse_add_rmsnorm(gm, across_layers=not split_later)
    if config.fuse_rope_kv:
        report["fused_rope_kv_write"] = fuse_rope_kv_write(gm)
    return report


# -- (a) structural rewrites -------------------------------------------------------------------------

def _lower_norms(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), RMSNorm):
            continue
        module = gm.get_submodule(node.target)
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            fused = gm.graph.call_function(ops.RMSNORM, (node.args[0], weight, float(module.eps), ops.REFERENCE))
        _adopt(weight, node)
        _adopt(fused, node, {"lower": {"from": node.target}})
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        count += 1
    return count


def _lower_swiglus(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        operands = _swiglu_operands(node)
        if operands is None:
            continue
        silu, gate, up = operands
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(ops.SWIGLU, (gate, up, ops.REFERENCE))
        _adopt(fused, node, {"lower": {"from": f"{silu.name} * {up.name}"}})
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        gm.graph.erase_node(silu)
        count += 1
    return count


def _swiglu_operands(node: fx.Node):
    """(silu node, gate, up) if node is mul(silu(gate), up) (either order) inside a dense MLP."""
    if node.op != "call_function" or node.target not in _MUL or len(node.args) != 2 or node.kwargs:
        return None
    if not traced_in(node, MLP):
        return None
    for silu, up in (node.args, node.args[::-1]):
        if (isinstance(silu, fx.Node) and isinstance(up, fx.Node) and silu.op == "call_function"
                and silu.target in _SILU and len(silu.users) == 1 and len(silu.args) == 1
                and not silu.kwargs.get("inplace", False)):
            return silu, silu.args[0], up
    return None


def _adopt(new: fx.Node, old: fx.Node, notes: dict | None = None) -> None:
    """Give a new node the provenance of the node it replaces (annotate() recomputes its role and
    layer from it) and, with `notes`, that node's notes plus these."""
    for key in ("nn_module_stack", "stack_trace"):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    if notes is not None:
        old_notes = old.meta[META_KEY].notes if META_KEY in old.meta else {}
        new.meta[META_KEY] = NodeMeta(role="op", notes={**old_notes, **notes})


# -- (b) kernel binding -------------------------------------------------------------------------------

def _bind(gm: fx.GraphModule, impl: str) -> int:
    """Bind every custom-op node to `impl`; returns how many changed."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ops.OP_NAMES and node.args[-1] != impl:
            ops.bind(node, impl)
            changed += 1
    return changed
