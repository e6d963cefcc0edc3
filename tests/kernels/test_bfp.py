"""kernels/bfp.py: BFP12/14/16 and MXFP4 KV formats.

The Triton kernels run under the interpreter on CPU (bit-exact against the torch references) and
natively on CUDA (class TestCUDA). Inputs are drawn fresh on every run; failures print the seed.
"""

import math
import os
import sys
import secrets

import pytest
import torch

from tests.kernels.interpreter import run_interpreted

# The interpreter must be on before triton is imported (triton.jit reads TRITON_INTERPRET when it
# decorates, triton's own library included). Set it only if nothing has imported triton yet: turning
# it on afterwards would leave a session with half-interpreted kernels.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fxforge.kernels import bfp, triton_support  # noqa: E402
from fxforge.kernels.bfp import dequantize_ref, parse_kv_format, quantize_ref, valid_format_names  # noqa: E402

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

PACKED = [name for name in valid_format_names() if not parse_kv_format(name).is_dense]
BFP = [name for name in PACKED if name.startswith("bfp")]
DENSE = [name for name in valid_format_names() if parse_kv_format(name).is_dense]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

# NaN blocks decode as 0 * inf; numpy (the interpreter) warns about it, the GPU does not
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")

INTERPRETER = HAS_TRITON and triton_support.INTERPRETED
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER,
    reason="triton is missing, or was imported before TRITON_INTERPRET=1 was set in this session "
           "(test_interpreter_tests_in_a_fresh_process runs these tests then)",
)


@pytest.fixture
def seed():
    return secrets.randbelow(2**31)


def kv_like(shape, dtype, seed, outliers=3):
    """Gaussian rows with a few outlier channels (x30), like K activations."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    channels = torch.randperm(shape[-1], generator=gen)[:outliers]
    x[..., channels] *= 30
    return x.to(dtype)


def assert_same(actual, expected, what, shape, seed=None):
    """Bit-exact equality; the message names the shape, mismatch count and max diff."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: shape {tuple(shape)}: got {actual.dtype} {tuple(actual.shape)}, "
        f"expected {expected.dtype} {tuple(expected.shape)}")
    mismatch = actual != expected
    if actual.is_floating_point():
        mismatch &= ~(actual.isnan() & expected.isnan())
    count = int(mismatch.sum())
    if count:
        max_diff = (actual.double() - expected.double()).abs().max().item()
        pytest.fail(f"{what}: shape {tuple(shape)}, seed {seed}: {count} of {actual.numel()} differ, "
                    f"max diff {max_diff}")


def implementations():
    return [pytest.param((quantize_ref, dequantize_ref), id="ref"),
            pytest.param((bfp.quantize_triton, bfp.dequantize_triton), id="triton", marks=needs_interpreter)]


def scale_exponent(x_blocks, emax):
    """Independent oracle for the shared exponent: s = max(floor(log2 amax) - emax, -126)."""
    amax = x_blocks.abs().amax(dim=-1).double()
    _, exponent = torch.frexp(amax)  # amax = f * 2^exponent, f in [0.5, 1)
    return (exponent - 1 - emax).clamp(min=-126)


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------

SIZES = [  # name, head_dim, bits/value, row_bytes, scale_cols, storage dtype
    ("bfp12_32", 64, 4.25, 32, 2, torch.uint8),
    ("bfp12_16", 128, 4.5, 64, 8, torch.uint8),
    ("bfp12_64", 64, 4.125, 32, 1, torch.uint8),
    ("bfp14_32", 64, 6.25, 48, 2, torch.uint8),
    ("bfp14_64", 128, 6.125, 96, 2, torch.uint8),
    ("bfp16_64", 64, 8.125, 64, 1, torch.uint8),
    ("bfp16_16", 96, 8.5, 96, 6, torch.uint8),
    ("mxfp4_32", 64, 4.25, 32, 2, torch.uint8),
    ("bfloat16", 64, 16.0, 128, 0, torch.bfloat16),
    ("float16", 96, 16.0, 192, 0, torch.float16),
    ("float32", 64, 32.0, 256, 0, torch.float32),
]


