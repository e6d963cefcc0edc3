"""kernels/paged_attention.py `_load_kv_tile`: the attention kernels' page decoder, value for value;
and the "blocks" decode kernel's `_load_raw_blocks` + `_block_codes` (unscaled codes), times the
block scales it applies per block, likewise.

The attention tests compare whole attention outputs with a tolerance, which could hide one wrongly
decoded code. Here every code of random packed rows (all byte values, scale bytes 0..231) is
decoded by `_load_kv_tile` and must equal `dequantize_ref` exactly: the portable Triton decode under
the interpreter and on CUDA, and on CUDA also the inline-PTX decode of 4- and 8-bit BFP and of MXFP4
into bf16 (exact: decoded values have at most 8 significant bits). Inputs are drawn fresh; failures print the seed.
"""

import secrets

import pytest
import torch

from tests.kernels.interpreter import fresh_process_test, interpreter_mark, is_interpreted

from fxforge.kernels import paged_attention as pa
from fxforge.kernels.bfp import dequantize_ref, valid_format_names
from fxforge.kernels.formats import parse_kv_format
from fxforge.kernels.triton_support import HAS_TRITON

INTERPRETER = HAS_TRITON and is_interpreted(pa._paged_decode_kernel)
needs_interpreter = interpreter_mark(INTERPRETER)
PACKED = [name for name in valid_format_names() if not parse_kv_format(name).is_dense]
MAX_SCALE_BYTE = 231  # above it the decoders' bias overflows (documented in paged_attention.py)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_rows_kernel(data_ptr, scale_ptr, out_ptr, n_rows, ROW_BYTES: tl.constexpr,
                            SCALE_COLS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                            BITS: tl.constexpr, MXFP4: tl.constexpr, BLOCK: tl.constexpr, ASM: tl.constexpr,
                            OUT_DTYPE: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        ok = rows < n_rows
        r64 = rows.to(tl.int64)
        first, second = pa._load_kv_tile(data_ptr, scale_ptr, r64 * ROW_BYTES, r64 * SCALE_COLS, ok, ROWS, D, D_PAD,
                                         BITS, MXFP4, BLOCK, ASM, OUT_DTYPE)
        if BITS == 4:  # (even columns, odd columns)
            cols = tl.arange(0, D_PAD // 2) * 2
            mask = ok[:, None] & (cols[None, :] < D)
            tl.store(out_ptr + r64[:, None] * D + cols[None, :], first, mask=mask)
            tl.store(out_ptr + r64[:, None] * D + cols[None, :] + 1, second, mask=mask)
        else:
            cols = tl.arange(0, D_PAD)
            mask = ok[:, None] & (cols[None, :] < D)
            tl.store(out_ptr + r64[:, None] * D + cols[None, :], first, mask=mask)

    @triton.jit
    def _decode_blocks_kernel(data_ptr, scale_ptr, out_ptr, n_rows, ROW_BYTES: tl.constexpr,
                              SCALE_COLS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, NB: tl.constexpr,
                              NB_PAD: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr, MXFP4: tl.constexpr,
                              PHASES: tl.constexpr, BW: tl.constexpr, ASM: tl.constexpr, OUT_DTYPE: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        ok = rows < n_rows
        r64 = rows.to(tl.int64)
        raw, scale = pa._load_raw_blocks(data_ptr, scale_ptr, r64 * ROW_BYTES, r64 * SCALE_COLS, ok, ROWS, D, NB,
                                         NB_PAD, BLOCK, BITS, True)
        first, second = pa._block_codes(raw, BITS, MXFP4, True, ASM, OUT_DTYPE)
        factor = pa.pow2(scale.to(tl.int32))[:, :, None]
        blocks, cols = pa._block_columns(NB_PAD, BW, BLOCK, PHASES)
        ptrs = out_ptr + r64[None, :, None] * D + cols
        mask = ok[None, :, None] & (blocks < NB)
        tl.store(ptrs, first.to(tl.float32) * factor, mask=mask)
        if PHASES == 2:
            tl.store(ptrs + 1, second.to(tl.float32) * factor, mask=mask)


@pytest.fixture
def seed():
    return secrets.randbelow(2**31)


def decode_and_compare(name: str, head_dim: int, seed: int, device: str, asm: bool = False, rows: int = 150) -> None:
    fmt = parse_kv_format(name)
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (rows, fmt.row_bytes(head_dim)), generator=gen, dtype=torch.uint8)
    scale = torch.randint(0, MAX_SCALE_BYTE + 1, (rows, head_dim // fmt.block), generator=gen, dtype=torch.uint8)
    scale[::7] = 0  # zero scales decode to zeros
    data, scale = data.to(device), scale.to(device)
    out_dtype = torch.bfloat16 if asm else torch.float32
    out = torch.full((rows, head_dim), float("nan"), dtype=out_dtype, device=device)
    tl_dtype = tl.bfloat16 if asm else tl.float32
    block_rows = 32
    _decode_rows_kernel[(triton.cdiv(rows, block_rows),)](
        data, scale, out, rows, data.shape[1], scale.shape[1], block_rows, head_dim,
        max(32, triton.next_power_of_2(head_dim)), fmt.mantissa_bits, fmt.kind == "mxfp4", fmt.block, asm, tl_dtype)
    expected = dequantize_ref(data.cpu(), scale.cpu(), fmt, head_dim).to(out_dtype)
    bad = (out.cpu() != expected).nonzero()
    assert not len(bad), (f"{name} D={head_dim} asm={asm} seed={seed}: {len(bad)} values differ, first at "
                          f"(row, col) {bad[0].tolist()}: {out.cpu()[tuple(bad[0])]} vs {expected[tuple(bad[0])]}")


def random_rows(fmt, head_dim: int, rows: int, seed: int, device: str):
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (rows, fmt.row_bytes(head_dim)), generator=gen, dtype=torch.uint8)
    scale = torch.randint(0, MAX_SCALE_BYTE + 1, (rows, head_dim // fmt.block), generator=gen, dtype=torch.uint8)
    scale[::7] = 0  # zero scales decode to zeros
    return data.to(device), scale.to(device)


def decode_blocks_and_compare(name: str, head_dim: int, seed: int, device: str, asm: bool = False,
                              rows: int = 150) -> None:
    """Unscaled codes (bf16 with asm, else float32) times 2^(scale byte - 127) == dequantize_ref, exactly."""
    fmt = parse_kv_format(name)
    data, scale = random_rows(fmt, head_dim, rows, seed, device)
    out = torch.full((rows, head_dim), float("nan"), dtype=torch.float32, device=device)
    blocks, phases = head_dim // fmt.block, 2 if fmt.mantissa_bits == 4 else 1
    block_rows = 32
    _decode_blocks_kernel[(triton.cdiv(rows, block_rows),)](
        data, scale, out, rows, data.shape[1], scale.shape[1], block_rows, head_dim, blocks,
        triton.next_power_of_2(blocks), fmt.block, fmt.mantissa_bits, fmt.kind == "mxfp4", phases,
        fmt.block // phases, asm, tl.bfloat16 if asm else tl.float32)
    expected = dequantize_ref(data.cpu(), scale.cpu(), fmt, head_dim)
    bad = (out.cpu() != expected).nonzero()
    assert not len(bad), (f"blocks {name} D={head_dim} asm={asm} seed={seed}: {len(bad)} values differ, first at "
                          f"(row, col) {bad[0].tolist()}: {out.cpu()[tuple(bad[0])]} vs {expected[tuple(bad[0])]}")


def _blocks_shapes():
    for name in PACKED:
        fmt = parse_kv_format(name)
        if pa.decode_kernel_supports("blocks", fmt, fmt, 128):
            for head_dim in (96, 128):
                if head_dim % fmt.block == 0:
                    yield name, head_dim


def _shapes():
    for name in PACKED:
        for head_dim in (64, 96, 128):
            if head_dim % parse_kv_format(name).block == 0:
                yield name, head_dim


@needs_interpreter
@pytest.mark.parametrize("name,head_dim", list(_shapes()))
def test_triton_decoder_is_exact(name, head_dim, seed):
    decode_and_compare(name, head_dim, seed, "cpu")


@needs_interpreter
@pytest.mark.parametrize("name,head_dim", list(_blocks_shapes()))
def test_triton_blocks_decoder_is_exact(name, head_dim, seed):
    decode_blocks_and_compare(name, head_dim, seed, "cpu", rows=40)


test_interpreted_kernels_in_a_fresh_process = fresh_process_test(__file__, "-k", "triton and not TestCUDA",
                                                                 interpreting=INTERPRETER)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and triton")
class TestCUDA:
    @pytest.mark.parametrize("name,head_dim", list(_shapes()))
    def test_portable_decoder_is_exact(self, name, head_dim, seed):
        decode_and_compare(name, head_dim, seed, "cuda", rows=2000)

    @pytest.mark.parametrize("name", [n for n in PACKED if n.startswith(("bfp12", "bfp16", "mxfp4"))])
    def test_inline_ptx_decoder_is_exact(self, name, seed):
        decode_and_compare(name, 128, seed, "cuda", asm=True, rows=2000)

    @pytest.mark.parametrize("name,head_dim", list(_blocks_shapes()))
    def test_blocks_decoder_is_exact(self, name, head_dim, seed):
        decode_blocks_and_compare(name, head_dim, seed, "cuda", rows=2000)

    @pytest.mark.parametrize("name", [n for n in PACKED if n.startswith(("bfp12_32", "bfp12_64", "bfp16", "mxfp4"))])
    def test_blocks_inline_ptx_decoder_is_exact(self, name, seed):
        decode_blocks_and_compare(name, 128, seed, "cuda", asm=True, rows=2000)
