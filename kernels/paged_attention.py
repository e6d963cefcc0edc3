"""Paged attention in Triton over a KV cache in any format: split-K decode and chunked prefill.

The semantics are those of `attention_ref` (kernels/attention.py), the float32 reference and test
oracle: flat queries [T, Hq, D], sequence s owns queries query_start[s]:query_start[s+1] and has
seq_lens[s] tokens in the cache (the new ones already written); query head h reads KV head h // g,
g = Hq / Hkv. Both kernels read K and V straight from the cache pages in the cache's format, through
the same helpers: `_load_page_ids` (page table), `_load_paged_tile` (a tile of K or V rows, decoded
by `_load_kv_tile`), `_dot_halves` and `_online_softmax_step`.

Decode (one query per sequence), flash-decoding: grid (Hkv, num_splits, B). A program serves all g
query heads of one KV head, so each K/V row is read and decoded once for g queries; the g rows are
padded to 16 so both products are tensor-core dots, computed transposed (K q^T: keys x heads, and
V^T p^T: head_dim x heads) so that M is BLOCK_N or head_dim (>= 64: wgmma on Hopper). The context
is cut into num_splits slices; each program runs an online softmax (float32, exp2 with log2(e)
folded into the scale) over BLOCK_N tokens at a time (BLOCK_N / page_size pages gathered through
the page table, the next tile's page ids loaded one iteration ahead, K and V loads issued together)
and writes a partial (max, sum, acc) to a float32 workspace; `_decode_reduce_kernel` merges the
slices. With one slice the first kernel writes the output itself.

Decode, "blocks" kernel (issue 14; `DecodeConfig.kernel`, picked per device and shape from
kernels/configs/paged_decode_<device>.json, else "tiles", the kernel above; FXFORGE_DECODE_KERNEL
forces one): the same grid, split-K and online softmax, but each shared exponent is applied once per
(key, block) instead of once per value. A tile is loaded block-major as it is stored ([blocks, keys,
bytes of a block] and [blocks, keys] scale bytes), its codes become exact unscaled floats (the same
decoders at scale 1), and the dots are batched over blocks: q . k = sum_b 2^e_kb * (codes_kb @ q_b^T),
the float32 partials scaled by the power of two (exact) and summed; P @ V = sum over keys of
(p * 2^e_vb) codes_vb, the V scale folded into P per block (bf16(p * 2^e) = bf16(p) * 2^e while it
is a normal number, so the result is the reference's up to summation order). With `prefetch` the next
tile's bytes are loaded into registers before this tile's math (the page ids two tiles ahead), so a
program keeps a tile's loads in flight while it computes. Dense formats run as one block of scale 1;
4-bit codes need >= 16 values per phase (blocks >= 32); pre-RoPE keys stay on "tiles" (the rotation
mixes channels of different blocks).

Decode, "diag" kernel: the same arithmetic with 2-d dots only (no batched dots, no reduction across
the block dim in the loop). A tile is loaded as rows of contiguous bytes; q enters as a block-diagonal
[head_dim, NCOL] operand whose column c = h * NB + b holds head h's q on block b's codes and zeros
elsewhere, so codes @ it gives every (key, head, block) partial at once (N = NCOL = pow2(g) * blocks,
padded to 16: for g = 4 and 4 blocks the same 16 columns the "tiles" kernel pads g to). The K scales
multiply those partials per column; a 0/1 dot (3xTF32) sums each head's columns, replicated, and the
online softmax runs on the replicated columns. P, scaled per column by the V scale of the column's
block, meets the transposed V codes (M = head_dim, as in "tiles"); each column accumulates all codes
and, after the loop, every code keeps only the column of its own block. K and V need as many blocks
(padded to a power of two) when both are packed; dense rows are cut into that many blocks of scale 1.

Prefill (any batch, chunked): grid (query tiles of all sequences, Hkv). A tile holds BLOCK_M rows
= BLOCK_M // g query tokens x their g heads (GQA packing: K/V tiles are decoded once per KV head),
and loops over the keys it can see: earlier chunks and the causal part of its own chunk, all read
from the pages after the write, so attention to the new tokens goes through the cache's format too.
A small tile -> (sequence, tile index) map is built with torch ops on the device (no host sync).

Packed pages (kernels/bfp.py documents the bytes) are decoded in registers: a tile of rows is loaded
as [rows, blocks, bytes of one block] (contiguous bytes, wide loads; the block's scale byte
broadcasts along the last dim). 4-bit codes are not interleaved back: the low nibbles (even columns)
and high nibbles (odd columns) stay two tiles, q is split the same way (two dots summed) and so is
the output (two accumulators). Codes become floats without an int->float conversion: the
offset-binary code sits in the mantissa of a power of two, and one fma with the block scale and a
bias (-(magic + 2^(m-1)) * scale) leaves code * scale exactly. On CUDA with bf16 dots, 4- and 8-bit
BFP use inline PTX for this (byte permutes + bf16x2 / f32 fmas, ~1.5 and ~2.75 instructions a value),
and so does MXFP4 (E2M1 bf16 bytes looked up by byte permutes, the sign OR-ed in, ~4 a value);
elsewhere (and under the interpreter) the same arithmetic is written in Triton. Decoded BFP/MXFP4
values have at most 8 significant bits, so with bf16 queries they enter the bf16 dots exactly;
float32 queries (and bf16 ones over float16/float32 pages) use 3xTF32 dots (~float32), float16
queries tf32 dots. E2M1 (MXFP4) codes become floats by building their bits (bfp.decode_e2m1_bits),
not by an int -> float conversion. Scale bytes above 231 (block
maxima above ~2^105) overflow the bias and decode to inf/NaN.

Pre-RoPE keys (`key_rope`, kernels/rope.py's key_rope_table): the cache holds keys before RoPE in a
key-RoPE layout (channels j and j + D/2 of a head form a RoPE pair). Both kernels decode the K tile
in float32, rotate it at the keys' positions (`_rotate_key_tile`: the tile's column halves are split,
scaled, rotated and joined back) and cast it for the dot; q arrives rotated. The branch is a
constexpr (PRE_ROPE), so the kernels of post-RoPE caches compile without it. A 4-bit K tile comes
as even and odd columns; in each, columns i and i + D/4 hold channels 2i and 2i + D/2 (or 2i + 1 and
2i + 1 + D/2), a pair, so each half-tile is rotated the same way. Needs a power-of-two head_dim >= 32
(the tile's halves are then the row's halves).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch

from fxforge.kernels.bfp import decode_e2m1_bits, dequantize, pow2
from fxforge.kernels.formats import KVFormat, parse_kv_format
from fxforge.kernels.kv_cache import to_channels_by_tokens, v_channels_by_tokens
from fxforge.kernels.triton_support import HAS_TRITON, INTERPRETED, check_launchable, jit, next_pow2, tl

__all__ = ["paged_decode_attention", "paged_prefill_attention", "attention_triton", "auto_num_splits", "DecodeConfig",
           "known_decode_fault", "DecodeLaunchFault",
           "DECODE_KERNELS", "decode_kernel_supports", "v_channels_by_tokens", "to_channels_by_tokens",
           "default_decode_config", "pick_decode_config", "decode_kernel_spec",
           "decode_config_path", "tuned_decode_configs", "decode_config_key", "nearest_tuned_config", "TUNE_CONTEXT"]

# On CUDA, 4- and 8-bit BFP and MXFP4 pages are decoded with inline PTX (bf16x2 math) when the dots run
# in bf16; FXFORGE_ATTENTION_ASM=0 selects the portable Triton decode instead (the one the interpreter runs).
_ASM_DECODE = os.environ.get("FXFORGE_ATTENTION_ASM", "1") != "0"
# FXFORGE_DECODE_KERNEL=tiles|blocks forces one decode kernel wherever it applies (benchmarks: old vs new)
_FORCED_KERNEL = os.environ.get("FXFORGE_DECODE_KERNEL") or None
CONFIG_DIR = Path(os.environ.get("FXFORGE_DECODE_CONFIG_DIR") or Path(__file__).parent / "configs")
_LOG2E = 1.4426950408889634
_MIN_DOT = 16  # tl.dot needs every dim >= 16
_MIN_INT8_DOT = 32  # and an int8 dot's contraction >= 32 (on the GPU; the interpreter has no such limit)
_MAX_SPLITS = 256
_DECODE_PAGES_MIN_TILES = 4  # prefill: query tiles per sequence (average) from which pages are decoded once
_DECODE_PAGES_MAX_BYTES = 4 << 30  # prefill: the largest decoded copy of a step's pages
_MIN_TOKENS_PER_SPLIT = 256  # below this a slice's partial results cost more than its parallelism
_DEFAULT_SMS = 132  # H100 SXM; used on CPU (interpreter), read off the device on CUDA
_SM_COUNTS: dict[int, int] = {}


# ----------------------------------------------------------------------------------------------
# Triton helpers: decode one tile of K or V rows from the pages
# ----------------------------------------------------------------------------------------------


@jit
def _magic_float(code, BITS: tl.constexpr):
    # m-bit two's complement code (in int32) -> the float 2^23 + code + 2^(m-1), with no int->float
    # convert: flipping the sign bit gives the offset-binary code, OR-ed into the mantissa of 2^23.
    # `_magic_float(c) * s + _magic_bias(s)` is then exactly c * s, in one fma.
    return ((code ^ (1 << (BITS - 1))) | 0x4B000000).to(tl.float32, bitcast=True)


@jit
def _magic_bias(scale, BITS: tl.constexpr):
    # -(2^23 + 2^(m-1)) * scale: exact (power-of-two scale); -inf for scale bytes > 231 (|x| >~ 2^105)
    return scale * -(8388608.0 + (1 << (BITS - 1)))


# Inline PTX decoding packed BFP bytes to bf16 (CUDA only; the interpreter runs the portable path).
# 4-bit codes, 4 bytes (8 codes) per instance, operands: $0-$3 out: bf16 pairs of the low-nibble
# values (bytes 0,1 / 2,3) then of the high-nibble values; $4 the 4 bytes; $5-$8 per byte (s, s) as
# bf16x2; $9-$12 per byte (-136 s, -136 s). Each offset-binary code u = code + 8 becomes the bf16
# 128 + u (byte 0x43 above it) and one bf16x2 fma leaves (128 + code + 8) s - 136 s = code * s, exactly.
# The pair of bytes 2i, 2i+1 takes its scale halves from both (a no-op when they lie in one block).
_BFP4_PTX = """
{
.reg .b32 lo, hi, m01, m23, b01, b23;
lop3.b32 lo, $4, 0x0F0F0F0F, 0x08080808, 0x6a;
shr.u32 hi, $4, 4;
lop3.b32 hi, hi, 0x0F0F0F0F, 0x08080808, 0x6a;
prmt.b32 m01, $5, $6, 0x7610;
prmt.b32 m23, $7, $8, 0x7610;
prmt.b32 b01, $9, $10, 0x7610;
prmt.b32 b23, $11, $12, 0x7610;
prmt.b32 $0, lo, 0x43434343, 0x7170;
prmt.b32 $1, lo, 0x43434343, 0x7372;
prmt.b32 $2, hi, 0x43434343, 0x7170;
prmt.b32 $3, hi, 0x43434343, 0x7372;
fma.rn.bf16x2 $0, $0, m01, b01;
fma.rn.bf16x2 $1, $1, m23, b23;
fma.rn.bf16x2 $2, $2, m01, b01;
fma.rn.bf16x2 $3, $3, m23, b23;
}
"""
# 8-bit codes, 4 bytes per instance: $0-$1 out: bf16 pairs; $2 the 4 bytes; $3-$6 per byte s as
# float32; $7-$10 per byte -(2^23 + 128) s. The offset-binary code u = code + 128 is placed into the
# float 2^23 + u by one byte permute; one fma leaves code * s exactly; pairs round to bf16 exactly.
_BFP8_PTX = """
{
.reg .b32 u, f0, f1, f2, f3;
xor.b32 u, $2, 0x80808080;
prmt.b32 f0, u, 0x4B000000, 0x7440;
prmt.b32 f1, u, 0x4B000000, 0x7441;
prmt.b32 f2, u, 0x4B000000, 0x7442;
prmt.b32 f3, u, 0x4B000000, 0x7443;
fma.rn.f32 f0, f0, $3, $7;
fma.rn.f32 f1, f1, $4, $8;
fma.rn.f32 f2, f2, $5, $9;
fma.rn.f32 f3, f3, $6, $10;
cvt.rn.bf16x2.f32 $0, f1, f0;
cvt.rn.bf16x2.f32 $1, f3, f2;
}
"""
# _BFP4_PTX's per-byte operands at scale 1 (unscaled codes, the block-scaled kernels): the bf16 pairs
# (1, 1) = 0x3F803F80 and (-136, -136) = 0xC308C308 (as an int32)
_BFP4_UNIT_MUL, _BFP4_UNIT_BIAS = 0x3F803F80, 0xC308C308 - (1 << 32)
# MXFP4 (E2M1 codes), 4 bytes (8 codes) per instance, operands as _BFP4_PTX without the bias: $0-$3
# out, $4 the 4 bytes, $5-$8 per byte (s, s) as bf16x2. A code's bf16 bits come from two 8-entry byte
# tables indexed by its magnitude (prmt: high bytes 00 3F 3F 3F 40 40 40 40, low bytes 00 00 80 C0
# 00 40 80 C0 give 0, 0.5, 1, 1.5, 2, 3, 4, 6); the selector holds the magnitudes of bytes 0, 2, 1, 3
# (x | x >> 12), the pairs are gathered back in order, the sign bit is OR-ed in, and one bf16x2 fma
# with (s, s) and -0 scales them exactly (s is a power of two).
_MXFP4_PTX = """
{
.reg .b32 m01, m23, thl, thh, tll, tlh, negz, sel, t, hb, lb, sl, sh;
mov.b32 thl, 0x3F3F3F00;
mov.b32 thh, 0x40404040;
mov.b32 tll, 0xC0800000;
mov.b32 tlh, 0xC0804000;
mov.b32 negz, 0x80008000;
prmt.b32 m01, $5, $6, 0x7610;
prmt.b32 m23, $7, $8, 0x7610;
and.b32 sel, $4, 0x07070707;
shr.u32 t, sel, 12;
or.b32 sel, sel, t;
prmt.b32 hb, thl, thh, sel;
prmt.b32 lb, tll, tlh, sel;
prmt.b32 $0, lb, hb, 0x6240;
prmt.b32 $1, lb, hb, 0x7351;
shl.b32 t, $4, 4;
and.b32 t, t, 0x80808080;
prmt.b32 sl, t, 0, 0x1404;
prmt.b32 sh, t, 0, 0x3424;
or.b32 $0, $0, sl;
or.b32 $1, $1, sh;
shr.u32 sel, $4, 4;
and.b32 sel, sel, 0x07070707;
shr.u32 t, sel, 12;
or.b32 sel, sel, t;
prmt.b32 hb, thl, thh, sel;
prmt.b32 lb, tll, tlh, sel;
prmt.b32 $2, lb, hb, 0x6240;
prmt.b32 $3, lb, hb, 0x7351;
and.b32 t, $4, 0x80808080;
prmt.b32 sl, t, 0, 0x1404;
prmt.b32 sh, t, 0, 0x3424;
or.b32 $2, $2, sl;
or.b32 $3, $3, sh;
fma.rn.bf16x2 $0, $0, m01, negz;
fma.rn.bf16x2 $1, $1, m23, negz;
fma.rn.bf16x2 $2, $2, m01, negz;
fma.rn.bf16x2 $3, $3, m23, negz;
}
"""
# The same E2M1 decode unscaled (the block-scaled kernels): $0-$3 out, $4 the 4 bytes.
_MXFP4_CODES_PTX = "\n".join(line for line in _MXFP4_PTX.splitlines()
                               if not line.startswith(("prmt.b32 m", "fma.", "mov.b32 negz")))
if HAS_TRITON:
    _BFP4_PTX_ASM = tl.constexpr(_BFP4_PTX)
    _BFP8_PTX_ASM = tl.constexpr(_BFP8_PTX)
    _BFP4_UNIT_MUL_C, _BFP4_UNIT_BIAS_C = tl.constexpr(_BFP4_UNIT_MUL), tl.constexpr(_BFP4_UNIT_BIAS)
    _MXFP4_PTX_ASM = tl.constexpr(_MXFP4_PTX)
    _MXFP4_CODES_PTX_ASM = tl.constexpr(_MXFP4_CODES_PTX)


@jit
def _bfp4_to_bf16_asm(packed, mul, bias):
    # packed: uint8 bytes; mul, bias: int32 (see _BFP4_PTX) -> (low-nibble values, high-nibble values)
    return tl.inline_asm_elementwise(asm=_BFP4_PTX_ASM, constraints="=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
                                     args=[packed, mul, bias], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
                                     pack=4)


@jit
def _mxfp4_to_bf16_asm(packed, mul):
    # packed: uint8 bytes; mul: int32 (see _MXFP4_PTX) -> (low-nibble values, high-nibble values)
    return tl.inline_asm_elementwise(asm=_MXFP4_PTX_ASM, constraints="=r,=r,=r,=r,r,r,r,r,r", args=[packed, mul],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@jit
def _mxfp4_codes_to_bf16_asm(packed):
    # packed: uint8 bytes -> (low-nibble E2M1 codes, high-nibble ones) as bf16, unscaled
    return tl.inline_asm_elementwise(asm=_MXFP4_CODES_PTX_ASM, constraints="=r,=r,=r,=r,r", args=[packed],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@jit
def _bfp8_to_bf16_asm(packed, mul, bias):
    # packed: uint8 bytes; mul, bias: int32 float32 bits (see _BFP8_PTX) -> values
    return tl.inline_asm_elementwise(asm=_BFP8_PTX_ASM, constraints="=r,=r,r,r,r,r,r,r,r,r,r", args=[packed, mul, bias],
                                     dtype=tl.bfloat16, is_pure=True, pack=4)


@jit
def _load_dense_tile(data_ptr, data_rows, row_mask, D: tl.constexpr, D_PAD: tl.constexpr, OUT_DTYPE: tl.constexpr):
    # [ROWS, D_PAD] values of a float32/bf16/fp16 cache; masked rows and columns D.. are zeros
    cols = tl.arange(0, D_PAD)
    mask = row_mask[:, None]
    if D_PAD != D:
        mask = mask & (cols[None, :] < D)
    return tl.load(data_ptr + data_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(OUT_DTYPE)


@jit
def _locate_blocks(data_ptr, scale_ptr, data_rows, scale_rows, row_mask, D: tl.constexpr, D_PAD: tl.constexpr,
                   BITS: tl.constexpr, BLOCK: tl.constexpr):
    # The [ROWS, blocks, 1] frame of a packed tile (the block's scale broadcasts along the bytes of
    # the block): each block's first data byte, which blocks to load, its scale byte (int32) and
    # its scale 2^(byte - 127) (0 for byte 0 and for masked rows)
    blocks = tl.arange(0, D_PAD // BLOCK)
    mask = row_mask[:, None, None]
    if D_PAD != D:
        mask = mask & (blocks[None, :, None] < D // BLOCK)
    exponent = tl.load(scale_ptr + scale_rows[:, None, None] + blocks[None, :, None], mask=mask,
                       other=0).to(tl.int32)
    scale = pow2(exponent)
    block_ptr = data_ptr + data_rows[:, None, None] + blocks[None, :, None] * (BLOCK * BITS // 8)
    return block_ptr, mask, exponent, scale


@jit
def _decode_4bit_blocks(packed, exponent, scale, MXFP4: tl.constexpr, ASM: tl.constexpr):
    # packed [ROWS, blocks, BLOCK / 2] bytes -> values of even columns and of odd ones: value 2i sits
    # in the low nibble of byte i, value 2i+1 in the high nibble
    if ASM and MXFP4:
        even, odd = _mxfp4_to_bf16_asm(packed, (exponent << 7) | (exponent << 23))
    elif ASM:
        bias = (scale * -136.0).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        even, odd = _bfp4_to_bf16_asm(packed, (exponent << 7) | (exponent << 23), bias | (bias << 16))
    else:
        packed = packed.to(tl.int32)
        if MXFP4:
            even = decode_e2m1_bits(packed & 15) * scale
            odd = decode_e2m1_bits(packed >> 4) * scale
        else:
            bias = _magic_bias(scale, 4)
            even = _magic_float(packed & 15, 4) * scale + bias
            odd = _magic_float(packed >> 4, 4) * scale + bias
    return even, odd


@jit
def _decode_8bit_blocks(packed, exponent, scale, ASM: tl.constexpr):
    # packed [ROWS, blocks, BLOCK] bytes, one code per byte -> values
    if ASM:
        values = _bfp8_to_bf16_asm(packed, exponent << 23, _magic_bias(scale, 8).to(tl.int32, bitcast=True))
    else:
        values = _magic_float(packed.to(tl.int32), 8) * scale + _magic_bias(scale, 8)
    return values


@jit
def _decode_6bit_blocks(block_ptr, mask, scale, BLOCK: tl.constexpr):
    # [ROWS, blocks, BLOCK] values: codes 4j..4j+3 in the 3 bytes 3j..3j+2, little-endian
    group_ptr = block_ptr + 3 * tl.arange(0, BLOCK // 4)[None, None, :]
    b0 = tl.load(group_ptr, mask=mask, other=0).to(tl.int32)
    b1 = tl.load(group_ptr + 1, mask=mask, other=0).to(tl.int32)
    b2 = tl.load(group_ptr + 2, mask=mask, other=0).to(tl.int32)
    bias = _magic_bias(scale, 6)
    c0 = _magic_float(b0 & 63, 6) * scale + bias
    c1 = _magic_float((b0 >> 6) | ((b1 & 15) << 2), 6) * scale + bias
    c2 = _magic_float((b1 >> 4) | ((b2 & 3) << 4), 6) * scale + bias
    c3 = _magic_float(b2 >> 2, 6) * scale + bias
    return tl.interleave(tl.interleave(c0, c2), tl.interleave(c1, c3))


@jit
def _load_raw_tile(data_ptr, scale_ptr, data_rows, scale_rows, row_mask, D: tl.constexpr, D_PAD: tl.constexpr,
                   BITS: tl.constexpr, BLOCK: tl.constexpr):
    # A tile of rows as stored, nothing decoded (4/8-bit and dense formats): packed ones give
    # ([ROWS, blocks, bytes of a block] uint8, [ROWS, blocks, 1] int32 scale bytes), dense ones
    # ([ROWS, D_PAD] values in the cache's dtype, a scalar 0). Masked rows read as zeros.
    if BLOCK == 0:
        cols = tl.arange(0, D_PAD)
        mask = row_mask[:, None]
        if D_PAD != D:
            mask = mask & (cols[None, :] < D)
        raw = tl.load(data_ptr + data_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        exponent = 0
    else:
        block_ptr, mask, exponent, scale = _locate_blocks(data_ptr, scale_ptr, data_rows, scale_rows, row_mask, D,
                                                          D_PAD, BITS, BLOCK)
        raw = tl.load(block_ptr + tl.arange(0, BLOCK * BITS // 8)[None, None, :], mask=mask, other=0)
    return raw, exponent


@jit
def _decode_raw_tile(raw, exponent, ROWS: tl.constexpr, D_PAD: tl.constexpr, BITS: tl.constexpr,
                     MXFP4: tl.constexpr, BLOCK: tl.constexpr, ASM: tl.constexpr, OUT_DTYPE: tl.constexpr):
    # _load_raw_tile's (raw, exponent) -> the tiles _load_kv_tile returns
    if BLOCK == 0:
        tile = raw.to(OUT_DTYPE)
        odd = tile
    elif BITS == 4:
        even, odd = _decode_4bit_blocks(raw, exponent, pow2(exponent), MXFP4, ASM)
        tile = tl.reshape(even, (ROWS, D_PAD // 2)).to(OUT_DTYPE)
        odd = tl.reshape(odd, (ROWS, D_PAD // 2)).to(OUT_DTYPE)
    else:
        values = _decode_8bit_blocks(raw, exponent, pow2(exponent), ASM)
        tile = tl.reshape(values, (ROWS, D_PAD)).to(OUT_DTYPE)
        odd = tile
    return tile, odd


@jit
def _load_kv_tile(
    data_ptr,  # *uint8 (packed) or *fp32/bf16/fp16 (dense): the cache's data tensor
    scale_ptr,  # *uint8: the cache's scale tensor (not read for dense formats)
    data_rows,  # int64 [ROWS]: offset of each token's row in data, in elements of data
    scale_rows,  # int64 [ROWS]: offset of each token's row of scale bytes
    row_mask,  # bool [ROWS]: tokens to load; the others come back as zeros
    ROWS: tl.constexpr,  # tokens in the tile
    D: tl.constexpr,  # head_dim
    D_PAD: tl.constexpr,  # next power of two >= D; columns D.. are zeros
    BITS: tl.constexpr,  # bits per code: 4, 6, 8 (packed) or the dense dtype's
    MXFP4: tl.constexpr,  # True: E2M1 codes; False: two's complement integers
    BLOCK: tl.constexpr,  # values per scale byte; 0 for dense formats
    ASM: tl.constexpr,  # decode 4/8-bit BFP codes to bf16 with inline PTX (CUDA, OUT_DTYPE bf16)
    OUT_DTYPE: tl.constexpr,  # dtype of the returned tiles (the dots' operand dtype)
):
    """K or V rows, dequantized, in OUT_DTYPE: 4-bit formats give (even columns, odd columns), two
    [ROWS, D_PAD / 2] tiles (no interleaving: the kernels split q and the output the same way);
    the others give ([ROWS, D_PAD] tile, the same tile)."""
    if BLOCK != 0 and BITS == 6:
        block_ptr, mask, _, scale = _locate_blocks(data_ptr, scale_ptr, data_rows, scale_rows, row_mask, D, D_PAD,
                                                   BITS, BLOCK)
        values = _decode_6bit_blocks(block_ptr, mask, scale, BLOCK)
        tile = tl.reshape(values, (ROWS, D_PAD)).to(OUT_DTYPE)
        odd = tile
    else:
        raw, exponent = _load_raw_tile(data_ptr, scale_ptr, data_rows, scale_rows, row_mask, D, D_PAD, BITS, BLOCK)
        tile, odd = _decode_raw_tile(raw, exponent, ROWS, D_PAD, BITS, MXFP4, BLOCK, ASM, OUT_DTYPE)
    return tile, odd


@jit
def _load_paged_tile(
    data_ptr, scale_ptr,  # one cache, K or V: data [pages, PAGE_SIZE, Hkv, cols] and scale bytes
    stride_data_page, stride_data_slot, stride_data_head,  # data strides (elements)
    stride_scale_page, stride_scale_slot, stride_scale_head,  # scale strides (bytes; 0 for dense formats)
    page,  # int64 [ROWS]: page id of each token
    slot,  # [ROWS]: each token's slot within its page
    kv_head,  # the KV head to read
    row_mask,  # bool [ROWS]: tokens to load; the others come back as zeros
    ROWS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,  # as in _load_kv_tile
    BITS: tl.constexpr, MXFP4: tl.constexpr, BLOCK: tl.constexpr, ASM: tl.constexpr,  # the cache's format
    OUT_DTYPE: tl.constexpr,  # dtype of the returned tiles
):
    # the tokens' rows of one KV head, as _load_kv_tile returns them
    data_rows = page * stride_data_page + slot * stride_data_slot + kv_head * stride_data_head
    scale_rows = page * stride_scale_page + slot * stride_scale_slot + kv_head * stride_scale_head
    return _load_kv_tile(data_ptr, scale_ptr, data_rows, scale_rows, row_mask, ROWS, D, D_PAD, BITS, MXFP4, BLOCK,
                         ASM, OUT_DTYPE)


@jit
def _load_paged_raw(data_ptr, scale_ptr, stride_data_page, stride_data_slot, stride_data_head, stride_scale_page,
                    stride_scale_slot, stride_scale_head, page, slot, kv_head, row_mask, D: tl.constexpr,
                    D_PAD: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    # the tokens' rows of one KV head as stored (_load_raw_tile), decoded later by _decode_raw_tile
    data_rows = page * stride_data_page + slot * stride_data_slot + kv_head * stride_data_head
    scale_rows = page * stride_scale_page + slot * stride_scale_slot + kv_head * stride_scale_head
    return _load_raw_tile(data_ptr, scale_ptr, data_rows, scale_rows, row_mask, D, D_PAD, BITS, BLOCK)


@jit
def _raw_zeros(data_ptr, ROWS: tl.constexpr, D_PAD: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    # zeros shaped and typed like a _load_raw_tile tile (benchmark ablations: an elementwise running
    # max of the tiles keeps their loads alive at one instruction a value, no reduction per tile)
    if BLOCK == 0:
        zeros = tl.zeros([ROWS, D_PAD], data_ptr.dtype.element_ty)
    else:
        zeros = tl.zeros([ROWS, D_PAD // BLOCK, BLOCK * BITS // 8], tl.uint8)
    return zeros


@jit
def _rotate_halves(tile, positions, table_ptr, slots, ROWS: tl.constexpr, WIDTH: tl.constexpr,
                   HALF_D: tl.constexpr):
    # float32 tile [ROWS, WIDTH] whose columns i and i + WIDTH/2 hold one RoPE pair, the pair of
    # table slot slots[i]: scale both by the table's scales, rotate at angle positions * frequency
    lo, hi = tl.split(tl.permute(tl.reshape(tile, (ROWS, 2, WIDTH // 2)), (0, 2, 1)))
    lo = lo * tl.load(table_ptr + HALF_D + slots)[None, :]
    hi = hi * tl.load(table_ptr + 2 * HALF_D + slots)[None, :]
    angle = positions.to(tl.float32)[:, None] * tl.load(table_ptr + slots)[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    rotated = tl.join(lo * cos - hi * sin, hi * cos + lo * sin)
    return tl.reshape(tl.permute(rotated, (0, 2, 1)), (ROWS, WIDTH))


@jit
def _rotate_key_tile(k0, k1, positions, table_ptr, ROWS: tl.constexpr, D: tl.constexpr, PHASES: tl.constexpr,
                     OUT_DTYPE: tl.constexpr):
    # pre-RoPE K tile (float32, as _load_kv_tile gives it) -> rotated, in OUT_DTYPE; table_ptr: the KV
    # head's [3, D/2] key_rope table. 4-bit tiles: k0 holds channels 2i, k1 channels 2i + 1.
    if PHASES == 2:
        slots = tl.arange(0, D // 4) * 2
        k0 = _rotate_halves(k0, positions, table_ptr, slots, ROWS, D // 2, D // 2)
        k1 = _rotate_halves(k1, positions, table_ptr, slots + 1, ROWS, D // 2, D // 2)
    else:
        k0 = _rotate_halves(k0, positions, table_ptr, tl.arange(0, D // 2), ROWS, D, D // 2)
        k1 = k0
    return k0.to(OUT_DTYPE), k1.to(OUT_DTYPE)


@jit
def _load_page_ids(page_row, tokens, live, PAGE_SIZE: tl.constexpr):
    # int64 page id of each token (0 where not live) from the sequence's row of the page table
    return tl.load(page_row + tokens // PAGE_SIZE, mask=live, other=0).to(tl.int64)


# ----------------------------------------------------------------------------------------------
# Triton helpers: rows of q and of the output, dots, online softmax
# ----------------------------------------------------------------------------------------------


@jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # acc + a @ b in float32 (acc None: zeros); INPUT_PRECISION only matters for float32 operands.
    # UPCAST: the Triton interpreter multiplies bf16 bit patterns as integers, so there the (already
    # rounded) bf16 operands are widened to float32 first: same products, only the order of the sum differs.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@jit
def _dot_halves(a0, a1, b0, b1, PHASES: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                TRANS_B: tl.constexpr = False):
    # a @ b (a @ b^T with TRANS_B) in float32, where the summed dim comes as column halves (PHASES == 2:
    # a0 @ b0 + a1 @ b1, K decoded as even and odd columns) or whole (a0 @ b0). Each half of b is
    # transposed right before its dot: the order of the ops decides the shared-memory layout.
    if TRANS_B:
        b0 = tl.trans(b0)
    product = _dot(a0, b0, None, INPUT_PRECISION, UPCAST)
    if PHASES == 2:
        if TRANS_B:
            b1 = tl.trans(b1)
        product = _dot(a1, b1, product, INPUT_PRECISION, UPCAST)
    return product


@jit
def _load_rows(row_ptrs, row_ok, D: tl.constexpr, D_PAD: tl.constexpr, PHASES: tl.constexpr, DTYPE: tl.constexpr):
    # rows [M, D] (row_ptrs: pointer to each row's first value) as (even, odd) column halves for
    # PHASES == 2 (q against a 4-bit K), else (all columns, the same tile)
    cols = tl.arange(0, D_PAD // PHASES) * PHASES
    mask = row_ok[:, None] & (cols[None, :] < D)
    first = tl.load(row_ptrs[:, None] + cols[None, :], mask=mask, other=0.0).to(DTYPE)
    second = first
    if PHASES == 2:
        second = tl.load(row_ptrs[:, None] + cols[None, :] + 1, mask=mask, other=0.0).to(DTYPE)
    return first, second


@jit
def _store_rows(row_ptrs, row_ok, first, second, D: tl.constexpr, D_PAD: tl.constexpr, PHASES: tl.constexpr):
    # inverse of _load_rows: write [M, D] rows held as column halves (PHASES == 2) or whole
    cols = tl.arange(0, D_PAD // PHASES) * PHASES
    mask = row_ok[:, None] & (cols[None, :] < D)
    tl.store(row_ptrs[:, None] + cols[None, :], first.to(row_ptrs.dtype.element_ty), mask=mask)
    if PHASES == 2:
        tl.store(row_ptrs[:, None] + cols[None, :] + 1, second.to(row_ptrs.dtype.element_ty), mask=mask)


@jit
def _online_softmax_step(scores, m_i, l_i, KEY_AXIS: tl.constexpr, MAY_SEE_NOTHING: tl.constexpr):
    # One tile of the online softmax in the log2 domain; the keys of `scores` (-inf where masked)
    # run along KEY_AXIS. Returns (p = exp2(scores - new max), alpha = the factor rescaling what was
    # accumulated so far, the new running max, the new running sum). MAY_SEE_NOTHING: a query may
    # have seen only masked keys so far (max -inf), so exp2 is taken against 0 there instead.
    m_new = tl.maximum(m_i, tl.max(scores, KEY_AXIS))
    m_ref = m_new
    if MAY_SEE_NOTHING:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(scores - tl.expand_dims(m_ref, KEY_AXIS))
    l_i = l_i * alpha + tl.sum(p, KEY_AXIS)
    return p, alpha, m_new, l_i


# ----------------------------------------------------------------------------------------------
# Decode: split-K kernel + reduction
# ----------------------------------------------------------------------------------------------


@jit
def _decode_slice(seq_len, split, num_splits, sliding_window, BLOCK_N: tl.constexpr):
    # [lo, hi): slice `split` of the visible context [start, seq_len), cut in whole BLOCK_N tiles
    start = tl.where(sliding_window > 0, tl.maximum(seq_len - sliding_window, 0), 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    return lo, hi


@jit
def _store_decode_slice(out_ptr, stride_ob, stride_oh, ws_acc_ptr, ws_ml_ptr, seq, split, num_splits, q_heads, row_ok,
                        acc0, acc1, m_i, l_i, G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                        V_PHASES: tl.constexpr, SPLIT: tl.constexpr):
    # One program's result, acc0 / acc1 as [heads, columns] (see _store_rows): with SPLIT the slice's
    # unnormalized partial (acc, max, sum) goes to the workspace, else the normalized output rows
    if SPLIT:
        ws_row = (seq * (tl.num_programs(0) * G) + q_heads).to(tl.int64) * num_splits + split
        _store_rows(ws_acc_ptr + ws_row * D, row_ok, acc0, acc1, D, D_PAD, V_PHASES)
        tl.store(ws_ml_ptr + ws_row * 2, m_i, mask=row_ok)
        tl.store(ws_ml_ptr + ws_row * 2 + 1, l_i, mask=row_ok)
    else:
        inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty context gives zeros
        _store_rows(out_ptr + seq.to(tl.int64) * stride_ob + q_heads * stride_oh, row_ok, acc0 * inv_l,
                    acc1 * inv_l, D, D_PAD, V_PHASES)


@jit
def _paged_decode_kernel(
    q_ptr,  # *fp32|bf16|fp16 [B, Hq, D]: one query per sequence (last dim contiguous)
    stride_qb, stride_qh,  # q strides (elements)
    k_data_ptr, k_scale_ptr,  # K cache: data [pages, PAGE_SIZE, Hkv, cols] and scale bytes
    stride_kd_page, stride_kd_slot, stride_kd_head,  # k_data strides (elements; last dim contiguous)
    stride_ks_page, stride_ks_slot, stride_ks_head,  # k_scale strides (bytes; 0 for dense formats)
    v_data_ptr, v_scale_ptr,  # V cache, same layout as K (its own format)
    stride_vd_page, stride_vd_slot, stride_vd_head,  # v_data strides
    stride_vs_page, stride_vs_slot, stride_vs_head,  # v_scale strides
    page_table_ptr,  # *int32|int64 [B, P]: page ids of each sequence, in token order
    stride_pt,  # page_table row stride
    seq_lens_ptr,  # *int32|int64 [B]: tokens in the cache per sequence (the query's own included)
    key_rope_ptr,  # *fp32 [Hkv, 3, D/2]: pre-RoPE key table (read only when PRE_ROPE)
    out_ptr,  # *q.dtype [B, Hq, D]: written when NUM_SPLITS == 1
    stride_ob, stride_oh,  # out strides
    ws_acc_ptr,  # *fp32 [B, Hq, num_splits, D]: unnormalized partial outputs (NUM_SPLITS > 1)
    ws_ml_ptr,  # *fp32 [B, Hq, num_splits, 2]: partial running max (log2 domain) and sum
    num_splits,  # context slices per sequence (grid axis 1)
    qk_scale,  # softmax scale * log2(e): scores go straight to exp2
    sliding_window,  # > 0: a query sees only its last `sliding_window` positions
    G: tl.constexpr,  # query heads per KV head
    G_PAD: tl.constexpr,  # max(16, next power of two >= G): rows of the dots
    D: tl.constexpr,  # head_dim
    D_PAD: tl.constexpr,  # next power of two >= D
    PAGE_SIZE: tl.constexpr,  # tokens per page
    BLOCK_N: tl.constexpr,  # tokens per iteration (BLOCK_N / PAGE_SIZE pages)
    SPLIT: tl.constexpr,  # True: write partials to the workspace; False: write the output
    K_BITS: tl.constexpr, K_MXFP4: tl.constexpr, K_BLOCK: tl.constexpr,  # K format (K_BLOCK 0: dense)
    K_ASM: tl.constexpr, K_PHASES: tl.constexpr,  # K decoded by inline PTX; 2: K as column halves
    V_BITS: tl.constexpr, V_MXFP4: tl.constexpr, V_BLOCK: tl.constexpr,  # V format
    V_ASM: tl.constexpr, V_PHASES: tl.constexpr,  # same for V
    DOT_DTYPE: tl.constexpr,  # operand dtype of both dots
    INPUT_PRECISION: tl.constexpr,  # "tf32x3" / "tf32" for float32 operands
    UPCAST_DOT: tl.constexpr,  # True under the interpreter with bf16 operands (see _dot)
    PRE_ROPE: tl.constexpr,  # True: K is stored before RoPE and rotated on read
    K_TILE_DTYPE: tl.constexpr,  # dtype K tiles are decoded to: float32 when PRE_ROPE, else DOT_DTYPE
    PREFETCH: tl.constexpr,  # load the next tile's raw bytes before this tile's decode and math
    ABLATE: tl.constexpr,  # benchmarks only: 1 loads the tiles and skips all math, 2 also decodes them, 5 no loop
):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)

    rows = tl.arange(0, G_PAD)
    q_heads = kv_head * G + rows
    row_ok = rows < G
    q0, q1 = _load_rows(q_ptr + seq.to(tl.int64) * stride_qb + q_heads * stride_qh, row_ok, D, D_PAD, K_PHASES,
                        DOT_DTYPE)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    lo, hi = _decode_slice(seq_len, split, num_splits, sliding_window, BLOCK_N)
    if ABLATE == 5:  # the loop left out: the program's setup (q, its slice) and its store, no K/V read
        hi = lo

    # Everything runs transposed (keys x heads): with BLOCK_N >= 64 keys as the M dim of K q^T and
    # head_dim as the M dim of V^T p^T, Hopper runs both dots as wgmma (M of 64 per warpgroup),
    # while the g query heads, padded to G_PAD >= 16, only need N >= 16.
    q0 = tl.trans(q0)
    q1 = tl.trans(q1)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc0 = tl.zeros([D_PAD // V_PHASES, G_PAD], tl.float32)  # output^T (even columns if V_PHASES == 2)
    acc1 = tl.zeros([D_PAD // V_PHASES, G_PAD], tl.float32)  # odd columns (V_PHASES == 2)
    page_row = page_table_ptr + seq.to(tl.int64) * stride_pt
    tokens = lo + tl.arange(0, BLOCK_N)
    page = _load_page_ids(page_row, tokens, tokens < hi, PAGE_SIZE)
    # ABLATE only: running elementwise maxima of what the skipped stages would have read
    if ABLATE == 1:
        k_sink = _raw_zeros(k_data_ptr, BLOCK_N, D_PAD, K_BITS, K_BLOCK)
        v_sink = _raw_zeros(v_data_ptr, BLOCK_N, D_PAD, V_BITS, V_BLOCK)
    if ABLATE == 2:
        k_tile_sink = tl.zeros([BLOCK_N, D_PAD // K_PHASES], K_TILE_DTYPE)
        v_tile_sink = tl.zeros([BLOCK_N, D_PAD // V_PHASES], DOT_DTYPE)
    if PREFETCH:  # the first tile's bytes, and the second tile's page ids
        k_raw, k_exp = _load_paged_raw(k_data_ptr, k_scale_ptr, stride_kd_page, stride_kd_slot, stride_kd_head,
                                       stride_ks_page, stride_ks_slot, stride_ks_head, page, tokens % PAGE_SIZE,
                                       kv_head, tokens < hi, D, D_PAD, K_BITS, K_BLOCK)
        v_raw, v_exp = _load_paged_raw(v_data_ptr, v_scale_ptr, stride_vd_page, stride_vd_slot, stride_vd_head,
                                       stride_vs_page, stride_vs_slot, stride_vs_head, page, tokens % PAGE_SIZE,
                                       kv_head, tokens < hi, D, D_PAD, V_BITS, V_BLOCK)
        page = _load_page_ids(page_row, tokens + BLOCK_N, tokens + BLOCK_N < hi, PAGE_SIZE)
    for n0 in range(lo, hi, BLOCK_N):
        tokens = n0 + tl.arange(0, BLOCK_N)
        live = tokens < hi
        ahead = tokens + BLOCK_N
        if PREFETCH:
            # the next tile's bytes go in flight (masked off past the slice) before this tile's decode
            # and math; `page` holds the next tile's page ids, the one after that is looked up now
            next_k_raw, next_k_exp = _load_paged_raw(
                k_data_ptr, k_scale_ptr, stride_kd_page, stride_kd_slot, stride_kd_head, stride_ks_page,
                stride_ks_slot, stride_ks_head, page, ahead % PAGE_SIZE, kv_head, ahead < hi, D, D_PAD, K_BITS,
                K_BLOCK)
            next_v_raw, next_v_exp = _load_paged_raw(
                v_data_ptr, v_scale_ptr, stride_vd_page, stride_vd_slot, stride_vd_head, stride_vs_page,
                stride_vs_slot, stride_vs_head, page, ahead % PAGE_SIZE, kv_head, ahead < hi, D, D_PAD, V_BITS,
                V_BLOCK)
            page = _load_page_ids(page_row, ahead + BLOCK_N, ahead + BLOCK_N < hi, PAGE_SIZE)
        else:
            # the next tile's page ids, so the gather of the next K/V tile waits on no page-table load;
            # K and V are both loaded before any math, so their loads are in flight together
            next_page = _load_page_ids(page_row, ahead, ahead < hi, PAGE_SIZE)
            if ABLATE != 0:
                k_raw, k_exp = _load_paged_raw(
                    k_data_ptr, k_scale_ptr, stride_kd_page, stride_kd_slot, stride_kd_head, stride_ks_page,
                    stride_ks_slot, stride_ks_head, page, tokens % PAGE_SIZE, kv_head, live, D, D_PAD, K_BITS, K_BLOCK)
                v_raw, v_exp = _load_paged_raw(
                    v_data_ptr, v_scale_ptr, stride_vd_page, stride_vd_slot, stride_vd_head, stride_vs_page,
                    stride_vs_slot, stride_vs_head, page, tokens % PAGE_SIZE, kv_head, live, D, D_PAD, V_BITS, V_BLOCK)
        if ABLATE == 1:  # the bytes only: a running sum keeps the loads alive
            k_sink = tl.maximum(k_sink, k_raw).to(k_sink.dtype)  # (a bf16 maximum may come back as float32)
            v_sink = tl.maximum(v_sink, v_raw).to(v_sink.dtype)
        elif ABLATE == 2:  # decoded, no dots and no softmax
            k0, k1 = _decode_raw_tile(k_raw, k_exp, BLOCK_N, D_PAD, K_BITS, K_MXFP4, K_BLOCK, K_ASM, K_TILE_DTYPE)
            v0, v1 = _decode_raw_tile(v_raw, v_exp, BLOCK_N, D_PAD, V_BITS, V_MXFP4, V_BLOCK, V_ASM, DOT_DTYPE)
            # (Triton may compute a bf16 maximum in float32: cast back to the sink's dtype, a no-op otherwise)
            k_tile_sink = tl.maximum(k_tile_sink, tl.maximum(k0, k1)).to(K_TILE_DTYPE)
            v_tile_sink = tl.maximum(v_tile_sink, tl.maximum(v0, v1)).to(DOT_DTYPE)
        else:
            if PREFETCH:
                k0, k1 = _decode_raw_tile(k_raw, k_exp, BLOCK_N, D_PAD, K_BITS, K_MXFP4, K_BLOCK, K_ASM, K_TILE_DTYPE)
                v0, v1 = _decode_raw_tile(v_raw, v_exp, BLOCK_N, D_PAD, V_BITS, V_MXFP4, V_BLOCK, V_ASM, DOT_DTYPE)
            else:
                k0, k1 = _load_paged_tile(k_data_ptr, k_scale_ptr, stride_kd_page, stride_kd_slot, stride_kd_head,
                                          stride_ks_page, stride_ks_slot, stride_ks_head, page, tokens % PAGE_SIZE,
                                          kv_head, live, BLOCK_N, D, D_PAD, K_BITS, K_MXFP4, K_BLOCK, K_ASM,
                                          K_TILE_DTYPE)
                v0, v1 = _load_paged_tile(v_data_ptr, v_scale_ptr, stride_vd_page, stride_vd_slot, stride_vd_head,
                                          stride_vs_page, stride_vs_slot, stride_vs_head, page, tokens % PAGE_SIZE,
                                          kv_head, live, BLOCK_N, D, D_PAD, V_BITS, V_MXFP4, V_BLOCK, V_ASM,
                                          DOT_DTYPE)
            if PRE_ROPE:
                k0, k1 = _rotate_key_tile(k0, k1, tokens, key_rope_ptr + kv_head * (3 * (D // 2)), BLOCK_N, D,
                                          K_PHASES, DOT_DTYPE)
            scores = _dot_halves(k0, k1, q0, q1, K_PHASES, INPUT_PRECISION, UPCAST_DOT)  # [BLOCK_N, G_PAD]
            scores = tl.where(live[:, None], scores * qk_scale, float("-inf"))
            # every tile holds a live token, so the running max is finite
            p, alpha, m_i, l_i = _online_softmax_step(scores, m_i, l_i, KEY_AXIS=0, MAY_SEE_NOTHING=False)
            p = p.to(DOT_DTYPE)
            acc0 = _dot(tl.trans(v0), p, acc0 * alpha[None, :], INPUT_PRECISION, UPCAST_DOT)
            if V_PHASES == 2:
                acc1 = _dot(tl.trans(v1), p, acc1 * alpha[None, :], INPUT_PRECISION, UPCAST_DOT)
        if PREFETCH:
            k_raw, k_exp, v_raw, v_exp = next_k_raw, next_k_exp, next_v_raw, next_v_exp
        else:
            page = next_page

    if ABLATE == 1:  # keep the loads: one value of the sinks lands in the output (the result is not attention)
        acc0 += tl.sum(k_sink.to(tl.float32), axis=None) + tl.sum(v_sink.to(tl.float32), axis=None)
    elif ABLATE == 2:
        acc0 += tl.sum(k_tile_sink.to(tl.float32), axis=None) + tl.sum(v_tile_sink.to(tl.float32), axis=None)

    _store_decode_slice(out_ptr, stride_ob, stride_oh, ws_acc_ptr, ws_ml_ptr, seq, split, num_splits, q_heads, row_ok,
                        tl.trans(acc0), tl.trans(acc1), m_i, l_i, G, D, D_PAD, V_PHASES, SPLIT)


@jit
def _decode_reduce_kernel(
    ws_acc_ptr,  # *fp32 [B, Hq, num_splits, D]: unnormalized partial outputs
    ws_ml_ptr,  # *fp32 [B, Hq, num_splits, 2]: partial max (log2 domain) and sum of exp2
    out_ptr,  # *q.dtype [B, Hq, D]
    stride_ob, stride_oh,  # out strides (elements; last dim contiguous)
    num_splits,  # slices per sequence
    D: tl.constexpr,  # head_dim
    D_PAD: tl.constexpr,  # next power of two >= D
    SPLITS_PAD: tl.constexpr,  # next power of two >= num_splits
):
    q_head = tl.program_id(0)
    seq = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    cols = tl.arange(0, D_PAD)
    split_ok = splits < num_splits
    ws_row = (seq * tl.num_programs(0) + q_head).to(tl.int64) * num_splits + splits
    m = tl.load(ws_ml_ptr + ws_row * 2, mask=split_ok, other=float("-inf"))
    l = tl.load(ws_ml_ptr + ws_row * 2 + 1, mask=split_ok, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty slices weigh 0
    denom = tl.sum(weight * l, 0)
    acc = tl.load(ws_acc_ptr + ws_row[:, None] * D + cols[None, :], mask=split_ok[:, None] & (cols[None, :] < D),
                  other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    out_ptrs = out_ptr + seq.to(tl.int64) * stride_ob + q_head * stride_oh + cols
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=cols < D)


# ----------------------------------------------------------------------------------------------
# Decode, block-scaled ("blocks" kernel): each shared exponent applied once per block, not per value
# ----------------------------------------------------------------------------------------------


@jit
def _block_columns(NB_PAD: tl.constexpr, BW: tl.constexpr, BLOCK: tl.constexpr, PHASES: tl.constexpr):
    # ([NB_PAD, 1, 1] block index, [NB_PAD, 1, BW] head column of value i of phase 0 in block b):
    # value i of phase ph of block b is column b * BLOCK + PHASES * i + ph
    blocks = tl.arange(0, NB_PAD)[:, None, None]
    return blocks, blocks * BLOCK + tl.arange(0, BW)[None, None, :] * PHASES


@jit
def _load_raw_blocks(data_ptr, scale_ptr, data_rows, scale_rows, row_mask, ROWS: tl.constexpr, D: tl.constexpr,
                     NB: tl.constexpr, NB_PAD: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr,
                     PACKED: tl.constexpr):
    # A tile of K or V rows as stored, block-major: packed formats give ([NB_PAD, ROWS, bytes of a
    # block] uint8, [NB_PAD, ROWS] scale bytes), dense ones ([1, ROWS, BLOCK] values, zeros) with
    # BLOCK the padded head_dim. Masked rows, padding blocks and columns >= D read as zeros.
    blocks = tl.arange(0, NB_PAD)
    if PACKED:
        mask = row_mask[None, :] & (blocks[:, None] < NB)
        raw = tl.load(data_ptr + data_rows[None, :, None] + blocks[:, None, None] * (BLOCK * BITS // 8)
                      + tl.arange(0, BLOCK * BITS // 8)[None, None, :], mask=mask[:, :, None], other=0)
        scale = tl.load(scale_ptr + scale_rows[None, :] + blocks[:, None], mask=mask, other=0)
    else:
        cols = tl.arange(0, BLOCK)[None, None, :]
        raw = tl.load(data_ptr + data_rows[None, :, None] + cols, mask=row_mask[None, :, None] & (cols < D),
                      other=0.0)
        scale = tl.zeros([NB_PAD, ROWS], tl.uint8)
    return raw, scale


@jit
def _load_paged_blocks(data_ptr, scale_ptr, stride_data_page, stride_data_slot, stride_data_head, stride_scale_page,
                       stride_scale_slot, stride_scale_head, page, slot, kv_head, row_mask, ROWS: tl.constexpr,
                       D: tl.constexpr, NB: tl.constexpr, NB_PAD: tl.constexpr, BLOCK: tl.constexpr,
                       BITS: tl.constexpr, PACKED: tl.constexpr):
    # the tokens' rows of one KV head, as _load_raw_blocks returns them
    data_rows = page * stride_data_page + slot * stride_data_slot + kv_head * stride_data_head
    scale_rows = page * stride_scale_page + slot * stride_scale_slot + kv_head * stride_scale_head
    return _load_raw_blocks(data_ptr, scale_ptr, data_rows, scale_rows, row_mask, ROWS, D, NB, NB_PAD, BLOCK, BITS,
                            PACKED)


@jit
def _block_codes(raw, BITS: tl.constexpr, MXFP4: tl.constexpr, PACKED: tl.constexpr, ASM: tl.constexpr,
                 OUT_DTYPE: tl.constexpr):
    # Raw bytes -> the codes as exact floats in OUT_DTYPE, no scale applied: (phase 0, phase 1)
    # [NB_PAD, ROWS, BW]; 4-bit codes come as even and odd columns of each block, the others as one
    # tile (returned twice). The decoders of _load_kv_tile at scale 1 (scale byte 127): exact.
    if not PACKED:
        even = raw.to(OUT_DTYPE)
        odd = even
    elif BITS == 4:
        if ASM and MXFP4:
            even, odd = _mxfp4_codes_to_bf16_asm(raw)
        elif ASM:  # _BFP4_PTX at scale 1
            even, odd = _bfp4_to_bf16_asm(raw, tl.full(raw.shape, _BFP4_UNIT_MUL_C, tl.int32),
                                          tl.full(raw.shape, _BFP4_UNIT_BIAS_C, tl.int32))
        else:
            codes = raw.to(tl.int32)
            if MXFP4:
                even = decode_e2m1_bits(codes & 15)
                odd = decode_e2m1_bits(codes >> 4)
            else:
                even = _magic_float(codes & 15, 4) - 8388616.0  # - (2^23 + 8): the code, exactly
                odd = _magic_float(codes >> 4, 4) - 8388616.0
        even = even.to(OUT_DTYPE)
        odd = odd.to(OUT_DTYPE)
    else:
        if ASM:  # _BFP8_PTX operands at scale 1: float32 1.0 and -(2^23 + 128)
            even = _bfp8_to_bf16_asm(raw, tl.full(raw.shape, 0x3F800000, tl.int32),
                                     tl.full(raw.shape, -889192320, tl.int32))
        else:
            even = _magic_float(raw.to(tl.int32), 8) - 8388736.0
        even = even.to(OUT_DTYPE)
        odd = even
    return even, odd


@jit
def _load_query_blocks(q_row_ptrs, row_ok, D: tl.constexpr, NB: tl.constexpr, NB_PAD: tl.constexpr,
                       BLOCK: tl.constexpr, PHASES: tl.constexpr, BW: tl.constexpr, DTYPE: tl.constexpr):
    # q's G_PAD head rows (q_row_ptrs: each row's first value) cut like the K tile's blocks, transposed
    # for codes [NB_PAD, ROWS, BW] @ q^T: (phase 0, phase 1) [NB_PAD, BW, G_PAD], zeros outside
    blocks, cols = _block_columns(NB_PAD, BW, BLOCK, PHASES)
    cols = tl.permute(cols, (0, 2, 1))  # [NB_PAD, BW, 1]
    mask = row_ok[None, None, :] & (blocks < NB) & (cols < D)
    ptrs = q_row_ptrs[None, None, :] + cols
    first = tl.load(ptrs, mask=mask, other=0.0).to(DTYPE)
    second = first
    if PHASES == 2:
        second = tl.load(ptrs + 1, mask=mask, other=0.0).to(DTYPE)
    return first, second


@jit
def _block_scores(k_raw, k_scale, q0, q1, BITS: tl.constexpr, MXFP4: tl.constexpr, PACKED: tl.constexpr,
                  ASM: tl.constexpr, PHASES: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr):
    # q . k [ROWS, G_PAD] = sum over blocks b of 2^(scale byte - 127) * (codes_b @ q_b^T): one dot per
    # block (a batched dot), its float32 result scaled once per (key, block), exactly (a power of two)
    k0, k1 = _block_codes(k_raw, BITS, MXFP4, PACKED, ASM, DOT_DTYPE)
    part = _dot(k0, q0, None, INPUT_PRECISION, UPCAST)  # [NB_PAD, ROWS, G_PAD]
    if PHASES == 2:
        part = _dot(k1, q1, part, INPUT_PRECISION, UPCAST)
    if PACKED:
        part = part * pow2(k_scale.to(tl.int32))[:, :, None]
    return tl.sum(part, 0)


@jit
def _block_values(p, v_raw, v_scale, acc0, acc1, alpha, BITS: tl.constexpr, MXFP4: tl.constexpr,
                  PACKED: tl.constexpr, ASM: tl.constexpr, PHASES: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # acc_b [NB_PAD, G_PAD, BW] * alpha + (p^T scaled by block b's scale of each key) @ codes_b: the V
    # scales folded into P per tile, so the codes enter the dot unscaled (exact while p * scale is a
    # normal number in DOT_DTYPE, where it equals rounding p first)
    v0, v1 = _block_codes(v_raw, BITS, MXFP4, PACKED, ASM, DOT_DTYPE)
    p_t = tl.trans(p)[None, :, :]  # [1, G_PAD, ROWS]
    if PACKED:
        p_t = p_t * pow2(v_scale.to(tl.int32))[:, None, :]
    p_t = p_t.to(DOT_DTYPE)
    rescale = alpha[None, :, None]
    acc0 = _dot(p_t, v0, acc0 * rescale, INPUT_PRECISION, UPCAST)
    if PHASES == 2:
        acc1 = _dot(p_t, v1, acc1 * rescale, INPUT_PRECISION, UPCAST)
    return acc0, acc1


@jit
def _store_decode_blocks(out_ptr, stride_ob, stride_oh, ws_acc_ptr, ws_ml_ptr, seq, split, num_splits, q_heads, row_ok,
                         acc0, acc1, m_i, l_i, G: tl.constexpr, D: tl.constexpr, NB: tl.constexpr,
                         NB_PAD: tl.constexpr, BLOCK: tl.constexpr, PHASES: tl.constexpr, BW: tl.constexpr,
                         SPLIT: tl.constexpr):
    # _store_decode_slice for accumulators held per V block, acc0 / acc1 [NB_PAD, G_PAD, BW]
    blocks, cols = _block_columns(NB_PAD, BW, BLOCK, PHASES)
    mask = row_ok[None, :, None] & (blocks < NB) & (cols < D)
    if SPLIT:
        ws_row = (seq * (tl.num_programs(0) * G) + q_heads).to(tl.int64) * num_splits + split
        ptrs = ws_acc_ptr + ws_row[None, :, None] * D + cols
        tl.store(ptrs, acc0, mask=mask)
        if PHASES == 2:
            tl.store(ptrs + 1, acc1, mask=mask)
        tl.store(ws_ml_ptr + ws_row * 2, m_i, mask=row_ok)
        tl.store(ws_ml_ptr + ws_row * 2 + 1, l_i, mask=row_ok)
    else:
        inv_l = (1.0 / tl.where(l_i > 0, l_i, 1.0))[None, :, None]  # an empty context gives zeros
        ptrs = out_ptr + seq.to(tl.int64) * stride_ob + q_heads[None, :, None] * stride_oh + cols
        tl.store(ptrs, (acc0 * inv_l).to(out_ptr.dtype.element_ty), mask=mask)
        if PHASES == 2:
            tl.store(ptrs + 1, (acc1 * inv_l).to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _paged_decode_blocks_kernel(
    q_ptr,  # *fp32|bf16|fp16 [B, Hq, D]: one query per sequence (last dim contiguous)
    stride_qb, stride_qh,  # q strides (elements)
    k_data_ptr, k_scale_ptr,  # K cache: data [pages, PAGE_SIZE, Hkv, cols] and scale bytes
    stride_kd_page, stride_kd_slot, stride_kd_head,  # k_data strides (elements; last dim contiguous)
    stride_ks_page, stride_ks_slot, stride_ks_head,  # k_scale strides (bytes; 0 for dense formats)
    v_data_ptr, v_scale_ptr,  # V cache, same layout as K (its own format)
    stride_vd_page, stride_vd_slot, stride_vd_head,  # v_data strides
    stride_vs_page, stride_vs_slot, stride_vs_head,  # v_scale strides
    page_table_ptr,  # *int32|int64 [B, P]: page ids of each sequence, in token order
    stride_pt,  # page_table row stride
    seq_lens_ptr,  # *int32|int64 [B]: tokens in the cache per sequence (the query's own included)
    out_ptr,  # *q.dtype [B, Hq, D]: written when SPLIT is False
    stride_ob, stride_oh,  # out strides
    ws_acc_ptr,  # *fp32 [B, Hq, num_splits, D]: unnormalized partial outputs (SPLIT)
    ws_ml_ptr,  # *fp32 [B, Hq, num_splits, 2]: partial running max (log2 domain) and sum
    num_splits,  # context slices per sequence (grid axis 1)
    qk_scale,  # softmax scale * log2(e): scores go straight to exp2
    sliding_window,  # > 0: a query sees only its last `sliding_window` positions
    G: tl.constexpr,  # query heads per KV head
    G_PAD: tl.constexpr,  # max(16, next power of two >= G): N of the score dots, M of the value dots
    D: tl.constexpr,  # head_dim
    PAGE_SIZE: tl.constexpr,  # tokens per page
    BLOCK_N: tl.constexpr,  # tokens per iteration (BLOCK_N / PAGE_SIZE pages)
    SPLIT: tl.constexpr,  # True: write partials to the workspace; False: write the output
    PREFETCH: tl.constexpr,  # True: the next tile's bytes are loaded into registers before this one's math
    K_BITS: tl.constexpr, K_MXFP4: tl.constexpr, K_PACKED: tl.constexpr, K_ASM: tl.constexpr,  # K format
    K_BLOCK: tl.constexpr,  # values per K scale (dense: the padded head_dim, one "block")
    K_NB: tl.constexpr, K_NB_PAD: tl.constexpr,  # K blocks per row, and that padded to a power of two
    K_PHASES: tl.constexpr, K_BW: tl.constexpr,  # 2: 4-bit codes as even / odd columns; K_BLOCK // K_PHASES
    V_BITS: tl.constexpr, V_MXFP4: tl.constexpr, V_PACKED: tl.constexpr, V_ASM: tl.constexpr,  # V format
    V_BLOCK: tl.constexpr, V_NB: tl.constexpr, V_NB_PAD: tl.constexpr, V_PHASES: tl.constexpr,  # as for K
    V_BW: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # operand dtype of both dots
    INPUT_PRECISION: tl.constexpr,  # "tf32x3" / "tf32" for float32 operands
    UPCAST_DOT: tl.constexpr,  # True under the interpreter with bf16 operands (see _dot)
):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)

    rows = tl.arange(0, G_PAD)
    q_heads = kv_head * G + rows
    row_ok = rows < G
    q0, q1 = _load_query_blocks(q_ptr + seq.to(tl.int64) * stride_qb + q_heads * stride_qh, row_ok, D, K_NB,
                                K_NB_PAD, K_BLOCK, K_PHASES, K_BW, DOT_DTYPE)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    lo, hi = _decode_slice(seq_len, split, num_splits, sliding_window, BLOCK_N)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc0 = tl.zeros([V_NB_PAD, G_PAD, V_BW], tl.float32)  # output per V block (even columns if V_PHASES == 2)
    acc1 = tl.zeros([V_NB_PAD, G_PAD, V_BW], tl.float32)  # odd columns (V_PHASES == 2)
    page_row = page_table_ptr + seq.to(tl.int64) * stride_pt
    tokens = lo + tl.arange(0, BLOCK_N)
    page = _load_page_ids(page_row, tokens, tokens < hi, PAGE_SIZE)
    if PREFETCH:  # the first tile's bytes, and the second tile's page ids
        k_raw, k_sc = _load_paged_blocks(k_data_ptr, k_scale_ptr, stride_kd_page, stride_kd_slot, stride_kd_head,
                                         stride_ks_page, stride_ks_slot, stride_ks_head, page, tokens % PAGE_SIZE,
                                         kv_head, tokens < hi, BLOCK_N, D, K_NB, K_NB_PAD, K_BLOCK, K_BITS, K_PACKED)
        v_raw, v_sc = _load_paged_blocks(v_data_ptr, v_scale_ptr, stride_vd_page, stride_vd_slot, stride_vd_head,
                                         stride_vs_page, stride_vs_slot, stride_vs_head, page, tokens % PAGE_SIZE,
                                         kv_head, tokens < hi, BLOCK_N, D, V_NB, V_NB_PAD, V_BLOCK, V_BITS, V_PACKED)
        page = _load_page_ids(page_row, tokens + BLOCK_N, tokens + BLOCK_N < hi, PAGE_SIZE)
    for n0 in range(lo, hi, BLOCK_N):
        tokens = n0 + tl.arange(0, BLOCK_N)
        live = tokens < hi
        ahead = tokens + BLOCK_N
        if PREFETCH:
            # the next tile's bytes go in flight (masked off past the slice) before this tile's math;
            # `page` holds the next tile's page ids, and the one after that is looked up now
            next_k_raw, next_k_sc = _load_paged_blocks(
                k_data_ptr, k_scale_ptr, stride_kd_page, stride_kd_slot, stride_kd_head, stride_ks_page,
                stride_ks_slot, stride_ks_head, page, ahead % PAGE_SIZE, kv_head, ahead < hi, BLOCK_N, D, K_NB,
                K_NB_PAD, K_BLOCK, K_BITS, K_PACKED)
            next_v_raw, next_v_sc = _load_paged_blocks(
                v_data_ptr, v_scale_ptr, stride_vd_page, stride_vd_slot, stride_vd_head, stride_vs_page,
                stride_vs_slot, stride_vs_head, page, ahead % PAGE_SIZE, kv_head, ahead < hi, BLOCK_N, D, V_NB,
                V_NB_PAD, V_BLOCK, V_BITS, V_PACKED)
            page = _load_page_ids(page_row, ahead + BLOCK_N, ahead + BLOCK_N < hi, PAGE_SIZE)
        else:
            next_page = _load_page_ids(page_row, ahead, ahead < hi, PAGE_SIZE)
            k_raw, k_sc = _load_paged_blocks(k_data_ptr, k_scale_ptr, stride_kd_page, stride_kd_slot, stride_kd_head,
                                             stride_ks_page, stride_ks_slot, stride_ks_head, page, tokens % PAGE_SIZE,
                                             kv_head, live, BLOCK_N, D, K_NB, K_NB_PAD, K_BLOCK, K_BITS, K_PACKED)
            v_raw, v_sc = _load_paged_blocks(v_data_ptr, v_scale_ptr, stride_vd_page, stride_vd_slot, stride_vd_head,
                                             stride_vs_page, stride_vs_slot, stride_vs_head, page, tokens % PAGE_SIZE,
                                             kv_head, live, BLOCK_N, D, V_NB, V_NB_PAD, V_BLOCK, V_BITS, V_PACKED)
            page = next_page
        scores = _block_scores(k_raw, k_sc, q0, q1, K_BITS, K_MXFP4, K_PACKED, K_ASM, K_PHASES, DOT_DTYPE,
                               INPUT_PRECISION, UPCAST_DOT)  # [BLOCK_N, G_PAD]
        scores = tl.where(live[:, None], scores * qk_scale, float("-inf"))
        # every tile holds a live token, so the running max is finite
        p, alpha, m_i, l_i = _online_softmax_step(scores, m_i, l_i, KEY_AXIS=0, MAY_SEE_NOTHING=False)
        acc0, acc1 = _block_values(p, v_raw, v_sc, acc0, acc1, alpha, V_BITS, V_MXFP4, V_PACKED, V_ASM, V_PHASES,
                                   DOT_DTYPE, INPUT_PRECISION, UPCAST_DOT)
        if PREFETCH:
            k_raw, k_sc, v_raw, v_sc = next_k_raw, next_k_sc, next_v_raw, next_v_sc

    _store_decode_blocks(out_ptr, stride_ob, stride_oh, ws_acc_ptr, ws_ml_ptr, seq, split, num_splits, q_heads, row_ok,
                         acc0, acc1, m_i, l_i, G, D, V_NB, V_NB_PAD, V_BLOCK, V_PHASES, V_BW, SPLIT)


# ----------------------------------------------------------------------------------------------
# Decode, block-diagonal ("diag" kernel): per-block scales with plain 2-d dots
# ----------------------------------------------------------------------------------------------


@jit
def _load_raw_rows(data_ptr, scale_ptr, data_rows, scale_rows, row_mask, WIDTH: tl.constexpr, VALID: tl.constexpr,
                   NB: tl.constexpr, NB_PAD: tl.constexpr, NCOL: tl.constexpr, PACKED: tl.constexpr):
    # ([ROWS, WIDTH] row tile as stored (bytes or dense values; columns >= VALID and masked rows are
    # zeros), [ROWS, NCOL] scale byte of block c % NB_PAD for column c (zeros for dense formats))
    cols = tl.arange(0, WIDTH)
    raw = tl.load(data_ptr + data_rows[:, None] + cols[None, :], mask=row_mask[:, None] & (cols[None, :] < VALID),
                  other=0)
    if PACKED:  # a row's NB_PAD scale bytes, repeated for each head's columns
        block = tl.arange(0, NB_PAD)
        scale = tl.load(scale_ptr + scale_rows[:, None] + block[None, :],
                        mask=row_mask[:, None] & (block[None, :] < NB), other=0)
        scale = tl.reshape(tl.broadcast_to(scale[:, None, :], (row_mask.shape[0], NCOL // NB_PAD, NB_PAD)),
                           (row_mask.shape[0], NCOL))
    else:
        scale = tl.zeros([row_mask.shape[0], NCOL], tl.uint8)
    return raw, scale


@jit
def _load_paged_rows(data_ptr, scale_ptr, stride_data_page, stride_data_slot, stride_data_head, stride_scale_page,
                     stride_scale_slot, stride_scale_head, page, slot, kv_head, row_mask, WIDTH: tl.constexpr,
                     VALID: tl.constexpr, NB: tl.constexpr, NB_PAD: tl.constexpr, NCOL: tl.constexpr,
                     PACKED: tl.constexpr):
    # the tokens' rows of one KV head, as _load_raw_rows returns them
    data_rows = page * stride_data_page + slot * stride_data_slot + kv_head * stride_data_head
    scale_rows = page * stride_scale_page + slot * stride_scale_slot + kv_head * stride_scale_head
    return _load_raw_rows(data_ptr, scale_ptr, data_rows, scale_rows, row_mask, WIDTH, VALID, NB, NB_PAD, NCOL, PACKED)


@jit
def _diag_masks(DPH: tl.constexpr, NCOL: tl.constexpr, NB_PAD: tl.constexpr, BLOCK: tl.constexpr,
                PHASES: tl.constexpr):
    # ([DPH, 1] head column of phase-0 code i, [1, NCOL] query head of column c, [DPH, NCOL] whether
    # column c's block (c % NB_PAD) holds code i): the block-diagonal frame
    cols = tl.arange(0, DPH)[:, None] * PHASES
    c = tl.arange(0, NCOL)[None, :]
    return cols, c // NB_PAD, (cols // BLOCK) == (c % NB_PAD)


@jit
def _load_query_diag(q_base, stride_qh, G: tl.constexpr, D: tl.constexpr, DPH: tl.constexpr, NCOL: tl.constexpr,
                     NB_PAD: tl.constexpr, BLOCK: tl.constexpr, PHASES: tl.constexpr, DTYPE: tl.constexpr):
    # q of the group as block-diagonal [DPH, NCOL] operands (phase 0, phase 1): column c = h * NB_PAD +
    # b holds q[h] on the codes of block b and zeros elsewhere, so codes [ROWS, DPH] @ it gives every
    # (key, head, block) partial q . k in one 2-d dot
    cols, head, in_block = _diag_masks(DPH, NCOL, NB_PAD, BLOCK, PHASES)
    mask = in_block & (head < G) & (cols < D)
    ptrs = q_base + head * stride_qh + cols
    first = tl.load(ptrs, mask=mask, other=0.0).to(DTYPE)
    second = first
    if PHASES == 2:
        second = tl.load(ptrs + 1, mask=mask, other=0.0).to(DTYPE)
    return first, second


@jit
def _group_sum(x, NCOL: tl.constexpr, NB_PAD: tl.constexpr):
    # [ROWS, NCOL] -> each column replaced by the sum over its head's NB_PAD columns, in float32: a
    # reshape and a sum in registers, broadcast back (compiled for sm_90 this takes half the registers
    # and shared-memory stores of the 0/1 tf32x3 dot it replaced)
    if NB_PAD > 1:
        heads = tl.sum(tl.reshape(x, (x.shape[0], NCOL // NB_PAD, NB_PAD)), 2)
        x = tl.reshape(tl.broadcast_to(heads[:, :, None], (x.shape[0], NCOL // NB_PAD, NB_PAD)), (x.shape[0], NCOL))
    return x


@jit
def _diag_scores(k_raw, k_scale, q0, q1, NCOL: tl.constexpr, NB_PAD: tl.constexpr, BITS: tl.constexpr,
                 MXFP4: tl.constexpr, PACKED: tl.constexpr, ASM: tl.constexpr, PHASES: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # [ROWS, NCOL] q . k, column c = h * NB_PAD + b holding head h's score (replicated over b)
    k0, k1 = _block_codes(k_raw, BITS, MXFP4, PACKED, ASM, DOT_DTYPE)
    part = _dot(k0, q0, None, INPUT_PRECISION, UPCAST)
    if PHASES == 2:
        part = _dot(k1, q1, part, INPUT_PRECISION, UPCAST)
    if PACKED:
        part = part * pow2(k_scale.to(tl.int32))
    return _group_sum(part, NCOL, NB_PAD)


@jit
def _diag_values(p, v_raw, v_scale, acc0, acc1, alpha, BITS: tl.constexpr, MXFP4: tl.constexpr,
                 PACKED: tl.constexpr, ASM: tl.constexpr, PHASES: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # acc^T [DPH, NCOL] * alpha + codes^T @ (p * 2^e of block c % NB_PAD): column c accumulates every
    # code weighted with block b's scale; only the codes of block b are kept from it at the end
    v0, v1 = _block_codes(v_raw, BITS, MXFP4, PACKED, ASM, DOT_DTYPE)
    if PACKED:
        p = p * pow2(v_scale.to(tl.int32))
    p = p.to(DOT_DTYPE)
    acc0 = _dot(tl.trans(v0), p, acc0 * alpha[None, :], INPUT_PRECISION, UPCAST)
    if PHASES == 2:
        acc1 = _dot(tl.trans(v1), p, acc1 * alpha[None, :], INPUT_PRECISION, UPCAST)
    return acc0, acc1


@jit
def _diag_head_values(acc, in_block, G_ROWS: tl.constexpr, NB_PAD: tl.constexpr):
    # acc^T [DPH, NCOL] -> [DPH, G_ROWS]: per head, each code's column of its own block
    acc = tl.where(in_block, acc, 0.0)
    return tl.sum(tl.reshape(acc, (acc.shape[0], G_ROWS, NB_PAD)), 2)


@jit
def _store_decode_diag(out_ptr, stride_ob, stride_oh, ws_acc_ptr, ws_ml_ptr, seq, kv_head, split, num_splits,
                       acc0, acc1, m_i, l_i, G: tl.constexpr, D: tl.constexpr, DPH: tl.constexpr, NCOL: tl.constexpr,
                       NB_PAD: tl.constexpr, BLOCK: tl.constexpr, PHASES: tl.constexpr, SPLIT: tl.constexpr):
    # _store_decode_slice for the block-diagonal accumulators (acc^T per phase, [DPH, NCOL]); a 4-bit
    # tile's odd code i (column 2i + 1) lies in the block of its even one
    cols, _, in_block = _diag_masks(DPH, NCOL, NB_PAD, BLOCK, PHASES)
    out0 = _diag_head_values(acc0, in_block, NCOL // NB_PAD, NB_PAD)
    out1 = _diag_head_values(acc1, in_block, NCOL // NB_PAD, NB_PAD)
    heads = tl.arange(0, NCOL // NB_PAD)
    m_h = tl.max(tl.reshape(m_i, (NCOL // NB_PAD, NB_PAD)), 1)  # equal over a head's columns
    l_h = tl.max(tl.reshape(l_i, (NCOL // NB_PAD, NB_PAD)), 1)
    head_ok = heads < G
    q_heads = kv_head * G + heads
    mask = head_ok[None, :] & (cols < D)
    if SPLIT:
        ws_row = (seq * (tl.num_programs(0) * G) + q_heads).to(tl.int64) * num_splits + split
        ptrs = ws_acc_ptr + ws_row[None, :] * D + cols
        tl.store(ptrs, out0, mask=mask)
        if PHASES == 2:
            tl.store(ptrs + 1, out1, mask=mask)
        tl.store(ws_ml_ptr + ws_row * 2, m_h, mask=head_ok)
        tl.store(ws_ml_ptr + ws_row * 2 + 1, l_h, mask=head_ok)
    else:
        inv_l = (1.0 / tl.where(l_h > 0, l_h, 1.0))[None, :]  # an empty context gives zeros
        ptrs = out_ptr + seq.to(tl.int64) * stride_ob + q_heads[None, :] * stride_oh + cols
        tl.store(ptrs, (out0 * inv_l).to(out_ptr.dtype.element_ty), mask=mask)
        if PHASES == 2:
            tl.store(ptrs + 1, (out1 * inv_l).to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _paged_decode_diag_kernel(
    q_ptr,  # *fp32|bf16|fp16 [B, Hq, D]: one query per sequence (last dim contiguous)
    stride_qb, stride_qh,  # q strides (elements)
    k_data_ptr, k_scale_ptr,  # K cache: data [pages, PAGE_SIZE, Hkv, cols] and scale bytes
    stride_kd_page, stride_kd_slot, stride_kd_head,  # k_data strides (elements; last dim contiguous)
    stride_ks_page, stride_ks_slot, stride_ks_head,  # k_scale strides (bytes; 0 for dense formats)
    v_data_ptr, v_scale_ptr,  # V cache, same layout as K (its own format)
    stride_vd_page, stride_vd_slot, stride_vd_head,  # v_data strides
    stride_vs_page, stride_vs_slot, stride_vs_head,  # v_scale strides
    page_table_ptr,  # *int32|int64 [B, P]: page ids of each sequence, in token order
    stride_pt,  # page_table row stride
    seq_lens_ptr,  # *int32|int64 [B]: tokens in the cache per sequence (the query's own included)
    out_ptr,  # *q.dtype [B, Hq, D]: written when SPLIT is False
    stride_ob, stride_oh,  # out strides
    ws_acc_ptr,  # *fp32 [B, Hq, num_splits, D]: unnormalized partial outputs (SPLIT)
    ws_ml_ptr,  # *fp32 [B, Hq, num_splits, 2]: partial running max (log2 domain) and sum
    num_splits,  # context slices per sequence (grid axis 1)
    qk_scale,  # softmax scale * log2(e): scores go straight to exp2
    sliding_window,  # > 0: a query sees only its last `sliding_window` positions
    G: tl.constexpr,  # query heads per KV head
    D: tl.constexpr,  # head_dim
    NB_PAD: tl.constexpr,  # blocks per row, padded to a power of two (K's and V's; 1 for dense pairs)
    NCOL: tl.constexpr,  # columns (head, block) of the block-diagonal dots: max(16, pow2(G) * NB_PAD)
    PAGE_SIZE: tl.constexpr,  # tokens per page
    BLOCK_N: tl.constexpr,  # tokens per iteration (BLOCK_N / PAGE_SIZE pages)
    SPLIT: tl.constexpr,  # True: write partials to the workspace; False: write the output
    PREFETCH: tl.constexpr,  # True: the next tile's bytes are loaded into registers before this one's math
    K_BITS: tl.constexpr, K_MXFP4: tl.constexpr, K_PACKED: tl.constexpr, K_ASM: tl.constexpr,  # K format
    K_NB: tl.constexpr,  # K blocks per row (scale bytes read; dense: NB_PAD blocks of scale 1)
    K_BLOCK: tl.constexpr,  # head columns per K block (dense: the padded row / NB_PAD)
    K_PHASES: tl.constexpr,  # 2: 4-bit codes as even / odd columns
    K_DPH: tl.constexpr,  # codes per phase of a (padded) row: the dots' K dim
    K_WIDTH: tl.constexpr, K_VALID: tl.constexpr,  # elements of a padded row as stored, and of a real one
    V_BITS: tl.constexpr, V_MXFP4: tl.constexpr, V_PACKED: tl.constexpr, V_ASM: tl.constexpr,  # V format
    V_NB: tl.constexpr, V_BLOCK: tl.constexpr, V_PHASES: tl.constexpr, V_DPH: tl.constexpr,  # as for K
    V_WIDTH: tl.constexpr, V_VALID: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # operand dtype of both dots
    INPUT_PRECISION: tl.constexpr,  # "tf32x3" / "tf32" for float32 operands
    UPCAST_DOT: tl.constexpr,  # True under the interpreter with bf16 operands (see _dot)
):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)

    q0, q1 = _load_query_diag(q_ptr + seq.to(tl.int64) * stride_qb + kv_head * G * stride_qh, stride_qh, G, D, K_DPH,
                              NCOL, NB_PAD, K_BLOCK, K_PHASES, DOT_DTYPE)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    lo, hi = _decode_slice(seq_len, split, num_splits, sliding_window, BLOCK_N)

    m_i = tl.full([NCOL], float("-inf"), tl.float32)
    l_i = tl.zeros([NCOL], tl.float32)
    acc0 = tl.zeros([V_DPH, NCOL], tl.float32)  # output^T per (head, block) column (even columns if 4-bit)
    acc1 = tl.zeros([V_DPH, NCOL], tl.float32)  # odd columns (V_PHASES == 2)
    page_row = page_table_ptr + seq.to(tl.int64) * stride_pt
    tokens = lo + tl.arange(0, BLOCK_N)
    page = _load_page_ids(page_row, tokens, tokens < hi, PAGE_SIZE)
    if PREFETCH:  # the first tile's bytes, and the second tile's page ids
        k_raw, k_sc = _load_paged_rows(k_data_ptr, k_scale_ptr, stride_kd_page, stride_kd_slot, stride_kd_head,
                                       stride_ks_page, stride_ks_slot, stride_ks_head, page, tokens % PAGE_SIZE,
                                       kv_head, tokens < hi, K_WIDTH, K_VALID, K_NB, NB_PAD, NCOL, K_PACKED)
        v_raw, v_sc = _load_paged_rows(v_data_ptr, v_scale_ptr, stride_vd_page, stride_vd_slot, stride_vd_head,
                                       stride_vs_page, stride_vs_slot, stride_vs_head, page, tokens % PAGE_SIZE,
                                       kv_head, tokens < hi, V_WIDTH, V_VALID, V_NB, NB_PAD, NCOL, V_PACKED)
        page = _load_page_ids(page_row, tokens + BLOCK_N, tokens + BLOCK_N < hi, PAGE_SIZE)
    for n0 in range(lo, hi, BLOCK_N):
        tokens = n0 + tl.arange(0, BLOCK_N)
        live = tokens < hi
        ahead = tokens + BLOCK_N
        if PREFETCH:  # as in _paged_decode_blocks_kernel
            next_k_raw, next_k_sc = _load_paged_rows(
                k_data_ptr, k_scale_ptr, stride_kd_page, stride_kd_slot, stride_kd_head, stride_ks_page,
                stride_ks_slot, stride_ks_head, page, ahead % PAGE_SIZE, kv_head, ahead < hi, K_WIDTH, K_VALID,
                K_NB, NB_PAD, NCOL, K_PACKED)
            next_v_raw, next_v_sc = _load_paged_rows(
                v_data_ptr, v_scale_ptr, stride_vd_page, stride_vd_slot, stride_vd_head, stride_vs_page,
                stride_vs_slot, stride_vs_head, page, ahead % PAGE_SIZE, kv_head, ahead < hi, V_WIDTH, V_VALID,
                V_NB, NB_PAD, NCOL, V_PACKED)
            page = _load_page_ids(page_row, ahead + BLOCK_N, ahead + BLOCK_N < hi, PAGE_SIZE)
        else:
            next_page = _load_page_ids(page_row, ahead, ahead < hi, PAGE_SIZE)
            k_raw, k_sc = _load_paged_rows(k_data_ptr, k_scale_ptr, stride_kd_page, stride_kd_slot, stride_kd_head,
                                           stride_ks_page, stride_ks_slot, stride_ks_head, page, tokens % PAGE_SIZE,
                                           kv_head, live, K_WIDTH, K_VALID, K_NB, NB_PAD, NCOL, K_PACKED)
            v_raw, v_sc = _load_paged_rows(v_data_ptr, v_scale_ptr, stride_vd_page, stride_vd_slot, stride_vd_head,
                                           stride_vs_page, stride_vs_slot, stride_vs_head, page, tokens % PAGE_SIZE,
                                           kv_head, live, V_WIDTH, V_VALID, V_NB, NB_PAD, NCOL, V_PACKED)
            page = next_page
        scores = _diag_scores(k_raw, k_sc, q0, q1, NCOL, NB_PAD, K_BITS, K_MXFP4, K_PACKED, K_ASM, K_PHASES,
                              DOT_DTYPE, INPUT_PRECISION, UPCAST_DOT)  # [BLOCK_N, NCOL]
        scores = tl.where(live[:, None], scores * qk_scale, float("-inf"))
        # every tile holds a live token, so the running max is finite
        p, alpha, m_i, l_i = _online_softmax_step(scores, m_i, l_i, KEY_AXIS=0, MAY_SEE_NOTHING=False)
        acc0, acc1 = _diag_values(p, v_raw, v_sc, acc0, acc1, alpha, V_BITS, V_MXFP4, V_PACKED, V_ASM, V_PHASES,
                                  DOT_DTYPE, INPUT_PRECISION, UPCAST_DOT)
        if PREFETCH:
            k_raw, k_sc, v_raw, v_sc = next_k_raw, next_k_sc, next_v_raw, next_v_sc

    _store_decode_diag(out_ptr, stride_ob, stride_oh, ws_acc_ptr, ws_ml_ptr, seq, kv_head, split, num_splits, acc0,
                       acc1, m_i, l_i, G, D, V_DPH, NCOL, NB_PAD, V_BLOCK, V_PHASES, SPLIT)


# ----------------------------------------------------------------------------------------------
# Decode with int8 key dots ("i8k" kernel): BFP16 and BFP12 keys never decoded to floats
# ----------------------------------------------------------------------------------------------
# BFP16 codes are int8 already, so K's bytes go from global to shared memory (cp.async, Triton's
# pipeliner) straight into int8 tensor-core dots, with no decode and no register round trip; a BFP12
# byte's two codes become int8 16 * code by one shift and one mask (staged through shared memory). q is
# split per (head, block) into two int8 limbs of one power-of-two step (q ~ (64 hi + lo) step, 13
# significant bits against bf16's 8), laid out block-diagonally as in the "diag" kernel: column
# c = h * NB_PAD + b holds head h on block b's channels, so one [BLOCK_N, D] x [D, NCOL] int32 dot per
# limb (and phase) gives every (key, head, block) partial sum; each is scaled by its key's block scale
# times q's step and summed over the head's blocks. V takes the "tiles" path (decoded with its scales
# into bf16, dotted with P, whose columns repeat each head NB_PAD times).


@jit
def _int8_limbs(q, step):
    # q (float32) -> (hi, lo) int8 with q = (64 hi + lo) step within step / 2, for |q| < 2^12 step:
    # Q = round(q / step) (half to even; the division is exact, step is a power of two),
    # hi = floor((Q + 32) / 64), lo = Q - 64 hi in [-32, 31]
    whole = ((q / step + 12582912.0) - 12582912.0).to(tl.int32)
    hi = (whole + 32) >> 6
    return hi.to(tl.int8), (whole - hi * 64).to(tl.int8)


@jit
def _query_int8_limbs(q_base, stride_qh, G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                      NCOL: tl.constexpr, NB_PAD: tl.constexpr, BLOCK: tl.constexpr, PHASES: tl.constexpr):
    # q of the group, block-diagonal ([D_PAD / PHASES, NCOL], see _load_query_diag; 4-bit keys: even and
    # odd channels), as int8 limbs (hi, lo) of each phase and each column's step [NCOL]: step = 2^(floor(
    # log2 max|q| over the column's block) - 11), so |q| < 2^12 step
    cols, head, in_block = _diag_masks(D_PAD // PHASES, NCOL, NB_PAD, BLOCK, PHASES)
    mask = in_block & (head < G) & (cols < D)
    q0 = tl.load(q_base + head * stride_qh + cols, mask=mask, other=0.0).to(tl.float32)
    q1 = q0
    if PHASES == 2:
        q1 = tl.load(q_base + head * stride_qh + cols + 1, mask=mask, other=0.0).to(tl.float32)
    biased = (tl.maximum(tl.max(tl.abs(q0), 0), tl.max(tl.abs(q1), 0)).to(tl.int32, bitcast=True) >> 23) & 0xFF
    step = pow2(tl.maximum(biased - 11, 1))[None, :]  # 2^(exponent of max|q| - 11)
    hi0, lo0 = _int8_limbs(q0, step)
    hi1, lo1 = _int8_limbs(q1, step)
    return hi0, lo0, hi1, lo1, tl.reshape(step, (NCOL,))


@jit
def _load_paged_columns(data_ptr, scale_ptr, stride_data_page, stride_data_slot, stride_data_head, stride_data_col,
                        stride_scale_page, stride_scale_slot, stride_scale_head, stride_scale_col, page, slot, kv_head,
                        row_mask, WIDTH: tl.constexpr, VALID: tl.constexpr, NB: tl.constexpr, NB_PAD: tl.constexpr,
                        NCOL: tl.constexpr, RUN: tl.constexpr):
    # "i8t": the tokens' rows of one KV head from a cache stored channels by tokens (a page's tokens
    # adjacent per byte column), as ([WIDTH, ROWS] bytes transposed: column t is token t; columns >=
    # VALID are zeros, [ROWS, NCOL] scale byte of block c % NB_PAD for column c, 0 for masked tokens).
    # The tile covers whole runs of RUN tokens of one page each (the caller aligns it and gives every
    # token of a run its run's page), so each run's bytes are adjacent and RUN-aligned: loaded as
    # vectors, unmasked by token. Bytes of tokens that are not live are read, finite (int8 codes), and
    # must be weighted 0 by the caller.
    tokens = page * stride_data_page + slot * stride_data_slot + kv_head * stride_data_head
    tokens = tl.max_contiguous(tl.multiple_of(tokens, RUN), RUN)
    cols = tl.arange(0, WIDTH)
    ptrs = data_ptr + cols[:, None] * stride_data_col + tokens[None, :]
    if VALID < WIDTH:
        raw = tl.load(ptrs, mask=cols[:, None] < VALID, other=0)
    else:
        raw = tl.load(ptrs)
    block = tl.arange(0, NB_PAD)
    scale_tokens = page * stride_scale_page + slot * stride_scale_slot + kv_head * stride_scale_head
    scale_tokens = tl.max_contiguous(tl.multiple_of(scale_tokens, RUN), RUN)
    scale = tl.load(scale_ptr + scale_tokens[:, None] + block[None, :] * stride_scale_col,
                    mask=row_mask[:, None] & (block[None, :] < NB), other=0)
    scale = tl.reshape(tl.broadcast_to(scale[:, None, :], (row_mask.shape[0], NCOL // NB_PAD, NB_PAD)),
                       (row_mask.shape[0], NCOL))
    return raw, scale


@jit
def _int8_values(p, v_raw_t, v_exp, acc0, acc1, alpha, V_PHASES: tl.constexpr):
    # "i8t": acc^T [D_PAD / V_PHASES, NCOL] * alpha + V's codes^T @ P', block-diagonal as in
    # _diag_values: P'[t, c] = p[t, c] * 2^e(t, block c % NB_PAD) >= 0, split per column into two int8
    # limbs of one power-of-two step (13 significant bits against the column's largest weight in the
    # tile: error <= 2^-13 of it, where p in bf16 errs by 2^-9 of each weight), so both dots are int8
    # with int32 sums (|sum| < 64 keys x 128 x 64 x 64 < 2^31 for 64-key tiles); BFP12 codes enter as
    # int8 16 * code (even channels from the low nibbles, odd from the high). v_raw_t is V's tile
    # transposed as stored ([bytes, tokens]), so the codes reach the dot with tokens, the contraction,
    # contiguous, as K's bytes do in the K dot.
    weights = p * pow2(v_exp.to(tl.int32))
    biased = (tl.max(weights, 0).to(tl.int32, bitcast=True) >> 23) & 0xFF
    step = pow2(tl.maximum(biased - 11, 1))  # 2^(exponent of the column's largest weight - 11)
    hi, lo = _int8_limbs(weights, step[None, :])
    if V_PHASES == 2:
        step = step * 0.0625
        v0 = (v_raw_t << 4).to(tl.int8, bitcast=True)
        v1 = (v_raw_t & 0xF0).to(tl.int8, bitcast=True)
        part1 = tl.dot(v1, hi, out_dtype=tl.int32) * 64 + tl.dot(v1, lo, out_dtype=tl.int32)
        acc1 = acc1 * alpha[None, :] + part1.to(tl.float32) * step[None, :]
    else:
        v0 = v_raw_t.to(tl.int8, bitcast=True)
    part0 = tl.dot(v0, hi, out_dtype=tl.int32) * 64 + tl.dot(v0, lo, out_dtype=tl.int32)
    acc0 = acc0 * alpha[None, :] + part0.to(tl.float32) * step[None, :]
    return acc0, acc1


@jit
def _paged_decode_i8k_kernel(
    q_ptr,  # *bf16 [B, Hq, D]: one query per sequence (last dim contiguous)
    stride_qb, stride_qh,  # q strides (elements)
    k_data_ptr, k_scale_ptr,  # K cache (BFP16 or BFP12): data [pages, PAGE_SIZE, Hkv, D * m / 8] codes, scale bytes
    stride_kd_page, stride_kd_slot, stride_kd_head,  # k_data strides (bytes; last dim contiguous)
    stride_ks_page, stride_ks_slot, stride_ks_head,  # k_scale strides (bytes)
    v_data_ptr, v_scale_ptr,  # V cache, its own format (as in _paged_decode_kernel)
    stride_vd_page, stride_vd_slot, stride_vd_head,  # v_data strides
    stride_vs_page, stride_vs_slot, stride_vs_head,  # v_scale strides
    page_table_ptr,  # *int32|int64 [B, P]: page ids of each sequence, in token order
    stride_pt,  # page_table row stride
    seq_lens_ptr,  # *int32|int64 [B]: tokens in the cache per sequence (the query's own included)
    out_ptr,  # *q.dtype [B, Hq, D]: written when SPLIT is False
    stride_ob, stride_oh,  # out strides
    ws_acc_ptr,  # *fp32 [B, Hq, num_splits, D]: unnormalized partial outputs (SPLIT)
    ws_ml_ptr,  # *fp32 [B, Hq, num_splits, 2]: partial running max (log2 domain) and sum
    num_splits,  # context slices per sequence (grid axis 1)
    qk_scale,  # softmax scale * log2(e): scores go straight to exp2
    sliding_window,  # > 0: a query sees only its last `sliding_window` positions
    stride_vd_col, stride_vs_col,  # V_T: strides between V's byte columns and its scale columns (1 otherwise)
    G: tl.constexpr,  # query heads per KV head
    D: tl.constexpr,  # head_dim
    D_PAD: tl.constexpr,  # max(32, next power of two >= D) = K_NB_PAD * K_BLOCK
    NB_PAD: tl.constexpr,  # K blocks per row, padded to a power of two
    NCOL: tl.constexpr,  # columns (head, block): max(16, pow2(G) * NB_PAD)
    K_NB: tl.constexpr,  # K blocks per row
    K_BLOCK: tl.constexpr,  # values per K block
    K_PHASES: tl.constexpr,  # 2: BFP12 keys (4-bit codes, even and odd channels); 1: BFP16
    PAGE_SIZE: tl.constexpr,  # tokens per page
    BLOCK_N: tl.constexpr,  # tokens per iteration
    SPLIT: tl.constexpr,  # True: write partials to the workspace; False: write the output
    V_BITS: tl.constexpr, V_MXFP4: tl.constexpr, V_BLOCK: tl.constexpr,  # V format (V_BLOCK 0: dense)
    V_ASM: tl.constexpr, V_PHASES: tl.constexpr,  # V decoded by inline PTX; 2: V as column halves
    UPCAST_DOT: tl.constexpr,  # True under the interpreter (see _dot)
    ABLATE: tl.constexpr,  # benchmarks only: 3 leaves the V stage out (no V loads, no P V dot), 4 the K stage,
    #                      5 the whole loop
    V_T: tl.constexpr = False,  # "i8t": V stored channels by tokens, its codes in int8 dots (_int8_values);
    #                              V's block is K's, so V has K_NB blocks a row
):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)

    hi0, lo0, hi1, lo1, step = _query_int8_limbs(q_ptr + seq.to(tl.int64) * stride_qb + kv_head * G * stride_qh,
                                                 stride_qh, G, D, D_PAD, NCOL, NB_PAD, K_BLOCK, K_PHASES)
    if K_PHASES == 2:
        step = step * 0.0625  # 4-bit codes enter the dots as int8 16 * code
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    lo, hi = _decode_slice(seq_len, split, num_splits, sliding_window, BLOCK_N)
    if ABLATE == 5:  # the loop left out: the program's setup (q's limbs, its slice) and its store only
        hi = lo
    slice_start = lo
    V_RUN: tl.constexpr = min(PAGE_SIZE, BLOCK_N)  # "i8t": tokens of one page adjacent in V's columns
    if V_T:  # tiles start on a run (a sliding window's slice may not); tokens before slice_start are masked
        lo = tl.where(lo < hi, lo - lo % V_RUN, lo)  # (an empty slice stays empty)

    m_i = tl.full([NCOL], float("-inf"), tl.float32)
    l_i = tl.zeros([NCOL], tl.float32)
    acc0 = tl.zeros([D_PAD // V_PHASES, NCOL], tl.float32)  # output^T, each head in NB_PAD columns
    acc1 = tl.zeros([D_PAD // V_PHASES, NCOL], tl.float32)  # odd columns (V_PHASES == 2)
    page_row = page_table_ptr + seq.to(tl.int64) * stride_pt
    for n0 in range(lo, hi, BLOCK_N):
        tokens = n0 + tl.arange(0, BLOCK_N)
        live = tokens < hi
        if V_T:  # every token of a run that starts before hi gets the run's page (its V bytes load as one)
            live = live & (tokens >= slice_start)
            page = _load_page_ids(page_row, tokens, (tokens - tokens % V_RUN) < hi, PAGE_SIZE)
        else:
            page = _load_page_ids(page_row, tokens, live, PAGE_SIZE)
        if ABLATE == 4:  # K stage left out: every live key scores 0
            scores = tl.zeros([BLOCK_N, NCOL], tl.float32)
        else:
            k_raw, k_exp = _load_paged_rows(k_data_ptr, k_scale_ptr, stride_kd_page, stride_kd_slot, stride_kd_head,
                                            stride_ks_page, stride_ks_slot, stride_ks_head, page, tokens % PAGE_SIZE,
                                            kv_head, live, D_PAD // K_PHASES, D // K_PHASES, K_NB, NB_PAD, NCOL, True)
            if K_PHASES == 2:  # each byte's two 4-bit codes as int8 16 * code: the low nibble moved up, the high masked
                k0 = (k_raw << 4).to(tl.int8, bitcast=True)
                k1 = (k_raw & 0xF0).to(tl.int8, bitcast=True)
                whole = (tl.dot(k0, hi0, out_dtype=tl.int32) + tl.dot(k1, hi1, out_dtype=tl.int32)) * 64
                whole += tl.dot(k0, lo0, out_dtype=tl.int32) + tl.dot(k1, lo1, out_dtype=tl.int32)
            else:  # BFP16 codes are int8 as stored
                k0 = k_raw.to(tl.int8, bitcast=True)
                whole = tl.dot(k0, hi0, out_dtype=tl.int32) * 64 + tl.dot(k0, lo0, out_dtype=tl.int32)
            part = whole.to(tl.float32) * (pow2(k_exp.to(tl.int32)) * step[None, :])
            scores = _group_sum(part, NCOL, NB_PAD)  # [BLOCK_N, NCOL]: each head's score in its NB_PAD columns
        scores = tl.where(live[:, None], scores * qk_scale, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax_step(scores, m_i, l_i, KEY_AXIS=0, MAY_SEE_NOTHING=False)
        if ABLATE == 3:  # V stage left out (p still feeds l_i, so the K stage stays live)
            acc0 = acc0 * alpha[None, :]
        elif V_T:
            v_raw, v_exp = _load_paged_columns(v_data_ptr, v_scale_ptr, stride_vd_page, stride_vd_slot, stride_vd_head,
                                               stride_vd_col, stride_vs_page, stride_vs_slot, stride_vs_head,
                                               stride_vs_col, page, tokens % PAGE_SIZE, kv_head, live,
                                               D_PAD // V_PHASES, D // V_PHASES, K_NB, NB_PAD, NCOL, V_RUN)
            acc0, acc1 = _int8_values(p, v_raw, v_exp, acc0, acc1, alpha, V_PHASES)
        else:
            v0, v1 = _load_paged_tile(v_data_ptr, v_scale_ptr, stride_vd_page, stride_vd_slot, stride_vd_head,
                                      stride_vs_page, stride_vs_slot, stride_vs_head, page, tokens % PAGE_SIZE,
                                      kv_head, live, BLOCK_N, D, D_PAD, V_BITS, V_MXFP4, V_BLOCK, V_ASM, tl.bfloat16)
            p = p.to(tl.bfloat16)
            acc0 = _dot(tl.trans(v0), p, acc0 * alpha[None, :], "tf32", UPCAST_DOT)
            if V_PHASES == 2:
                acc1 = _dot(tl.trans(v1), p, acc1 * alpha[None, :], "tf32", UPCAST_DOT)

    if V_T:  # column h * NB_PAD + b holds head h's output on block b's channels
        _store_decode_diag(out_ptr, stride_ob, stride_oh, ws_acc_ptr, ws_ml_ptr, seq, kv_head, split, num_splits,
                           acc0, acc1, m_i, l_i, G, D, D_PAD // V_PHASES, NCOL, NB_PAD, K_BLOCK, V_PHASES, SPLIT)
    else:  # column h * NB_PAD of each head (all NB_PAD of its columns hold the same values)
        first = (tl.arange(0, NCOL) % NB_PAD) == 0
        rows = tl.arange(0, NCOL // NB_PAD)
        out0 = _diag_head_values(acc0, first[None, :], NCOL // NB_PAD, NB_PAD)
        out1 = _diag_head_values(acc1, first[None, :], NCOL // NB_PAD, NB_PAD)
        m_h = tl.max(tl.reshape(m_i, (NCOL // NB_PAD, NB_PAD)), 1)
        l_h = tl.max(tl.reshape(l_i, (NCOL // NB_PAD, NB_PAD)), 1)
        _store_decode_slice(out_ptr, stride_ob, stride_oh, ws_acc_ptr, ws_ml_ptr, seq, split, num_splits,
                            kv_head * G + rows, rows < G, tl.trans(out0), tl.trans(out1), m_h, l_h, G, D, D_PAD,
                            V_PHASES, SPLIT)


# ----------------------------------------------------------------------------------------------
# Prefill: causal, variable length, chunked
# ----------------------------------------------------------------------------------------------


@jit
def _locate_query_tile(tile, tile_seq_ptr, tile_index_ptr, query_start_ptr, seq_lens_ptr, num_seqs,
                       TOKENS_PER_TILE: tl.constexpr):
    # (sequence, the tile's first query within the sequence's queries, the sequence's first row of
    # q, its number of queries, its tokens in the cache); a padding tile reads sequence 0 and gets
    # no queries
    seq = tl.load(tile_seq_ptr + tile)
    tile_live = seq < num_seqs
    seq = tl.where(tile_live, seq, 0)
    first_token = tl.load(tile_index_ptr + tile) * TOKENS_PER_TILE
    q_begin = tl.load(query_start_ptr + seq).to(tl.int32)
    num_queries = tl.where(tile_live, tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_begin, 0)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    return seq, first_token, q_begin, num_queries, seq_len


@jit
def _prefill_key_range(seq_len, num_queries, first_token, sliding_window, TOKENS_PER_TILE: tl.constexpr):
    # keys a tile of queries can see: [lo, hi), hi = the last query's position + 1 (empty for a
    # tile without queries)
    first_pos = seq_len - num_queries + first_token
    hi = tl.minimum(first_pos + TOKENS_PER_TILE, seq_len)
    lo = tl.where(sliding_window > 0, tl.maximum(first_pos - sliding_window + 1, 0), 0)
    hi = tl.where(first_token < num_queries, hi, lo)
    return lo, hi


@jit
def _paged_prefill_kernel(
    q_ptr,  # *fp32|bf16|fp16 [T, Hq, D]: flat queries of all sequences (last dim contiguous)
    stride_qt, stride_qh,  # q strides (elements)
    k_data_ptr, k_scale_ptr,  # K cache: data [pages, PAGE_SIZE, Hkv, cols] and scale bytes
    stride_kd_page, stride_kd_slot, stride_kd_head,  # k_data strides (elements; last dim contiguous)
    stride_ks_page, stride_ks_slot, stride_ks_head,  # k_scale strides (bytes; 0 for dense formats)
    v_data_ptr, v_scale_ptr,  # V cache, same layout as K (its own format)
    stride_vd_page, stride_vd_slot, stride_vd_head,  # v_data strides
    stride_vs_page, stride_vs_slot, stride_vs_head,  # v_scale strides
    page_table_ptr,  # *int32|int64 [S, P]: page ids of each sequence, in token order
    stride_pt,  # page_table row stride
    seq_lens_ptr,  # *int32|int64 [S]: tokens in the cache per sequence, this chunk included
    query_start_ptr,  # *int32|int64 [S + 1]: sequence s owns queries query_start[s]:query_start[s+1]
    tile_seq_ptr,  # *int32 [grid 0]: sequence of each query tile; >= num_seqs: no tile (padding)
    tile_index_ptr,  # *int32 [grid 0]: index of the tile within its sequence's queries
    key_rope_ptr,  # *fp32 [Hkv, 3, D/2]: pre-RoPE key table (read only when PRE_ROPE)
    out_ptr,  # *q.dtype [T, Hq, D]
    stride_ot, stride_oh,  # out strides
    num_seqs,  # S
    qk_scale,  # softmax scale * log2(e)
    sliding_window,  # > 0: a query sees only its last `sliding_window` positions
    G: tl.constexpr,  # query heads per KV head
    D: tl.constexpr,  # head_dim
    D_PAD: tl.constexpr,  # next power of two >= D
    PAGE_SIZE: tl.constexpr,  # tokens per page
    BLOCK_M: tl.constexpr,  # rows per tile: TOKENS_PER_TILE query tokens x G heads, padded
    TOKENS_PER_TILE: tl.constexpr,  # BLOCK_M // G
    BLOCK_N: tl.constexpr,  # keys per iteration
    K_BITS: tl.constexpr, K_MXFP4: tl.constexpr, K_BLOCK: tl.constexpr,  # K format (K_BLOCK 0: dense)
    K_ASM: tl.constexpr, K_PHASES: tl.constexpr,  # K decoded by inline PTX; 2: K as column halves
    V_BITS: tl.constexpr, V_MXFP4: tl.constexpr, V_BLOCK: tl.constexpr,  # V format
    V_ASM: tl.constexpr, V_PHASES: tl.constexpr,  # same for V
    DOT_DTYPE: tl.constexpr,  # operand dtype of both dots
    INPUT_PRECISION: tl.constexpr,  # "tf32x3" / "tf32" for float32 operands
    UPCAST_DOT: tl.constexpr,  # True under the interpreter with bf16 operands (see _dot)
    PRE_ROPE: tl.constexpr,  # True: K is stored before RoPE and rotated on read
    K_TILE_DTYPE: tl.constexpr,  # dtype K tiles are decoded to: float32 when PRE_ROPE, else DOT_DTYPE
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq, first_token, q_begin, num_queries, seq_len = _locate_query_tile(
        tile, tile_seq_ptr, tile_index_ptr, query_start_ptr, seq_lens_ptr, num_seqs, TOKENS_PER_TILE)

    rows = tl.arange(0, BLOCK_M)
    token = first_token + rows // G
    q_heads = kv_head * G + rows % G
    row_ok = (rows < TOKENS_PER_TILE * G) & (token < num_queries)
    q_pos = seq_len - num_queries + token
    q_rows = (q_begin + token).to(tl.int64)
    q0, q1 = _load_rows(q_ptr + q_rows * stride_qt + q_heads * stride_qh, row_ok, D, D_PAD, K_PHASES, DOT_DTYPE)
    lo, hi = _prefill_key_range(seq_len, num_queries, first_token, sliding_window, TOKENS_PER_TILE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D_PAD // V_PHASES], tl.float32)  # output columns (even ones if V_PHASES == 2)
    acc1 = tl.zeros([BLOCK_M, D_PAD // V_PHASES], tl.float32)  # odd columns (V_PHASES == 2)
    page_row = page_table_ptr + seq.to(tl.int64) * stride_pt
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        live = keys < hi
        page = _load_page_ids(page_row, keys, live, PAGE_SIZE)
        slot = keys % PAGE_SIZE
        k0, k1 = _load_paged_tile(k_data_ptr, k_scale_ptr, stride_kd_page, stride_kd_slot, stride_kd_head,
                                  stride_ks_page, stride_ks_slot, stride_ks_head, page, slot, kv_head, live,
                                  BLOCK_N, D, D_PAD, K_BITS, K_MXFP4, K_BLOCK, K_ASM, K_TILE_DTYPE)
        if PRE_ROPE:
            k0, k1 = _rotate_key_tile(k0, k1, keys, key_rope_ptr + kv_head * (3 * (D // 2)), BLOCK_N, D, K_PHASES,
                                      DOT_DTYPE)
        scores = _dot_halves(q0, q1, k0, k1, K_PHASES, INPUT_PRECISION, UPCAST_DOT, TRANS_B=True) * qk_scale
        visible = live[None, :] & (keys[None, :] <= q_pos[:, None])
        visible = visible & ((sliding_window <= 0) | (keys[None, :] > q_pos[:, None] - sliding_window))
        scores = tl.where(visible, scores, float("-inf"))
        # with a sliding window, a row's first key tiles can lie wholly before its window
        p, alpha, m_i, l_i = _online_softmax_step(scores, m_i, l_i, KEY_AXIS=1, MAY_SEE_NOTHING=True)
        v0, v1 = _load_paged_tile(v_data_ptr, v_scale_ptr, stride_vd_page, stride_vd_slot, stride_vd_head,
                                  stride_vs_page, stride_vs_slot, stride_vs_head, page, slot, kv_head, live,
                                  BLOCK_N, D, D_PAD, V_BITS, V_MXFP4, V_BLOCK, V_ASM, DOT_DTYPE)
        p = p.to(DOT_DTYPE)
        acc0 = _dot(p, v0, acc0 * alpha[:, None], INPUT_PRECISION, UPCAST_DOT)
        if V_PHASES == 2:
            acc1 = _dot(p, v1, acc1 * alpha[:, None], INPUT_PRECISION, UPCAST_DOT)

    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows that see no key (padding) stay zero
    _store_rows(out_ptr + q_rows * stride_ot + q_heads * stride_oh, row_ok, acc0 * inv_l, acc1 * inv_l,
                D, D_PAD, V_PHASES)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def auto_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int = _DEFAULT_SMS,
                    programs_per_sm: int = 8, min_tokens: int = _MIN_TOKENS_PER_SPLIT) -> int:
    """Context slices per sequence for decode: about `programs_per_sm` programs per SM (several
    waves, so the last, partial wave costs little), each slice at least `min_tokens` tokens long
    (DecodeConfig.min_split_tokens). `max_context` is an upper bound on the visible context."""
    programs = max(1, batch * num_kv_heads)
    wanted = math.ceil(programs_per_sm * num_sms / programs)
    longest = max(1, max_context // min_tokens)
    return max(1, min(wanted, longest, _MAX_SPLITS))


# ----------------------------------------------------------------------------------------------
# Decode launch configs (data: kernels/configs/paged_decode_<device>.json, written by the tuner)
# ----------------------------------------------------------------------------------------------

DECODE_KERNELS = ("tiles", "blocks", "diag", "i8k", "i8t")
# benchmark ablations per kernel (paged_decode_attention(ablate=)): stages of the loop left out
ABLATIONS = {"tiles": (1, 2, 5), "i8k": (3, 4, 5), "i8t": (3, 4, 5)}


@dataclass(frozen=True)
class DecodeConfig:
    """How paged_decode_attention launches. kernel "tiles": _paged_decode_kernel (values decoded and
    scaled per value into bf16/fp32 tiles); "blocks": _paged_decode_blocks_kernel (codes unscaled into
    batched per-block dots, scales applied per block); "diag": _paged_decode_diag_kernel (the same
    with 2-d dots against a block-diagonal q); "i8k": _paged_decode_i8k_kernel (BFP16 / BFP12 keys' codes
    in int8 dots against q in two int8 limbs, V as "tiles" reads it; bf16 queries); "i8t": "i8k" over a V
    cache stored channels by tokens (v_channels_by_tokens), V's codes in int8 dots too, against P scaled
    per V block. prefetch: the next
    tile's bytes are loaded into registers before this tile's math (without it, "tiles" leaves its
    loads to Triton's pipeliner, which stages them through shared memory, num_stages deep; "tiles"
    ignores it for 6-bit formats; "i8k" and "i8t" have none).
    block_n: tokens per iteration; programs_per_sm: the split-K target of auto_num_splits;
    min_split_tokens: the shortest context slice it makes (short contexts of a few hundred tokens run
    in one or two slices at the default, so one-warp programs leave SMs idle)."""

    VERSION: ClassVar[int] = 1  # of the JSON layout; a file of another version is refused

    kernel: str = "tiles"
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    prefetch: bool = False
    programs_per_sm: int = 8
    min_split_tokens: int = _MIN_TOKENS_PER_SPLIT

    def __post_init__(self):
        if self.kernel not in DECODE_KERNELS:
            raise ValueError(f"DecodeConfig: kernel={self.kernel!r} must be one of {DECODE_KERNELS}")
        if not isinstance(self.block_n, int) or self.block_n < _MIN_DOT or self.block_n & (self.block_n - 1):
            raise ValueError(f"DecodeConfig: block_n={self.block_n!r} must be a power of two >= {_MIN_DOT}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1 or self.programs_per_sm < 1:
            raise ValueError(f"DecodeConfig: num_warps={self.num_warps} must be a power of two <= 16, num_stages="
                             f"{self.num_stages} and programs_per_sm={self.programs_per_sm} >= 1")
        if not isinstance(self.min_split_tokens, int) or isinstance(self.min_split_tokens, bool) \
                or self.min_split_tokens < 1:
            raise ValueError(f"DecodeConfig: min_split_tokens={self.min_split_tokens!r} must be an int >= 1")
        if not isinstance(self.prefetch, bool):
            raise ValueError(f"DecodeConfig: prefetch must be a bool, got {self.prefetch!r}")
        if self.kernel == "i8t" and self.block_n < _MIN_INT8_DOT:  # its int8 V dot contracts over the tile's tokens
            raise ValueError(f"DecodeConfig: kernel='i8t' needs block_n >= {_MIN_INT8_DOT}, got {self.block_n}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DecodeConfig":
        """The inverse of to_dict; unknown keys are an error, missing ones take the defaults."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"DecodeConfig: unknown keys {sorted(unknown)}; expected {[f.name for f in fields(cls)]}")
        return cls(**data)


