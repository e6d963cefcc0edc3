"""SwiGLU activation of the MLP: silu(gate) * up, in one pass.

    out = (silu(gate) * up).to(dtype),  silu(g) = g / (1 + exp(-g)),  math in float32

The unfused graph rounds silu(gate) to the model dtype before the multiply; the fused form rounds
once, at the end (identical in float32, at most one rounding step apart in bf16/fp16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxforge.kernels.triton_support import check_launchable, jit, tl, triton

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 2048  # values per program


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Float32 reference (the CPU path): silu(gate) * up computed in float32, returned in gate's dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


@jit
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
    check_launchable("swiglu_triton", "gate", gate, "swiglu_ref")
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