@pytest.mark.parametrize("name,head_dim,bits,row_bytes,scale_cols,storage", SIZES, ids=[s[0] for s in SIZES])
def test_format_sizes(name, head_dim, bits, row_bytes, scale_cols, storage):
    fmt = parse_kv_format(name)
    assert fmt.bits_per_value() == bits
    assert fmt.row_bytes(head_dim) == row_bytes
    assert fmt.scale_cols(head_dim) == scale_cols
    assert fmt.bytes_per_row(head_dim) == row_bytes + scale_cols
    assert fmt.storage_dtype() == storage
    # bits_per_value is the real storage cost
    assert fmt.bytes_per_row(head_dim) * 8 == fmt.bits_per_value() * head_dim


PARSES = [
    ("bfp12", None, "bfp12_32"), ("bfp12_32", None, "bfp12_32"), ("bfp12", 64, "bfp12_64"),
    ("BFP14_16", None, "bfp14_16"), (" bfp16 ", 16, "bfp16_16"), ("mxfp4", None, "mxfp4_32"),
    ("mxfp4_32", 32, "mxfp4_32"), ("bf16", None, "bfloat16"), ("bfloat16", None, "bfloat16"),
    ("fp16", None, "float16"), ("fp32", None, "float32"), ("float32", None, "float32"),
]


@pytest.mark.parametrize("spec,block,name", PARSES, ids=[f"{s.strip()}-{b}" for s, b, _ in PARSES])
def test_parse_kv_format(spec, block, name):
    fmt = parse_kv_format(spec, block)
    assert fmt.name == name
    assert parse_kv_format(fmt.name) == fmt  # the canonical name round-trips


def test_parse_kv_format_fields():
    assert parse_kv_format("bfp14_64") == bfp.KVFormat("bfp14_64", "bfp", 6, 64)
    assert parse_kv_format("mxfp4") == bfp.KVFormat("mxfp4_32", "mxfp4", 4, 32)
    assert parse_kv_format("bf16") == bfp.KVFormat("bfloat16", "dense", 16, 0)
    with pytest.raises(ValueError, match="inconsistent"):
        bfp.KVFormat("bfp12_32", "bfp", 6, 32)


BAD_SPECS = [  # spec, block, words the message must contain
    ("bfp10", None, ["bfp10", "bfp12_32", "mxfp4_32", "bfloat16"]),
    ("int8", None, ["int8", "bfp16_64"]),
    ("bfp12", 48, ["48", "16, 32, 64"]),
    ("bfp12_128", None, ["128", "16, 32, 64"]),
    ("mxfp4", 16, ["16", "32"]),
    ("bfp12_32", 64, ["32", "64"]),
    ("bfp12_x", None, ["'x'"]),
]


@pytest.mark.parametrize("spec,block,words", BAD_SPECS, ids=[f"{s}-{b}" for s, b, _ in BAD_SPECS])
def test_parse_kv_format_rejects(spec, block, words):
    with pytest.raises(ValueError) as info:
        parse_kv_format(spec, block)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


@pytest.mark.parametrize("impl", implementations())
def test_head_dim_not_multiple_of_block(impl):
    quantize_fn, dequantize_fn = impl
    with pytest.raises(ValueError, match=r"head_dim=48.*block=32"):
        parse_kv_format("bfp12_32").check_head_dim(48)
    with pytest.raises(ValueError, match=r"head_dim=48.*block=32"):
        quantize_fn(torch.randn(2, 48), "bfp12_32")
    with pytest.raises(ValueError, match=r"head_dim=48.*block=32"):
        dequantize_fn(torch.zeros(2, 24, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8), "bfp12_32", 48)
    with pytest.raises(ValueError, match="unknown KV format 'bfp11'"):
        quantize_fn(torch.randn(2, 64), "bfp11")


# ----------------------------------------------------------------------------------------------
# Triton (interpreter) vs torch reference, bit for bit
# ----------------------------------------------------------------------------------------------

SHAPES = {  # id -> shape, given the block
    "one_row": lambda block: (1, 64),
    "one_block": lambda block: (1, block),
    "d96": lambda block: (4, 96),
}


def kernel_cases():
    """Every format in every dtype on a [3, 5, 2, 128] tensor; awkward shapes in a rotating dtype."""
    cases = [pytest.param(name, (3, 5, 2, 128), dtype, id=f"{name}-lead_3x5x2_d128-{dtype_id}")
             for name in PACKED for dtype, dtype_id in zip(DTYPES, DTYPE_IDS)]
    for i, name in enumerate(PACKED):
        block = parse_kv_format(name).block
        for j, (shape_id, shape_of) in enumerate(SHAPES.items()):
            k = (i + j) % len(DTYPES)
            if shape_of(block)[-1] % block == 0:
                cases.append(pytest.param(name, shape_of(block), DTYPES[k], id=f"{name}-{shape_id}-{DTYPE_IDS[k]}"))
    return cases


