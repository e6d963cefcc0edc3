"""RMSNorm over the last dim, with a [N] weight or a per-head [H, N] weight (QK-norm after KSort).

    y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)

The statistics and the normalisation run in float32 (the sum of squares in a fixed pairwise order, so
it does not depend on how the compiler lays the row out); the normalised row is rounded to x's dtype
before the weight multiply, exactly as the canonical RMSNorm module does, and the result takes the
promoted dtype of weight and x. A weight of k dims scales the last k dims of x, so row r of x viewed
as [R, N] uses weight row r mod (weight.numel() / N).

`add_rmsnorm` fuses the residual add that precedes every norm of a decoder layer: it returns
(s, rmsnorm(s)) with s = x + residual in the dtype torch's add gives (the promoted dtype of the two),
so both outputs are exactly what the unfused add and rmsnorm compute.
"""

from __future__ import annotations

import torch

from fxforge.kernels.triton_support import check_launchable, jit, round_to_bf16, tl, triton

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_VALUES_PER_PROGRAM = 4096  # rows per program = this // BLOCK_N (at least 1)
_MAX_BLOCK_N = 32768  # one row is held in registers at once


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Float32 reference (the CPU path): weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rmsnorm_ref(x + residual)): the sum as torch's add rounds it, normalised as is."""
    total = x + residual
    return total, rmsnorm_ref(total, weight, eps)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------


@jit
def _sum_of_squares(x, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, LOG2_BLOCK_N: tl.constexpr):
    # Row sums of x * x, [BLOCK_R, 1], as a fixed pairwise tree: s[i] = s[2i] + s[2i + 1], log2(BLOCK_N)
    # times. tl.sum adds in the order of the register layout the compiler picks, and that follows the
    # kernel's other loads and stores: add_rmsnorm's store of the sum gave its reduction another layout
    # than rmsnorm's (sm_90), so the two differed in the last bit. A sum over an axis of two is one
    # commutative add in any layout; with FMA contraction off (see the launch) no square fuses into an
    # add where both happen to sit in one thread. Wide rows pay a few more shuffles and barriers.
    squares = x * x
    for level in tl.static_range(LOG2_BLOCK_N):
        squares = tl.sum(tl.reshape(squares, [BLOCK_R, BLOCK_N >> (level + 1), 2]), axis=2)
    return squares


