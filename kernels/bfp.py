"""Block floating point (BFP12/14/16) and MXFP4 quantization of KV-cache rows.

A row is the last dim of a tensor [..., head_dim]. It is cut into blocks of `block` consecutive
values (blocks never cross rows, hence never cross heads); each block shares one 8-bit exponent and
each value keeps a signed m-bit code. Formats and their sizes: kernels/formats.py (KVFormat).

Quantization rules (the torch reference and the Triton kernel follow them step for step and agree
bit for bit):
  1. Inputs are read as float32 (bf16/fp16 upcast exactly). Values in the float32 denormal range
     (|x| < 2^-126) are flushed to 0, as a GPU does under FTZ, so CPU and GPU agree. (fp16/bf16
     denormals are normal numbers in float32 and are kept.) NaN/Inf: a block holding one gets scale
     byte 255 (the E8M0 NaN) and all-zero codes, so it dequantizes to NaN as a whole; `quantize`
     then raises ValueError, unless check_finite=False (the check reads the scales back to the host,
     which a CUDA graph capture cannot do; it is skipped while a capture is running).
  2. Shared exponent: amax = max |x| over the block, e = floor(log2(amax)) read exactly from the
     float32 exponent bits. The block scale is 2^s with s = e - EMAX, EMAX = m - 2 for BFP (the
     largest value lands in the top binade [2^(m-2), 2^(m-1)) of the mantissa) and EMAX = 2 for
     MXFP4 (the OCP MX rule: scale = 2^(floor(log2 amax) - emax_elem), emax of E2M1 = 2).
  3. Scale byte = s + 127 (E8M0: the byte is a biased power of two), clamped to [1, 254]; for finite
     float32 inputs only the lower clamp ever binds (s >= -126 keeps every scale a normal float;
     values that small then get fewer significant bits). An all-zero block stores scale byte 0 and
     all-zero codes; byte 0 decodes to scale 0.0, so it dequantizes to exact zeros (a spec E8M0
     decoder reads 2^-127 * 0 = 0 as well). Byte 255 marks a non-finite block (rule 1).
  4. Elements: y = x * 2^-s (exact: a power-of-two multiply).
     BFP: q = round_half_to_even(y) clamped to the symmetric range [-(2^(m-1)-1), 2^(m-1)-1]
     (only values rounding up to 2^(m-1) at the very top of the block are clamped; their error is
     < one step, all others are within half a step 2^s / 2). The code is q in m-bit two's
     complement; -2^(m-1) is never written.
     MXFP4: |y| rounds to the nearest E2M1 magnitude {0, 0.5, 1, 1.5, 2, 3, 4, 6}, ties to the even
     code (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4), saturating at 6. The 4-bit
     code is sign<<3 | exp<<1 | man (E2M1, exponent bias 1); -0 is written as +0 (code 0).
  5. Dequantization: value = decode(code) * 2^(scale_byte - 127) (scale 0.0 for byte 0, +inf for
     byte 255), computed in float32 (exact: few significant bits times a power of two), then cast to
     the requested dtype.

Packed layout (everything little-endian, no padding; a block is `block * m / 8` bytes, a row is
blocks back to back, rows back to back):
  data  [..., head_dim * m / 8] uint8. Values are taken in groups of 4 consecutive values
        (v[4g], v[4g+1], v[4g+2], v[4g+3]); the group is the 4m-bit word
            w = c0 | c1 << m | c2 << 2m | c3 << 3m
        stored as m/2 little-endian bytes at byte offset g * m/2 of the row. So:
          m=4 (bfp12, mxfp4): 2 codes per byte, value 2i in the low nibble, 2i+1 in the high nibble;
          m=6 (bfp14): 4 codes in 3 bytes (real 6-bit packing);
          m=8 (bfp16): one int8 per byte.
        Value i of a row: bit = (i % 4) * m, byte = (i // 4) * (m // 2) + bit // 8,
        code = ((data[byte] | data[byte + 1] << 8) >> (bit % 8)) & (2^m - 1)
        (the second byte is only needed for m = 6 when bit % 8 > 2).
  scale [..., head_dim / block] uint8: the scale byte of each block, in order.
Dense formats (float32/bfloat16/float16) store the row itself and an empty [..., 0] scale.

`bfp_decode` is a @triton.jit helper that decodes packed values inline (a fused attention kernel
reading packed pages calls it); the dequantize kernel is built on it.

Dispatch: CUDA tensors go to the Triton kernels; CPU tensors go to the torch references, or to the
Triton interpreter when TRITON_INTERPRET=1 was set when this module was imported. (triton.jit reads
the variable when it decorates, so it decides how the kernels were built; it must be set before
triton itself is first imported, since triton's own library functions are decorated then.)
"""

