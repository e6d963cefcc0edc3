"""RoPE on K fused with the paged KV write: one launch rotates K in registers and stores it (and V).

    rope_kv_write_ref(k, v, k_data, k_scale, v_data, v_scale, slot_mapping, positions, inv_freq,
                      interleaved, channel_perm, k_format, v_format)
      = kv_write_pair_ref(rope_ref(k, positions, inv_freq, interleaved, channel_perm), v, ...)

The unfused pair writes the rotated K to memory (rope_triton) and reads it back to quantize it
(kv_write_triton): two launches and a round trip of K per layer and step. `rope_kv_write_triton`
computes every K value as rope_triton does (the same angle, cos/sin and expression, rounded to K's
dtype as rope's output is) and quantizes it as kv_write_triton does (kernels/bfp.py's rules, via
`encode_values` on the values in registers), so its bytes equal the unfused Triton pair's for
every KV format; V takes kv_write_triton's path unchanged. Each program handles a few KV heads of
one token, K then V. Slots < 0 are skipped, as kv_write skips them.

Keys cached before RoPE (bfp-kv pre_rope=True) have no RoPE before their write: nothing to fuse.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from fxforge.kernels.bfp import encode_groups, encode_values, parse_kv_format
from fxforge.kernels.kv_cache import _check_write, _store_packed_blocks, _write_strides, kv_write_pair_ref
from fxforge.kernels.rope import _check_rope_inputs, permuted_pair, rope_ref, rope_tables, rotated
from fxforge.kernels.triton_support import jit, round_to_bf16, tl, triton

# how rope_kv_write_triton cuts its grid: K values (and as many V values) a program writes (heads = this // D),
# K and V in programs of their own or not, warps a program. Measured on the H200 (benchmarks/kv_write_bench.py,
# BENCHMARKS.md): K and V apart with 2 warps took a SmolLM2 decode layer's write (256 tokens x 3 heads x d64)
# from 5.98 to 5.63 us in bf16 and from 7.04 to 6.34-6.50 us packed, an 8B one (64 x 8 x d128, 2 heads a program)
# from 6.94 to 6.24 us and from 8.3 to 6.6 us. FXFORGE_WRITE_LAUNCH (JSON) overrides it per process, for A/B
# runs of whole benchmarks.
WRITE_LAUNCH = {"values_per_program": 256, "split_kv": True, "num_warps": 2}


def rope_kv_write_ref(k: torch.Tensor, v: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor,
                      v_data: torch.Tensor, v_scale: torch.Tensor, slot_mapping: torch.Tensor,
                      positions: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool,
                      channel_perm: torch.Tensor | None, k_format: str, v_format: str) -> None:
    """rope_ref on k, then kv_write_pair_ref (in place): the unfused pair, step for step."""
    k_rot = rope_ref(k, positions, inv_freq, interleaved, channel_perm)
    kv_write_pair_ref(k_rot, v, k_data, k_scale, v_data, v_scale, slot_mapping, k_format, v_format)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------


@jit
def _row_values(
    row_ptr,  # pointer to head 0 of the program's heads, for this token
    values,  # int tensor: value indices head * HEAD_DIM + channel within the program's heads
    mask,  # bool tensor like values: which to load (others read 0)
    position,  # float32: the token's position
    inv_freq_ptr,  # *float [D/2]: frequency of each RoPE pair
    table_ptr,  # *int32 [H, D] (first_head applied): rope_tables' o | partner << 16 (PERMUTED only)
    stride_h,  # row stride between heads (elements)
    HEAD_DIM: tl.constexpr,  # D
    ROTATE: tl.constexpr,  # apply RoPE (K), else the values as stored (V)
    INTERLEAVED: tl.constexpr,  # pairs (2i, 2i+1) if True, else (i, i + D/2)
    PERMUTED: tl.constexpr,  # channels carry a KSort permutation (table_ptr)
):
    # float32 values; rotated ones exactly as kernels/rope.py's kernels compute and round them.
    head = values // HEAD_DIM
    channel = values % HEAD_DIM
    ptr = row_ptr + head * stride_h
    x = tl.load(ptr + channel, mask=mask, other=0.0).to(tl.float32)
    if ROTATE:
        if PERMUTED:  # _rope_permuted_kernel's formula
            code = tl.load(table_ptr + head * HEAD_DIM + channel, mask=mask, other=0)
            is_first, freq, partner = permuted_pair(code, HEAD_DIM, INTERLEAVED)
            angle = position * tl.load(inv_freq_ptr + freq, mask=mask, other=0.0).to(tl.float32)
            sin = tl.sin(angle)
            x_partner = tl.load(ptr + partner, mask=mask, other=0.0).to(tl.float32)
            out = rotated(x, x_partner, tl.cos(angle), tl.where(is_first, -sin, sin))
        else:  # _rope_kernel's formula: (x1 cos - x2 sin, x2 cos + x1 sin) per pair
            if INTERLEAVED:
                is_first = (channel % 2) == 0
                partner = channel ^ 1
                pair = channel // 2
            else:
                is_first = channel < HEAD_DIM // 2
                partner = tl.where(is_first, channel + HEAD_DIM // 2, channel - HEAD_DIM // 2)
                pair = tl.where(is_first, channel, channel - HEAD_DIM // 2)
            angle = position * tl.load(inv_freq_ptr + pair, mask=mask, other=0.0).to(tl.float32)
            cos = tl.cos(angle)
            sin = tl.sin(angle)
            x_partner = tl.load(ptr + partner, mask=mask, other=0.0).to(tl.float32)
            out = rotated(x, x_partner, cos, tl.where(is_first, -sin, sin))
        x = out.to(row_ptr.dtype.element_ty).to(tl.float32)  # rope's output dtype is its input's
    return x


@jit
def _write_rows(
    row_ptr,  # pointer to head 0 of the program's heads (K or V), for this token
    data_ptr,  # *storage dtype: the cache's data (dense: contiguous, viewed flat)
    scale_ptr,  # *uint8: the cache's shared exponents (packed formats)
    stride_dp, stride_ds, stride_dh, stride_dc,  # data strides (page, slot in page, head, byte; packed formats)
    stride_sp, stride_ss, stride_sh, stride_sc,  # scale strides (rows, or a V channels by tokens)
    slot,  # int64: the token's slot
    first_head,  # first KV head of this program
    live_values,  # values this program writes (0 for a skipped slot)
    position,  # float32: the token's position (ROTATE)
    inv_freq_ptr,  # *float [D/2] (ROTATE)
    table_ptr,  # *int32 [H, D] permutation table at first_head (PERMUTED)
    stride_h,  # row stride between heads (elements)
    NUM_HEADS: tl.constexpr,  # Hkv
    HEAD_DIM: tl.constexpr,  # D
    ROTATE: tl.constexpr,  # RoPE before the write (K)
    INTERLEAVED: tl.constexpr,  # RoPE pair layout (ROTATE)
    PERMUTED: tl.constexpr,  # KSort channel permutation (ROTATE)
    MANTISSA_BITS: tl.constexpr,  # 0: dense format; 4, 6 or 8: packed codes
    MXFP4: tl.constexpr,  # E2M1 elements (packed)
    BLOCK: tl.constexpr,  # values per shared exponent (packed)
    TO_BF16: tl.constexpr,  # dense bfloat16 cache: rounded via round_to_bf16, as kv_write_triton does
    BLOCK_VALUES: tl.constexpr,  # power of two >= the values one program writes
    PAGE_SIZE: tl.constexpr,  # tokens per page
):
    if MANTISSA_BITS == 0:  # _kv_write_dense_kernel's store
        values = tl.arange(0, BLOCK_VALUES)
        mask = values < live_values
        x = _row_values(row_ptr, values, mask, position, inv_freq_ptr, table_ptr, stride_h, HEAD_DIM, ROTATE,
                        INTERLEAVED, PERMUTED)
        if TO_BF16:
            value = round_to_bf16(x)
        else:
            value = x.to(data_ptr.dtype.element_ty)
        tl.store(data_ptr + slot * (NUM_HEADS * HEAD_DIM) + first_head * HEAD_DIM + values, value, mask=mask)
    else:  # _kv_write_packed_kernel's store
        blocks = tl.arange(0, BLOCK_VALUES // BLOCK)
        live = blocks < live_values // BLOCK
        groups = tl.arange(0, BLOCK // 4)[None, :]
        first = blocks[:, None] * BLOCK + groups * 4  # first value of each group of 4
        if ROTATE:
            x0 = _row_values(row_ptr, first, live[:, None], position, inv_freq_ptr, table_ptr, stride_h, HEAD_DIM,
                             ROTATE, INTERLEAVED, PERMUTED)
            x1 = _row_values(row_ptr, first + 1, live[:, None], position, inv_freq_ptr, table_ptr, stride_h,
                             HEAD_DIM, ROTATE, INTERLEAVED, PERMUTED)
            x2 = _row_values(row_ptr, first + 2, live[:, None], position, inv_freq_ptr, table_ptr, stride_h,
                             HEAD_DIM, ROTATE, INTERLEAVED, PERMUTED)
            x3 = _row_values(row_ptr, first + 3, live[:, None], position, inv_freq_ptr, table_ptr, stride_h,
                             HEAD_DIM, ROTATE, INTERLEAVED, PERMUTED)
            word, biased, nonfinite = encode_values(x0, x1, x2, x3, MANTISSA_BITS, MXFP4)
        else:  # heads of V are read where they are (a block never crosses a head)
            head = first // HEAD_DIM
            word, biased, nonfinite = encode_groups(row_ptr + head * stride_h + first % HEAD_DIM, live,
                                                    MANTISSA_BITS, MXFP4)
        block_ids = first_head * (HEAD_DIM // BLOCK) + blocks
        _store_packed_blocks(data_ptr, scale_ptr, slot, block_ids, groups, live, word, biased, nonfinite,
                             stride_dp, stride_ds, stride_dh, stride_dc, stride_sp, stride_ss, stride_sh, stride_sc,
                             PAGE_SIZE, HEAD_DIM // BLOCK, MANTISSA_BITS, BLOCK)


@jit
def _rope_kv_write_kernel(
    k_ptr,  # *fp32|bf16|fp16 [T, Hkv, D]: keys before RoPE, unit stride along D
    v_ptr,  # *fp32|bf16|fp16 [T, Hkv, D]: values, unit stride along D
    k_data_ptr,  # *K storage dtype [slots, Hkv, ...] out: the paged K cache, flat
    k_scale_ptr,  # *uint8 [slots, Hkv, D / K_BLOCK] out: K's shared exponents (packed K formats)
    v_data_ptr,  # *V storage dtype [slots, Hkv, ...] out: the paged V cache, flat
    v_scale_ptr,  # *uint8 [slots, Hkv, D / V_BLOCK] out: V's shared exponents (packed V formats)
    slot_ptr,  # *int32|int64 [T]: destination slot of each token (< 0: skipped)
    positions_ptr,  # *int32|int64 [T]: position of each token
    inv_freq_ptr,  # *float [D/2]: frequency of each RoPE pair
    table_ptr,  # *int32 [Hkv, D]: rope_tables of the channel permutation (read only when PERMUTED)
    stride_kt,  # k stride between tokens (elements)
    stride_kh,  # k stride between heads (elements)
    stride_vt,  # v stride between tokens (elements)
    stride_vh,  # v stride between heads (elements)
    stride_kdp, stride_kds, stride_kdh, stride_kdc,  # K data strides (page, slot in page, head, byte)
    stride_ksp, stride_kss, stride_ksh, stride_ksc,  # K scale strides
    stride_vdp, stride_vds, stride_vdh, stride_vdc,  # V data strides (rows, or channels by tokens)
    stride_vsp, stride_vss, stride_vsh, stride_vsc,  # V scale strides
    PAGE_SIZE: tl.constexpr,  # tokens per page
    NUM_HEADS: tl.constexpr,  # Hkv
    HEAD_DIM: tl.constexpr,  # D
    HEADS_PER_PROGRAM: tl.constexpr,  # KV heads one program writes
    BLOCK_VALUES: tl.constexpr,  # power of two >= HEADS_PER_PROGRAM * D
    INTERLEAVED: tl.constexpr,  # RoPE pairs (2i, 2i+1) if True, else (i, i + D/2)
    PERMUTED: tl.constexpr,  # K carries a KSort channel permutation
    K_MANTISSA_BITS: tl.constexpr,  # 0: dense K format; else bits per K code
    K_MXFP4: tl.constexpr,  # K in MXFP4
    K_BLOCK: tl.constexpr,  # K values per shared exponent
    K_TO_BF16: tl.constexpr,  # K cache is dense bfloat16
    V_MANTISSA_BITS: tl.constexpr,  # the same four for V
    V_MXFP4: tl.constexpr,
    V_BLOCK: tl.constexpr,
    V_TO_BF16: tl.constexpr,
    SPLIT_KV: tl.constexpr = False,  # grid axis 2 of 2: program 0 writes K, program 1 V (else one program, both)
):
    token = tl.program_id(0).to(tl.int64)
    first_head = tl.program_id(1) * HEADS_PER_PROGRAM
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.minimum(HEADS_PER_PROGRAM, NUM_HEADS - first_head)
    live_values = tl.where(slot >= 0, heads * HEAD_DIM, 0)
    position = tl.load(positions_ptr + token).to(tl.float32)
    which = tl.program_id(2) if SPLIT_KV else -1  # -1: this program writes both
    if which != 1:
        _write_rows(k_ptr + token * stride_kt + first_head * stride_kh, k_data_ptr, k_scale_ptr, stride_kdp,
                    stride_kds, stride_kdh, stride_kdc, stride_ksp, stride_kss, stride_ksh, stride_ksc, slot,
                    first_head, live_values, position, inv_freq_ptr, table_ptr + first_head * HEAD_DIM, stride_kh,
                    NUM_HEADS, HEAD_DIM, True, INTERLEAVED, PERMUTED, K_MANTISSA_BITS, K_MXFP4, K_BLOCK, K_TO_BF16,
                    BLOCK_VALUES, PAGE_SIZE)
    if which != 0:
        _write_rows(v_ptr + token * stride_vt + first_head * stride_vh, v_data_ptr, v_scale_ptr, stride_vdp,
                    stride_vds, stride_vdh, stride_vdc, stride_vsp, stride_vss, stride_vsh, stride_vsc, slot,
                    first_head, live_values, position, inv_freq_ptr, table_ptr, stride_vh, NUM_HEADS, HEAD_DIM, False,
                    False, False, V_MANTISSA_BITS, V_MXFP4, V_BLOCK, V_TO_BF16, BLOCK_VALUES, PAGE_SIZE)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _format_meta(prefix: str, fmt, data: torch.Tensor) -> dict:
    packed = not fmt.is_dense
    return {f"{prefix}_MANTISSA_BITS": fmt.mantissa_bits if packed else 0, f"{prefix}_MXFP4": fmt.kind == "mxfp4",
            f"{prefix}_BLOCK": fmt.block if packed else 4, f"{prefix}_TO_BF16": data.dtype == torch.bfloat16}


@functools.lru_cache(maxsize=8)
def _env_launch(text: str):
    """FXFORGE_WRITE_LAUNCH's JSON, parsed once per value ({} when unset)."""
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"rope_kv_write_triton: FXFORGE_WRITE_LAUNCH={text!r} is not JSON ({exc}); give a dict "
                         f"such as {json.dumps(WRITE_LAUNCH)}") from None