@jit
def _rmsnorm_kernel(
    x_ptr,  # *fp32|bf16|fp16 [R, N]: rows to normalise, unit stride along N
    residual_ptr,  # *same [R, N]: added to x first (read only when HAS_RESIDUAL)
    weight_ptr,  # *float [W, N] contiguous: row r uses weight row r % W
    out_ptr,  # *promoted dtype [R, N] out, contiguous
    sum_ptr,  # *promoted(x, residual) dtype [R, N] out: x + residual (written only when HAS_RESIDUAL)
    num_rows,  # R
    weight_rows,  # W
    stride_x,  # x stride between rows (elements)
    stride_residual,  # residual stride between rows (elements)
    eps,  # added to mean(x^2)
    N: tl.constexpr,  # row length
    BLOCK_N: tl.constexpr,  # next power of two >= N
    BLOCK_R: tl.constexpr,  # rows per program (power of two)
    HAS_RESIDUAL: tl.constexpr,  # fuse s = x + residual
    SUM_BF16: tl.constexpr,  # the sum is bfloat16 (rounded via round_to_bf16, as torch rounds it)
    LOG2_BLOCK_N: tl.constexpr,  # log2(BLOCK_N)
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < num_rows) & (cols < N)
    xf = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # the float32 sum rounded once to the sum's dtype, as torch computes x + residual
        residual = tl.load(residual_ptr + rows * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        if SUM_BF16:
            total = round_to_bf16(xf + residual)
        else:
            total = (xf + residual).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows * N + cols, total, mask=mask)
        xf = total.to(tl.float32)
    mean_square = _sum_of_squares(xf, BLOCK_R, BLOCK_N, LOG2_BLOCK_N) / N
    if HAS_RESIDUAL:  # rounded to the dtype of the row normalised: the sum's
        normed = (xf * tl.math.rsqrt(mean_square + eps)).to(sum_ptr.dtype.element_ty).to(tl.float32)
    else:
        normed = (xf * tl.math.rsqrt(mean_square + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + (rows % weight_rows) * N + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * N + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    check_launchable("rmsnorm_triton", "x", x, "rmsnorm_ref")
    if x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES or x.dim() == 0:
        raise ValueError(f"rmsnorm_triton: x and weight must be float32/bfloat16/float16 with a last dim, got "
                         f"x {x.dtype} {tuple(x.shape)}, weight {weight.dtype} {tuple(weight.shape)}")
    if weight.dim() == 0 or weight.dim() > x.dim() or tuple(weight.shape) != tuple(x.shape[x.dim() - weight.dim():]):
        raise ValueError(f"rmsnorm_triton: weight {tuple(weight.shape)} must match the trailing dims of x "
                         f"{tuple(x.shape)} (e.g. [N] or [H, N] for x [T, H, N])")
    if triton.next_power_of_2(x.shape[-1]) > _MAX_BLOCK_N:
        raise ValueError(f"rmsnorm_triton: rows of {x.shape[-1]} values exceed the {_MAX_BLOCK_N} one program holds")
    if residual is not None and (residual.shape != x.shape or residual.dtype not in _FLOAT_DTYPES):
        raise ValueError(f"add_rmsnorm_triton: residual must be a float32/bfloat16/float16 tensor of x's shape "
                         f"{tuple(x.shape)}, got {residual.dtype} {tuple(residual.shape)}")
    for name, t in (("weight", weight), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"rmsnorm_triton: {name} is on {t.device}, x on {x.device}; put them on one device")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [R, N] with unit stride along N (a view where strides allow, else a copy)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(1) == 1 else rows.contiguous()


def _launch(x, weight, eps, residual):
    """(normed, sum): rmsnorm of x, or with a residual, of sum = x + residual (else sum is normed)."""
    _check(x, weight, residual)
    n = x.shape[-1]
    normed_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, normed_dtype), device=x.device)
    total = torch.empty(x.shape, dtype=normed_dtype, device=x.device) if residual is not None else out
    if x.numel() == 0:
        return out, total
    x_rows = _rows(x)
    residual_rows = _rows(residual) if residual is not None else x_rows
    block_n = triton.next_power_of_2(n)
    block_r = min(triton.next_power_of_2(x_rows.shape[0]), max(1, _VALUES_PER_PROGRAM // block_n))
    grid = (triton.cdiv(x_rows.shape[0], block_r),)
    _rmsnorm_kernel[grid](x_rows, residual_rows, weight.contiguous(), out, total, x_rows.shape[0], weight.numel() // n,
                          x_rows.stride(0), residual_rows.stride(0), float(eps), N=n, BLOCK_N=block_n,
                          BLOCK_R=block_r, HAS_RESIDUAL=residual is not None,
                          SUM_BF16=residual is not None and total.dtype == torch.bfloat16,
                          LOG2_BLOCK_N=block_n.bit_length() - 1, num_warps=min(16, max(4, block_n * block_r // 1024)),
                          enable_fp_fusion=False)  # no FMA: the sum of squares is the same in every layout
    return out, total


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton `rmsnorm_ref` (CUDA, or CPU under TRITON_INTERPRET=1): one read of x, one write."""
    return _launch(x, weight, eps, None)[0]


def add_rmsnorm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `add_rmsnorm_ref`: (x + residual, its rmsnorm) in one pass that reads x and residual once;
    the sum is bit for bit torch's, the norm what rmsnorm_triton gives for that sum."""
    normed, total = _launch(x, weight, eps, residual)
    return total, normed