def check_kernels_match_reference(module, x, fmt, seed, check_finite=True):
    """Quantize/dequantize with `module`'s Triton launchers and compare with the references on CPU."""
    head_dim = x.shape[-1]
    data, scale = module.quantize_triton(x, fmt, check_finite)
    ref_data, ref_scale = quantize_ref(x.cpu(), fmt, check_finite)
    assert data.shape == (*x.shape[:-1], fmt.row_bytes(head_dim))
    assert scale.shape == (*x.shape[:-1], fmt.scale_cols(head_dim))
    assert_same(data.cpu(), ref_data, f"{fmt.name} data bytes", x.shape, seed)
    assert_same(scale.cpu(), ref_scale, f"{fmt.name} scale bytes", x.shape, seed)
    for dtype in dict.fromkeys((x.dtype, torch.float32)):
        values = module.dequantize_triton(data, scale, fmt, head_dim, dtype)
        assert_same(values.cpu(), dequantize_ref(ref_data, ref_scale, fmt, head_dim, dtype),
                    f"{fmt.name} dequantized ({dtype})", x.shape, seed)


@needs_interpreter
@pytest.mark.parametrize("name,shape,dtype", kernel_cases())
def test_triton_matches_reference(name, shape, dtype, seed):
    x = kv_like(shape, dtype, seed)
    x.view(-1, shape[-1])[0, :16] = 0  # a zero run: a whole zero block where block == 16
    check_kernels_match_reference(bfp, x, parse_kv_format(name), seed)


if HAS_TRITON:
    import triton.language as tl

    @triton.jit
    def _e2m1_pair_kernel(codes_ptr, conv_ptr, bits_ptr):
        codes = tl.load(codes_ptr + tl.arange(0, 16))
        tl.store(conv_ptr + tl.arange(0, 16), bfp.decode_e2m1(codes))
        tl.store(bits_ptr + tl.arange(0, 16), bfp.decode_e2m1_bits(codes))