from __future__ import annotations

import torch

from fxforge.kernels.formats import KVFormat, parse_kv_format, valid_format_names
from fxforge.kernels.triton_support import can_launch, check_launchable, jit, tl, triton

__all__ = [
    "KVFormat", "parse_kv_format", "valid_format_names", "quantize", "dequantize", "fake_quantize",
    "simulate_quantize", "quantize_ref", "dequantize_ref", "quantize_triton", "dequantize_triton",
    "bfp_decode", "FP32_MIN_NORMAL",
]

FP32_MIN_NORMAL = 2.0**-126  # below this, inputs are flushed to zero (rule 1)
FP32_MAX = 3.4028234663852886e38  # |x| <= FP32_MAX is false exactly for NaN and +-Inf
NONFINITE_SCALE = 255  # scale byte of a block holding NaN/Inf (E8M0 NaN)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Values per Triton program and warps per program, from a sweep on H100 (bf16 [32768, 8, 128]):
# quantize ~1.5-1.9 TB/s, dequantize ~2.0-2.3 TB/s for every format.
_QUANTIZE_VALUES_PER_PROGRAM = 512
_DEQUANTIZE_VALUES_PER_PROGRAM = 1024
_NUM_WARPS = 1


def _emax(fmt: KVFormat) -> int:
    """Exponent of the top element binade: the shared scale is 2^(floor(log2 amax) - EMAX)."""
    return 2 if fmt.kind == "mxfp4" else fmt.mantissa_bits - 2


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@jit
def _round_half_even(y):
    # Exact for |y| < 2^22: adding 1.5 * 2^23 moves y where the float32 ulp is 1, so the add itself
    # rounds to an integer, half to even (the FPU's default mode). Works the same in the interpreter.
    return (y + 12582912.0) - 12582912.0


@jit
def pow2(biased):
    # 2^(biased - 127) built from the exponent bits, for biased in [1, 254]; biased = 0 gives 0.0.
    return (biased << 23).to(tl.float32, bitcast=True)


@jit
def _scale_byte(amax, EMAX: tl.constexpr):
    # Rules 2-3: s = floor(log2(amax)) - EMAX, byte = clamp(s + 127, 1, 254); 0 for an all-zero block.
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    biased = tl.minimum(tl.maximum(e - EMAX + 127, 1), 254)
    return tl.where(amax > 0.0, biased, 0)


@jit
def _encode_int(y, MANTISSA_BITS: tl.constexpr):
    # BFP element: round half to even, clamp to the symmetric range, m-bit two's complement.
    qmax = (1 << (MANTISSA_BITS - 1)) - 1
    q = tl.minimum(tl.maximum(_round_half_even(y), -qmax), qmax).to(tl.int32)
    return q & ((1 << MANTISSA_BITS) - 1)


@jit
def _encode_e2m1(y):
    # MXFP4 element: nearest E2M1 magnitude, ties to even code, saturating at 6.0 (code 7).
    v = tl.abs(y)
    mag = tl.where(
        v < 2.0,
        _round_half_even(v * 2.0),  # 0, 0.5, 1, 1.5 (2.0 = code 4) in steps of 0.5
        tl.where(v < 4.0, _round_half_even(v) + 2.0, tl.minimum(_round_half_even(v * 0.5) + 4.0, 7.0)),
    ).to(tl.int32)
    return tl.where((y < 0.0) & (mag > 0), mag | 8, mag)


