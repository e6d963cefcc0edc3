"""Batched per-depth LoRA: y = base + (x A_s^T) B_s^T, where each row's adapter slot s is its loop depth.

A layer-tied model runs one shared block at several loop depths, each with its own LoRA. In one
batched call of the block, rows sit at different loop iterations: this is the multi-adapter problem
of Punica (SGMV) and vLLM (lora_shrink / lora_expand), with the loop iteration as the adapter id.
The rows arrive ordered by loop iteration (the runner sorts them on the host, where the loop of
every row is known), so `loop_starts` [L+1] bounds them: loop j owns rows
[loop_starts[j], loop_starts[j+1]) and uses slot `slot + loop_stride * j` of the stacked factors.
Without `loop_starts` every row uses `slot` (the unrolled, one-depth-per-call form).

    lora_a [S, R, IN] (A), lora_b [S, OUT, R] (B), x [T, IN], base [T, OUT] (the shared projection's output)
    shrink:  h[t] = x[t] @ A[s]^T                       [T, R] in float32
    expand:  y[t] = base[t] + h[t] @ B[s]^T             rounded once to base's dtype

Two launches (shrink writes h, expand reads it) serve large batches; at decode sizes one fused
launch recomputes each row tile's shrink per output tile instead, saving a launch per projection
(two would double the kernels of a relaxed depth).

The launch grid depends on shapes only (rows, ranks, output width, number of loops), never on how the
rows spread over the loops: a program whose row tile lies past its loop's rows does nothing, so a
CUDA graph captured for one batch composition replays any other of the same shape.
"""

from __future__ import annotations

import torch

from fxforge.kernels.triton_support import INTERPRETED, check_launchable, dot_acc, jit, next_pow2, tl, triton

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_DOT = 16  # tl.dot needs every dim >= 16
_BLOCK_T = 16  # rows per program: decode batches are small per loop
_BLOCK_K = 64  # reduction chunk of the shrink
_BLOCK_N = 64  # output columns per expand program
_MAX_BLOCK_R = 64  # ranks per program of the two-launch path (larger ranks take several programs / chunks)
FUSED_MAX_ROWS = 512  # the one-launch path recomputes each row's shrink once per column tile: decode sizes
FUSED_MAX_RANK = 128  # ... and holds the row tile's whole shrink result in registers


def loop_segments(loop_starts: torch.Tensor | None, num_rows: int) -> list[tuple[int, int]]:
    """[(first row, end row)] of each loop iteration (one segment of every row without loop_starts)."""
    if loop_starts is None:
        return [(0, num_rows)]
    bounds = loop_starts.tolist()
    if bounds[0] != 0 or bounds[-1] != num_rows or any(b > e for b, e in zip(bounds, bounds[1:])):
        raise ValueError(f"loop_starts {bounds} must rise from 0 to the {num_rows} rows")
    return list(zip(bounds, bounds[1:]))


