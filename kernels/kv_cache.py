"""Paged KV cache storage in any KV format: write new K/V rows, read a sequence's context back.

A layer's cache is four tensors: k_data, k_scale, v_data, v_scale, each [num_pages, page_size,
num_kv_heads, cols]. Dense formats keep the values in k_data and an empty k_scale; packed formats
(BFP, MXFP4) keep mantissa bytes in k_data and shared exponents in k_scale (kernels/bfp.py).
A token's slot is page_id * page_size + offset_in_page. A packed V may instead be stored channels by
tokens (`allocate_kv_pair(v_layout="channels")`: the same logical tensors, physically [num_pages,
num_kv_heads, cols, page_size], so a page's tokens are adjacent per column), the layout the "i8t"
decode kernel reads (kernels/paged_attention.py); the writers and readers here take either.

`kv_write_triton` writes K and V with one kernel launch each: a program reads a token's rows,
quantizes them (dense cast, or BFP/MXFP4 packing by the rules of kernels/bfp.py, bit for bit) and
stores the bytes straight into the token's slot, with no intermediate tensor. Slots < 0 are skipped
(padding tokens of a captured CUDA graph). Non-finite values are stored as NaN blocks (scale byte
255) rather than raised, since a check would read back to the host on every layer.
"""

from __future__ import annotations

import torch

from fxforge.kernels.bfp import KVFormat, dequantize, encode_groups, parse_kv_format, quantize
from fxforge.kernels.triton_support import check_launchable, jit, round_to_bf16, tl, triton


V_LAYOUTS = ("rows", "channels")


def allocate_kv_pair(num_pages, page_size, num_kv_heads, head_dim, k_format, v_format, device="cpu",
                     v_layout: str = "rows"):
    """[k_data, k_scale, v_data, v_scale] for one layer, K and V each in its own format. v_layout
    "channels" stores a packed V channels by tokens (to_channels_by_tokens; same shapes and values)."""
    if v_layout not in V_LAYOUTS:
        raise ValueError(f"allocate_kv_pair: v_layout={v_layout!r} must be one of {V_LAYOUTS}")
    out = []
    for name, fmt in (("k", k_format), ("v", v_format)):
        fmt = parse_kv_format(fmt) if isinstance(fmt, str) else fmt
        fmt.check_head_dim(head_dim)
        if name == "v" and v_layout == "channels" and (fmt.is_dense or page_size < 2):
            raise ValueError(f"allocate_kv_pair: v_layout='channels' needs a packed V format and pages of >= 2 "
                             f"tokens, got {fmt.name} with page_size {page_size}")
        shape = (num_pages, page_size, num_kv_heads)
        pair = [torch.zeros(*shape, fmt.row_bytes(head_dim) // _itemsize(fmt), dtype=fmt.storage_dtype(),
                            device=device),
                torch.zeros(*shape, fmt.scale_cols(head_dim), dtype=torch.uint8, device=device)]
        if name == "v" and v_layout == "channels":
            pair = [to_channels_by_tokens(t) for t in pair]
        out += pair
    return out


def v_channels_by_tokens(data: torch.Tensor) -> bool:
    """Whether a cache tensor [pages, page_size, Hkv, cols] is stored channels by tokens: for each page,
    head and column, the page's tokens adjacent (strides: slot 1, column page_size), as
    to_channels_by_tokens lays it out. The "i8t" decode kernel reads V this way (its P @ V dot
    contracts over tokens); the other decode kernels read rows (last dim contiguous)."""
    if not (isinstance(data, torch.Tensor) and data.dim() == 4 and data.shape[1] > 1 and data.stride(1) == 1):
        return False
    # a dim of length 1 is never stepped over, so its stride says nothing (torch may give it any value:
    # a [pages, page_size, 1, 1] scale comes out of .contiguous() or .clone() with strides (page_size, 1, 1, 1))
    page_size = data.shape[1]
    return ((data.shape[3] == 1 or data.stride(3) == page_size)
            and (data.shape[0] == 1 or data.stride(0) % page_size == 0)
            and (data.shape[2] == 1 or data.stride(2) % page_size == 0))