def rope_kv_write_triton(k: torch.Tensor, v: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor,
                         v_data: torch.Tensor, v_scale: torch.Tensor, slot_mapping: torch.Tensor,
                         positions: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool,
                         channel_perm: torch.Tensor | None, k_format: str, v_format: str,
                         launch: dict | None = None) -> None:
    """Triton `rope_kv_write_ref` (in place, one launch; CUDA, or CPU under TRITON_INTERPRET=1).

    The bytes equal those of rope_triton followed by kv_write_triton for every slot >= 0, and
    inputs are validated as those two validate theirs before anything is written.
    launch (benchmarks): how the grid is cut, over WRITE_LAUNCH's values (and FXFORGE_WRITE_LAUNCH's):
    values_per_program (K values a program writes, whole heads), split_kv (K and V by programs of their
    own), num_warps; any cut stores the same bytes.
    """
    env = _env_launch(os.environ.get("FXFORGE_WRITE_LAUNCH", ""))
    for what, given in (("FXFORGE_WRITE_LAUNCH", env), ("launch", launch or {})):
        if not isinstance(given, dict) or set(given) - set(WRITE_LAUNCH):
            raise ValueError(f"rope_kv_write_triton: {what} keys must be among {sorted(WRITE_LAUNCH)}, got "
                             f"{sorted(set(given) - set(WRITE_LAUNCH)) if isinstance(given, dict) else given!r}")
    launch = {**WRITE_LAUNCH, **env, **(launch or {})}
    k_fmt, v_fmt = parse_kv_format(k_format), parse_kv_format(v_format)
    try:
        _check_rope_inputs(k, positions, inv_freq, channel_perm)
        _check_write("k", k, k_data, k_scale, slot_mapping, k_fmt)
        _check_write("v", v, v_data, v_scale, slot_mapping, v_fmt)
    except ValueError as exc:
        raise ValueError(f"rope_kv_write_triton: {exc}") from None
    if v.shape != k.shape:
        raise ValueError(f"rope_kv_write_triton: v {tuple(v.shape)} must have k's shape {tuple(k.shape)}")
    tokens, heads, head_dim = k.shape
    if tokens == 0:
        return
    per_program = min(heads, max(1, launch["values_per_program"] // head_dim))
    table = rope_tables(channel_perm, interleaved) if channel_perm is not None else positions
    grid = (tokens, triton.cdiv(heads, per_program), 2 if launch["split_kv"] else 1)
    _rope_kv_write_kernel[grid](
        k, v, k_data, k_scale, v_data, v_scale, slot_mapping.contiguous(), positions.contiguous(),
        inv_freq.contiguous(), table, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *_write_strides(k_data, k_scale), *_write_strides(v_data, v_scale), PAGE_SIZE=k_data.shape[1], NUM_HEADS=heads,
        HEAD_DIM=head_dim, HEADS_PER_PROGRAM=per_program,
        BLOCK_VALUES=triton.next_power_of_2(per_program * head_dim), INTERLEAVED=bool(interleaved),
        PERMUTED=channel_perm is not None, **_format_meta("K", k_fmt, k_data), **_format_meta("V", v_fmt, v_data),
        SPLIT_KV=bool(launch["split_kv"]), num_warps=launch["num_warps"])