def e2m1_both_ways(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.arange(16, dtype=torch.int32, device=device)
    conv, bits = (torch.full((16,), float("nan"), device=device) for _ in range(2))
    _e2m1_pair_kernel[(1,)](codes, conv, bits)
    return conv.cpu(), bits.cpu()


@needs_interpreter
def test_e2m1_from_bits_equals_the_conversion():
    """decode_e2m1_bits (the block-scaled decode kernels' MXFP4 decoder) gives decode_e2m1's value and
    sign for each of the 16 codes, and both give the reference's."""
    conv, bits = e2m1_both_ways("cpu")
    expected = bfp._decode_e2m1_ref(torch.arange(16))
    assert torch.equal(bits, expected) and torch.equal(conv, expected), (bits.tolist(), expected.tolist())
    assert torch.equal(torch.signbit(bits), torch.arange(16) >= 8)


@needs_interpreter
@pytest.mark.parametrize("name", PACKED)
def test_triton_matches_reference_on_edge_values(name, seed):
    """Zero blocks, denormals, tiny and huge magnitudes, exact ties, NaN/Inf: same bytes as the reference."""
    fmt = parse_kv_format(name)
    x = kv_like((8, 64), torch.float32, seed)
    x[0] = 0
    x[1] = 1e-40 * torch.sign(x[1])  # float32 denormals: flushed
    x[2] *= 1e-36  # exponent clamped at 2^-126
    x[3] *= 2.0**100
    x[4] = torch.round(x[4] * 4) / 4  # many exact quarter/half ties
    x[5, 1::2] = 1e-30
    x[6, 3], x[6, 40], x[7, 60] = float("nan"), float("inf"), -float("inf")  # NaN blocks
    check_kernels_match_reference(bfp, x, fmt, seed, check_finite=False)


@needs_interpreter
def test_public_functions_dispatch_to_triton_under_the_interpreter(monkeypatch, seed):
    def fail(*args, **kwargs):
        raise AssertionError("the torch reference ran instead of the Triton kernel")

    x = kv_like((3, 64), torch.float32, seed)
    expected = dequantize_ref(*quantize_ref(x, "bfp14_32"), "bfp14_32", 64)
    monkeypatch.setattr(bfp, "quantize_ref", fail)
    monkeypatch.setattr(bfp, "dequantize_ref", fail)
    assert_same(bfp.fake_quantize(x, "bfp14_32"), expected, "fake_quantize", x.shape, seed)
    non_contiguous = x.t().contiguous().t()
    assert not non_contiguous.is_contiguous()
    assert_same(bfp.fake_quantize(non_contiguous, "bfp14_32"), expected, "fake_quantize, non-contiguous x",
                x.shape, seed)


@pytest.mark.skipif(INTERPRETER, reason="under the interpreter, CPU calls go to the Triton kernels")
def test_public_functions_use_the_reference_on_cpu(monkeypatch, seed):
    def fail(*args, **kwargs):
        raise AssertionError("a Triton launcher ran on a CPU tensor")

    monkeypatch.setattr(bfp, "quantize_triton", fail)
    monkeypatch.setattr(bfp, "dequantize_triton", fail)
    x = kv_like((3, 64), torch.bfloat16, seed)
    expected = dequantize_ref(*quantize_ref(x, "bfp12_32"), "bfp12_32", 64, torch.bfloat16)
    assert_same(bfp.fake_quantize(x, "bfp12_32"), expected, "fake_quantize", x.shape, seed)


@pytest.mark.skipif(INTERPRETER or not HAS_TRITON or torch.cuda.is_available(),
                    reason="the interpreter tests run in this process (or natively on CUDA in TestCUDA)")
def test_interpreter_tests_in_a_fresh_process():
    """When an earlier test module imported triton without the interpreter (a full-suite run on a
    CPU machine), run this file's Triton tests in a process that sets TRITON_INTERPRET=1 first."""
    run_interpreted(__file__, "-k", "triton")


# ----------------------------------------------------------------------------------------------
# The algorithm: exponent, rounding, bounds, packed layout (reference and kernel alike)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PACKED)
def test_roundtrip_error_within_half_step(name, seed):
    """|x - deq| <= 2^s / 2 per element (MXFP4: half the local E2M1 step); clamped tops bounded too."""
    fmt = parse_kv_format(name)
    gen = torch.Generator().manual_seed(seed)
    x = kv_like((64, 128), torch.float32, seed) * 2.0 ** torch.randint(-40, 40, (64, 1), generator=gen)
    data, scale = quantize_ref(x, fmt)
    deq = dequantize_ref(data, scale, fmt, 128).double()
    blocks = x.double().unflatten(-1, (-1, fmt.block))
    s = scale_exponent(blocks, bfp._emax(fmt))
    assert_same(scale.long(), (s + 127).long(), f"{name} scale byte = floor(log2 amax) - emax + 127", x.shape, seed)
    step = torch.pow(2.0, s.double()).unsqueeze(-1)
    y = blocks.abs() / step  # magnitude in units of the block scale
    err = (blocks - deq.unflatten(-1, (-1, fmt.block))).abs() / step
    if fmt.kind == "mxfp4":
        half_step = torch.where(y < 2, 0.25, torch.where(y < 4, 0.5, 1.0))
        clamped, top = y > 7, 6.0
    else:
        half_step = torch.full_like(y, 0.5)
        top = 2 ** (fmt.mantissa_bits - 1) - 1
        clamped = y > top + 0.5
    within = (err <= half_step) | clamped
    assert bool(within.all()), (f"{name}: shape {tuple(x.shape)}, seed {seed}: {int((~within).sum())} values "
                                f"beyond half a step, max excess {(err - half_step)[~within].max().item()}")
    # clamped values land exactly on the top code, so their error is below one top-binade step
    deq_units = deq.unflatten(-1, (-1, fmt.block)).abs() / step
    assert bool((deq_units[clamped] == top).all())
    assert bool((err[clamped] < 2 * half_step[clamped]).all())
    assert int(clamped.sum()) < x.numel() // 50, "clamping should be rare on gaussian data"


def sqnr_db(x, fmt):
    data, scale = quantize_ref(x, fmt)
    err = x - dequantize_ref(data, scale, fmt, x.shape[-1])
    return 10 * math.log10(float((x**2).sum() / (err**2).sum()))


def test_sqnr_ordered_by_mantissa_bits_and_block(seed):
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(seed))
    db = {name: sqnr_db(x, parse_kv_format(name)) for name in PACKED}
    report = ", ".join(f"{k} {v:.1f} dB" for k, v in db.items())
    for block in (16, 32, 64):
        # two mantissa bits are worth about 12 dB
        assert 10 < db[f"bfp14_{block}"] - db[f"bfp12_{block}"] < 14, report
        assert 10 < db[f"bfp16_{block}"] - db[f"bfp14_{block}"] < 14, report
    assert db["bfp12_16"] > db["bfp12_32"] > db["bfp12_64"], report  # a smaller block tracks the data better
    assert 15 < db["bfp12_32"] < 20 and 15 < db["mxfp4_32"] < 21, report


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("name", BFP)
def test_rounding_is_half_to_even_and_clamps_symmetrically(impl, name):
    quantize_fn, dequantize_fn = impl
    fmt = parse_kv_format(name)
    top = 2 ** (fmt.mantissa_bits - 1) - 1
    # amax = 2^(m-2) gives scale 2^0, so the codes are the rounded values themselves
    x = torch.zeros(3, fmt.block)
    x[0, :10] = torch.tensor([2 ** (fmt.mantissa_bits - 2), 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 0.49, 0.51, -1.5])
    x[1, :3] = torch.tensor([top, -top, 1.0])  # the largest mantissa, exact
    x[2, :3] = torch.tensor([top + 0.5, -(top + 0.75), 1.0])  # rounds to 2^(m-1): clamped to +-top
    data, scale = quantize_fn(x, fmt)
    assert scale.tolist() == [[127] * (fmt.block // fmt.block)] * 3
    deq = dequantize_fn(data, scale, fmt, fmt.block)
    assert deq[0, :10].tolist() == [2 ** (fmt.mantissa_bits - 2), 0, 2, 2, 0, -2, 4, 0, 1, -2]
    assert deq[1, :3].tolist() == [top, -top, 1]
    assert deq[2, :3].tolist() == [top, -top, 1]
    codes = bfp._unpack_ref(data.cpu(), fmt.mantissa_bits)
    assert int(codes[1, 1]) == 2 ** (fmt.mantissa_bits - 1) + 1, "-top is two's complement; -2^(m-1) unused"
    assert int(codes[0, 4]) == 0, "-0.5 rounds to +0"


@pytest.mark.parametrize("impl", implementations())
def test_mxfp4_rounds_to_nearest_e2m1_ties_to_even(impl):
    quantize_fn, dequantize_fn = impl
    x = torch.zeros(2, 32)
    # amax in [4, 8): scale 2^0. Ties: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    x[0, :16] = torch.tensor([4, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6.5, 7.5, -5, -0.2, 0.3, 2.9, 6, -7])
    x[1, :8] = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6]) * 2.0**-20  # every grid point, exactly
    data, scale = quantize_fn(x, "mxfp4_32")
    assert scale.tolist() == [[127], [127 - 20]]
    deq = dequantize_fn(data, scale, "mxfp4_32", 32)
    assert deq[0, :16].tolist() == [4, 0, 1, 1, 2, 2, 4, 4, 6, 6, -4, 0, 0.5, 3, 6, -6]
    assert_same(deq[1], x[1], "E2M1 grid points", x.shape)