def to_channels_by_tokens(data: torch.Tensor) -> torch.Tensor:
    """A copy of a cache tensor [pages, page_size, Hkv, cols] with the same values, stored channels by
    tokens (v_channels_by_tokens): physically [pages, Hkv, cols, page_size]."""
    return data.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def _write_strides(data: torch.Tensor, scale: torch.Tensor) -> tuple[int, ...]:
    """The write kernels' view of a cache: (data page, slot, head, byte) and (scale page, slot, head,
    column) strides; a dense format's empty scale gives 0s (never read)."""
    return (*data.stride(), *(scale.stride() if scale.numel() else (0, 0, 0, 0)))


def _itemsize(fmt: KVFormat) -> int:
    return torch.empty((), dtype=fmt.storage_dtype()).element_size()


def kv_write_ref(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, slot_mapping: torch.Tensor, fmt: str) -> None:
    """Quantize x [T, Hkv, D] into the format and store row t at slot slot_mapping[t] (in place)."""
    if x.shape[0] == 0:
        return
    q_data, q_scale = quantize(x, parse_kv_format(fmt))
    slots = slot_mapping.long()
    page, in_page = slots // data.shape[1], slots % data.shape[1]  # (any layout: rows or channels by tokens)
    data[page, in_page] = q_data.to(data.dtype)
    if scale.shape[-1]:
        scale[page, in_page] = q_scale


def kv_write_pair_ref(k: torch.Tensor, v: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor,
                      v_data: torch.Tensor, v_scale: torch.Tensor, slot_mapping: torch.Tensor,
                      k_format: str, v_format: str) -> None:
    """kv_write_ref for K and V: the reference of kv_write_triton (same signature)."""
    kv_write_ref(k, k_data, k_scale, slot_mapping, k_format)
    kv_write_ref(v, v_data, v_scale, slot_mapping, v_format)


def kv_read_ref(data: torch.Tensor, scale: torch.Tensor, pages: torch.Tensor, length: int, fmt: str, head_dim: int) -> torch.Tensor:
    """The first `length` tokens stored in `pages`, dequantized to float32: [length, Hkv, D]."""
    rows = data[pages.long()].flatten(0, 1)[:length]
    scales = scale[pages.long()].flatten(0, 1)[:length]
    return dequantize(rows, scales, parse_kv_format(fmt), head_dim, torch.float32)


# ----------------------------------------------------------------------------------------------
# Triton: fused quantize + scatter
# ----------------------------------------------------------------------------------------------