@jit
def decode_e2m1_bits(code):
    # decode_e2m1 with no int -> float conversion (I2F issues at a quarter rate): the float's bits
    # directly. exp > 0: (1 + man / 2) * 2^(exp - 1) has bits ((exp + 126) << 23) | (man << 22);
    # exp 0: man * 0.5 has bits man * (126 << 23); bit 3 of the code is bit 31 of the float.
    exp = (code >> 1) & 3
    man = code & 1
    bits = tl.where(exp == 0, man * (126 << 23), ((exp + 126) << 23) | (man << 22))
    return (bits | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@jit
def decode_e2m1(code):
    # E2M1 -> float: exp = code bits 1-2, man = bit 0; magnitude in halves is man (exp 0) or
    # (2 + man) << (exp - 1); bit 3 is the sign.
    exp = (code >> 1) & 3
    man = code & 1
    halves = tl.where(exp == 0, man, (2 + man) << tl.maximum(exp - 1, 0))
    sign = 1.0 - 2.0 * ((code >> 3) & 1).to(tl.float32)
    return halves.to(tl.float32) * 0.5 * sign


@jit
def _flush(x):
    # Rule 1 on float32 values: denormals and NaN/Inf become 0, the latter flagged in `finite`.
    finite = tl.abs(x) <= 3.4028234663852886e38
    return tl.where(finite & (tl.abs(x) >= 1.1754943508222875e-38), x, 0.0), finite


@jit
def bfp_decode(
    data_ptr,  # pointer(s) to the first packed byte of each row (or of any block-aligned part of one)
    scale_ptr,  # pointer(s) to the matching first scale byte; both broadcast against cols
    cols,  # int tensor: value indices within that row
    mask,  # bool tensor broadcastable to cols: which values to load (others decode to 0)
    MANTISSA_BITS: tl.constexpr,  # 4, 6 or 8
    MXFP4: tl.constexpr,  # True: E2M1 codes; False: m-bit two's complement integers
    BLOCK: tl.constexpr,  # values per scale byte
):
    """Decode packed values inline to float32 (layout in the module docstring).

    Example, a [BLOCK_N, D] tile of K rows: bfp_decode(k_data_ptr + rows[:, None] * ROW_BYTES,
    k_scale_ptr + rows[:, None] * (D // BLOCK), tl.arange(0, D)[None, :], row_mask[:, None], 4, False, 32).
    """
    bit = (cols % 4) * MANTISSA_BITS
    byte = (cols // 4) * (MANTISSA_BITS // 2) + bit // 8
    shift = bit % 8
    word = tl.load(data_ptr + byte, mask=mask, other=0).to(tl.int32)
    if MANTISSA_BITS == 6:  # a 6-bit code straddles two bytes when it starts above bit 2
        high = tl.load(data_ptr + byte + 1, mask=mask & (shift > 2), other=0).to(tl.int32)
        word = word | (high << 8)
    code = (word >> shift) & ((1 << MANTISSA_BITS) - 1)
    scale = pow2(tl.load(scale_ptr + cols // BLOCK, mask=mask, other=0).to(tl.int32))
    if MXFP4:
        value = decode_e2m1(code)
    else:
        value = (code - ((code >> (MANTISSA_BITS - 1)) << MANTISSA_BITS)).to(tl.float32)
    return value * scale


@jit
def encode_groups(
    first,  # pointers [blocks, BLOCK / 4] to the first value of each group of 4 consecutive values
    live,  # [blocks] mask: blocks to quantize
    MANTISSA_BITS: tl.constexpr,  # 4, 6 or 8 bits per code
    MXFP4: tl.constexpr,  # True: E2M1 elements, EMAX = 2; False: BFP integers, EMAX = m - 2
):
    # encode_values of the groups stored at `first` (masked blocks read as zeros).
    x0 = tl.load(first, mask=live[:, None], other=0.0).to(tl.float32)
    x1 = tl.load(first + 1, mask=live[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(first + 2, mask=live[:, None], other=0.0).to(tl.float32)
    x3 = tl.load(first + 3, mask=live[:, None], other=0.0).to(tl.float32)
    return encode_values(x0, x1, x2, x3, MANTISSA_BITS, MXFP4)


@jit
def encode_values(
    x0,  # float32 [blocks, BLOCK / 4]: value 4g of each group g of a block (x1, x2, x3: values 4g+1..4g+3)
    x1,
    x2,
    x3,
    MANTISSA_BITS: tl.constexpr,  # 4, 6 or 8 bits per code
    MXFP4: tl.constexpr,  # True: E2M1 elements, EMAX = 2; False: BFP integers, EMAX = m - 2
):
    # Rules 1-4 for whole blocks held in registers: the packed 4m-bit word of every group, each
    # block's scale byte, and which blocks hold NaN/Inf (their words are zeroed; callers store scale
    # byte 255 for them). A kernel that computes its values (e.g. rotates them) quantizes them here.
    x0, finite0 = _flush(x0)
    x1, finite1 = _flush(x1)
    x2, finite2 = _flush(x2)
    x3, finite3 = _flush(x3)
    nonfinite = tl.max(tl.where(finite0 & finite1 & finite2 & finite3, 0, 1), axis=1) > 0
    amax = tl.max(tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))), axis=1)
    if MXFP4:
        biased = _scale_byte(amax, 2)
    else:
        biased = _scale_byte(amax, MANTISSA_BITS - 2)
    inv_scale = pow2(254 - biased)[:, None]  # 2^-s
    if MXFP4:
        c0 = _encode_e2m1(x0 * inv_scale)
        c1 = _encode_e2m1(x1 * inv_scale)
        c2 = _encode_e2m1(x2 * inv_scale)
        c3 = _encode_e2m1(x3 * inv_scale)
    else:
        c0 = _encode_int(x0 * inv_scale, MANTISSA_BITS)
        c1 = _encode_int(x1 * inv_scale, MANTISSA_BITS)
        c2 = _encode_int(x2 * inv_scale, MANTISSA_BITS)
        c3 = _encode_int(x3 * inv_scale, MANTISSA_BITS)
    word = (c0.to(tl.int64) | (c1.to(tl.int64) << MANTISSA_BITS) | (c2.to(tl.int64) << (2 * MANTISSA_BITS))
            | (c3.to(tl.int64) << (3 * MANTISSA_BITS)))
    word = tl.where(nonfinite[:, None], 0, word)
    return word, biased, nonfinite


@jit
def _bfp_quantize_kernel(
    x_ptr,  # *fp32|bf16|fp16: contiguous input, n_blocks * BLOCK values (rows back to back)
    data_ptr,  # *uint8 out: n_blocks * BLOCK * MANTISSA_BITS / 8 packed bytes
    scale_ptr,  # *uint8 out: n_blocks scale bytes
    n_blocks,  # number of blocks (x.numel() // BLOCK; BLOCK divides head_dim, so none crosses a row)
    MANTISSA_BITS: tl.constexpr,  # 4, 6 or 8 bits per code
    MXFP4: tl.constexpr,  # True: E2M1 elements, EMAX = 2; False: BFP integers, EMAX = m - 2
    BLOCK: tl.constexpr,  # values per shared exponent (16, 32, 64)
    BLOCKS_PER_PROGRAM: tl.constexpr,  # blocks one program quantizes (power of two)
):
    pid = tl.program_id(0).to(tl.int64)
    blocks = pid * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    live = blocks < n_blocks
    groups = tl.arange(0, BLOCK // 4)[None, :]
    first = blocks[:, None] * BLOCK + groups * 4  # first value of each group of 4
    # one tensor per position in the group, so the 4 codes of a group can be packed side by side
    word, biased, nonfinite = encode_groups(x_ptr + first, live, MANTISSA_BITS, MXFP4)
    group_bytes = data_ptr + blocks[:, None] * (BLOCK * MANTISSA_BITS // 8) + groups * (MANTISSA_BITS // 2)
    for j in tl.static_range(MANTISSA_BITS // 2):
        tl.store(group_bytes + j, ((word >> (8 * j)) & 0xFF).to(tl.uint8), mask=live[:, None])
    tl.store(scale_ptr + blocks, tl.where(nonfinite, 255, biased).to(tl.uint8), mask=live)


@jit
def _bfp_dequantize_kernel(
    data_ptr,  # *uint8: n_blocks * BLOCK * MANTISSA_BITS / 8 packed bytes
    scale_ptr,  # *uint8: n_blocks scale bytes
    out_ptr,  # *fp32|bf16|fp16 out: n_blocks * BLOCK values
    n_blocks,  # number of blocks
    MANTISSA_BITS: tl.constexpr,  # 4, 6 or 8 bits per code
    MXFP4: tl.constexpr,  # True: E2M1 codes; False: two's complement integers
    BLOCK: tl.constexpr,  # values per shared exponent
    BLOCKS_PER_PROGRAM: tl.constexpr,  # blocks one program decodes (power of two)
):
    pid = tl.program_id(0).to(tl.int64)
    blocks = pid * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    live = (blocks < n_blocks)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    values = bfp_decode(data_ptr + blocks[:, None] * (BLOCK * MANTISSA_BITS // 8), scale_ptr + blocks[:, None],
                        cols, live, MANTISSA_BITS, MXFP4, BLOCK)
    tl.store(out_ptr + blocks[:, None] * BLOCK + cols, values.to(out_ptr.dtype.element_ty), mask=live)


# ----------------------------------------------------------------------------------------------
# Validation shared by the references and the launchers
# ----------------------------------------------------------------------------------------------


def _as_format(fmt: KVFormat | str) -> KVFormat:
    return parse_kv_format(fmt) if isinstance(fmt, str) else fmt


def _check_input(x: torch.Tensor, fmt: KVFormat) -> int:
    """Validate a tensor to quantize; returns head_dim."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"quantize: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize: x has dtype {x.dtype}; expected one of float32, bfloat16, float16")
    if x.dim() == 0:
        raise ValueError("quantize: x must have a last dim (head_dim); got a 0-d tensor")
    head_dim = x.shape[-1]
    fmt.check_head_dim(head_dim)
    return head_dim


def _raise_if_nonfinite(x: torch.Tensor, scale: torch.Tensor, fmt: KVFormat) -> None:
    """Rule 1: reject NaN/Inf by reading back the scale bytes (small) instead of all of x."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # no host sync inside a CUDA graph capture; such blocks decode to NaN
    bad_blocks = int((scale == NONFINITE_SCALE).sum())
    if bad_blocks:
        raise ValueError(f"quantize to {fmt.name}: x {tuple(x.shape)} holds NaN or Inf in {bad_blocks} "
                         f"block(s) of {fmt.block}; a shared exponent cannot represent them "
                         "(check_finite=False stores them as NaN blocks)")


def _check_packed(data: torch.Tensor, scale: torch.Tensor, fmt: KVFormat, head_dim: int, dtype) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dequantize: dtype={dtype}; expected one of float32, bfloat16, float16")
    fmt.check_head_dim(head_dim)
    want = fmt.row_bytes(head_dim) // data.element_size() if fmt.is_dense else fmt.row_bytes(head_dim)
    if data.dtype != fmt.storage_dtype() or data.dim() == 0 or data.shape[-1] != want:
        raise ValueError(f"dequantize {fmt.name}, head_dim={head_dim}: data must be {fmt.storage_dtype()} "
                         f"[..., {want}], got {data.dtype} {tuple(data.shape)}")
    cols = fmt.scale_cols(head_dim)
    if scale.dtype != torch.uint8 or scale.shape != (*data.shape[:-1], cols):
        raise ValueError(f"dequantize {fmt.name}, head_dim={head_dim}: scale must be uint8 "
                         f"{(*data.shape[:-1], cols)}, got {scale.dtype} {tuple(scale.shape)}")


def _dense_quantize(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    return x.to(fmt.storage_dtype()), torch.empty(*x.shape[:-1], 0, dtype=torch.uint8, device=x.device)


# ----------------------------------------------------------------------------------------------
# float32 torch references (the CPU path and the test oracle)
# ----------------------------------------------------------------------------------------------


def _pow2_ref(biased: torch.Tensor) -> torch.Tensor:
    return (biased.to(torch.int32) << 23).view(torch.float32)


def _scale_byte_ref(amax: torch.Tensor, emax: int) -> torch.Tensor:
    e = ((amax.view(torch.int32) >> 23) & 0xFF) - 127
    biased = (e - emax + 127).clamp(1, 254)
    return torch.where(amax > 0, biased, 0)


def _encode_int_ref(y: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    qmax = 2 ** (mantissa_bits - 1) - 1
    q = torch.round(y).clamp(-qmax, qmax).to(torch.int32)  # torch.round: half to even
    return q & (2**mantissa_bits - 1)


def _encode_e2m1_ref(y: torch.Tensor) -> torch.Tensor:
    v = y.abs()
    mag = torch.where(
        v < 2, torch.round(v * 2), torch.where(v < 4, torch.round(v) + 2, (torch.round(v * 0.5) + 4).clamp(max=7))
    ).to(torch.int32)
    return torch.where((y < 0) & (mag > 0), mag | 8, mag)


def _decode_e2m1_ref(code: torch.Tensor) -> torch.Tensor:
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], device=code.device)
    return grid[code.long()]


def _pack_ref(codes: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """codes [..., D] (m-bit, in int32) -> bytes [..., D * m / 8]: groups of 4 codes as m/2 bytes."""
    groups = codes.to(torch.int64).unflatten(-1, (-1, 4))
    word = sum(groups[..., k] << (k * mantissa_bits) for k in range(4))
    packed = torch.stack([(word >> (8 * j)) & 0xFF for j in range(mantissa_bits // 2)], dim=-1)
    return packed.flatten(-2).to(torch.uint8)


def _unpack_ref(data: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """Inverse of _pack_ref: bytes [..., D * m / 8] -> unsigned m-bit codes [..., D] in int32."""
    groups = data.to(torch.int64).unflatten(-1, (-1, mantissa_bits // 2))
    word = sum(groups[..., j] << (8 * j) for j in range(mantissa_bits // 2))
    codes = torch.stack([(word >> (k * mantissa_bits)) & (2**mantissa_bits - 1) for k in range(4)], dim=-1)
    return codes.flatten(-2).to(torch.int32)


def quantize_ref(x: torch.Tensor, fmt: KVFormat | str, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `quantize`: (data uint8 [..., row_bytes], scale uint8 [..., head_dim/block])."""
    fmt = _as_format(fmt)
    head_dim = _check_input(x, fmt)
    if fmt.is_dense:
        return _dense_quantize(x, fmt)
    blocks = x.float().unflatten(-1, (head_dim // fmt.block, fmt.block))
    finite = blocks.abs() <= FP32_MAX  # rule 1
    nonfinite = ~finite.all(dim=-1)
    blocks = torch.where(finite & (blocks.abs() >= FP32_MIN_NORMAL), blocks, 0.0)
    biased = _scale_byte_ref(blocks.abs().amax(dim=-1), _emax(fmt))  # rules 2-3
    y = blocks * _pow2_ref(254 - biased).unsqueeze(-1)  # rule 4: x * 2^-s
    codes = _encode_e2m1_ref(y) if fmt.kind == "mxfp4" else _encode_int_ref(y, fmt.mantissa_bits)
    codes = torch.where(nonfinite.unsqueeze(-1), 0, codes)
    scale = torch.where(nonfinite, NONFINITE_SCALE, biased).to(torch.uint8)
    if check_finite:
        _raise_if_nonfinite(x, scale, fmt)
    return _pack_ref(codes.flatten(-2), fmt.mantissa_bits), scale


def dequantize_ref(data: torch.Tensor, scale: torch.Tensor, fmt: KVFormat | str, head_dim: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch reference of `dequantize`: [..., head_dim] in `dtype`."""
    fmt = _as_format(fmt)
    _check_packed(data, scale, fmt, head_dim, dtype)
    if fmt.is_dense:
        return data.to(dtype)
    m = fmt.mantissa_bits
    codes = _unpack_ref(data, m).unflatten(-1, (head_dim // fmt.block, fmt.block))
    if fmt.kind == "mxfp4":
        values = _decode_e2m1_ref(codes)
    else:
        values = (codes - ((codes >> (m - 1)) << m)).float()  # sign-extend m-bit two's complement
    return (values * _pow2_ref(scale).unsqueeze(-1)).flatten(-2).to(dtype)


# ----------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------


def _check_triton_device(*tensors: torch.Tensor) -> None:
    if triton is None:
        raise ValueError("the Triton kernels need triton installed; use quantize_ref/dequantize_ref on CPU")
    for t in tensors:
        if t.device != tensors[0].device:
            raise ValueError(f"all tensors must be on one device, got {tensors[0].device} and {t.device}")
        check_launchable("the BFP Triton kernels", "a tensor", t, "the *_ref functions")
        if not t.is_contiguous():
            raise ValueError(f"Triton kernels need contiguous tensors, got shape {tuple(t.shape)} with "
                             f"strides {t.stride()}; call .contiguous() first")


def _launch_meta(fmt: KVFormat, n_blocks: int, values_per_program: int) -> tuple[tuple[int], dict]:
    per_program = values_per_program // fmt.block
    meta = dict(MANTISSA_BITS=fmt.mantissa_bits, MXFP4=fmt.kind == "mxfp4", BLOCK=fmt.block,
                BLOCKS_PER_PROGRAM=per_program, num_warps=_NUM_WARPS)
    return (triton.cdiv(n_blocks, per_program),), meta


def quantize_triton(x: torch.Tensor, fmt: KVFormat | str,
                    check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `quantize` (x must be contiguous, on CUDA or on CPU under the interpreter)."""
    fmt = _as_format(fmt)
    head_dim = _check_input(x, fmt)
    if fmt.is_dense:
        return _dense_quantize(x, fmt)
    _check_triton_device(x)
    data = torch.empty(*x.shape[:-1], fmt.row_bytes(head_dim), dtype=torch.uint8, device=x.device)
    scale = torch.empty(*x.shape[:-1], fmt.scale_cols(head_dim), dtype=torch.uint8, device=x.device)
    n_blocks = x.numel() // fmt.block
    if n_blocks:
        grid, meta = _launch_meta(fmt, n_blocks, _QUANTIZE_VALUES_PER_PROGRAM)
        _bfp_quantize_kernel[grid](x, data, scale, n_blocks, **meta)
    if check_finite:
        _raise_if_nonfinite(x, scale, fmt)
    return data, scale


def dequantize_triton(data: torch.Tensor, scale: torch.Tensor, fmt: KVFormat | str, head_dim: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton `dequantize` (data and scale contiguous, on CUDA or on CPU under the interpreter)."""
    fmt = _as_format(fmt)
    _check_packed(data, scale, fmt, head_dim, dtype)
    if fmt.is_dense:
        return data.to(dtype)
    _check_triton_device(data, scale)
    out = torch.empty(*data.shape[:-1], head_dim, dtype=dtype, device=data.device)
    n_blocks = out.numel() // fmt.block
    if n_blocks:
        grid, meta = _launch_meta(fmt, n_blocks, _DEQUANTIZE_VALUES_PER_PROGRAM)
        _bfp_dequantize_kernel[grid](data, scale, out, n_blocks, **meta)
    return out


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def quantize(x: torch.Tensor, fmt: KVFormat | str, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] float -> (data [..., fmt.row_bytes(head_dim)], scale uint8 [..., fmt.scale_cols(head_dim)]).

    Packed formats give uint8 data; dense formats give x in their dtype and an empty [..., 0] scale.
    NaN/Inf in x raise ValueError for packed formats; with check_finite=False (or while a CUDA graph
    is being captured) their blocks are stored as NaN blocks instead. Dense formats store x as is.
    Runs the Triton kernel where it can (CUDA, or the interpreter), the torch reference otherwise;
    both give the same bytes.
    """
    fmt = _as_format(fmt)
    if not fmt.is_dense and isinstance(x, torch.Tensor) and can_launch(x):
        return quantize_triton(x.contiguous(), fmt, check_finite)
    return quantize_ref(x, fmt, check_finite)


def dequantize(data: torch.Tensor, scale: torch.Tensor, fmt: KVFormat | str, head_dim: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize`: [..., head_dim] in `dtype`."""
    fmt = _as_format(fmt)
    if not fmt.is_dense and can_launch(data):
        return dequantize_triton(data.contiguous(), scale.contiguous(), fmt, head_dim, dtype)
    return dequantize_ref(data, scale, fmt, head_dim, dtype)


def fake_quantize(x: torch.Tensor, fmt: KVFormat | str) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype: what a cache in `fmt` hands back for x."""
    fmt = _as_format(fmt)
    data, scale = quantize(x, fmt)
    return dequantize(data, scale, fmt, x.shape[-1], x.dtype)


def simulate_quantize(x: torch.Tensor, fmt: KVFormat | str) -> torch.Tensor:
    """fake_quantize without packing: the same rules 1-5 on float32, values only (fast, for searches).

    Gives exactly fake_quantize(x.float(), fmt) for finite x (tested in tests/kernels/test_bfp.py);
    dense formats return x.float() cast through their dtype. NaN/Inf are not checked here.
    """
    fmt = _as_format(fmt)
    head_dim = x.shape[-1]
    if fmt.is_dense:
        return x.to(fmt.storage_dtype()).float()
    blocks = x.float().unflatten(-1, (head_dim // fmt.block, fmt.block))
    blocks = torch.where(blocks.abs() < FP32_MIN_NORMAL, 0.0, blocks)
    biased = _scale_byte_ref(blocks.abs().amax(dim=-1), _emax(fmt)).unsqueeze(-1)
    y = blocks * _pow2_ref(254 - biased)
    if fmt.kind == "mxfp4":
        values = _decode_e2m1_ref(_encode_e2m1_ref(y))
    else:
        qmax = 2 ** (fmt.mantissa_bits - 1) - 1
        values = torch.round(y).clamp(-qmax, qmax)
    return (values * _pow2_ref(biased)).flatten(-2)
