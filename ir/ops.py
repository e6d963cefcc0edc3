"""The custom ops of the canonical IR: fxforge::rope, fxforge::kv_write, fxforge::attention,
fxforge::moe (the experts of an MoE block), the two that lowering introduces, fxforge::rmsnorm and
fxforge::swiglu, and fxforge::lora, the per-depth LoRA of a layer-tied graph. Two fused pairs replace
op pairs of a lowered graph (passes/fuse_elementwise.py): fxforge::add_rmsnorm (a residual add and the
rmsnorm of its sum) and fxforge::rope_kv_write (K's rope and the kv_write of the rotated K).

They are opaque to torch.fx so passes can find them by target, and each has a fake implementation
so graphs that contain them survive torch.compile / torch.export.

Kernel binding is data on each node: every op takes, as its last argument, `impl`, the
implementation that node is bound to:
  "reference"  the float32 torch reference of kernels/ (the test oracle), on any device;
  "triton"     the Triton kernel of kernels/ for CUDA tensors (and for CPU tensors when this process
               interprets Triton, TRITON_INTERPRET=1); the reference for other CPU tensors.
The canonical modules emit "reference"; the `lower` pass rewrites the argument. So the binding
belongs to the graph (graph.py shows it, an artifact replays it), and two models lowered
differently run side by side in one process.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
import torch.fx as fx

from fxforge.kernels.attention import attention_ref
from fxforge.kernels.kv_cache import kv_write_pair_ref
from fxforge.kernels.lora import lora_ref
from fxforge.kernels.moe import fused_moe_ref
from fxforge.kernels.triton_support import can_launch
from fxforge.kernels.norm import add_rmsnorm_ref, rmsnorm_ref
from fxforge.kernels.rope import rope_ref
from fxforge.kernels.rope_kv_write import rope_kv_write_ref
from fxforge.kernels.swiglu import swiglu_ref

REFERENCE, TRITON = "reference", "triton"
IMPLS = (REFERENCE, TRITON)


# op name -> its reference (same signature as the op, without `impl`)
REFERENCES: dict[str, Callable] = {"rope": rope_ref, "kv_write": kv_write_pair_ref, "attention": attention_ref,
                                   "rmsnorm": rmsnorm_ref, "swiglu": swiglu_ref, "lora": lora_ref,
                                   "moe": fused_moe_ref, "add_rmsnorm": add_rmsnorm_ref,
                                   "rope_kv_write": rope_kv_write_ref}
# op name -> (kernel module, launcher) imported on first use, so the IR loads without triton
_TRITON_LAUNCHERS = {"rope": ("fxforge.kernels.rope", "rope_triton"),
                     "kv_write": ("fxforge.kernels.kv_cache", "kv_write_triton"),
                     "attention": ("fxforge.kernels.paged_attention", "attention_triton"),
                     "rmsnorm": ("fxforge.kernels.norm", "rmsnorm_triton"),
                     "swiglu": ("fxforge.kernels.swiglu", "swiglu_triton"),
                     "lora": ("fxforge.kernels.lora", "lora_triton"),
                     "moe": ("fxforge.kernels.moe", "fused_moe"),
                     "add_rmsnorm": ("fxforge.kernels.norm", "add_rmsnorm_triton"),
                     "rope_kv_write": ("fxforge.kernels.rope_kv_write", "rope_kv_write_triton")}


def triton_launcher(op_name: str) -> Callable:
    module, name = _TRITON_LAUNCHERS[op_name]
    return getattr(importlib.import_module(module), name)


def implementation(op_name: str, impl: str, tensor: torch.Tensor) -> Callable:
    """The function an op bound to `impl` runs for inputs like `tensor`."""
    if impl not in IMPLS:
        raise ValueError(f"fxforge::{op_name}: impl={impl!r} is not one of {IMPLS}")
    if impl == TRITON and can_launch(tensor):
        return triton_launcher(op_name)
    return REFERENCES[op_name]


def implementation_names(impls: dict[str, str], device_type: str) -> dict[str, str]:
    """{op: name of the function it runs for tensors on device_type} for a binding {op: impl} (CPU:
    as on a machine that does not interpret Triton)."""
    use_kernel = device_type == "cuda"
    return {op: (triton_launcher(op) if impl == TRITON and use_kernel else REFERENCES[op]).__name__
            for op, impl in impls.items()}


@torch.library.custom_op("fxforge::rope", mutates_args=())
def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool,
         channel_perm: Optional[torch.Tensor], impl: str) -> torch.Tensor:
    return implementation("rope", impl, x)(x, positions, inv_freq, interleaved, channel_perm)


@rope.register_fake
def _rope_fake(x, positions, inv_freq, interleaved, channel_perm, impl):
    return torch.empty_like(x)


@torch.library.custom_op("fxforge::kv_write", mutates_args=("k_data", "k_scale", "v_data", "v_scale"))
def kv_write(k: torch.Tensor, v: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor,
             v_data: torch.Tensor, v_scale: torch.Tensor, slot_mapping: torch.Tensor,
             k_format: str, v_format: str, impl: str) -> None:
    implementation("kv_write", impl, k)(k, v, k_data, k_scale, v_data, v_scale, slot_mapping,
                                                    k_format, v_format)


@kv_write.register_fake
def _kv_write_fake(k, v, k_data, k_scale, v_data, v_scale, slot_mapping, k_format, v_format, impl):
    return None


@torch.library.custom_op("fxforge::attention", mutates_args=())
def attention(q: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor, v_data: torch.Tensor,
              v_scale: torch.Tensor, page_table: torch.Tensor, query_start: torch.Tensor,
              seq_lens: torch.Tensor, k_format: str, v_format: str, scale: float,
              sliding_window: int, key_rope: Optional[torch.Tensor], impl: str) -> torch.Tensor:
    """key_rope: None for a cache of rotated keys; a key_rope_table (kernels/rope.py) when the cache
    holds keys before RoPE, rotated as attention reads them."""
    return implementation("attention", impl, q)(
        q, k_data, k_scale, v_data, v_scale, page_table, query_start, seq_lens, k_format, v_format, scale,
        sliding_window, key_rope)


@attention.register_fake
def _attention_fake(q, k_data, k_scale, v_data, v_scale, page_table, query_start, seq_lens,
                    k_format, v_format, scale, sliding_window, key_rope, impl):
    return torch.empty_like(q)


@torch.library.custom_op("fxforge::rmsnorm", mutates_args=())
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str) -> torch.Tensor:
    return implementation("rmsnorm", impl, x)(x, weight, eps)


@rmsnorm.register_fake
def _rmsnorm_fake(x, weight, eps, impl):
    return x.new_empty(torch.broadcast_shapes(x.shape, weight.shape), dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("fxforge::swiglu", mutates_args=())
def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str) -> torch.Tensor:
    return implementation("swiglu", impl, gate)(gate, up)


@swiglu.register_fake
def _swiglu_fake(gate, up, impl):
    return torch.empty_like(gate)


@torch.library.custom_op("fxforge::lora", mutates_args=())
def lora(x: torch.Tensor, base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
         loop_starts: Optional[torch.Tensor], slot: int, loop_stride: int, impl: str) -> torch.Tensor:
    """base + the LoRA update of x; rows of loop j (loop_starts bounds them) use slot + loop_stride * j."""
    return implementation("lora", impl, x)(x, base, lora_a, lora_b, loop_starts, slot, loop_stride)


@lora.register_fake
def _lora_fake(x, base, lora_a, lora_b, loop_starts, slot, loop_stride, impl):
    return torch.empty_like(base)


@torch.library.custom_op("fxforge::moe", mutates_args=("expert_counts",))
def moe(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
        expert_ids: torch.Tensor, expert_counts: torch.Tensor, impl: str) -> torch.Tensor:
    """sum over the k slots of weights * expert(x) (SwiGLU experts stacked [E, ...]); expert_counts, int32 [E],
    is overwritten with the (token, slot) pairs routed to each expert: it stays on the device (the
    triton binding never syncs the host, so a CUDA graph captures the op, counts included)."""
    return implementation("moe", impl, x)(x, w_gate, w_up, w_down, weights, expert_ids, expert_counts=expert_counts)


@moe.register_fake
def _moe_fake(x, w_gate, w_up, w_down, weights, expert_ids, expert_counts, impl):
    return torch.empty_like(x)


# Fused pairs (passes/fuse_elementwise.py rewrites lowered graphs into them; each computes exactly what
# its unfused pair computes under the same binding).


@torch.library.custom_op("fxforge::add_rmsnorm", mutates_args=())
def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rmsnorm(x + residual)): a residual add and the norm that reads it, one pass."""
    return implementation("add_rmsnorm", impl, x)(x, residual, weight, eps)