def lora_ref(x: torch.Tensor, base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             loop_starts: torch.Tensor | None, slot: int, loop_stride: int) -> torch.Tensor:
    """Float32 reference (the CPU path): per loop segment, shrink then expand with that loop's slot."""
    out = base.to(torch.float32, copy=True)  # never write into the caller's base
    for j, (begin, end) in enumerate(loop_segments(loop_starts, x.shape[0])):
        if end > begin:
            s = slot + loop_stride * j
            h = x[begin:end].float() @ lora_a[s].float().T
            out[begin:end] += h @ lora_b[s].float().T
    return out.to(base.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@jit
def _segment(starts_ptr, loop, num_rows, tile, BLOCK_T: tl.constexpr, SEGMENTED: tl.constexpr):
    """(rows [BLOCK_T] int64, row mask) of row tile `tile` inside loop `loop`'s segment."""
    if SEGMENTED:
        begin = tl.load(starts_ptr + loop).to(tl.int64)
        end = tl.load(starts_ptr + loop + 1).to(tl.int64)
    else:
        begin = 0
        end = num_rows
    rows = begin + tile.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    return rows, rows < end


@jit
def _lora_shrink_kernel(
    x_ptr,  # *fp32|bf16|fp16 [T, IN], unit stride along IN
    a_ptr,  # *same [S, R, IN] contiguous: the stacked A factors
    h_ptr,  # *fp32 [T, R] out, contiguous
    starts_ptr,  # *int32 [L+1]: loop j owns rows [starts[j], starts[j+1]) (read only when SEGMENTED)
    num_rows,  # T
    slot,  # adapter slot of loop 0
    loop_stride,  # slot step from one loop to the next
    stride_x,  # x row stride (elements)
    IN: tl.constexpr,  # input width
    R: tl.constexpr,  # rank
    BLOCK_T: tl.constexpr,  # rows per program
    BLOCK_R: tl.constexpr,  # ranks per program
    BLOCK_K: tl.constexpr,  # reduction chunk
    SEGMENTED: tl.constexpr,  # rows carry loop segments (else all rows use `slot`)
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision ("ieee" for float32 x)
    UPCAST: tl.constexpr,  # bf16 operands under the interpreter (see triton_support.dot_acc)
):
    loop = tl.program_id(2)
    rows, row_mask = _segment(starts_ptr, loop, num_rows, tl.program_id(0), BLOCK_T, SEGMENTED)
    if tl.max(row_mask.to(tl.int32), axis=0) > 0:  # else the tile lies past this loop's rows
        ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        a_base = a_ptr + (slot + loop_stride * loop).to(tl.int64) * R * IN
        acc = _shrink(x_ptr, a_base, rows, row_mask, ranks, stride_x, IN, R, BLOCK_T, BLOCK_R, BLOCK_K, INPUT_PRECISION,
                      UPCAST)
        tl.store(h_ptr + rows[:, None] * R + ranks[None, :], acc, mask=row_mask[:, None] & (ranks[None, :] < R))


@jit
def _shrink(x_ptr, a_base, rows, row_mask, ranks, stride_x, IN: tl.constexpr, R: tl.constexpr, BLOCK_T: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """x[rows] @ A[s][ranks]^T in float32: [BLOCK_T, BLOCK_R] (a_base points at A[s])."""
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_mask[:, None] & (ks[None, :] < IN),
                    other=0.0)
        a = tl.load(a_base + ranks[None, :] * IN + ks[:, None], mask=(ranks[None, :] < R) & (ks[:, None] < IN),
                    other=0.0)  # [BLOCK_K, BLOCK_R] = A[s]^T chunk
        acc = dot_acc(x, a, acc, INPUT_PRECISION, UPCAST)
    return acc


@jit
def _lora_expand_kernel(
    h_ptr,  # *fp32 [T, R] contiguous: the shrink's output
    b_ptr,  # *fp32|bf16|fp16 [S, OUT, R] contiguous: the stacked B factors
    base_ptr,  # *fp32|bf16|fp16 [T, OUT], unit stride along OUT
    out_ptr,  # *base dtype [T, OUT] out, contiguous
    starts_ptr,  # *int32 [L+1] (read only when SEGMENTED)
    num_rows,  # T
    slot,  # adapter slot of loop 0
    loop_stride,  # slot step from one loop to the next
    stride_base,  # base row stride (elements)
    OUT: tl.constexpr,  # output width
    R: tl.constexpr,  # rank
    BLOCK_T: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_R: tl.constexpr,  # rank chunk
    SEGMENTED: tl.constexpr,  # rows carry loop segments
):
    loop = tl.program_id(2)
    rows, row_mask = _segment(starts_ptr, loop, num_rows, tl.program_id(0), BLOCK_T, SEGMENTED)
    if tl.max(row_mask.to(tl.int32), axis=0) > 0:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < OUT
        b_base = b_ptr + (slot + loop_stride * loop).to(tl.int64) * OUT * R
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            h = tl.load(h_ptr + rows[:, None] * R + ranks[None, :], mask=row_mask[:, None] & (ranks[None, :] < R),
                        other=0.0)
            b = tl.load(b_base + cols[None, :] * R + ranks[:, None], mask=col_mask[None, :] & (ranks[:, None] < R),
                        other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_N] = B[s]^T chunk
            acc = dot_acc(h, b, acc, "ieee", False)  # h is float32: full-precision products
        mask = row_mask[:, None] & col_mask[None, :]
        base = tl.load(base_ptr + rows[:, None] * stride_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * OUT + cols[None, :], (base + acc).to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _lora_fused_kernel(
    x_ptr,  # *fp32|bf16|fp16 [T, IN], unit stride along IN
    a_ptr,  # *same [S, R, IN] contiguous
    b_ptr,  # *same [S, OUT, R] contiguous
    base_ptr,  # *fp32|bf16|fp16 [T, OUT], unit stride along OUT
    out_ptr,  # *base dtype [T, OUT] out, contiguous
    starts_ptr,  # *int32 [L+1] (read only when SEGMENTED)
    num_rows,  # T
    slot,  # adapter slot of loop 0
    loop_stride,  # slot step from one loop to the next
    stride_x,  # x row stride (elements)
    stride_base,  # base row stride (elements)
    IN: tl.constexpr,  # input width
    OUT: tl.constexpr,  # output width
    R: tl.constexpr,  # rank (<= BLOCK_R: the whole shrink result stays in registers)
    BLOCK_T: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_R: tl.constexpr,  # ranks, padded to a power of two
    BLOCK_K: tl.constexpr,  # reduction chunk of the shrink
    SEGMENTED: tl.constexpr,  # rows carry loop segments
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision of the shrink ("ieee" for float32 x)
    UPCAST: tl.constexpr,  # bf16 operands under the interpreter
):
    # Shrink and expand in one launch: each program recomputes its rows' shrink (R x IN per row, small
    # next to the launch it saves at decode sizes) and expands it into its columns.
    loop = tl.program_id(2)
    rows, row_mask = _segment(starts_ptr, loop, num_rows, tl.program_id(0), BLOCK_T, SEGMENTED)
    if tl.max(row_mask.to(tl.int32), axis=0) > 0:
        s = (slot + loop_stride * loop).to(tl.int64)
        ranks = tl.arange(0, BLOCK_R)
        h = _shrink(x_ptr, a_ptr + s * R * IN, rows, row_mask, ranks, stride_x, IN, R, BLOCK_T, BLOCK_R, BLOCK_K,
                    INPUT_PRECISION, UPCAST)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < OUT
        b = tl.load(b_ptr + s * OUT * R + cols[None, :] * R + ranks[:, None],
                    mask=col_mask[None, :] & (ranks[:, None] < R), other=0.0).to(tl.float32)
        acc = dot_acc(h, b, tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32), "ieee", False)  # h is float32
        mask = row_mask[:, None] & col_mask[None, :]
        base = tl.load(base_ptr + rows[:, None] * stride_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * OUT + cols[None, :], (base + acc).to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _check(x, base, lora_a, lora_b, loop_starts, slot: int, loop_stride: int) -> int:
    """Validate the inputs; returns the number of loop segments."""
    check_launchable("lora_triton", "x", x, "lora_ref")
    tensors = {"x": x, "base": base, "lora_a": lora_a, "lora_b": lora_b}
    if any(t.dtype not in _FLOAT_DTYPES for t in tensors.values()) or len({x.dtype, lora_a.dtype, lora_b.dtype}) > 1:
        raise ValueError(f"lora_triton: x, lora_a and lora_b must share one float dtype (float32/bfloat16/float16), "
                         f"got {[(n, t.dtype) for n, t in tensors.items()]}")
    if x.dim() != 2 or base.dim() != 2 or lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(f"lora_triton: expected x [T, IN], base [T, OUT], lora_a [S, R, IN], lora_b [S, OUT, R], "
                         f"got {[(n, tuple(t.shape)) for n, t in tensors.items()]}")
    (t, width), (slots, rank, _) = x.shape, lora_a.shape
    want_b = (slots, base.shape[1], rank)
    if base.shape[0] != t or tuple(lora_a.shape) != (slots, rank, width) or tuple(lora_b.shape) != want_b:
        raise ValueError(f"lora_triton: shapes disagree: x {tuple(x.shape)}, base {tuple(base.shape)}, "
                         f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}")
    if x.stride(1) != 1 or base.stride(1) != 1 or not (lora_a.is_contiguous() and lora_b.is_contiguous()):
        raise ValueError("lora_triton: x and base need a unit stride along their last dim and lora_a / lora_b must "
                         "be contiguous; call .contiguous() first")
    loops = 1
    if loop_starts is not None:
        if loop_starts.dtype != torch.int32 or loop_starts.dim() != 1 or loop_starts.numel() < 2:
            raise ValueError(f"lora_triton: loop_starts must be a 1-d int32 tensor of L+1 >= 2 row bounds, got "
                             f"{loop_starts.dtype} {tuple(loop_starts.shape)}")
        loops = loop_starts.numel() - 1
        tensors["loop_starts"] = loop_starts
    if slot < 0 or slot + loop_stride * (loops - 1) >= slots or loop_stride < 0:
        raise ValueError(f"lora_triton: slot {slot} + loop_stride {loop_stride} * (loops {loops} - 1) must index one "
                         f"of the {slots} stacked adapters")
    for name, tensor in tensors.items():
        if tensor.device != x.device:
            raise ValueError(f"lora_triton: {name} is on {tensor.device}, x on {x.device}; put them on one device")
    return loops


def lora_triton(x: torch.Tensor, base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                loop_starts: torch.Tensor | None, slot: int, loop_stride: int, fused: bool | None = None) -> torch.Tensor:
    """Triton `lora_ref` (CUDA, or CPU under TRITON_INTERPRET=1), writing base + the update in base's
    dtype. `fused` (default: up to FUSED_MAX_ROWS rows and rank <= FUSED_MAX_RANK) runs shrink and
    expand in one launch; otherwise a shrink launch writes h [T, R] and an expand launch reads it."""
    loops = _check(x, base, lora_a, lora_b, loop_starts, slot, loop_stride)
    rows, rank, out_width = x.shape[0], lora_a.shape[1], base.shape[1]
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    if rows == 0:
        return out
    if fused is None:
        fused = rows <= FUSED_MAX_ROWS and rank <= FUSED_MAX_RANK
    starts = loop_starts if loop_starts is not None else out  # a pointer the kernels never read
    common = dict(BLOCK_T=_BLOCK_T, SEGMENTED=loop_starts is not None)
    # the shrink's operands: float32 at full precision; 16-bit products are exact in its float32 sum
    shrink = dict(INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                  UPCAST=INTERPRETED and x.dtype == torch.bfloat16)
    grid_n = (triton.cdiv(rows, _BLOCK_T), triton.cdiv(out_width, _BLOCK_N), loops)
    if fused:
        _lora_fused_kernel[grid_n](x, lora_a, lora_b, base, out, starts, rows, slot, loop_stride, x.stride(0),
                                   base.stride(0), IN=x.shape[1], OUT=out_width, R=rank, BLOCK_N=_BLOCK_N,
                                   BLOCK_R=max(_MIN_DOT, next_pow2(rank)), BLOCK_K=_BLOCK_K, **shrink, **common)
        return out
    h = torch.empty(rows, rank, dtype=torch.float32, device=x.device)
    block_r = min(_MAX_BLOCK_R, max(_MIN_DOT, next_pow2(rank)))
    _lora_shrink_kernel[(grid_n[0], triton.cdiv(rank, block_r), loops)](
        x, lora_a, h, starts, rows, slot, loop_stride, x.stride(0), IN=x.shape[1], R=rank, BLOCK_R=block_r,
        BLOCK_K=_BLOCK_K, **shrink, **common)
    _lora_expand_kernel[grid_n](h, lora_b, base, out, starts, rows, slot, loop_stride, base.stride(0), OUT=out_width,
                                R=rank, BLOCK_N=_BLOCK_N, BLOCK_R=block_r, **common)
    return out