@pytest.mark.parametrize("impl", implementations())
def test_packed_byte_layout(impl):
    """The layout documented in the module docstring, byte for byte (scale 2^0 in every case)."""
    quantize_fn, _ = impl

    def pack(x, name):
        data, scale = quantize_fn(x, name)
        assert scale[0, 0].item() == 127
        return data[0].tolist()

    x16 = torch.zeros(1, 16)
    x16[0, :5] = torch.tensor([4, -2, 3, -1, 1])  # bfp12: amax 4 -> 2^0
    assert pack(x16, "bfp12_16")[:3] == [0xE4, 0xF3, 0x01]  # (4, -2) (3, -1) (1, 0): low nibble first
    x16[0, 0] = 16  # bfp14: amax 16 -> 2^0; codes 16, -2 (0x3E), 3, -1 (0x3F) in one 24-bit word
    word = 16 | 0x3E << 6 | 3 << 12 | 0x3F << 18
    assert pack(x16, "bfp14_16")[:4] == [word & 0xFF, word >> 8 & 0xFF, word >> 16, 1]
    x16[0, 0] = 64  # bfp16: one int8 per byte
    assert pack(x16, "bfp16_16")[:5] == [64, 0xFE, 3, 0xFF, 1]
    x32 = torch.zeros(1, 32)
    x32[0, :4] = torch.tensor([0.5, -1, 6, -6])  # E2M1 codes 0b0001, 0b1010, 0b0111, 0b1111
    assert pack(x32, "mxfp4_32")[:2] == [0xA1, 0xF7]


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("name", PACKED)
def test_zero_blocks_are_exact_zeros(impl, name, seed):
    quantize_fn, dequantize_fn = impl
    fmt = parse_kv_format(name)
    x = kv_like((3, 128), torch.float32, seed)
    x[1] = 0
    x[2, : fmt.block] = 0
    data, scale = quantize_fn(x, fmt)
    assert scale[1].tolist() == [0] * (128 // fmt.block) and scale[2, 0].item() == 0
    assert data[1].tolist() == [0] * fmt.row_bytes(128)
    deq = dequantize_fn(data, scale, fmt, 128)
    assert_same(deq[1], torch.zeros(128), "all-zero row", x.shape, seed)
    assert_same(deq[2, : fmt.block], torch.zeros(fmt.block), "all-zero block", x.shape, seed)
    assert bool((deq[2, fmt.block:] != 0).any()), "the rest of the row must survive"


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("name", PACKED)
def test_one_huge_value_flushes_its_block_only(impl, name, seed):
    quantize_fn, dequantize_fn = impl
    fmt = parse_kv_format(name)
    x = kv_like((2, 64), torch.float32, seed, outliers=0)
    x[0, 0] = 1e4
    x[0, 1 : fmt.block] = 1e-3 * torch.sign(x[0, 1 : fmt.block])
    data, scale = quantize_fn(x, fmt)
    deq = dequantize_fn(data, scale, fmt, 64)
    scale_step = 2.0 ** (math.floor(math.log2(1e4)) - bfp._emax(fmt))
    top_binade_half_step = scale_step if fmt.kind == "mxfp4" else scale_step / 2  # E2M1 steps by 2 in [4, 8)
    assert abs(deq[0, 0].item() - 1e4) <= top_binade_half_step
    assert_same(deq[0, 1 : fmt.block], torch.zeros(fmt.block - 1), "tiny values beside a huge one", x.shape, seed)
    if fmt.block < 64:  # the next block keeps its own exponent
        alone_data, alone_scale = quantize_fn(x[:, fmt.block : 2 * fmt.block].contiguous(), fmt)
        assert_same(scale[:, 1], alone_scale[:, 0], "neighbouring block's exponent", x.shape, seed)
        row_bytes = fmt.row_bytes(fmt.block)
        assert_same(data[:, row_bytes : 2 * row_bytes], alone_data, "neighbouring block's codes", x.shape, seed)


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_denormal_inputs_flush_or_stay_within_bound(impl, dtype):
    quantize_fn, dequantize_fn = impl
    fmt = parse_kv_format("bfp16_32")
    x = torch.zeros(3, 32)
    x[0, :4] = torch.tensor([1e-40, -3e-39, 2.0**-127, 1e-45])  # all float32 denormals
    x[1, :4] = torch.tensor([2e-38, -5e-38, 1e-40, 1.5e-38])  # smallest normals: exponent clamps at 2^-126
    x[2, :2] = torch.tensor([1e-30, -3e-31])  # small but well inside the normal range
    x = x.to(dtype)
    data, scale = quantize_fn(x, fmt)
    deq = dequantize_fn(data, scale, fmt, 32)
    assert scale[0, 0].item() == 0 and deq[0].abs().max().item() == 0, "denormals flush to zero"
    assert scale[1, 0].item() == 1, "the exponent is clamped to 2^-126, never below"
    assert (deq[1] - x[1].float()).abs().max().item() <= 2.0**-127
    assert deq[1, 2].item() == 0
    half_step = 2.0 ** (math.floor(math.log2(x[2].float().abs().max().item())) - 6) / 2
    assert (deq[2] - x[2].float()).abs().max().item() <= half_step, "small normal values keep full precision"
    assert deq[2, 0].item() != 0 and deq[2, 1].item() != 0


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nan_and_inf_are_rejected(impl, bad):
    quantize_fn, _ = impl
    x = torch.randn(2, 64)
    x[1, 5] = bad
    for dtype in DTYPES:
        with pytest.raises(ValueError, match="NaN or Inf in 1 block"):
            quantize_fn(x.to(dtype), "bfp12_32")
    with pytest.raises(ValueError, match="NaN or Inf"):
        bfp.quantize(x, "mxfp4")


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("name", ["bfp12_16", "bfp14_32", "mxfp4_32"])
def test_unchecked_nan_and_inf_make_nan_blocks(impl, name, seed):
    """check_finite=False (CUDA graphs): the block is marked with scale byte 255 and decodes to NaN."""
    quantize_fn, dequantize_fn = impl
    fmt = parse_kv_format(name)
    x = kv_like((2, 64), torch.float32, seed)
    finite_data, finite_scale = quantize_fn(x, fmt)
    x[1, 5], x[1, 6] = float("nan"), float("inf")
    data, scale = quantize_fn(x, fmt, check_finite=False)
    assert scale[1, 0].item() == 255
    assert data[1, : fmt.row_bytes(fmt.block)].tolist() == [0] * fmt.row_bytes(fmt.block)
    deq = dequantize_fn(data, scale, fmt, 64)
    assert bool(deq[1, : fmt.block].isnan().all()), "a non-finite block must read back as NaN"
    assert_same(scale[:, 1:], finite_scale[:, 1:], "scales of finite blocks", x.shape, seed)
    assert_same(scale[0], finite_scale[0], "scales of the other row", x.shape, seed)
    assert_same(data[1, fmt.row_bytes(fmt.block):], finite_data[1, fmt.row_bytes(fmt.block):],
                "codes of finite blocks", x.shape, seed)


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("name", ["bfp12_16", "bfp14_32", "bfp16_64", "mxfp4_32"])
def test_blocks_never_cross_rows(impl, name, seed):
    """Changing row r (or one block of it) changes nothing else."""
    quantize_fn, _ = impl
    fmt = parse_kv_format(name)
    x = kv_like((4, 3, 64), torch.float32, seed)
    data, scale = quantize_fn(x, fmt)
    changed = x.clone()
    changed[2, 1] = changed[2, 1] * 1000 + 1
    new_data, new_scale = quantize_fn(changed, fmt)
    others = torch.ones(4, 3, dtype=torch.bool)
    others[2, 1] = False
    assert_same(new_data[others], data[others], "data of untouched rows", x.shape, seed)
    assert_same(new_scale[others], scale[others], "scales of untouched rows", x.shape, seed)
    assert not torch.equal(new_scale[2, 1], scale[2, 1]), "the changed row must re-encode"

    changed = x.clone()
    changed[0, 0, : fmt.block] *= 2.0**20
    new_data, new_scale = quantize_fn(changed, fmt)
    assert_same(new_scale[0, 0, 1:], scale[0, 0, 1:], "scales of the other blocks in the row", x.shape, seed)
    assert_same(new_data[0, 0, fmt.row_bytes(fmt.block):], data[0, 0, fmt.row_bytes(fmt.block):],
                "codes of the other blocks in the row", x.shape, seed)
    # a power-of-two rescale moves only the exponent: the codes stay as they were
    assert_same(new_scale[0, 0, 0], scale[0, 0, 0] + 20, "rescaled block's exponent", x.shape, seed)
    assert_same(new_data[0, 0, : fmt.row_bytes(fmt.block)], data[0, 0, : fmt.row_bytes(fmt.block)],
                "rescaled block's codes", x.shape, seed)


# ----------------------------------------------------------------------------------------------
# Dense formats, fake_quantize, input validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DENSE)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dense_formats_store_the_tensor(name, dtype, seed):
    fmt = parse_kv_format(name)
    x = kv_like((2, 3, 64), dtype, seed)
    data, scale = bfp.quantize(x, fmt)
    assert data.dtype == fmt.storage_dtype() and data.shape == (2, 3, fmt.row_bytes(64) // data.element_size())
    assert scale.dtype == torch.uint8 and scale.shape == (2, 3, 0)
    assert_same(data, x.to(fmt.storage_dtype()), "dense data", x.shape, seed)
    assert_same(bfp.dequantize(data, scale, fmt, 64, dtype), x.to(fmt.storage_dtype()).to(dtype),
                "dense round trip", x.shape, seed)
    assert_same(bfp.fake_quantize(x, name), x.to(fmt.storage_dtype()).to(dtype), "dense fake_quantize", x.shape, seed)


@pytest.mark.parametrize("name", ["bfp12_32", "bfp16_16", "mxfp4_32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fake_quantize_is_dequantize_of_quantize(name, dtype, seed):
    x = kv_like((5, 64), dtype, seed)
    out = bfp.fake_quantize(x, name)
    assert_same(out, dequantize_ref(*quantize_ref(x, name), name, 64, dtype), "fake_quantize", x.shape, seed)
    assert not torch.equal(out, x), "quantization must change gaussian data"


@pytest.mark.parametrize("name", PACKED + DENSE)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_simulate_quantize_equals_fake_quantize(name, dtype, seed):
    """simulate_quantize (values only, used by the K-sort search) must agree with the packed path."""
    x = kv_like((4, 3, 64), dtype, seed)
    x[0, 0] = 0
    x[1, 1, :16] = 1e-40
    x[2] *= 2.0**-120
    assert_same(bfp.simulate_quantize(x, name), bfp.fake_quantize(x.float(), name), "simulate_quantize",
                x.shape, seed)


@pytest.mark.parametrize("impl", implementations())
def test_bad_inputs_raise_clear_errors(impl):
    quantize_fn, dequantize_fn = impl
    with pytest.raises(ValueError, match="dtype torch.int32"):
        quantize_fn(torch.ones(2, 64, dtype=torch.int32), "bfp12_32")
    with pytest.raises(ValueError, match="0-d"):
        quantize_fn(torch.tensor(1.0), "bfp12_32")
    data, scale = quantize_ref(torch.randn(2, 64), "bfp12_32")
    with pytest.raises(ValueError, match=r"data must be torch.uint8 \[\.\.\., 32\]"):
        dequantize_fn(data[:, :30], scale, "bfp12_32", 64)
    with pytest.raises(ValueError, match=r"scale must be uint8 \(2, 2\)"):
        dequantize_fn(data, scale[:1], "bfp12_32", 64)
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        dequantize_fn(data, scale, "bfp12_32", 64, torch.int8)


@needs_interpreter
def test_triton_launcher_rejects_non_contiguous_input():
    x = torch.randn(64, 4).t()
    with pytest.raises(ValueError, match=r"contiguous.*strides \(1, 4\)"):
        bfp.quantize_triton(x, "bfp12_32")


# ----------------------------------------------------------------------------------------------
# CUDA: the compiled kernels against the references
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCUDA:
    @pytest.mark.parametrize("name", PACKED)
    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    @pytest.mark.parametrize("shape", [(1, 64), (5, 37, 8, 128), (333, 96), (2, 4096, 4, 64)],
                             ids=["one_row", "lead_5x37x8_d128", "d96", "large"])
    def test_kernels_match_reference(self, name, dtype, shape, seed):
        fmt = parse_kv_format(name)
        if shape[-1] % fmt.block:
            shape = (*shape[:-1], 128)
        x = kv_like(shape, dtype, seed).cuda()
        check_kernels_match_reference(bfp, x, fmt, seed)

    @pytest.mark.parametrize("name", PACKED)
    def test_edge_values_match_reference(self, name, seed):
        fmt = parse_kv_format(name)
        x = kv_like((8, 64), torch.float32, seed)
        x[0] = 0
        x[1] = 1e-40 * torch.sign(x[1])  # denormals: flushed on both sides despite FTZ differences
        x[2] *= 1e-36
        x[3] *= 2.0**100
        x[4] = torch.round(x[4] * 4) / 4
        x[5, 1::2] = 1e-30
        x[6, 3], x[6, 40], x[7, 60] = float("nan"), float("inf"), -float("inf")
        check_kernels_match_reference(bfp, x.cuda(), fmt, seed, check_finite=False)

    def test_e2m1_from_bits_equals_the_conversion(self):
        conv, bits = e2m1_both_ways("cuda")
        expected = bfp._decode_e2m1_ref(torch.arange(16))
        assert torch.equal(bits, expected) and torch.equal(conv, expected), (bits.tolist(), expected.tolist())

    def test_public_functions_run_on_cuda(self, seed):
        x = kv_like((3, 7, 64), torch.bfloat16, seed).cuda()
        out = bfp.fake_quantize(x, "bfp12_32")
        assert out.is_cuda and out.dtype == torch.bfloat16
        expected = dequantize_ref(*quantize_ref(x.cpu(), "bfp12_32"), "bfp12_32", 64, torch.bfloat16)
        assert_same(out.cpu(), expected, "fake_quantize on CUDA", x.shape, seed)
        with pytest.raises(ValueError, match="NaN or Inf"):
            bfp.quantize(torch.full((2, 64), float("nan"), device="cuda"), "bfp12_32")