@jit
def _kv_write_dense_kernel(
    x_ptr,  # *fp32|bf16|fp16 [T, Hkv, D]: rows of a token contiguous (Hkv * D values)
    data_ptr,  # *storage dtype [slots, Hkv, D] out: the paged cache viewed flat
    slot_ptr,  # *int32|int64 [T]: destination slot of each token (< 0: skipped)
    stride_xt,  # x stride between tokens (elements)
    ROW: tl.constexpr,  # Hkv * D values per token
    BLOCK: tl.constexpr,  # values per program (power of two)
    TO_BF16: tl.constexpr,  # True: x is fp32/fp16 and the cache bfloat16 (rounded via round_to_bf16)
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    mask = cols < tl.where(slot >= 0, ROW, 0)
    x = tl.load(x_ptr + token * stride_xt + cols, mask=mask)
    if TO_BF16:
        value = round_to_bf16(x.to(tl.float32))
    else:
        value = x.to(data_ptr.dtype.element_ty)
    tl.store(data_ptr + slot * ROW + cols, value, mask=mask)


@jit
def _kv_write_packed_kernel(
    x_ptr,  # *fp32|bf16|fp16 [T, Hkv, D]: rows of a token contiguous (Hkv * D values)
    data_ptr,  # *uint8 [pages, PAGE_SIZE, Hkv, D * MANTISSA_BITS / 8] out: packed codes
    scale_ptr,  # *uint8 [pages, PAGE_SIZE, Hkv, D / BLOCK] out: shared exponents
    slot_ptr,  # *int32|int64 [T]: destination slot of each token (< 0: skipped)
    stride_xt,  # x stride between tokens (elements)
    stride_dp, stride_ds, stride_dh, stride_dc,  # data strides (page, slot in page, head, byte), bytes
    stride_sp, stride_ss, stride_sh, stride_sc,  # scale strides, bytes (rows or channels by tokens)
    PAGE_SIZE: tl.constexpr,  # tokens per page
    TOKEN_BLOCKS: tl.constexpr,  # Hkv * D / BLOCK blocks per token (blocks never cross rows)
    HEAD_BLOCKS: tl.constexpr,  # D / BLOCK blocks per head
    MANTISSA_BITS: tl.constexpr,  # 4, 6 or 8 bits per code
    MXFP4: tl.constexpr,  # True: E2M1 elements, EMAX = 2; False: BFP integers, EMAX = m - 2
    BLOCK: tl.constexpr,  # values per shared exponent (16, 32, 64)
    BLOCKS_PER_PROGRAM: tl.constexpr,  # blocks one program quantizes (power of two)
):
    # The same steps as bfp._bfp_quantize_kernel, with a token's blocks stored at its slot.
    token = tl.program_id(0).to(tl.int64)
    blocks = tl.program_id(1) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    live = blocks < tl.where(slot >= 0, TOKEN_BLOCKS, 0)
    groups = tl.arange(0, BLOCK // 4)[None, :]
    first = x_ptr + token * stride_xt + blocks[:, None] * BLOCK + groups * 4  # first value of each group of 4
    word, biased, nonfinite = encode_groups(first, live, MANTISSA_BITS, MXFP4)
    _store_packed_blocks(data_ptr, scale_ptr, slot, blocks, groups, live, word, biased, nonfinite, stride_dp,
                         stride_ds, stride_dh, stride_dc, stride_sp, stride_ss, stride_sh, stride_sc, PAGE_SIZE,
                         HEAD_BLOCKS, MANTISSA_BITS, BLOCK)


@jit
def _store_packed_blocks(data_ptr, scale_ptr, slot, blocks, groups, live, word, biased, nonfinite, stride_dp,
                         stride_ds, stride_dh, stride_dc, stride_sp, stride_ss, stride_sh, stride_sc,
                         PAGE_SIZE: tl.constexpr, HEAD_BLOCKS: tl.constexpr, MANTISSA_BITS: tl.constexpr,
                         BLOCK: tl.constexpr):
    # A token's encoded blocks (blocks [N]: index over its heads' blocks; word [N, BLOCK // 4] packed
    # groups of 4 codes) stored at its slot, through the cache's strides (rows, or channels by tokens)
    page, in_page = slot // PAGE_SIZE, slot % PAGE_SIZE
    head, block = blocks // HEAD_BLOCKS, blocks % HEAD_BLOCKS
    row = page * stride_dp + in_page * stride_ds + head * stride_dh  # [N]
    byte = block[:, None] * (BLOCK * MANTISSA_BITS // 8) + groups * (MANTISSA_BITS // 2)  # first byte of each group
    for j in tl.static_range(MANTISSA_BITS // 2):
        tl.store(data_ptr + row[:, None] + (byte + j) * stride_dc, ((word >> (8 * j)) & 0xFF).to(tl.uint8),
                 mask=live[:, None])
    scale_at = page * stride_sp + in_page * stride_ss + head * stride_sh + block * stride_sc
    tl.store(scale_ptr + scale_at, tl.where(nonfinite, 255, biased).to(tl.uint8), mask=live)


_DENSE_VALUES_PER_PROGRAM = 1024
_PACKED_VALUES_PER_PROGRAM = 1024


def _check_write(name: str, x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, slot_mapping: torch.Tensor,
                 fmt: KVFormat) -> None:
    check_launchable("kv_write_triton", name, x, "kv_write_ref")
    if x.dim() != 3 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"kv_write_triton: {name} must be float32/bfloat16/float16 [T, Hkv, D], got {x.dtype} "
                         f"{tuple(x.shape)}")
    tokens, heads, head_dim = x.shape
    fmt.check_head_dim(head_dim)
    cols = head_dim if fmt.is_dense else fmt.row_bytes(head_dim)
    # a packed V may be stored channels by tokens (allocate_kv_pair's v_layout); everything else is contiguous
    laid_out = (lambda t: t.is_contiguous() or (name == "v" and not fmt.is_dense and v_channels_by_tokens(t)))
    if (data.dim() != 4 or data.dtype != fmt.storage_dtype() or tuple(data.shape[2:]) != (heads, cols)
            or not laid_out(data)):
        raise ValueError(f"kv_write_triton: {name}_data for {fmt.name} must be a contiguous {fmt.storage_dtype()} "
                         f"[pages, page_size, {heads}, {cols}] (a packed V may be stored channels by tokens), got "
                         f"{data.dtype} {tuple(data.shape)} strides {data.stride() if data.dim() == 4 else ()}")
    want_scale = (*data.shape[:3], fmt.scale_cols(head_dim))
    # a packed scale is laid out as its data: channels by tokens with such data, else contiguous (a scale of
    # one column and one head per token can be both, so the data decides)
    same_layout = fmt.is_dense or (v_channels_by_tokens(scale) if v_channels_by_tokens(data) else scale.is_contiguous())
    if scale.dtype != torch.uint8 or tuple(scale.shape) != want_scale or not laid_out(scale) or not same_layout:
        raise ValueError(f"kv_write_triton: {name}_scale for {fmt.name} must be a uint8 {want_scale} laid out as "
                         f"{name}_data, got {scale.dtype} {tuple(scale.shape)} strides {scale.stride()}")
    if x.stride(2) != 1 or x.stride(1) != head_dim:
        raise ValueError(f"kv_write_triton: {name} [T, Hkv, D] must have contiguous rows per token, got strides "
                         f"{x.stride()}; call .contiguous() first")
    if slot_mapping.shape != (tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_write_triton: slot_mapping must be int32/int64 [{tokens}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    for what, t in ((f"{name}_data", data), (f"{name}_scale", scale), ("slot_mapping", slot_mapping)):
        if t.device != x.device:
            raise ValueError(f"kv_write_triton: {what} is on {t.device}, {name} on {x.device}; put them on one device")


def _write_one(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, slot_mapping: torch.Tensor,
               fmt: KVFormat) -> None:
    tokens, heads, head_dim = x.shape
    if tokens == 0:
        return
    slots = slot_mapping.contiguous()
    if fmt.is_dense:
        row = heads * head_dim
        block = min(triton.next_power_of_2(row), _DENSE_VALUES_PER_PROGRAM)
        to_bf16 = data.dtype == torch.bfloat16 and x.dtype != torch.bfloat16
        _kv_write_dense_kernel[(tokens, triton.cdiv(row, block))](x, data, slots, x.stride(0), ROW=row, BLOCK=block,
                                                                  TO_BF16=to_bf16, num_warps=4)
        return
    token_blocks = heads * head_dim // fmt.block
    per_program = min(triton.next_power_of_2(token_blocks), _PACKED_VALUES_PER_PROGRAM // fmt.block)
    grid = (tokens, triton.cdiv(token_blocks, per_program))
    _kv_write_packed_kernel[grid](x, data, scale, slots, x.stride(0), *_write_strides(data, scale),
                                  PAGE_SIZE=data.shape[1], TOKEN_BLOCKS=token_blocks,
                                  HEAD_BLOCKS=head_dim // fmt.block, MANTISSA_BITS=fmt.mantissa_bits,
                                  MXFP4=fmt.kind == "mxfp4", BLOCK=fmt.block, BLOCKS_PER_PROGRAM=per_program,
                                  num_warps=4)


def kv_write_triton(k: torch.Tensor, v: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor,
                    v_data: torch.Tensor, v_scale: torch.Tensor, slot_mapping: torch.Tensor,
                    k_format: str, v_format: str) -> None:
    """Store k and v [T, Hkv, D] at slot_mapping in their formats (in place; one launch each).

    The bytes equal kv_write_ref's for every slot >= 0 and finite input (CUDA, or CPU under
    TRITON_INTERPRET=1). Inputs are validated before either tensor is written.
    """
    k_fmt, v_fmt = parse_kv_format(k_format), parse_kv_format(v_format)
    _check_write("k", k, k_data, k_scale, slot_mapping, k_fmt)
    _check_write("v", v, v_data, v_scale, slot_mapping, v_fmt)
    _write_one(k, k_data, k_scale, slot_mapping, k_fmt)
    _write_one(v, v_data, v_scale, slot_mapping, v_fmt)