@add_rmsnorm.register_fake
def _add_rmsnorm_fake(x, residual, weight, eps, impl):
    total = x.new_empty(torch.broadcast_shapes(x.shape, residual.shape), dtype=torch.promote_types(x.dtype, residual.dtype))
    return total, _rmsnorm_fake(total, weight, eps, impl)


@torch.library.custom_op("fxforge::rope_kv_write", mutates_args=("k_data", "k_scale", "v_data", "v_scale"))
def rope_kv_write(k: torch.Tensor, v: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor,
                  v_data: torch.Tensor, v_scale: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor, interleaved: bool, channel_perm: Optional[torch.Tensor], k_format: str,
                  v_format: str, impl: str) -> None:
    """kv_write(rope(k, positions, inv_freq, interleaved, channel_perm), v, ...): K rotated as it is written."""
    implementation("rope_kv_write", impl, k)(k, v, k_data, k_scale, v_data, v_scale, slot_mapping, positions,
                                             inv_freq, interleaved, channel_perm, k_format, v_format)


@rope_kv_write.register_fake
def _rope_kv_write_fake(k, v, k_data, k_scale, v_data, v_scale, slot_mapping, positions, inv_freq, interleaved,
                        channel_perm, k_format, v_format, impl):
    return None


ROPE = torch.ops.fxforge.rope
KV_WRITE = torch.ops.fxforge.kv_write
ATTENTION = torch.ops.fxforge.attention
RMSNORM = torch.ops.fxforge.rmsnorm
SWIGLU = torch.ops.fxforge.swiglu
LORA = torch.ops.fxforge.lora
MOE = torch.ops.fxforge.moe
ADD_RMSNORM = torch.ops.fxforge.add_rmsnorm
ROPE_KV_WRITE = torch.ops.fxforge.rope_kv_write
OP_NAMES = {ROPE: "rope", KV_WRITE: "kv_write", ATTENTION: "attention", RMSNORM: "rmsnorm", SWIGLU: "swiglu",
            LORA: "lora", MOE: "moe", ADD_RMSNORM: "add_rmsnorm", ROPE_KV_WRITE: "rope_kv_write"}
