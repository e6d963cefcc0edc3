"""SwiGLU activation of the MLP: silu(gate) * up, in one pass.

    out = (silu(gate) * up).to(dtype),  silu(g) = g / (1 + exp(-g)),  math in float32

The unfused graph rounds silu(gate) to the model dtype before the multiply; the fused form rounds
once, at the end (identical in float32, at most one rounding step apart in bf16/fp16).

gate and up may be strided views with unit stride along the last dim, e.g. the two column slices of a
fused gate/up projection's output [T, 2I] (passes/fuse_projections.py): the kernel reads rows at their
own stride; contiguous inputs run as one flat row.
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
    gate_ptr,  # *fp32|bf16|fp16 [R, N], unit stride along N
    up_ptr,  # *same [R, N], unit stride along N
    out_ptr,  # *same [R, N] out, contiguous
    n,  # N: values per row
    blocks_per_row,  # cdiv(N, BLOCK)
    stride_gate,  # gate stride between rows (elements)
    stride_up,  # up stride between rows (elements)
    BLOCK: tl.constexpr,  # values per program
):
    program = tl.program_id(0).to(tl.int64)
    row = program // blocks_per_row
    cols = (program % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * n + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton `swiglu_ref` (CUDA, or CPU under TRITON_INTERPRET=1): reads gate and up once, writes out."""
    check_launchable("swiglu_triton", "gate", gate, "swiglu_ref")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"swiglu_triton: gate and up must be float32/bfloat16/float16 of one shape and dtype, got "
                         f"gate {gate.dtype} {tuple(gate.shape)}, up {up.dtype} {tuple(up.shape)}")
    if gate.device != up.device:
        raise ValueError(f"swiglu_triton: gate is on {gate.device}, up on {up.device}; put them on one device")
    strided = not (gate.is_contiguous() and up.is_contiguous())
    if strided and (gate.stride(-1) != 1 or up.stride(-1) != 1):
        raise ValueError(f"swiglu_triton: gate and up need unit stride along the last dim, got strides {gate.stride()} "
                         f"and {up.stride()}; call .contiguous() first")
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if not gate.numel():
        return out
    # contiguous: one flat row of every value; strided: rows at their own stride (a copy where they have none)
    gate_rows, up_rows = (t.reshape(-1, t.shape[-1]) if strided else t.reshape(1, -1) for t in (gate, up))
    rows, n = gate_rows.shape
    block = min(_BLOCK, triton.next_power_of_2(n)) if strided else _BLOCK
    blocks_per_row = triton.cdiv(n, block)
    _swiglu_kernel[(rows * blocks_per_row,)](gate_rows, up_rows, out, n, blocks_per_row, gate_rows.stride(0),
                                            up_rows.stride(0), BLOCK=block, num_warps=max(1, min(8, block // 256)))
    return out
