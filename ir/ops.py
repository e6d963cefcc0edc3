"""The custom ops of the canonical IR: fxforge::rope, fxforge::kv_write, fxforge::attention, and the
two that lowering introduces, fxforge::rmsnorm and fxforge::swiglu.

They are opaque to torch.fx so passes can find them by target, and each has a fake implementation
so graphs that contain them survive torch.compile / torch.export. The CPU implementation is the
float32 torch reference in kernels/; the `lower` pass (register_cuda_impl) routes CUDA tensors to
the Triton kernels where those exist.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from fxforge.kernels.attention import attention_ref
from fxforge.kernels.kv_cache import kv_write_ref
from fxforge.kernels.norm import rmsnorm_ref
from fxforge.kernels.rope import rope_ref
from fxforge.kernels.swiglu import swiglu_ref

# op name -> implementation used for CUDA tensors; CPU tensors always use the references.
_CUDA_IMPLS: dict[str, object] = {}


def register_cuda_impl(op_name: str, fn) -> None:
    """Bind a (Triton) implementation to an op for CUDA tensors; lowering calls this."""
    _CUDA_IMPLS[op_name] = fn


def unregister_cuda_impl(op_name: str) -> None:
    """Send CUDA tensors of an op back to its torch reference (lowering with backend="torch")."""
    _CUDA_IMPLS.pop(op_name, None)


def cuda_impls() -> dict[str, str]:
    """Which implementation each op uses on CUDA (recorded in plans)."""
    return {name: getattr(fn, "__qualname__", str(fn)) for name, fn in _CUDA_IMPLS.items()}


def cpu_impls() -> dict[str, str]:
    """Which implementation each op uses on CPU: always its torch reference."""
    return {name: fn.__qualname__ for name, fn in _REFERENCES.items()}


@contextlib.contextmanager
def reference_only():
    """Run every op through its torch reference inside the block, CUDA tensors included."""
    saved = dict(_CUDA_IMPLS)
    _CUDA_IMPLS.clear()
    try:
        yield
    finally:
        _CUDA_IMPLS.update(saved)


def _pick(op_name: str, ref, tensor: torch.Tensor):
    if tensor.is_cuda and op_name in _CUDA_IMPLS:
        return _CUDA_IMPLS[op_name]
    return ref


@torch.library.custom_op("fxforge::rope", mutates_args=())
def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool,
         channel_perm: Optional[torch.Tensor]) -> torch.Tensor:
    return _pick("rope", rope_ref, x)(x, positions, inv_freq, interleaved, channel_perm)


@rope.register_fake
def _rope_fake(x, positions, inv_freq, interleaved, channel_perm):
    return torch.empty_like(x)


@torch.library.custom_op("fxforge::kv_write", mutates_args=("k_data", "k_scale", "v_data", "v_scale"))
def kv_write(k: torch.Tensor, v: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor,
             v_data: torch.Tensor, v_scale: torch.Tensor, slot_mapping: torch.Tensor,
             k_format: str, v_format: str) -> None:
    if k.is_cuda and "kv_write" in _CUDA_IMPLS:
        _CUDA_IMPLS["kv_write"](k, v, k_data, k_scale, v_data, v_scale, slot_mapping, k_format, v_format)
        return
    kv_write_ref(k, k_data, k_scale, slot_mapping, k_format)
    kv_write_ref(v, v_data, v_scale, slot_mapping, v_format)


@kv_write.register_fake
def _kv_write_fake(k, v, k_data, k_scale, v_data, v_scale, slot_mapping, k_format, v_format):
    return None


@torch.library.custom_op("fxforge::attention", mutates_args=())
def attention(q: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor, v_data: torch.Tensor,
              v_scale: torch.Tensor, page_table: torch.Tensor, query_start: torch.Tensor,
              seq_lens: torch.Tensor, k_format: str, v_format: str, scale: float,
              sliding_window: int) -> torch.Tensor:
    impl = _pick("attention", attention_ref, q)
    return impl(q, k_data, k_scale, v_data, v_scale, page_table, query_start, seq_lens,
                k_format, v_format, scale, sliding_window)


@attention.register_fake
def _attention_fake(q, k_data, k_scale, v_data, v_scale, page_table, query_start, seq_lens,
                    k_format, v_format, scale, sliding_window):
    return torch.empty_like(q)


@torch.library.custom_op("fxforge::rmsnorm", mutates_args=())
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _pick("rmsnorm", rmsnorm_ref, x)(x, weight, eps)


@rmsnorm.register_fake
def _rmsnorm_fake(x, weight, eps):
    return x.new_empty(torch.broadcast_shapes(x.shape, weight.shape), dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("fxforge::swiglu", mutates_args=())
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _pick("swiglu", swiglu_ref, gate)(gate, up)


@swiglu.register_fake
def _swiglu_fake(gate, up):
    return torch.empty_like(gate)


_REFERENCES = {"rope": rope_ref, "kv_write": kv_write_ref, "attention": attention_ref, "rmsnorm": rmsnorm_ref,
               "swiglu": swiglu_ref}

ROPE = torch.ops.fxforge.rope
KV_WRITE = torch.ops.fxforge.kv_write
ATTENTION = torch.ops.fxforge.attention
RMSNORM = torch.ops.fxforge.rmsnorm
SWIGLU = torch.ops.fxforge.swiglu
CUSTOM_OP_ROLES = {ROPE: "rope", KV_WRITE: "kv_write", ATTENTION: "attention", RMSNORM: "norm", SWIGLU: "mlp_act"}