def _head_dim_pad(head_dim: int) -> int:
    """A tile row's length in values: the next power of two >= head_dim, at least 32 (4-bit formats
    split it in two halves, and each dot dim is >= 16)."""
    return max(2 * _MIN_DOT, next_pow2(head_dim))


def decode_kernel_supports(kernel: str, k_fmt: KVFormat, v_fmt: KVFormat, head_dim: int,
                           pre_rope: bool = False, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether a decode kernel runs these formats for queries of `dtype`. "tiles": all. "blocks" and
    "diag": post-RoPE keys (a rotation mixes channels of different blocks) and per format dense, or
    4/8-bit BFP or MXFP4; "blocks" needs >= 16 codes per block and phase (4-bit blocks of >= 32), "diag"
    >= 16 codes per phase of a row and the same number of blocks (padded to a power of two) in K and V
    if both are packed. "i8k": post-RoPE BFP16 or BFP12 keys (BFP12 from 64 padded head
    channels: an int8 dot contracts over >= 32), bf16 queries and V exact in bf16 (packed, or bf16
    pages): its P @ V dot runs in bf16. "i8t": as "i8k", with V BFP16 or BFP12 of K's block size."""
    if kernel == "tiles":
        return True
    formats = (k_fmt, v_fmt)
    if kernel == "i8t":
        return (decode_kernel_supports("i8k", k_fmt, v_fmt, head_dim, pre_rope, dtype) and v_fmt.kind == "bfp"
                and v_fmt.mantissa_bits in (4, 8) and v_fmt.block == k_fmt.block)
    if kernel == "i8k":  # (its K dot contracts over a row's codes, halved for 4-bit codes)
        return (not pre_rope and k_fmt.kind == "bfp" and k_fmt.mantissa_bits in (4, 8)
                and head_dim % k_fmt.block == 0 and _head_dim_pad(head_dim) % k_fmt.block == 0
                and _head_dim_pad(head_dim) // (2 if k_fmt.mantissa_bits == 4 else 1) >= _MIN_INT8_DOT
                and dtype == torch.bfloat16 and (not v_fmt.is_dense or v_fmt.name == "bfloat16"))
    if pre_rope or any(not f.is_dense and f.mantissa_bits not in (4, 8) for f in formats):
        return False
    phases = [2 if not f.is_dense and f.mantissa_bits == 4 else 1 for f in formats]
    if kernel == "blocks":
        return all(f.is_dense or f.block // ph >= _MIN_DOT for f, ph in zip(formats, phases))
    blocks = {next_pow2(head_dim // f.block) for f in formats if not f.is_dense}
    return len(blocks) <= 1 and all(_diag_row(f, head_dim, max(blocks, default=1))[0] // ph >= _MIN_DOT
                                    for f, ph in zip(formats, phases))


def _diag_row(fmt: KVFormat, head_dim: int, nb_pad: int) -> tuple[int, int]:
    """(padded row length in values, head columns per block) of a format in the "diag" kernel: packed
    rows pad to nb_pad whole blocks; dense ones to a power of two >= 32, cut in nb_pad blocks of scale 1."""
    if fmt.is_dense:
        d_pad = _head_dim_pad(head_dim)
        return d_pad, d_pad // nb_pad
    return nb_pad * fmt.block, fmt.block


def default_decode_config(k_fmt: KVFormat, v_fmt: KVFormat) -> DecodeConfig:
    """The config without a tuned one: the "tiles" kernel, 64 tokens per iteration, 4 warps, 2 stages,
    8 programs per SM (the settings measured before issue 14); the tuner decides where "blocks" wins."""
    return DecodeConfig()


TUNE_CONTEXT = 4096  # the context a config file's plain shape keys were tuned at


def decode_config_key(k_fmt: KVFormat, v_fmt: KVFormat, head_dim: int, group: int, dtype: torch.dtype,
                      v_layout: str = "rows", context: int | None = None) -> str:
    """Key of one decode shape in a config file (a V stored channels by tokens has keys of its own).
    An entry tuned at a context other than TUNE_CONTEXT (the tokens its launch's page table held)
    carries it as ",context=N"; pick_decode_config takes the entry nearest the launch's context."""
    key = f"K={k_fmt.name},V={v_fmt.name},D={head_dim},G={group},dtype={str(dtype).removeprefix('torch.')}"
    key = key if v_layout == "rows" else f"{key},v_layout={v_layout}"
    return key if context in (None, TUNE_CONTEXT) else f"{key},context={context}"


def nearest_tuned_config(tuned: dict[str, DecodeConfig], key: str, context: int | None) -> DecodeConfig | None:
    """The entry of shape `key` tuned nearest `context` in ratio (the plain key counts as TUNE_CONTEXT;
    None asks for TUNE_CONTEXT); a tie goes to the longer context. None without an entry."""
    tuned_at = {TUNE_CONTEXT: tuned[key]} if key in tuned else {}
    prefix = key + ",context="
    tuned_at.update({int(k[len(prefix):]): config for k, config in tuned.items() if k.startswith(prefix)})
    if not tuned_at:
        return None
    want = math.log(context or TUNE_CONTEXT)
    return tuned_at[min(tuned_at, key=lambda c: (abs(math.log(c) - want), -c))]


def decode_config_path(device_name: str, directory: Path | None = None) -> Path:
    """kernels/configs/paged_decode_<device name, non-alphanumerics as _>.json (FXFORGE_DECODE_CONFIG_DIR
    replaces the folder)."""
    name = re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")
    return Path(directory or CONFIG_DIR) / f"paged_decode_{name}.json"


@functools.cache
def tuned_decode_configs(device_name: str, directory: Path | None = None) -> dict[str, DecodeConfig]:
    """{decode_config_key: DecodeConfig} from the device's config file ({} without one); read once."""
    path = decode_config_path(device_name, directory)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("version") != DecodeConfig.VERSION:
        raise ValueError(f"{path}: version {data.get('version')!r}, this fxforge reads version "
                         f"{DecodeConfig.VERSION}; rerun python -m fxforge.kernels.attention_bench --tune")
    return {key: DecodeConfig.from_dict(entry["config"]) for key, entry in data["shapes"].items()}


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def pick_decode_config(k_fmt: KVFormat, v_fmt: KVFormat, head_dim: int, group: int, dtype: torch.dtype,
                       device: torch.device, pre_rope: bool = False, v_layout: str = "rows",
                       context: int | None = None) -> DecodeConfig:
    """The tuned config of this CUDA device and shape, else default_decode_config; FXFORGE_DECODE_KERNEL
    overrides the kernel. A kernel that cannot run the formats falls back to "tiles" (decode_kernel_supports).
    A V stored channels by tokens (v_layout "channels") is read by "i8t" only: its tuned config, else the
    rows config's launch with kernel "i8t". context: the tokens the launch's page table holds (None:
    TUNE_CONTEXT); of a shape's entries tuned at several contexts, the nearest is taken."""
    tuned = tuned_decode_configs(_device_name(device)) if device.type == "cuda" else {}
    key = functools.partial(decode_config_key, k_fmt, v_fmt, head_dim, group, dtype)
    if v_layout != "rows":
        config = (nearest_tuned_config(tuned, key(v_layout), context) or nearest_tuned_config(tuned, key(), context)
                  or default_decode_config(k_fmt, v_fmt))
        return DecodeConfig(**{**config.to_dict(), "kernel": "i8t", "block_n": max(config.block_n, _MIN_INT8_DOT)})
    config = nearest_tuned_config(tuned, key(), context) or default_decode_config(k_fmt, v_fmt)
    kernel = _FORCED_KERNEL or config.kernel
    if not decode_kernel_supports(kernel, k_fmt, v_fmt, head_dim, pre_rope, dtype):
        kernel = "tiles"
    return config if kernel == config.kernel else DecodeConfig(**{**config.to_dict(), "kernel": kernel})


def _dot_config(dtype: torch.dtype, k_fmt: KVFormat, v_fmt: KVFormat) -> tuple:
    """(dot operand dtype, input_precision): bf16 dots when q is bf16 and K and V are exact in bf16
    (bf16 pages; BFP and MXFP4 values have <= 8 significant bits); tf32 for fp16 queries (fp16
    values are exact in tf32, fp16 operands could overflow); 3xTF32 (~float32) otherwise."""
    bf16_exact = all(fmt.name == "bfloat16" or not fmt.is_dense for fmt in (k_fmt, v_fmt))
    if dtype == torch.bfloat16 and bf16_exact:
        return tl.bfloat16, "tf32"  # (input_precision is ignored for bf16 operands)
    if dtype == torch.float16:
        return tl.float32, "tf32"
    return tl.float32, "tf32x3"


def _ptx_decodes(fmt: KVFormat, dot_dtype, device: torch.device) -> bool:
    """Whether a format's codes are decoded by inline PTX: 4/8-bit BFP and MXFP4 on CUDA, into bf16 dots."""
    return (_ASM_DECODE and device.type == "cuda" and dot_dtype == tl.bfloat16
            and (fmt.kind == "mxfp4" or (fmt.kind == "bfp" and fmt.mantissa_bits in (4, 8))))


def _format_meta(fmt: KVFormat, prefix: str, dot_dtype, device: torch.device, rotated: bool = False) -> dict:
    bits = fmt.mantissa_bits if not fmt.is_dense else torch.finfo(fmt.storage_dtype()).bits
    # the PTX decode gives bf16 values; pre-RoPE keys are rotated in float32 before the dot
    asm = _ptx_decodes(fmt, dot_dtype, device) and not rotated
    return {f"{prefix}_BITS": bits, f"{prefix}_MXFP4": fmt.kind == "mxfp4", f"{prefix}_BLOCK": fmt.block,
            f"{prefix}_ASM": asm, f"{prefix}_PHASES": 2 if bits == 4 else 1}


def _kernel_meta(k_fmt: KVFormat, v_fmt: KVFormat, dtype: torch.dtype, device: torch.device,
                 pre_rope: bool) -> dict:
    """Constexprs shared by the "tiles" decode and the prefill kernel: the two formats, how the dots
    run (for queries of `dtype` on `device`), whether K is pre-RoPE."""
    dot_dtype, precision = _dot_config(dtype, k_fmt, v_fmt)
    return dict(**_format_meta(k_fmt, "K", dot_dtype, device, pre_rope),
                **_format_meta(v_fmt, "V", dot_dtype, device),
                DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
                UPCAST_DOT=INTERPRETED and dot_dtype == tl.bfloat16,
                PRE_ROPE=pre_rope, K_TILE_DTYPE=tl.float32 if pre_rope else dot_dtype)


def _cache_strides(data: torch.Tensor, scale: torch.Tensor, fmt: KVFormat) -> tuple[int, ...]:
    scale_strides = (0, 0, 0) if fmt.is_dense else scale.stride()[:3]
    return (*data.stride()[:3], *scale_strides)


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, but q is on {device}; put every input on one device")


def _check_query(op: str, q) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"{op}: q must be a 3-d tensor [tokens, Hq, head_dim], got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: q has dtype {q.dtype}; expected float32, bfloat16 or float16")
    check_launchable(op, "q", q, "attention_ref (kernels/attention.py)")
    if q.stride(-1) != 1:
        raise ValueError(f"{op}: q's last dim must be contiguous, got strides {q.stride()}")
    if q.shape[2] < 1:
        raise ValueError(f"{op}: head_dim must be >= 1, got q {tuple(q.shape)}")


def _check_cache(op: str, name: str, data, scale, fmt: str | KVFormat, head_dim: int,
                 device: torch.device) -> KVFormat:
    """Validate one cache (name "k" or "v"): its data and scale tensors for `fmt`; returns the format."""
    fmt = parse_kv_format(fmt)
    fmt.check_head_dim(head_dim)
    for part, t in ((f"{name}_data", data), (f"{name}_scale", scale)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{op}: {part} must be a 4-d tensor [pages, page_size, Hkv, cols], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        _check_device(part, t, device)
    cols = fmt.row_bytes(head_dim) // fmt.storage_dtype().itemsize
    if data.dtype != fmt.storage_dtype() or data.shape[-1] != cols:
        raise ValueError(f"{op}: {name}_data for format {fmt.name}, head_dim={head_dim} must be "
                         f"{fmt.storage_dtype()} [..., {cols}], got {data.dtype} {tuple(data.shape)}")
    if scale.dtype != torch.uint8 or tuple(scale.shape) != (*data.shape[:3], fmt.scale_cols(head_dim)):
        raise ValueError(f"{op}: {name}_scale for format {fmt.name} must be uint8 "
                         f"{(*data.shape[:3], fmt.scale_cols(head_dim))}, got {scale.dtype} {tuple(scale.shape)}")
    rows = data.stride(-1) == 1 and (fmt.is_dense or scale.stride(-1) == 1)
    if not rows and not (name == "v" and not fmt.is_dense and v_channels_by_tokens(data)
                         and v_channels_by_tokens(scale)):
        raise ValueError(f"{op}: the last dim of {name}_data / {name}_scale must be contiguous (or, for a packed V, "
                         f"the tokens of a page: see v_channels_by_tokens), got strides {data.stride()} / "
                         f"{scale.stride()}")
    return fmt


def _check_page_table(op: str, page_table, seq_lens, device: torch.device) -> None:
    num_seqs = seq_lens.shape[0] if isinstance(seq_lens, torch.Tensor) and seq_lens.dim() == 1 else None
    for name, t, dims in (("page_table", page_table, 2), ("seq_lens", seq_lens, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: {name} must be a {dims}-d int32 (or int64) tensor, got "
                             f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
        _check_device(name, t, device)
    if page_table.shape[0] != num_seqs or page_table.stride(-1) != 1 or not seq_lens.is_contiguous():
        raise ValueError(f"{op}: page_table {tuple(page_table.shape)} needs one row per sequence "
                         f"(seq_lens has {num_seqs}) and a contiguous last dim; seq_lens must be contiguous")


def _check_key_rope(op: str, key_rope, num_kv_heads: int, head_dim: int, device: torch.device) -> None:
    if key_rope is None:
        return
    if head_dim < 2 * _MIN_DOT or head_dim & (head_dim - 1):
        raise ValueError(f"{op}: pre-RoPE keys (key_rope) need a power-of-two head_dim >= {2 * _MIN_DOT} in the "
                         f"Triton kernels, got head_dim={head_dim}; use attention_ref")
    want = (num_kv_heads, 3, head_dim // 2)
    if (not isinstance(key_rope, torch.Tensor) or key_rope.dtype != torch.float32 or tuple(key_rope.shape) != want
            or not key_rope.is_contiguous()):
        got = (key_rope.dtype, tuple(key_rope.shape)) if isinstance(key_rope, torch.Tensor) else type(key_rope).__name__
        raise ValueError(f"{op}: key_rope must be a contiguous float32 [Hkv, 3, D/2] = {list(want)} table "
                         f"(kernels/rope.py key_rope_table), got {got}")
    _check_device("key_rope", key_rope, device)


def _check_common(op: str, q, k_data, k_scale, v_data, v_scale, page_table, seq_lens, k_format, v_format,
                  scale, sliding_window, key_rope) -> tuple[KVFormat, KVFormat]:
    """Validate what decode and prefill share; returns the parsed K and V formats."""
    _check_query(op, q)
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    k_fmt = _check_cache(op, "k", k_data, k_scale, k_format, head_dim, q.device)
    v_fmt = _check_cache(op, "v", v_data, v_scale, v_format, head_dim, q.device)
    if tuple(k_data.shape[:3]) != tuple(v_data.shape[:3]):
        raise ValueError(f"{op}: k_data {tuple(k_data.shape)} and v_data {tuple(v_data.shape)} must share "
                         "[pages, page_size, Hkv]")
    num_kv_heads = k_data.shape[2]
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"{op}: Hq={num_q_heads} (q {tuple(q.shape)}) must be a multiple of "
                         f"Hkv={num_kv_heads} (k_data {tuple(k_data.shape)})")
    _check_page_table(op, page_table, seq_lens, q.device)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite float, got {scale!r}")
    if not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window < 0:
        raise ValueError(f"{op}: sliding_window must be an int >= 0 (0: none), got {sliding_window!r}")
    _check_key_rope(op, key_rope, num_kv_heads, head_dim, q.device)
    return k_fmt, v_fmt


def _cache_args(k_data, k_scale, v_data, v_scale, k_fmt, v_fmt) -> list:
    # a dense format's scale tensor is empty (maybe a null pointer): pass its data tensor, never read
    k_scale_arg = k_data if k_fmt.is_dense else k_scale
    v_scale_arg = v_data if v_fmt.is_dense else v_scale
    return [k_data, k_scale_arg, *_cache_strides(k_data, k_scale, k_fmt),
            v_data, v_scale_arg, *_cache_strides(v_data, v_scale, v_fmt)]


def _check_num_splits(num_splits) -> int:
    """num_splits, checked."""
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"paged_decode_attention: num_splits must be an int in [1, {_MAX_SPLITS}], got {num_splits!r}")
    return num_splits


def _decode_workspace(q: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split kernel's float32 partials: (acc [B, Hq, num_splits, D], (max, sum) [B, Hq, num_splits, 2])."""
    batch, num_q_heads, head_dim = q.shape
    return (torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device),
            torch.empty(batch, num_q_heads, num_splits, 2, dtype=torch.float32, device=q.device))


def paged_decode_attention(
    q: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor, v_data: torch.Tensor, v_scale: torch.Tensor,
    page_table: torch.Tensor, seq_lens: torch.Tensor, k_format: str, v_format: str, scale: float,
    sliding_window: int = 0, num_splits: int | None = None, *, key_rope: torch.Tensor | None = None,
    kernel: str | None = None, block_n: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, prefetch: bool | None = None, ablate: int = 0,
) -> torch.Tensor:
    """Attention of one query per sequence (q [B, Hq, D], the last token of each) over its paged
    context: out [B, Hq, D] in q's dtype, = attention_ref with query_start = arange(B + 1)
    (key_rope: pre-RoPE keys, as there).

    num_splits: context slices per sequence (flash-decoding); None picks it from B * Hkv, the SM
    count and the page table's capacity (page_table.shape[1] * page_size, min sliding_window), so it
    never reads seq_lens back to the host (CUDA-graph safe). kernel ("tiles", "blocks", "diag", "i8k"
    or "i8t", see DecodeConfig), block_n (tokens per iteration, a power of two >= 16), num_warps,
    num_stages and prefetch override the launch config (pick_decode_config: tuned per device, shape and
    that capacity, or the default).
    ablate (benchmarks only; 4/8-bit and dense formats; ABLATIONS): "tiles" 1 runs the loop's loads and
    nothing else, 2 loads and decodes; "i8k" / "i8t" 3 leave the V stage out, 4 the K stage (every key
    scores 0); 5 (each of them) the whole loop: the programs' setup and stores only (zeros out). The
    output is then not attention.
    """
    k_fmt, v_fmt = _check_common("paged_decode_attention", q, k_data, k_scale, v_data, v_scale, page_table,
                                 seq_lens, k_format, v_format, scale, sliding_window, key_rope)
    batch, num_q_heads, head_dim = q.shape
    if page_table.shape[0] != batch:
        raise ValueError(f"paged_decode_attention: q has {batch} sequences (one query each), but seq_lens / "
                         f"page_table have {page_table.shape[0]}")
    page_size, num_kv_heads = k_data.shape[1], k_data.shape[2]
    group = num_q_heads // num_kv_heads
    v_t = v_channels_by_tokens(v_data)
    if v_t and not decode_kernel_supports("i8t", k_fmt, v_fmt, head_dim, key_rope is not None, q.dtype):
        raise ValueError(f"paged_decode_attention: V stored channels by tokens is read only by kernel='i8t', which "
                         f"does not run K {k_fmt.name}, V {v_fmt.name}, head_dim {head_dim}, {q.dtype} queries"
                         f"{' with pre-RoPE keys' if key_rope is not None else ''}; store V row by row")
    capacity = page_table.shape[1] * page_size  # the longest context this launch serves (a graph's width)
    if sliding_window > 0:
        capacity = min(capacity, sliding_window)
    config = _decode_launch_config(k_fmt, v_fmt, q, group, key_rope is not None, kernel, block_n, num_warps,
                                   num_stages, prefetch, "channels" if v_t else "rows", capacity)
    if config.kernel == "i8t" and not v_t:
        if kernel is not None:
            raise ValueError(f"paged_decode_attention: kernel='i8t' reads V stored channels by tokens "
                             f"(v_channels_by_tokens: strides slot 1, column page_size), got v_data strides "
                             f"{v_data.stride()}; use to_channels_by_tokens, or kernel='i8k'")
        config = DecodeConfig(**{**config.to_dict(), "kernel": "i8k"})  # a tuned "i8t" over a row-major V
    if v_t and config.kernel != "i8t":
        raise ValueError(f"paged_decode_attention: V stored channels by tokens (v_data strides {v_data.stride()}) "
                         f"is read only by kernel='i8t', not {config.kernel!r}")
    if num_splits is None:
        num_splits = auto_num_splits(batch, num_kv_heads, capacity, _sm_count(q.device), config.programs_per_sm,
                                     config.min_split_tokens)
    num_splits = _check_num_splits(num_splits)

    out = torch.empty_like(q)
    if batch == 0:
        return out
    d_pad = _head_dim_pad(head_dim)
    split = num_splits > 1
    ws_acc, ws_ml = _decode_workspace(q, num_splits) if split else (out, out)  # (out: not written)
    kernel, constexprs = _decode_constexprs(config, k_fmt, v_fmt, head_dim, group, q.dtype, q.device, page_size,
                                            split, key_rope is not None)
    rope_args = [] if config.kernel != "tiles" else [q if key_rope is None else key_rope]  # (q: not read)
    # i8k / i8t: the strides between V's byte columns and between its scale columns
    column_args = [v_data.stride(3), v_scale.stride(3)] if config.kernel in ("i8k", "i8t") else []
    if ablate:
        if ablate not in ABLATIONS.get(config.kernel, ()) or any(
                not f.is_dense and f.mantissa_bits == 6 for f in (k_fmt, v_fmt)):
            raise ValueError(f"paged_decode_attention: ablate={ablate!r} with the {config.kernel!r} kernel; "
                             f"ablations are {ABLATIONS} (kernel: values), 4/8-bit or dense formats only")
        constexprs["ABLATE"] = ablate
    kernel[(num_kv_heads, num_splits, batch)](
        q, q.stride(0), q.stride(1),
        *_cache_args(k_data, k_scale, v_data, v_scale, k_fmt, v_fmt),
        page_table, page_table.stride(0), seq_lens, *rope_args,
        out, out.stride(0), out.stride(1),
        ws_acc, ws_ml, num_splits, float(scale) * _LOG2E, sliding_window, *column_args,
        **constexprs, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split:
        _decode_reduce_kernel[(num_q_heads, batch)](
            ws_acc, ws_ml, out, out.stride(0), out.stride(1), num_splits,
            D=head_dim, D_PAD=d_pad, SPLITS_PAD=next_pow2(num_splits), num_warps=4,
        )
    return out


def _decode_constexprs(config: DecodeConfig, k_fmt: KVFormat, v_fmt: KVFormat, head_dim: int, group: int,
                       dtype: torch.dtype, device: torch.device, page_size: int, split: bool, pre_rope: bool):
    """(the decode kernel of config.kernel, its constexprs) for these formats and shapes."""
    common = dict(G=group, D=head_dim, PAGE_SIZE=page_size, BLOCK_N=config.block_n, SPLIT=split)
    g_pad = max(_MIN_DOT, next_pow2(group))
    if config.kernel == "tiles":
        prefetch = config.prefetch and all(f.is_dense or f.mantissa_bits != 6 for f in (k_fmt, v_fmt))
        return _paged_decode_kernel, dict(common, G_PAD=g_pad, D_PAD=_head_dim_pad(head_dim),
                                          PREFETCH=prefetch, ABLATE=0,
                                          **_kernel_meta(k_fmt, v_fmt, dtype, device, pre_rope))
    if config.kernel in ("i8k", "i8t"):
        d_pad = _head_dim_pad(head_dim)
        nb_pad = d_pad // k_fmt.block
        v_meta = _format_meta(v_fmt, "V", tl.bfloat16, device)
        return _paged_decode_i8k_kernel, dict(common, D_PAD=d_pad, NB_PAD=nb_pad,
                                              NCOL=max(_MIN_DOT, next_pow2(group) * nb_pad),
                                              K_NB=head_dim // k_fmt.block, K_BLOCK=k_fmt.block,
                                              K_PHASES=2 if k_fmt.mantissa_bits == 4 else 1,
                                              **v_meta, UPCAST_DOT=INTERPRETED, ABLATE=0, V_T=config.kernel == "i8t")
    dot_dtype, precision = _dot_config(dtype, k_fmt, v_fmt)
    common.update(PREFETCH=config.prefetch, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
                  UPCAST_DOT=INTERPRETED and dot_dtype == tl.bfloat16)
    if config.kernel == "blocks":
        return _paged_decode_blocks_kernel, dict(common, G_PAD=g_pad,
                                                 **_blocks_format_meta(k_fmt, "K", head_dim, dot_dtype, device),
                                                 **_blocks_format_meta(v_fmt, "V", head_dim, dot_dtype, device))
    return _paged_decode_diag_kernel, dict(common, **_diag_meta(k_fmt, v_fmt, head_dim, group, dot_dtype, device))


def decode_kernel_spec(kernel: str, k_fmt: KVFormat, v_fmt: KVFormat, head_dim: int, group: int, dtype: torch.dtype,
                       config: DecodeConfig, asm: bool = True, page_size: int = 16, split: bool = True):
    """(jit function, constexprs, {pointer argument: Triton type}) of a decode kernel as the launcher
    would run it on CUDA (asm: the inline-PTX decode where it applies), for compiling it ahead of time."""
    config = DecodeConfig(**{**config.to_dict(), "kernel": kernel})
    device = torch.device("cuda" if asm else "cpu")  # the PTX decode is only picked for CUDA
    fn, constexprs = _decode_constexprs(config, k_fmt, v_fmt, head_dim, group, dtype, device, page_size, split, False)
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    pointers = dict(q_ptr=f"*{names[dtype]}", out_ptr=f"*{names[dtype]}", key_rope_ptr=f"*{names[dtype]}",
                    page_table_ptr="*i32", seq_lens_ptr="*i32", ws_acc_ptr="*fp32", ws_ml_ptr="*fp32")
    for side, fmt in (("k", k_fmt), ("v", v_fmt)):
        storage = "*u8" if not fmt.is_dense else f"*{names[fmt.storage_dtype()]}"
        pointers.update({f"{side}_data_ptr": storage, f"{side}_scale_ptr": storage})
    return fn, {k: v for k, v in constexprs.items() if k in fn.arg_names}, pointers


def _decode_launch_config(k_fmt: KVFormat, v_fmt: KVFormat, q: torch.Tensor, group: int, pre_rope: bool,
                          kernel: str | None, block_n: int | None, num_warps: int | None, num_stages: int | None,
                          prefetch: bool | None, v_layout: str = "rows", context: int | None = None) -> DecodeConfig:
    """pick_decode_config with the caller's overrides; an explicit kernel that cannot run these
    formats is an error (a picked one falls back to "tiles")."""
    config = pick_decode_config(k_fmt, v_fmt, q.shape[2], group, q.dtype, q.device, pre_rope, v_layout, context)
    if kernel is not None and kernel in DECODE_KERNELS and not decode_kernel_supports(kernel, k_fmt, v_fmt, q.shape[2],
                                                                                      pre_rope, q.dtype):
        raise ValueError(f"paged_decode_attention: kernel={kernel!r} does not run K {k_fmt.name}, V {v_fmt.name}, "
                         f"head_dim {q.shape[2]}, {q.dtype} queries{' with pre-RoPE keys' if pre_rope else ''} "
                         "(see decode_kernel_supports); use kernel='tiles'")
    overrides = dict(kernel=kernel, block_n=block_n, num_warps=num_warps, num_stages=num_stages, prefetch=prefetch)
    overrides = {name: value for name, value in overrides.items() if value is not None}
    try:
        config = DecodeConfig(**{**config.to_dict(), **overrides}) if overrides else config
    except ValueError as exc:
        raise ValueError(f"paged_decode_attention: {exc}") from None
    fault = known_decode_fault(config, k_fmt, v_fmt, q.device)
    if fault is not None:
        raise DecodeLaunchFault(f"paged_decode_attention: {fault}")
    return config


class DecodeLaunchFault(ValueError):
    """A decode launch refused because it is known to fault on this device (known_decode_fault)."""


def known_decode_fault(config: DecodeConfig, k_fmt: KVFormat, v_fmt: KVFormat, device) -> str | None:
    """Why a launch is known to fault on this device (an illegal memory access, which ends the process's
    CUDA context), or None. Measured on the H200 with Triton 3.6 (benchmarks/decode_variant_probe.py,
    BENCHMARKS.md, eighth session): "tiles" over dense K and V with 4 warps, one stage and no register
    prefetch, at 64, 128 and 256 keys a tile; the same launch is exact under the interpreter."""
    if (torch.device(device).type == "cuda" and config.kernel == "tiles" and k_fmt.is_dense and v_fmt.is_dense
            and config.num_warps == 4 and config.num_stages == 1 and not config.prefetch):
        return ("kernel='tiles' over dense K/V with num_warps=4, num_stages=1 and no prefetch faults on CUDA "
                "(an illegal memory access, measured on the H200 with Triton 3.6); use num_stages >= 2, "
                "num_warps=2 or prefetch=True")
    return None


def _diag_meta(k_fmt: KVFormat, v_fmt: KVFormat, head_dim: int, group: int, dot_dtype, device: torch.device) -> dict:
    """Constexprs of _paged_decode_diag_kernel: the shared block count, the dots' columns, per format."""
    nb_pad = max([next_pow2(head_dim // f.block) for f in (k_fmt, v_fmt) if not f.is_dense], default=1)
    meta = dict(NB_PAD=nb_pad, NCOL=max(_MIN_DOT, next_pow2(group) * nb_pad))
    for fmt, prefix in ((k_fmt, "K"), (v_fmt, "V")):
        d_pad, block = _diag_row(fmt, head_dim, nb_pad)
        bits = torch.finfo(fmt.storage_dtype()).bits if fmt.is_dense else fmt.mantissa_bits
        phases = 2 if not fmt.is_dense and bits == 4 else 1
        per_value = 1 if fmt.is_dense else bits / 8  # stored elements per value
        asm = _ptx_decodes(fmt, dot_dtype, device)
        meta.update({f"{prefix}_BITS": bits, f"{prefix}_MXFP4": fmt.kind == "mxfp4",
                     f"{prefix}_PACKED": not fmt.is_dense, f"{prefix}_ASM": asm,
                     f"{prefix}_NB": nb_pad if fmt.is_dense else head_dim // fmt.block,
                     f"{prefix}_BLOCK": block, f"{prefix}_PHASES": phases, f"{prefix}_DPH": d_pad // phases,
                     f"{prefix}_WIDTH": int(d_pad * per_value), f"{prefix}_VALID": int(head_dim * per_value)})
    return meta


def _blocks_format_meta(fmt: KVFormat, prefix: str, head_dim: int, dot_dtype, device: torch.device) -> dict:
    """Constexprs of one cache format for _paged_decode_blocks_kernel."""
    if fmt.is_dense:
        block = _head_dim_pad(head_dim)
        meta = dict(BITS=torch.finfo(fmt.storage_dtype()).bits, MXFP4=False, PACKED=False, ASM=False, BLOCK=block,
                    NB=1, NB_PAD=1, PHASES=1, BW=block)
    else:
        bits, phases = fmt.mantissa_bits, 2 if fmt.mantissa_bits == 4 else 1
        asm = _ptx_decodes(fmt, dot_dtype, device)
        meta = dict(BITS=bits, MXFP4=fmt.kind == "mxfp4", PACKED=True, ASM=asm, BLOCK=fmt.block,
                    NB=head_dim // fmt.block, NB_PAD=next_pow2(head_dim // fmt.block), PHASES=phases,
                    BW=fmt.block // phases)
    return {f"{prefix}_{name}": value for name, value in meta.items()}


def _query_tiles(query_start: torch.Tensor, num_tokens: int, tokens_per_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, tile index within the sequence) of each query tile, padded to a bound known on the
    host (T / tokens_per_tile + S); padding tiles get sequence S. Torch ops only, no host sync."""
    num_seqs = query_start.shape[0] - 1
    bound = num_tokens // tokens_per_tile + num_seqs
    lengths = (query_start[1:] - query_start[:-1]).to(torch.int64)
    tiles = (lengths + tokens_per_tile - 1) // tokens_per_tile
    ends = torch.cumsum(tiles, 0)
    ids = torch.arange(bound, device=query_start.device)
    seq = torch.searchsorted(ends, ids, right=True)
    first = (ends - tiles)[seq.clamp(max=num_seqs - 1)]
    return seq.to(torch.int32), (ids - first).to(torch.int32)


def _check_query_start(op: str, query_start, num_seqs: int, device: torch.device) -> None:
    if (not isinstance(query_start, torch.Tensor) or query_start.dim() != 1 or query_start.shape[0] != num_seqs + 1
            or query_start.dtype not in (torch.int32, torch.int64) or not query_start.is_contiguous()):
        got = ((query_start.dtype, tuple(query_start.shape)) if isinstance(query_start, torch.Tensor)
               else type(query_start).__name__)
        raise ValueError(f"{op}: query_start must be a contiguous int32 (or int64) tensor [S + 1] = "
                         f"[{num_seqs + 1}], got {got}")
    _check_device("query_start", query_start, device)


def _prefill_decodes_pages_first(decode_pages: bool | None, k_fmt: KVFormat, v_fmt: KVFormat, num_tokens: int,
                                 num_seqs: int, tokens_per_tile: int) -> bool:
    """Whether the prefill kernel reads a decoded copy of the step's pages instead of the packed cache:
    asked for (decode_pages), or by default when a format is packed and the step averages at least
    _DECODE_PAGES_MIN_TILES query tiles per sequence (the kernel decodes a key once per query tile
    that sees it, so a long chunk decodes its context many times over)."""
    if k_fmt.is_dense and v_fmt.is_dense:
        return False
    if decode_pages is not None:
        return bool(decode_pages)
    return num_tokens >= _DECODE_PAGES_MIN_TILES * tokens_per_tile * num_seqs


def _decoded_pages(k_data, k_scale, v_data, v_scale, page_table, k_fmt: KVFormat, v_fmt: KVFormat, head_dim: int,
                   dot_dtype, capped: bool = True) -> tuple[list, torch.Tensor, KVFormat, KVFormat] | None:
    """The pages `page_table` names, gathered in table order and the packed ones decoded (to bf16 when
    the dots run in bf16, where BFP and MXFP4 values are exact, else float32): ([k_data, k_scale,
    v_data, v_scale] of a dense cache of S * W pages, its page table, the two formats). None when the
    copy would pass _DECODE_PAGES_MAX_BYTES (if capped) or does not fit in free memory (the caller reads
    the packed cache instead). Table entries past a sequence's pages may hold any id; they are clamped, never read."""
    pages = page_table.reshape(-1).to(torch.int64).clamp(0, k_data.shape[0] - 1)
    dtype = torch.bfloat16 if dot_dtype == tl.bfloat16 else torch.float32
    per_page = k_data.shape[1] * k_data.shape[2] * head_dim * 2 * torch.empty((), dtype=dtype).element_size()
    if capped and pages.numel() * per_page > _DECODE_PAGES_MAX_BYTES:
        return None
    out, fmts = [], []
    try:
        for data, scale_, fmt in ((k_data, k_scale, k_fmt), (v_data, v_scale, v_fmt)):
            rows = data.index_select(0, pages).contiguous()  # (rows, whatever the cache's layout)
            if not fmt.is_dense:
                rows = dequantize(rows, scale_.index_select(0, pages), fmt, head_dim, dtype)
                fmt = parse_kv_format("bfloat16" if dtype == torch.bfloat16 else "float32")
            out += [rows, rows.new_empty(*rows.shape[:3], 0, dtype=torch.uint8)]
            fmts.append(fmt)
    except torch.OutOfMemoryError:
        return None
    table = torch.arange(pages.numel(), dtype=torch.int32, device=page_table.device).view(page_table.shape)
    return out, table, fmts[0], fmts[1]


def paged_prefill_attention(
    q: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor, v_data: torch.Tensor, v_scale: torch.Tensor,
    page_table: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor, k_format: str, v_format: str,
    scale: float, sliding_window: int = 0, *, key_rope: torch.Tensor | None = None, block_m: int = 64,
    block_n: int = 64, num_warps: int = 4, num_stages: int = 2, decode_pages: bool | None = None,
) -> torch.Tensor:
    """Causal attention of a variable-length, possibly chunked batch (q [T, Hq, D]) over the paged
    cache, the new tokens' K/V already written: out [T, Hq, D] in q's dtype, = attention_ref
    (key_rope: pre-RoPE keys, as there).

    A chunk of n queries of sequence s sits at positions seq_lens[s] - n .. seq_lens[s] - 1 and sees
    every earlier token (earlier chunks) and its own chunk causally, all read in the cache's format.
    block_m (rows = query tokens x group heads per tile), block_n (keys per iteration), num_warps and
    num_stages are tuning knobs (powers of two >= 16 for the blocks).

    With a packed format the kernel can read the cache two ways, with the same values in its dots:
    decoding each key tile in the loop (once per query tile that sees it), or from a copy of the
    step's pages decoded once (see _decoded_pages; memory S x W pages in bf16 or float32).
    decode_pages picks one (True: the copy, False: in the loop); None (default) takes the copy when
    the step averages at least _DECODE_PAGES_MIN_TILES query tiles per sequence.
    """
    op = "paged_prefill_attention"
    k_fmt, v_fmt = _check_common(op, q, k_data, k_scale, v_data, v_scale, page_table, seq_lens,
                                 k_format, v_format, scale, sliding_window, key_rope)
    num_seqs = seq_lens.shape[0]
    _check_query_start(op, query_start, num_seqs, q.device)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = k_data.shape[2], k_data.shape[1]
    group = num_q_heads // num_kv_heads
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < _MIN_DOT or size & (size - 1):
            raise ValueError(f"{op}: {name} must be a power of two >= 16, got {size}")
    block_m = max(block_m, next_pow2(group))  # at least one query token per tile
    tokens_per_tile = block_m // group

    out = torch.zeros_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    v_t = v_channels_by_tokens(v_data)  # read only through the decoded copy
    if _prefill_decodes_pages_first(True if v_t else decode_pages, k_fmt, v_fmt, num_tokens, num_seqs,
                                    tokens_per_tile):
        decoded = _decoded_pages(k_data, k_scale, v_data, v_scale, page_table, k_fmt, v_fmt, head_dim,
                                 _dot_config(q.dtype, k_fmt, v_fmt)[0], capped=not v_t)  # (a must for v_t)
        if decoded is not None:
            (k_data, k_scale, v_data, v_scale), page_table, k_fmt, v_fmt = decoded
    if v_channels_by_tokens(v_data):
        raise ValueError(f"{op}: V stored channels by tokens is read through a decoded copy of the step's pages, "
                         "which did not fit in GPU memory; use fewer tokens a step (max_num_batched_tokens) or "
                         "v_layout='rows'")
    tile_seq, tile_index = _query_tiles(query_start, num_tokens, tokens_per_tile)
    _paged_prefill_kernel[(tile_seq.shape[0], num_kv_heads)](
        q, q.stride(0), q.stride(1),
        *_cache_args(k_data, k_scale, v_data, v_scale, k_fmt, v_fmt),
        page_table, page_table.stride(0), seq_lens, query_start, tile_seq, tile_index,
        q if key_rope is None else key_rope,  # (q: not read)
        out, out.stride(0), out.stride(1), num_seqs, float(scale) * _LOG2E, sliding_window,
        G=group, D=head_dim, D_PAD=_head_dim_pad(head_dim), PAGE_SIZE=page_size,
        BLOCK_M=block_m, TOKENS_PER_TILE=tokens_per_tile, BLOCK_N=block_n,
        **_kernel_meta(k_fmt, v_fmt, q.dtype, q.device, key_rope is not None), num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def _one_query_per_sequence(query_start: torch.Tensor, num_tokens: int) -> bool:
    num_seqs = query_start.shape[0] - 1
    if num_tokens != num_seqs:
        return False
    if query_start.is_cuda and torch.cuda.is_current_stream_capturing():
        return True  # no host sync inside a capture: T == S is taken to mean a pure decode batch
    return bool(torch.equal(query_start, torch.arange(num_seqs + 1, device=query_start.device,
                                                      dtype=query_start.dtype)))


def attention_triton(
    q: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor, v_data: torch.Tensor, v_scale: torch.Tensor,
    page_table: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
    k_format: str, v_format: str, scale: float, sliding_window: int, key_rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """Drop-in for attention_ref (same signature and semantics): the decode kernel when every
    sequence has exactly one query, the prefill kernel otherwise.

    Telling the two apart reads query_start back to the host when T == S (one small sync), except
    during CUDA-graph capture, where T == S is taken as a pure decode batch.
    """
    if isinstance(query_start, torch.Tensor) and _one_query_per_sequence(query_start, q.shape[0]):
        return paged_decode_attention(q, k_data, k_scale, v_data, v_scale, page_table, seq_lens,
                                      k_format, v_format, scale, sliding_window, key_rope=key_rope)
    return paged_prefill_attention(q, k_data, k_scale, v_data, v_scale, page_table, query_start, seq_lens,
                                   k_format, v_format, scale, sliding_window, key_rope=key_rope)
