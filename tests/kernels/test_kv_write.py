"""kernels/kv_cache.py: the fused quantize-and-scatter KV write in Triton against kv_write_ref.

The bytes written must equal kv_write_ref's exactly, for dense and packed formats, into pages
scattered over the cache; every other byte of the cache must stay as it was. The kernel runs under
the interpreter on CPU and natively on CUDA (class TestCUDA). Inputs are drawn fresh; failures
print the seed.
"""

import secrets
import sys

import pytest
import torch

from tests.kernels.checks import Spy
from tests.kernels.interpreter import fresh_process_test, interpreter_mark, is_interpreted

from fxforge.kernels import kv_cache
from fxforge.kernels.bfp import parse_kv_format
from fxforge.kernels.kv_cache import allocate_kv_pair, kv_write_ref, v_channels_by_tokens

INTERPRETER = is_interpreted(kv_cache._kv_write_packed_kernel)
needs_interpreter = interpreter_mark(INTERPRETER)

FORMATS = ["float32", "bfloat16", "bfp12_32", "bfp16_16", "bfp14_32", "mxfp4_32"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {"t1_h1_d32": (1, 1, 32), "t7_h3_d64": (7, 3, 64), "t33_h1_d128": (33, 1, 128)}
PAGE_SIZE, NUM_PAGES = 8, 7


def cases(every_dtype: bool) -> list:
    """Every format x shape; K in the format and V in another one (the next in FORMATS), so both
    kernels run with different formats in one call. Input dtypes all, or one each in rotation."""
    out = []
    for f, k_format in enumerate(FORMATS):
        v_format = FORMATS[(f + 3) % len(FORMATS)]
        for s, (shape_id, shape) in enumerate(SHAPES.items()):
            rotation = ["fp32", "fp16"] if s == 2 else list(DTYPES)  # bf16 loads are slow when interpreted
            names = list(DTYPES) if every_dtype else [rotation[(f + s) % len(rotation)]]
            out += [pytest.param(shape, DTYPES[name], k_format, v_format, id=f"{shape_id}-{name}-k_{k_format}-v_{v_format}")
                    for name in names]
    return out


@pytest.fixture
def seed():
    return secrets.randbelow(2**31)


def scattered_slots(tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Slots of `tokens` consecutive positions after a random past, in pages taken in random order."""
    past = int(torch.randint(0, PAGE_SIZE, (1,), generator=gen))
    assert past + tokens <= NUM_PAGES * PAGE_SIZE, f"{tokens} tokens need more than NUM_PAGES={NUM_PAGES} pages"
    pages = torch.randperm(NUM_PAGES, generator=gen)
    positions = torch.arange(past, past + tokens)
    return pages[positions // PAGE_SIZE] * PAGE_SIZE + positions % PAGE_SIZE


def random_cache(heads, head_dim, k_format, v_format, gen, device="cpu", v_layout="rows"):
    """A cache full of random bytes (two identical copies, laid out alike), so untouched bytes can be checked."""
    cache = allocate_kv_pair(NUM_PAGES, PAGE_SIZE, heads, head_dim, k_format, v_format, v_layout=v_layout)
    for t in cache:
        raw = t.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, generator=gen, dtype=torch.uint8))
    return [t.to(device) for t in cache], [t.clone() for t in cache]


def kv_like(shape, dtype, gen):
    """Gaussian rows with a few x30 outlier channels and a wide range of row scales (within fp16's)."""
    octaves = 8 if dtype == torch.float16 else 20
    x = torch.randn(shape, generator=gen) * 2.0 ** torch.randint(-octaves, octaves, (*shape[:2], 1), generator=gen)
    x[..., torch.randperm(shape[-1], generator=gen)[:3]] *= 30
    return x.to(dtype)


def assert_same_bytes(actual, expected, what, shape, seed):
    """Bit-exact equality; the message names the shape, mismatch count and max diff."""
    a, e = actual.cpu(), expected.cpu()
    assert a.shape == e.shape and a.dtype == e.dtype, f"{what}: {a.dtype} {tuple(a.shape)} vs {e.dtype} {tuple(e.shape)}"
    mismatch = a.view(torch.uint8) != e.view(torch.uint8)
    if mismatch.any():
        diff = (a.double() - e.double()).abs().nan_to_num(0).max().item()
        pytest.fail(f"{what}: x shape {tuple(shape)}, seed {seed}: {int(mismatch.sum())} of {mismatch.numel()} bytes "
                    f"differ, max value diff {diff:.3g}")


def check_against_reference(shape, dtype, k_format, v_format, seed, device, v_layout="rows"):
    gen = torch.Generator().manual_seed(seed)
    k, v = kv_like(shape, dtype, gen), kv_like(shape, dtype, gen)
    slots = scattered_slots(shape[0], gen)
    actual, expected = random_cache(shape[1], shape[2], k_format, v_format, gen, device, v_layout)
    assert v_channels_by_tokens(actual[2]) == (v_layout == "channels") == v_channels_by_tokens(expected[2])
    kv_write_ref(k, expected[0], expected[1], slots, k_format)
    kv_write_ref(v, expected[2], expected[3], slots, v_format)
    kv_cache.kv_write_triton(k.to(device), v.to(device), *actual, slots.to(device), k_format, v_format)
    for name, a, e in zip(("k_data", "k_scale", "v_data", "v_scale"), actual, expected):
        assert_same_bytes(a, e, f"{name} ({k_format if name[0] == 'k' else v_format})", shape, seed)


# ----------------------------------------------------------------------------------------------
# The Triton kernel under the interpreter
# ----------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("shape, dtype, k_format, v_format", cases(every_dtype=False))
def test_triton_matches_reference(shape, dtype, k_format, v_format, seed):
    check_against_reference(shape, dtype, k_format, v_format, seed, "cpu")


EDGE_VALUES = torch.tensor([0.0, -0.0, 1e-40, -3e-39, 2.0**-126, 1e-30, 3e38, -3e38, 0.5, 1.5, 2.5, -2.5, 6.0, 7.0,
                            0.25, 0.75, 1.25, 1.75, 3.5, 5.0, 1e4, -1e-3, 65504.0, 1.0])


@needs_interpreter
@pytest.mark.parametrize("fmt", FORMATS + ["float16"])
def test_triton_edge_values(fmt, seed):
    """Denormals, the float32 extremes, exact rounding ties, zero blocks: the same bytes as the reference."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(4, 2, 64)
    x[0, 0, : len(EDGE_VALUES)] = EDGE_VALUES
    x[1, 1] = EDGE_VALUES[torch.randint(0, len(EDGE_VALUES), (64,), generator=gen)]
    x[2, 0, :32] = 1e-3 * torch.randn(32, generator=gen)  # a small block beside a zero block
    if fmt == "float16":
        x = x.clamp(-6e4, 6e4)
    slots = torch.tensor([5, 17, 0, 55])
    actual, expected = random_cache(2, 64, fmt, fmt, gen)
    kv_write_ref(x, expected[0], expected[1], slots, fmt)
    kv_write_ref(x, expected[2], expected[3], slots, fmt)
    kv_cache.kv_write_triton(x, x, *actual, slots, fmt, fmt)
    for name, a, e in zip(("k_data", "k_scale", "v_data", "v_scale"), actual, expected):
        assert_same_bytes(a, e, f"{name} ({fmt}) edge values", x.shape, seed)


@needs_interpreter
@pytest.mark.parametrize("fmt", ["bfloat16", "bfp12_32"])
def test_triton_negative_slots_are_skipped(fmt, seed):
    """Padding tokens (slot -1) write nothing; the others land where the reference puts them."""
    gen = torch.Generator().manual_seed(seed)
    x = kv_like((4, 2, 64), torch.float32, gen)
    actual, expected = random_cache(2, 64, fmt, fmt, gen)
    kv_write_ref(x[[0, 2]], expected[0], expected[1], torch.tensor([9, 30]), fmt)
    kv_write_ref(x[[0, 2]], expected[2], expected[3], torch.tensor([9, 30]), fmt)
    kv_cache.kv_write_triton(x, x, *actual, torch.tensor([9, -1, 30, -1]), fmt, fmt)
    for name, a, e in zip(("k_data", "k_scale", "v_data", "v_scale"), actual, expected):
        assert_same_bytes(a, e, f"{name} ({fmt}) with padding slots", x.shape, seed)


@needs_interpreter
@pytest.mark.parametrize("v_format", ["bfp12_32", "bfp16_16", "bfp14_32", "mxfp4_32"])
def test_triton_writes_v_stored_channels_by_tokens(v_format, seed):
    """A packed V stored channels by tokens (allocate_kv_pair(v_layout="channels"), the layout the
    "i8t" decode kernel reads) gets the bytes kv_write_ref puts in the same logical places, and no
    other byte changes."""
    check_against_reference((11, 3, 64), torch.float32, "bfp12_32", v_format, seed, "cpu", v_layout="channels")


def test_v_layout_is_checked_at_allocation():
    from fxforge.runtime.config import V_LAYOUTS  # the engine's copy (runtime/config.py imports nothing heavy)

    assert V_LAYOUTS == kv_cache.V_LAYOUTS
    k_data, k_scale, v_data, v_scale = allocate_kv_pair(3, 8, 2, 64, "bfp12_32", "bfp16_32", v_layout="channels")
    assert v_channels_by_tokens(v_data) and v_channels_by_tokens(v_scale)
    assert k_data.is_contiguous() and k_scale.is_contiguous() and v_data.shape == (3, 8, 2, 64)
    with pytest.raises(ValueError, match="v_layout='channels' needs a packed V format"):
        allocate_kv_pair(3, 8, 2, 64, "bfp12_32", "bfloat16", v_layout="channels")
    with pytest.raises(ValueError, match=r"v_layout='columns' must be one of \('rows', 'channels'\)"):
        allocate_kv_pair(3, 8, 2, 64, "bfp12_32", "bfp16_32", v_layout="columns")


@needs_interpreter
def test_triton_takes_a_one_column_one_head_scale_in_its_data_layout():
    """With one KV head and one scale column a token (head_dim 32 in blocks of 32), a V scale is
    [pages, page_size, 1, 1]: rows and channels by tokens are the same bytes, and to_channels_by_tokens
    hands it back with strides (page_size, 1, 1, 1). It counts as channels by tokens (length-1 dims'
    strides say nothing), the write and decode checks take it beside channels data, and beside rows
    data the rows reading stands (both caches were refused before, or classed by those strides)."""
    from fxforge.kernels.paged_attention import _check_cache

    for layout in ("channels", "rows"):
        k_data, k_scale, v_data, v_scale = allocate_kv_pair(3, 8, 1, 32, "bfp16_32", "bfp16_32", v_layout=layout)
        assert v_scale.shape == (3, 8, 1, 1) and v_scale.stride()[:2] == (8, 1)
        assert v_channels_by_tokens(v_scale)  # either way: the same bytes
        assert v_channels_by_tokens(v_data) == (layout == "channels")
        x = torch.zeros(2, 1, 32)
        kv_cache._check_write("v", x, v_data, v_scale, torch.tensor([0, 9]), parse_kv_format("bfp16_32"))
        _check_cache("paged_decode_attention", "v", v_data, v_scale, "bfp16_32", 32, torch.device("cpu"))
    rows_scale = torch.zeros(3, 8, 2, 1, dtype=torch.uint8)  # two heads: rows, not channels by tokens
    assert not v_channels_by_tokens(rows_scale)
    _, _, v_data, _ = allocate_kv_pair(3, 8, 2, 32, "bfp16_32", "bfp16_32", v_layout="channels")
    with pytest.raises(ValueError, match="v_scale for bfp16_32 must be a uint8 .* laid out as v_data"):
        kv_cache._check_write("v", torch.zeros(2, 2, 32), v_data, rows_scale, torch.tensor([0, 9]),
                              parse_kv_format("bfp16_32"))


@needs_interpreter
def test_triton_validates_both_tensors_before_writing(seed):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(3, 2, 64)
    actual, untouched = random_cache(2, 64, "bfp12_32", "bfp16_32", gen)
    with pytest.raises(ValueError, match=r"v_data for bfp12_32 must be a contiguous torch.uint8 \[pages, page_size, 2, 32\]"):
        kv_cache.kv_write_triton(k, k, *actual, torch.tensor([1, 2, 3]), "bfp12_32", "bfp12_32")
    assert all(torch.equal(a, b) for a, b in zip(actual, untouched)), "a rejected call wrote to the cache"
    with pytest.raises(ValueError, match=r"slot_mapping must be int32/int64 \[3\]"):
        kv_cache.kv_write_triton(k, k, *actual, torch.tensor([1, 2]), "bfp12_32", "bfp16_32")
    with pytest.raises(ValueError, match="head_dim=64 is not a multiple of block=128|unsupported block"):
        kv_cache.kv_write_triton(k, k, *actual, torch.tensor([1, 2, 3]), "bfp12_128", "bfp16_32")


test_interpreted_kernels_in_a_fresh_process = fresh_process_test(__file__, "-k", "triton and not TestCUDA", interpreting=INTERPRETER)


# ----------------------------------------------------------------------------------------------
# Native on the GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCUDA:
    @pytest.mark.parametrize("shape, dtype, k_format, v_format", cases(every_dtype=True))
    def test_matches_reference(self, shape, dtype, k_format, v_format, seed):
        check_against_reference(shape, dtype, k_format, v_format, seed, "cuda")

    @pytest.mark.parametrize("v_format", ["bfp12_32", "bfp16_32", "mxfp4_32"])
    def test_v_stored_channels_by_tokens(self, v_format, seed, monkeypatch):
        monkeypatch.setattr(sys.modules[__name__], "NUM_PAGES", 64)  # 300 tokens after up to 7: 39 pages of 8
        check_against_reference((300, 8, 128), torch.bfloat16, "bfp12_32", v_format, seed, "cuda", v_layout="channels")

    @pytest.mark.parametrize("fmt", ["bfloat16", "bfp12_32", "bfp14_64", "mxfp4_32"])
    def test_prefill_sized_write(self, fmt, seed, monkeypatch):
        monkeypatch.setattr(sys.modules[__name__], "NUM_PAGES", 600)
        check_against_reference((4096, 8, 128), torch.bfloat16, fmt, "bfp16_32", seed, "cuda")

    def test_custom_op_uses_the_kernel(self, seed, monkeypatch):
        from fxforge.ir import ops

        spy = Spy(kv_cache.kv_write_triton)
        monkeypatch.setattr(kv_cache, "kv_write_triton", spy)
        gen = torch.Generator().manual_seed(seed)
        k, v = kv_like((7, 3, 64), torch.bfloat16, gen), kv_like((7, 3, 64), torch.bfloat16, gen)
        slots = scattered_slots(7, gen)
        actual, expected = random_cache(3, 64, "bfp12_32", "bfloat16", gen, "cuda")
        kv_write_ref(k, expected[0], expected[1], slots, "bfp12_32")
        kv_write_ref(v, expected[2], expected[3], slots, "bfloat16")
        ops.KV_WRITE(k.cuda(), v.cuda(), *actual, slots.cuda(), "bfp12_32", "bfloat16", ops.TRITON)
        assert spy.calls == 1, "an op bound to 'triton' must run the kernel for CUDA tensors"
        for name, a, e in zip(("k_data", "k_scale", "v_data", "v_scale"), actual, expected):
            assert_same_bytes(a, e, f"fxforge::kv_write {name}", k.shape, seed)