CUSTOM_OP_ROLES = {ROPE: "rope", KV_WRITE: "kv_write", ATTENTION: "attention", RMSNORM: "norm", SWIGLU: "mlp_act",
                   LORA: "lora", MOE: "expert",
                   ADD_RMSNORM: "norm", ROPE_KV_WRITE: "kv_write"}  # a fused op: the role of the work it ends in


def bindings(gm: fx.GraphModule) -> dict[str, str]:
    """{op name: impl} over the custom-op nodes of a graph; "mixed" where nodes of one op disagree."""
    found: dict[str, set] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in OP_NAMES:
            found.setdefault(OP_NAMES[node.target], set()).add(node.args[-1])
    return {op: impls.pop() if len(impls) == 1 else "mixed" for op, impls in found.items()}


def bind(node: fx.Node, impl: str) -> None:
    """Bind one custom-op node to `impl` (its last argument)."""
    if node.target not in OP_NAMES or impl not in IMPLS:
        raise ValueError(f"cannot bind node {node.name} ({node.target}) to {impl!r}; impls: {IMPLS}")
    node.update_arg(len(node.args) - 1, impl)


# -- direct dispatch: the same implementations without torch.library's layers, for eager steps -------

def _direct(op_name: str) -> Callable:
    def call(*args):
        *inputs, impl = args
        return implementation(op_name, impl, inputs[0])(*inputs)

    call.__name__ = call.__qualname__ = f"{op_name}_direct"
    return call


# op -> a plain function of the same arguments running what the op's body runs (moe keeps the op: its
# implementations take expert_counts by keyword)
DIRECT: dict = {op: _direct(name) for op, name in OP_NAMES.items() if op is not MOE}


def direct_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over gm's own submodules and tensors (nothing copied) whose custom-op calls go
    straight to the bound implementation (`DIRECT`) instead of through torch.library's dispatcher
    (custom_op, fake registrations, autograd and dispatch keys: 30-50 us of host time a call on the
    H100's host). Same numbers as gm, for eager runs only: torch.compile and export need the ops."""
    graph = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, mapping)
    graph.output(output)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in DIRECT:
            node.target = DIRECT[node.target]
    return fx.GraphModule(gm, graph, class_name="DirectDispatch")
