"""SwiGLU activation of the MLP: silu(gate) * up, in one pass.

    out = (silu(gate) * up).to(dtype),  silu(g) = g / (1 + exp(-g)),  math in float32

The unfused graph rounds silu(gate) to the model dtype before the multiply; the fused form rounds
once, at the end (identical in float32, at most one rounding step apart in bf16/fp16).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: swiglu_ref serves every call
    triton = None

# triton.jit reads TRITON_INTERPRET when it decorates, so this is how the kernels below were built.
_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 2048  # values per program


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Float32 reference (the CPU path): silu(gate) * up computed in float32, returned in gate's dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _swiglu_kernel(
    gate_ptr,  # *fp32|bf16|fp16 [numel] contiguous
    up_ptr,  # *same [numel] contiguous
    out_ptr,  # *same [numel] out
    numel,  # number of values
    BLOCK: tl.constexpr,  # values per program
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton `swiglu_ref` (CUDA, or CPU under TRITON_INTERPRET=1): reads gate and up once, writes out."""
    if triton is None:
        raise ValueError("swiglu_triton needs triton installed; use swiglu_ref on CPU")
    if not (gate.is_cuda or (_INTERPRETED and gate.device.type == "cpu")):
        raise ValueError(f"swiglu_triton needs CUDA tensors (or CPU with TRITON_INTERPRET=1 set before importing "
                         f"fxforge), got gate on {gate.device}; use swiglu_ref")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"swiglu_triton: gate and up must be float32/bfloat16/float16 of one shape and dtype, got "
                         f"gate {gate.dtype} {tuple(gate.shape)}, up {up.dtype} {tuple(up.shape)}")
    if gate.device != up.device:
        raise ValueError(f"swiglu_triton: gate is on {gate.device}, up on {up.device}; put them on one device")
    if not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError(f"swiglu_triton: gate and up must be contiguous, got strides {gate.stride()} and "
                         f"{up.stride()}; call .contiguous() first")
    out = torch.empty_like(gate)
    if gate.numel():
        _swiglu_kernel[(triton.cdiv(gate.numel(), _BLOCK),)](gate, up, out, gate.numel(), BLOCK=_BLOCK, num_warps=8)
    return out
