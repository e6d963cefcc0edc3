"""kernels/paged_attention.py: Triton paged decode (split-K) and chunked prefill vs attention_ref.

The reference reads the same cache pages, so for packed formats the only difference is the float
accumulation order (and the bf16 rounding of the dot operands with bf16 queries). The Triton kernels
run under the interpreter on CPU (tiny shapes) and natively on CUDA (class TestCUDA, larger shapes).
Inputs are drawn fresh on every run; failures print the seed.
"""

import functools
import os
import secrets
import sys
import types
from unittest import mock

import numpy as np
import pytest
import torch

from tests.kernels.interpreter import run_interpreted

# As in test_bfp.py: the interpreter must be on before triton is imported. If something imported
# triton first (tests/conftest.py does), test_interpreter_tests_in_a_fresh_process runs them.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fxforge.kernels import paged_attention as pa  # noqa: E402
from fxforge.kernels import kv_cache, triton_support  # noqa: E402
from fxforge.kernels.attention import attention_ref  # noqa: E402
from fxforge.kernels.bfp import valid_format_names  # noqa: E402
from fxforge.kernels.formats import parse_kv_format  # noqa: E402
from fxforge.kernels.kv_cache import allocate_kv_pair, kv_read_ref, kv_write_ref  # noqa: E402
from fxforge.kernels.rope import key_rope_table, rope_ref, rotate_keys_ref  # noqa: E402

INTERPRETER = triton_support.INTERPRETED
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER,
    reason="triton is missing, or was imported before TRITON_INTERPRET=1 was set in this session "
           "(test_interpreter_tests_in_a_fresh_process runs these tests then)",
)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}  # atol = rtol


@pytest.fixture
def seed():
    return secrets.randbelow(2**31)


def build_cache(lens, num_kv_heads, head_dim, k_format, v_format, page_size, gen, device="cpu"):
    """A cache holding `lens[s]` random tokens per sequence in pages scattered by a random permutation.
    Everything no sequence owns is poison: NaN for dense formats, NaN blocks (scale byte 255) for
    packed ones, and page-table entries past a sequence's pages point outside the cache. So reading
    a token past seq_lens, or a page not in the table, turns the output into NaN."""
    pages = [(n + page_size - 1) // page_size for n in lens]
    num_pages = sum(pages) + 3
    cache = allocate_kv_pair(num_pages, page_size, num_kv_heads, head_dim, k_format, v_format, device)
    for data, scale in (cache[:2], cache[2:]):
        if data.dtype == torch.uint8:
            data.copy_(torch.randint(0, 256, data.shape, generator=gen, dtype=torch.uint8))
            scale.fill_(255)
        else:
            data.fill_(float("nan"))
    perm = torch.randperm(num_pages, generator=gen)
    page_table = torch.full((len(lens), max(pages + [1]) + 2), num_pages + 1000, dtype=torch.int32)
    first = 0
    for s, (n, p) in enumerate(zip(lens, pages)):
        page_table[s, :p] = perm[first:first + p].to(torch.int32)
        first += p
        positions = torch.arange(n)
        slots = page_table[s, positions // page_size].long() * page_size + positions % page_size
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        k[..., torch.randperm(head_dim, generator=gen)[:3]] *= 20  # outlier channels, as real keys have
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        kv_write_ref(k.to(device), cache[0], cache[1], slots.to(device), k_format)
        kv_write_ref(v.to(device), cache[2], cache[3], slots.to(device), v_format)
    return cache, page_table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def assert_close(actual, expected, q_dtype, what, seed):
    """|actual - expected| <= tol * (1 + |expected|); NaN never passes. Names shape, count, max diff."""
    tol = TOLERANCE[q_dtype]
    assert actual.shape == expected.shape and actual.dtype == q_dtype, (
        f"{what}: got {actual.dtype} {tuple(actual.shape)}, expected {q_dtype} {tuple(expected.shape)}")
    diff = (actual.double() - expected.double()).abs()
    bad = ~(diff <= tol * (1 + expected.double().abs()))  # NaN compares False
    count = int(bad.sum())
    if count:
        pytest.fail(f"{what}: shape {tuple(actual.shape)}, seed {seed}: {count} of {actual.numel()} differ "
                    f"(tol {tol}), max diff {diff.nan_to_num(float('inf')).max().item():.3g}, "
                    f"NaN {int(actual.isnan().sum())}")


def decode_inputs(lens, g, num_kv_heads, head_dim, k_format, v_format, q_dtype, page_size, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    cache, page_table, seq_lens = build_cache(lens, num_kv_heads, head_dim, k_format, v_format, page_size, gen, device)
    q = torch.randn(len(lens), g * num_kv_heads, head_dim, generator=gen).to(device, q_dtype)
    query_start = torch.arange(len(lens) + 1, dtype=torch.int32, device=device)
    return q, cache, page_table, query_start, seq_lens


def prefill_inputs(chunks, g, num_kv_heads, head_dim, k_format, v_format, q_dtype, page_size, seed, device="cpu"):
    """chunks: (tokens already in the cache, new queries) per sequence; the new tokens are written too."""
    gen = torch.Generator().manual_seed(seed)
    lens = [before + new for before, new in chunks]
    cache, page_table, seq_lens = build_cache(lens, num_kv_heads, head_dim, k_format, v_format, page_size, gen, device)
    counts = torch.tensor([0] + [new for _, new in chunks])
    query_start = counts.cumsum(0).to(device, torch.int32)
    q = torch.randn(int(counts.sum()), g * num_kv_heads, head_dim, generator=gen).to(device, q_dtype)
    return q, cache, page_table, query_start, seq_lens


def reference(q, cache, page_table, query_start, seq_lens, k_format, v_format, scale, window):
    """attention_ref in float32 (q upcast exactly), the oracle for every query dtype."""
    return attention_ref(q.float(), *cache, page_table, query_start, seq_lens, k_format, v_format, scale, window)


# ----------------------------------------------------------------------------------------------
# Decode (interpreter)
# ----------------------------------------------------------------------------------------------

# id: (k_format, v_format, g, Hkv, head_dim, q dtype, context lengths, page size)
DECODE_CASES = {
    "fp32-mha-d64": ("float32", "float32", 1, 2, 64, torch.float32, [1, 17, 100], 16),
    "bf16-g4-d128": ("bfloat16", "bfloat16", 4, 2, 128, torch.bfloat16, [100, 1, 17], 16),
    "bfp12_32-g3-d64": ("bfp12_32", "bfp12_32", 3, 2, 64, torch.float32, [17, 100, 1], 16),
    "bfp16_32-g4-d128": ("bfp16_32", "bfp16_32", 4, 1, 128, torch.float32, [100, 33], 16),
    "bfp14_16-g3-d64-bf16q-page8": ("bfp14_16", "bfp14_16", 3, 2, 64, torch.bfloat16, [1, 100], 8),
    "mxfp4_32-mha-d128-bf16q": ("mxfp4_32", "mxfp4_32", 1, 2, 128, torch.bfloat16, [17, 100], 16),
    "k_bfp12_64-v_bf16-g4-d64": ("bfp12_64", "bfloat16", 4, 2, 64, torch.bfloat16, [100, 17, 1], 16),
    "bfp12_32-g3-d96": ("bfp12_32", "float32", 3, 1, 96, torch.float32, [65, 3], 16),
    "bfp16_32-g4-d64-fp16q": ("bfp16_32", "float16", 4, 1, 64, torch.float16, [40, 9], 16),
    "bfp12_16-g2-d32": ("bfp12_16", "bfp12_16", 2, 2, 32, torch.float32, [30, 7], 16),  # the tiny test models
}


@needs_interpreter
@pytest.mark.parametrize("case", list(DECODE_CASES), ids=list(DECODE_CASES))
def test_decode_matches_reference(case, seed):
    check_decode_case(case, seed)


def check_decode_case(case, seed, **launch):
    """One DECODE_CASES case against attention_ref, split in 1 and 3 slices, launched with `launch`."""
    k_format, v_format, g, hkv, d, q_dtype, lens, page_size = DECODE_CASES[case]
    q, cache, page_table, query_start, seq_lens = decode_inputs(lens, g, hkv, d, k_format, v_format, q_dtype,
                                                                page_size, seed)
    expected = reference(q, cache, page_table, query_start, seq_lens, k_format, v_format, d**-0.5, 0)
    for num_splits in (1, 3):
        out = pa.paged_decode_attention(q, *cache, page_table, seq_lens, k_format, v_format, d**-0.5,
                                        num_splits=num_splits, **launch)
        assert_close(out, expected, q_dtype, f"decode {case} num_splits={num_splits} {launch}", seed)


PREFETCH_CASES = [c for c in DECODE_CASES if "bfp14" not in c]


@needs_interpreter
@pytest.mark.parametrize("case", PREFETCH_CASES, ids=PREFETCH_CASES)
def test_tiles_decode_with_register_prefetch_matches_reference(case, seed):
    """The "tiles" kernel with the next tile's raw bytes loaded before this tile's math (prefetch),
    split or not, tiles of 16 tokens so the prefetch crosses pages and runs past the slice's end."""
    check_decode_case(case, seed, kernel="tiles", prefetch=True, block_n=16)


@needs_interpreter
def test_decode_ablations_are_refused_where_they_do_not_apply(seed):
    """ablate (benchmarks: loads only / loads + decode) runs on the tiles kernel for 4/8-bit and dense
    formats; elsewhere it is an error naming what it needs, not a silent full run."""
    q, cache, page_table, _, seq_lens = decode_inputs([20, 3], 4, 1, 64, "bfp12_32", "bfp12_32", torch.float32, 16,
                                                      seed)
    for ablate in (1, 2):
        out = pa.paged_decode_attention(q, *cache, page_table, seq_lens, "bfp12_32", "bfp12_32", 0.125,
                                        num_splits=1, kernel="tiles", ablate=ablate)
        assert torch.isfinite(out).all()
    for bad, kwargs in ((3, {"kernel": "tiles"}), (1, {"kernel": "blocks"}), (1, {"kernel": "i8k"})):
        with pytest.raises(ValueError, match="ablate"):
            pa.paged_decode_attention(q.bfloat16(), *cache, page_table, seq_lens, "bfp12_32", "bfp12_32", 0.125,
                                      num_splits=1, ablate=bad, **kwargs)


@needs_interpreter
@pytest.mark.parametrize("k_format", ["bfp16_32", "bfp12_32"])
def test_i8k_ablations_leave_out_one_stage(k_format, seed):
    """The i8k ablations time one stage left out, and the output says which: without the V stage
    (ablate=3) nothing reaches the accumulator (zeros); without the K stage (ablate=4) every key
    scores 0, so the output is attention with uniform weights, the reference's answer for q = 0."""
    q, cache, page_table, query_start, seq_lens = decode_inputs([40, 7], 4, 2, 64, k_format, "bfp16_32",
                                                                torch.bfloat16, 16, seed)
    launch = dict(num_splits=2, kernel="i8k", block_n=16)
    no_v = pa.paged_decode_attention(q, *cache, page_table, seq_lens, k_format, "bfp16_32", 0.125, ablate=3, **launch)
    assert torch.equal(no_v, torch.zeros_like(q))
    no_k = pa.paged_decode_attention(q, *cache, page_table, seq_lens, k_format, "bfp16_32", 0.125, ablate=4, **launch)
    uniform = reference(torch.zeros_like(q), cache, page_table, query_start, seq_lens, k_format, "bfp16_32", 0.125, 0)
    assert_close(no_k, uniform, torch.bfloat16, f"i8k ablate=4 {k_format}", seed)


@needs_interpreter
@pytest.mark.parametrize("kernel,k_format", [("tiles", "bfp16_32"), ("tiles", "bfloat16"), ("i8k", "bfp12_32"),
                                             ("i8t", "bfp16_32")])
def test_ablation_without_the_loop_reads_no_kv(kernel, k_format, seed):
    """ablate=5 times a launch's fixed cost (setup and store, no K/V loop): the output is zeros, one
    slice or several (the reduce weighs empty slices 0), and the cache's values cannot reach it (a
    cache of NaN gives zeros too). The full launch on the same inputs is attention, so the test sees
    that 5 changed what ran."""
    v_format = "bfloat16" if k_format == "bfloat16" else "bfp16_32"
    q, cache, page_table, _, seq_lens = decode_inputs([40, 7], 4, 2, 64, k_format, v_format, torch.bfloat16, 16, seed)
    if kernel == "i8t":
        cache = [cache[0], cache[1], pa.to_channels_by_tokens(cache[2]), pa.to_channels_by_tokens(cache[3])]
    for num_splits in (1, 3):
        launch = dict(num_splits=num_splits, kernel=kernel, block_n=32 if kernel == "i8t" else 16)
        full = pa.paged_decode_attention(q, *cache, page_table, seq_lens, k_format, v_format, 0.125, **launch)
        assert full.abs().max() > 0
        nan_cache = [c.float().fill_(float("nan")).to(c.dtype) if c.is_floating_point() else c for c in cache]
        for kv in (cache, nan_cache):
            out = pa.paged_decode_attention(q, *kv, page_table, seq_lens, k_format, v_format, 0.125, ablate=5,
                                            **launch)
            assert torch.equal(out, torch.zeros_like(q)), (kernel, k_format, num_splits)


@needs_interpreter
def test_decode_splits_agree_and_sliding_window(seed):
    """num_splits 1, 2, 5 give the same numbers (up to summation order); with a sliding window the
    slices cover only the last `window` tokens (window 20 < 100, and > 17, and > 1)."""
    fmt, window = "bfp12_32", 20
    q, cache, page_table, query_start, seq_lens = decode_inputs([100, 17, 1], 4, 2, 64, fmt, fmt, torch.float32,
                                                                16, seed)
    expected = reference(q, cache, page_table, query_start, seq_lens, fmt, fmt, 0.125, window)
    outs = [pa.paged_decode_attention(q, *cache, page_table, seq_lens, fmt, fmt, 0.125, window, num_splits=n)
            for n in (1, 2, 5)]
    for n, out in zip((1, 2, 5), outs):
        assert_close(out, expected, torch.float32, f"decode window={window} num_splits={n}", seed)
    for n, out in zip((2, 5), outs[1:]):
        assert (out - outs[0]).abs().max() <= 1e-5, f"num_splits={n} differs from 1 by {(out - outs[0]).abs().max()}"


# The block-scaled decode kernels ("blocks", "diag"): id: (k_format, v_format, g, Hkv, head_dim, q dtype,
# context lengths, sliding window, (num_splits, prefetch) runs: "diag" runs the first only)
BLOCKS_CASES = {
    "bfp12_32-g4-d64-fp32q": ("bfp12_32", "bfp12_32", 4, 1, 64, torch.float32, [17, 33, 1], 0,
                              [(2, False), (1, True)]),
    "bfp16_32-g4-d128-bf16q": ("bfp16_32", "bfp16_32", 4, 1, 128, torch.bfloat16, [33, 20], 0, [(2, True)]),
    "mxfp4_32-g2-d128-bf16q": ("mxfp4_32", "mxfp4_32", 2, 1, 128, torch.bfloat16, [17, 20], 0, [(2, True)]),
    "k_bfp12_32-v_bf16-g3-d96-window": ("bfp12_32", "bfloat16", 3, 1, 96, torch.bfloat16, [40, 3], 24,
                                        [(1, False), (2, True)]),
    "k_bf16-v_bfp16_16-g4-d64-fp32q": ("bfloat16", "bfp16_16", 4, 1, 64, torch.float32, [40, 9], 0, [(1, True)]),
    "k_bfp16_32-v_fp16-fp16q": ("bfp16_32", "float16", 4, 1, 64, torch.float16, [40, 9], 0, [(2, False)]),
    "bfp12_16-g2-d32": ("bfp12_16", "bfp12_16", 2, 2, 32, torch.float32, [30, 7], 0, [(2, True)]),  # diag only
}
BLOCKS_RUNS = [(kernel, case) for kernel in ("blocks", "diag") for case in BLOCKS_CASES
               if kernel == "diag" or "bfp12_16" not in case]


@needs_interpreter
@pytest.mark.parametrize("kernel,case", BLOCKS_RUNS, ids=[f"{k}-{c}" for k, c in BLOCKS_RUNS])
def test_blocks_decode_matches_reference(kernel, case, seed):
    """The block-scaled kernels (unscaled codes in per-block or block-diagonal dots, K scales on the
    partial scores, V scales folded into P) against attention_ref, with and without the register
    prefetch, split or not; a 3-block head (d96) pads the block count to 4."""
    k_format, v_format, g, hkv, d, q_dtype, lens, window, runs = BLOCKS_CASES[case]
    q, cache, page_table, query_start, seq_lens = decode_inputs(lens, g, hkv, d, k_format, v_format, q_dtype, 16,
                                                                seed)
    expected = reference(q, cache, page_table, query_start, seq_lens, k_format, v_format, d**-0.5, window)
    for num_splits, prefetch in runs if kernel == "blocks" else runs[:1]:
        out = pa.paged_decode_attention(q, *cache, page_table, seq_lens, k_format, v_format, d**-0.5, window,
                                        num_splits=num_splits, kernel=kernel, prefetch=prefetch, block_n=32)
        assert_close(out, expected, q_dtype, f"{kernel} decode {case} num_splits={num_splits} prefetch={prefetch}",
                     seed)


# "i8k": id: (k_format, v_format, g, Hkv, head_dim, context lengths, sliding window); bf16 queries only
I8K_CASES = {
    "bfp16_32-g4-d128": ("bfp16_32", "bfp16_32", 4, 2, 128, [33, 20, 1], 0),
    "k_bfp16_32-v_bfp12_32": ("bfp16_32", "bfp12_32", 4, 1, 128, [70, 17], 0),
    "k_bfp16_16-v_bf16-g3-d64-window": ("bfp16_16", "bfloat16", 3, 2, 64, [40, 3], 24),
    "k_bfp16_32-v_mxfp4-g2-d96": ("bfp16_32", "mxfp4_32", 2, 1, 96, [17, 50], 0),
    "bfp16_64-g8-d64": ("bfp16_64", "bfp16_64", 8, 1, 64, [30, 9], 0),
    "k_bfp12_32-v_bfp16_32": ("bfp12_32", "bfp16_32", 4, 2, 128, [33, 20, 1], 0),
    "bfp12_16-g3-d64-window": ("bfp12_16", "bfp12_16", 3, 1, 64, [40, 3], 24),
}


@needs_interpreter
@pytest.mark.parametrize("case", list(I8K_CASES))
def test_i8k_decode_matches_reference(case, seed):
    """The int8-key kernel (BFP16 codes, or BFP12 codes as int8 16 * code, in int8 dots against q in two
    int8 limbs per head and block, block-diagonal; V as "tiles" reads it) against attention_ref, split
    or not; a 3-block head (d96) pads the block count to 4, g3 pads the heads to 4."""
    k_format, v_format, g, hkv, d, lens, window = I8K_CASES[case]
    q, cache, page_table, query_start, seq_lens = decode_inputs(lens, g, hkv, d, k_format, v_format, torch.bfloat16,
                                                                16, seed)
    expected = reference(q, cache, page_table, query_start, seq_lens, k_format, v_format, d**-0.5, window)
    for num_splits in (1, 2):
        out = pa.paged_decode_attention(q, *cache, page_table, seq_lens, k_format, v_format, d**-0.5, window,
                                        num_splits=num_splits, kernel="i8k", block_n=32)
        assert_close(out, expected, torch.bfloat16, f"i8k decode {case} num_splits={num_splits}", seed)


# "i8t": id: (k_format, v_format, g, Hkv, head_dim, context lengths, sliding window); V stored channels by tokens
I8T_CASES = {
    "bfp16_32-g4-d128": ("bfp16_32", "bfp16_32", 4, 2, 128, [33, 20, 1], 0),
    "k_bfp12_32-v_bfp16_32": ("bfp12_32", "bfp16_32", 4, 2, 128, [70, 17], 0),
    "bfp16_32-g3-d96-window": ("bfp16_32", "bfp16_32", 3, 1, 96, [50, 3], 24),
    "bfp12_16-g3-d64": ("bfp12_16", "bfp12_16", 3, 2, 64, [40, 9], 0),
}


def channels_by_tokens_cache(cache):
    """The same cache with V (data and scale) stored channels by tokens, the layout "i8t" reads."""
    k_data, k_scale, v_data, v_scale = cache
    v_data, v_scale = pa.to_channels_by_tokens(v_data), pa.to_channels_by_tokens(v_scale)
    assert pa.v_channels_by_tokens(v_data) and pa.v_channels_by_tokens(v_scale)
    assert not pa.v_channels_by_tokens(cache[2])
    return [k_data, k_scale, v_data, v_scale]


@needs_interpreter
@pytest.mark.parametrize("case", list(I8T_CASES))
def test_i8t_decode_over_v_stored_channels_by_tokens_matches_reference(case, seed):
    """"i8t": "i8k" with V stored channels by tokens and V's codes in int8 dots against P scaled per V
    block (two int8 limbs per column), against attention_ref over the same values, split or not; the
    layout alone picks the kernel."""
    k_format, v_format, g, hkv, d, lens, window = I8T_CASES[case]
    q, cache, page_table, query_start, seq_lens = decode_inputs(lens, g, hkv, d, k_format, v_format, torch.bfloat16,
                                                                16, seed)
    expected = reference(q, cache, page_table, query_start, seq_lens, k_format, v_format, d**-0.5, window)
    t_cache = channels_by_tokens_cache(cache)
    assert torch.equal(reference(q, t_cache, page_table, query_start, seq_lens, k_format, v_format, d**-0.5, window),
                       expected)  # the layout changes no value
    runs = ((1, "i8t"), (2, None))
    outs = [pa.paged_decode_attention(q, *t_cache, page_table, seq_lens, k_format, v_format, d**-0.5, window,
                                      num_splits=num_splits, kernel=kernel, block_n=32) for num_splits, kernel in runs]
    for (num_splits, _), out in zip(runs, outs):
        assert_close(out, expected, torch.bfloat16, f"i8t decode {case} num_splits={num_splits}", seed)
    # "i8t" loads whole runs of a page's tokens, past a sequence's end too, and pages past its last as
    # page 0: poison every V byte the reference does not read (random codes, scale bytes 255, which
    # decode to inf); the outputs must not change by a bit
    live = torch.zeros(t_cache[2].shape[:2], dtype=torch.bool)
    for row, n in zip(page_table, seq_lens.tolist()):
        for pos in range(n):
            live[row[pos // 16], pos % 16] = True
    gen = torch.Generator().manual_seed(seed)
    t_cache[2][~live] = torch.randint(0, 256, t_cache[2][~live].shape, generator=gen, dtype=torch.uint8)
    t_cache[3][~live] = 255
    (num_splits, kernel), out = runs[-1], outs[-1]
    poisoned = pa.paged_decode_attention(q, *t_cache, page_table, seq_lens, k_format, v_format, d**-0.5, window,
                                         num_splits=num_splits, kernel=kernel, block_n=32)
    assert torch.equal(poisoned, out), f"i8t {case} num_splits={num_splits}: unread bytes changed the output"


@needs_interpreter
def test_v_stored_channels_by_tokens_is_read_by_i8t_and_the_decoded_prefill_only(seed):
    """Only "i8t" reads V stored channels by tokens, and "i8t" reads nothing else: either mismatch is
    an error naming the layout, never a wrong answer. Prefill reads that V through the decoded copy."""
    fmt = "bfp16_32"
    q, cache, page_table, query_start, seq_lens = decode_inputs([40, 9], 4, 1, 64, fmt, fmt, torch.bfloat16, 16, seed)
    t_cache = channels_by_tokens_cache(cache)
    with pytest.raises(ValueError, match="read only by kernel='i8t', not 'tiles'"):
        pa.paged_decode_attention(q, *t_cache, page_table, seq_lens, fmt, fmt, 0.125, kernel="tiles")
    with pytest.raises(ValueError, match="kernel='i8t' reads V stored channels by tokens"):
        pa.paged_decode_attention(q, *cache, page_table, seq_lens, fmt, fmt, 0.125, kernel="i8t")
    other_v = channels_by_tokens_cache(decode_inputs([40, 9], 4, 1, 64, fmt, "bfp12_16", torch.bfloat16, 16,
                                                     seed)[1])[2:]
    for kernel in ("i8t", None):  # V's blocks are not K's
        with pytest.raises(ValueError, match="read only by kernel='i8t', which does not run K bfp16_32, V bfp12_16"):
            pa.paged_decode_attention(q, *cache[:2], *other_v, page_table, seq_lens, fmt, "bfp12_16", 0.125,
                                      kernel=kernel)
    dense = decode_inputs([40, 9], 4, 1, 64, fmt, "bfloat16", torch.bfloat16, 16, seed)[1]
    with pytest.raises(ValueError, match="for a packed V, the tokens of a page"):  # a dense V keeps its rows
        pa.paged_decode_attention(q, *dense[:2], pa.to_channels_by_tokens(dense[2]), dense[3], page_table, seq_lens,
                                  fmt, "bfloat16", 0.125)
    with pytest.raises(ValueError, match="must be contiguous"):  # K has no such layout
        pa.paged_decode_attention(q, pa.to_channels_by_tokens(cache[0]), *cache[1:], page_table, seq_lens, fmt, fmt,
                                  0.125)
    q, cache, page_table, query_start, seq_lens = prefill_inputs([(20, 13), (0, 9)], 4, 1, 64, fmt, fmt,
                                                                 torch.bfloat16, 16, seed)
    t_cache = channels_by_tokens_cache(cache)
    expected = pa.paged_prefill_attention(q, *cache, page_table, query_start, seq_lens, fmt, fmt, 0.125,
                                          block_m=32, block_n=32, decode_pages=True)
    for decode_pages in (None, False):  # the copy is taken whatever was asked
        out = pa.paged_prefill_attention(q, *t_cache, page_table, query_start, seq_lens, fmt, fmt, 0.125,
                                         block_m=32, block_n=32, decode_pages=decode_pages)
        assert torch.equal(out, expected)
    with mock.patch.object(pa, "_DECODE_PAGES_MAX_BYTES", 0):  # the cap is for the optional copy only
        assert torch.equal(pa.paged_prefill_attention(q, *t_cache, page_table, query_start, seq_lens, fmt, fmt, 0.125,
                                                      block_m=32, block_n=32), expected)
    with mock.patch.object(torch.Tensor, "index_select", side_effect=torch.OutOfMemoryError("test")):
        with pytest.raises(ValueError, match="did not fit in GPU memory; use fewer tokens a step"):
            pa.paged_prefill_attention(q, *t_cache, page_table, query_start, seq_lens, fmt, fmt, 0.125)


@needs_interpreter
def test_i8k_runs_bfp16_and_bfp12_keys_and_bf16_queries_only(monkeypatch):
    """Picked where it cannot run (another K format, pre-RoPE keys, float32 queries, V not exact in
    bf16), "i8k" falls back to "tiles"; asked for explicitly there, it is an error naming the inputs."""
    fmt, cpu = pa.parse_kv_format, torch.device("cpu")
    monkeypatch.setattr(pa, "_FORCED_KERNEL", "i8k")
    assert pa.pick_decode_config(fmt("bfp16_32"), fmt("bfp12_32"), 128, 4, torch.bfloat16, cpu).kernel == "i8k"
    assert pa.pick_decode_config(fmt("bfp12_32"), fmt("bfp16_32"), 128, 4, torch.bfloat16, cpu).kernel == "i8k"
    for k_format, v_format, dtype, pre_rope in (("mxfp4_32", "bfp16_32", torch.bfloat16, False),
                                                ("bfp14_32", "bfp16_32", torch.bfloat16, False),
                                                ("bfp16_32", "bfp16_32", torch.bfloat16, True),
                                                ("bfp16_32", "bfp16_32", torch.float32, False),
                                                ("bfp16_32", "float32", torch.bfloat16, False)):
        picked = pa.pick_decode_config(fmt(k_format), fmt(v_format), 128, 4, dtype, cpu, pre_rope)
        assert picked.kernel == "tiles", (k_format, v_format, dtype, pre_rope)
    q, cache, page_table, _, seq_lens = decode_inputs([5, 9], 2, 2, 64, "bfp16_32", "bfp16_32", torch.float32, 16, 0)
    with pytest.raises(ValueError, match="kernel='i8k' does not run K bfp16_32, V bfp16_32, head_dim 64, "
                                         "torch.float32 queries"):
        pa.paged_decode_attention(q, *cache, page_table, seq_lens, "bfp16_32", "bfp16_32", 0.125, kernel="i8k")


@needs_interpreter
@pytest.mark.parametrize("kernel", ["blocks", "diag", "tiles"])
def test_blocks_decode_reads_no_poison(kernel, seed):
    """A page-table entry past a sequence's pages (poison: NaN blocks) is never read: a sequence of one
    full page and one of 16 + 1 tokens, with tiles of 16 tokens, so the prefetch reaches past both."""
    fmt = "bfp12_32"
    q, cache, page_table, query_start, seq_lens = decode_inputs([16, 17], 4, 1, 64, fmt, fmt, torch.float32, 16, seed)
    expected = reference(q, cache, page_table, query_start, seq_lens, fmt, fmt, 0.125, 0)
    out = pa.paged_decode_attention(q, *cache, page_table, seq_lens, fmt, fmt, 0.125, num_splits=1, kernel=kernel,
                                    block_n=16, prefetch=True)
    assert_close(out, expected, torch.float32, f"{kernel} decode at page ends", seed)


def test_decode_config_pick_tuned_file_and_fallbacks(tmp_path, monkeypatch):
    """Tuned configs are data: read per device and shape, refused at another version; a forced kernel
    falls back to "tiles" where it cannot run (an explicit one there is an error: the next test)."""
    fmt = pa.parse_kv_format
    key = pa.decode_config_key(fmt("bfp12_32"), fmt("bfp16_32"), 128, 4, torch.bfloat16)
    assert key == "K=bfp12_32,V=bfp16_32,D=128,G=4,dtype=bfloat16"
    tuned = {"kernel": "blocks", "block_n": 128, "num_warps": 8, "num_stages": 1, "prefetch": True,
             "programs_per_sm": 4}
    path = pa.decode_config_path("NVIDIA H200 (test)", tmp_path)
    assert path.name == "paged_decode_NVIDIA_H200_test.json"
    path.write_text(__import__("json").dumps({"version": 1, "shapes": {key: {"config": tuned, "time_us": 1.0}}}))
    assert pa.tuned_decode_configs("NVIDIA H200 (test)", tmp_path) == {key: pa.DecodeConfig(**tuned)}
    path.write_text('{"version": 99, "shapes": {}}')
    pa.tuned_decode_configs.cache_clear()
    with pytest.raises(ValueError, match="version 99"):
        pa.tuned_decode_configs("NVIDIA H200 (test)", tmp_path)
    pa.tuned_decode_configs.cache_clear()
    with pytest.raises(ValueError, match="unknown keys"):
        pa.DecodeConfig.from_dict({**tuned, "tiles_per_sm": 2})
    cpu = torch.device("cpu")
    assert pa.pick_decode_config(fmt("bfp12_32"), fmt("bfp12_32"), 128, 4, torch.bfloat16, cpu) == pa.DecodeConfig()
    monkeypatch.setattr(pa, "_FORCED_KERNEL", "blocks")
    assert pa.pick_decode_config(fmt("bfp12_32"), fmt("bfp12_32"), 128, 4, torch.bfloat16, cpu).kernel == "blocks"
    for k_format, pre_rope in (("bfp14_32", False), ("bfp12_16", False), ("bfp12_32", True)):
        picked = pa.pick_decode_config(fmt(k_format), fmt("bfp16_32"), 128, 4, torch.bfloat16, cpu, pre_rope)
        assert picked.kernel == "tiles", (k_format, pre_rope)
    monkeypatch.setattr(pa, "_FORCED_KERNEL", "diag")  # any block size; K and V with as many blocks
    assert pa.pick_decode_config(fmt("bfp12_16"), fmt("bfp16_16"), 128, 4, torch.bfloat16, cpu).kernel == "diag"
    assert pa.pick_decode_config(fmt("bfp12_16"), fmt("bfp16_32"), 128, 4, torch.bfloat16, cpu).kernel == "tiles"
    assert pa.pick_decode_config(fmt("bfloat16"), fmt("bfp16_16"), 128, 4, torch.bfloat16, cpu).kernel == "diag"


def test_a_v_stored_channels_by_tokens_picks_i8t_configs(monkeypatch):
    """v_layout "channels" looks up its own tuned key, then the rows key's launch, always with "i8t";
    rows never get an i8t entry's launch."""
    fmt, cuda = pa.parse_kv_format, torch.device("cuda")  # (a device object; nothing runs on it)
    k_fmt, v_fmt = fmt("bfp12_32"), fmt("bfp16_32")
    rows_key = pa.decode_config_key(k_fmt, v_fmt, 128, 4, torch.bfloat16)
    channels_key = pa.decode_config_key(k_fmt, v_fmt, 128, 4, torch.bfloat16, "channels")
    assert channels_key == rows_key + ",v_layout=channels"
    tuned = {rows_key: pa.DecodeConfig(kernel="i8k", num_warps=1),
             channels_key: pa.DecodeConfig(kernel="i8t", block_n=32, num_warps=1)}
    monkeypatch.setattr(pa, "_device_name", lambda device: "test")
    monkeypatch.setattr(pa, "tuned_decode_configs", lambda name: tuned)
    pick = functools.partial(pa.pick_decode_config, k_fmt, v_fmt, 128, 4, torch.bfloat16, cuda)
    assert pick() == pa.DecodeConfig(kernel="i8k", num_warps=1)
    assert pick(v_layout="channels") == pa.DecodeConfig(kernel="i8t", block_n=32, num_warps=1)
    del tuned[channels_key]
    assert pick(v_layout="channels") == pa.DecodeConfig(kernel="i8t", num_warps=1)
    assert pa.pick_decode_config(k_fmt, v_fmt, 128, 4, torch.bfloat16, torch.device("cpu"),
                                 v_layout="channels") == pa.DecodeConfig(kernel="i8t")
    tuned[rows_key] = pa.DecodeConfig(kernel="i8k", block_n=16)  # i8t's int8 V dot contracts over >= 32 tokens
    assert pick(v_layout="channels") == pa.DecodeConfig(kernel="i8t", block_n=32)
    with pytest.raises(ValueError, match="kernel='i8t' needs block_n >= 32, got 16"):
        pa.DecodeConfig(kernel="i8t", block_n=16)


def test_decode_configs_tuned_at_several_contexts_pick_the_nearest(monkeypatch):
    """A shape may hold entries tuned at several page-table capacities (",context=N"; the plain key is
    TUNE_CONTEXT): a launch takes the one nearest its capacity in ratio, ties to the longer; no capacity
    asks for TUNE_CONTEXT; a channels V looks among its own entries first."""
    fmt, cuda = pa.parse_kv_format, torch.device("cuda")  # (a device object; nothing runs on it)
    k_fmt = fmt("bfp16_32")
    key = functools.partial(pa.decode_config_key, k_fmt, k_fmt, 64, 3, torch.bfloat16)
    assert key(context=464) == key() + ",context=464" and key(context=pa.TUNE_CONTEXT) == key()
    assert key("channels", 512) == key() + ",v_layout=channels,context=512"
    tuned = {key(): pa.DecodeConfig(num_warps=8), key(context=464): pa.DecodeConfig(num_warps=1),
             key(context=1024): pa.DecodeConfig(num_warps=2)}
    monkeypatch.setattr(pa, "_device_name", lambda device: "test")
    monkeypatch.setattr(pa, "tuned_decode_configs", lambda name: tuned)
    pick = functools.partial(pa.pick_decode_config, k_fmt, k_fmt, 64, 3, torch.bfloat16, cuda)
    warps = {context: pick(context=context).num_warps for context in (None, 64, 464, 600, 700, 1024, 2048, 2049, 65536)}
    assert warps == {None: 8, 64: 1, 464: 1, 600: 1, 700: 2, 1024: 2, 2048: 8, 2049: 8, 65536: 8}  # 2048: a tie
    del tuned[key()]
    assert pick().num_warps == 2 and pick(context=100).num_warps == 1  # context entries alone still serve
    tuned[key("channels", 512)] = pa.DecodeConfig(kernel="i8t", num_warps=4)
    assert pick(v_layout="channels", context=4096) == pa.DecodeConfig(kernel="i8t", num_warps=4)
    tuned.clear()
    assert pick(context=464) == pa.DecodeConfig()


@needs_interpreter
def test_paged_decode_attention_picks_by_its_page_table_capacity(monkeypatch):
    """paged_decode_attention asks pick_decode_config for the config of its page table's capacity (a
    sliding window caps it): the capacity an engine's decode graph has, not the sequences' lengths."""
    seen = []
    real = pa.pick_decode_config
    monkeypatch.setattr(pa, "pick_decode_config",
                        lambda *args, **kwargs: seen.append(args[-1]) or real(*args, **kwargs))
    fmt = "bfp16_32"
    q, cache, page_table, _, seq_lens = decode_inputs([16, 40], 4, 2, 32, fmt, fmt, torch.float32, 16, 0)
    wide = torch.nn.functional.pad(page_table, (0, 3))  # 3 more pages never read
    out = pa.paged_decode_attention(q, *cache, page_table, seq_lens, fmt, fmt, 0.125, 0)
    assert_close(pa.paged_decode_attention(q, *cache, wide, seq_lens, fmt, fmt, 0.125, 0), out, torch.float32,
                 "a wider page table", 0)
    pa.paged_decode_attention(q, *cache, wide, seq_lens, fmt, fmt, 0.125, 32)
    assert seen == [page_table.shape[1] * 16, wide.shape[1] * 16, 32]


def test_the_launch_known_to_fault_is_refused_on_cuda_only():
    """bf16 "tiles" with 4 warps, one stage and no prefetch faults on the H200 (Triton 3.6): refused there
    with the launches that run instead named; the neighbours that ran stay allowed, and the CPU (the
    interpreter, where it is exact) is not refused."""
    fmt = pa.parse_kv_format
    dense, packed = fmt("bfloat16"), fmt("bfp16_32")
    faulty = pa.DecodeConfig(kernel="tiles", block_n=128, num_warps=4, num_stages=1)
    assert "num_stages >= 2, num_warps=2 or prefetch=True" in pa.known_decode_fault(faulty, dense, dense, "cuda")
    assert pa.known_decode_fault(faulty, dense, dense, "cpu") is None
    assert pa.known_decode_fault(faulty, packed, packed, "cuda") is None
    assert issubclass(pa.DecodeLaunchFault, ValueError)  # what paged_decode_attention raises; attention_bench skips it
    for ok in (dict(num_stages=2), dict(num_warps=2), dict(prefetch=True)):
        config = pa.DecodeConfig(**{**faulty.to_dict(), **ok})
        assert pa.known_decode_fault(config, dense, dense, "cuda") is None, ok


def test_int8_key_dots_contract_over_at_least_32_codes():
    """On the GPU an int8 dot contracts over >= 32: BFP12 keys (two 4-bit phases) need >= 64 padded
    channels for i8k / i8t, BFP16 keys >= 32 (the padded minimum). An engine asked to keep V channels
    by tokens for a shape i8t cannot run is refused when its cache is made (the check reads only the
    model's formats and kernels, so it runs here on CPU)."""
    import fxforge
    from tests.conftest import tiny_model

    fmt = pa.parse_kv_format
    for kernel in ("i8k", "i8t"):
        for k, v, d, ok in (("bfp12_32", "bfp12_32", 32, False), ("bfp12_32", "bfp12_32", 64, True),
                            ("bfp16_32", "bfp16_32", 32, True), ("bfp16_16", "bfp16_16", 16, True)):
            assert pa.decode_kernel_supports(kernel, fmt(k), fmt(v), d) is ok, (kernel, k, d)
    lowered = [{"name": "lower", "backend": "triton"}]
    bfp12 = fxforge.optimize(tiny_model("llama-gqa", dtype=torch.bfloat16), passes=["bfp-kv", *lowered])
    with pytest.raises(ValueError, match=r"v_layout='channels': layer 0 \(K bfp12_32, V bfp16_32, head_dim 32"):
        bfp12._check_channels_decode(torch.device("cuda"))
    if INTERPRETER:  # the CPU decodes with the Triton kernels too: the same refusal
        with pytest.raises(ValueError, match=r"v_layout='channels': layer 0 \(K bfp12_32, V bfp16_32, head_dim 32"):
            bfp12._check_channels_decode(torch.device("cpu"))
    else:
        bfp12._check_channels_decode(torch.device("cpu"))  # the references read either layout
    bfp16 = fxforge.optimize(tiny_model("llama-gqa", dtype=torch.bfloat16),
                             passes=[{"name": "bfp-kv", "k_format": "bfp16"}, *lowered])
    bfp16._check_channels_decode(torch.device("cuda"))
    fp32 = fxforge.optimize(tiny_model("llama-gqa"), passes=[{"name": "bfp-kv", "k_format": "bfp16"}, *lowered])
    with pytest.raises(ValueError, match="float32\\) cannot be decoded"):
        fp32._check_channels_decode(torch.device("cuda"))


def test_tuner_keeps_the_fastest_kernel_and_variant_per_format():
    """attention_bench.tuned_entries: the fastest row at 4k context per format (any kernel, any
    variant) becomes the config; the tiles default is the baseline; portable-decode rows are not configs."""
    from fxforge.kernels.attention_bench import tuned_entries

    def row(fmt, kernel, config, time_us, context=4096):
        return dict(format=fmt, context=context, kernel=kernel, config=config, time_us=time_us, d=128, hq=32, hkv=8)

    variant = '{"block_n": 128, "num_warps": 8, "num_stages": 1, "prefetch": true}'
    rows = [row("bfp12_32", "tiles", "default", 300.0), row("bfp12_32", "blocks", "default", 200.0),
            row("bfp12_32", "blocks", variant, 150.0), row("bfp12_32", "blocks", "default", 10.0, context=1024),
            row("bfp12_32", "tiles", "default", 12.0, context=1024),
            row("bfloat16", "tiles", "default", 260.0), row("bfloat16", "tiles", '{"asm": false}', 250.0),
            row("bfp12_32/bfp16_32", "tiles", "default", 280.0), row("bfp12_32/bfp16_32", "blocks", "default", 290.0),
            dict(row("bfp12_32/bfp16_32", "tiles", "ablate=1 default", 90.0), ablate=1),  # not a config
            row("bfp12_32/bfp16_32", "i8t", "default", 80.0)]  # reads V stored channels by tokens: its own key
    entries = tuned_entries(rows)
    key = "K=bfp12_32,V=bfp12_32,D=128,G=4,dtype=bfloat16"
    tuned = pa.DecodeConfig(kernel="blocks", block_n=128, num_warps=8, num_stages=1, prefetch=True)
    assert entries[key] == {"config": tuned.to_dict(), "time_us": 150.0, "default_time_us": 300.0, "context": 4096}
    short = tuned_entries(rows, context=1024)  # a sweep at another context (--sweep-context) tunes from its rows,
    assert short[key + ",context=1024"]["config"] == pa.DecodeConfig(kernel="blocks").to_dict()  # keyed by it
    assert short[key + ",context=1024"]["context"] == 1024 and key not in short
    wide = [dict(r, capacity=4096) for r in rows if r["context"] == 1024]  # 1k-token sequences, 4k-token tables
    assert tuned_entries(wide, context=1024)[key] == {"config": pa.DecodeConfig(kernel="blocks").to_dict(),
                                                       "time_us": 10.0, "default_time_us": 12.0, "context": 4096,
                                                       "lengths": 1024}
    assert "K=bfloat16,V=bfloat16,D=128,G=4,dtype=bfloat16" not in entries  # its fastest was asm=False
    mixed = entries["K=bfp12_32,V=bfp16_32,D=128,G=4,dtype=bfloat16"]
    assert mixed["config"] == pa.DecodeConfig().to_dict() and mixed["time_us"] == 280.0
    channels = entries["K=bfp12_32,V=bfp16_32,D=128,G=4,dtype=bfloat16,v_layout=channels"]
    assert channels["config"] == pa.DecodeConfig(kernel="i8t").to_dict() and channels["time_us"] == 80.0
    assert sum(k.endswith("v_layout=channels") for k in entries) == 1


def test_tuner_writes_the_launch_each_row_ran(monkeypatch):
    """A variant's keywords override the config the device's tuned file gives, so a field the variant
    leaves out ran with the tuned entry's value: each row records that whole launch (launch_of), and
    the tuner writes it. (The fourth session's one-warp entries were written as the variant over the
    defaults, programs_per_sm 8, where the timed launch had inherited 4 from the entry it replaced.)"""
    from fxforge.kernels.attention_bench import launch_of, tuned_entries

    fmt = pa.parse_kv_format
    k_fmt = fmt("bfp12_32")
    rows_key = pa.decode_config_key(k_fmt, k_fmt, 128, 4, torch.bfloat16)
    tuned = {rows_key: pa.DecodeConfig(kernel="i8k", programs_per_sm=4)}
    monkeypatch.setattr(pa, "_device_name", lambda device: "test")
    monkeypatch.setattr(pa, "tuned_decode_configs", lambda name: tuned)
    # launch_of reads the query's shape, dtype and device only: a CUDA query stood in for on CPU
    q = types.SimpleNamespace(shape=(64, 32, 128), dtype=torch.bfloat16, device=torch.device("cuda"))
    cache = kv_cache.allocate_kv_pair(2, 16, 8, 128, "bfp12_32", "bfp12_32")
    launch = launch_of(q, cache, "bfp12_32", "bfp12_32", "i8k", {"num_warps": 1})
    assert launch == pa.DecodeConfig(kernel="i8k", num_warps=1, programs_per_sm=4).to_dict()
    assert launch_of(q, cache, "bfp12_32", "bfp12_32", "i8k", {"num_warps": 1, "programs_per_sm": 16}) == \
        pa.DecodeConfig(kernel="i8k", num_warps=1, programs_per_sm=16).to_dict()
    channels = [cache[0], cache[1], kv_cache.to_channels_by_tokens(cache[2]), kv_cache.to_channels_by_tokens(cache[3])]
    assert launch_of(q, channels, "bfp12_32", "bfp12_32", "i8t", {}) == \
        pa.DecodeConfig(kernel="i8t", programs_per_sm=4).to_dict()  # no channels entry: the rows entry's launch
    assert launch_of(q, cache, "bfp12_32", "bfp12_32", "i8k", {"min_split_tokens": 64}) == \
        pa.DecodeConfig(kernel="i8k", programs_per_sm=4, min_split_tokens=64).to_dict()
    row = dict(format="bfp12_32", context=4096, kernel="i8k", config='{"num_warps": 1}', launch=launch,
               time_us=240.0, d=128, hq=32, hkv=8)
    default = dict(row, kernel="tiles", config="default", launch=None, time_us=300.0)
    assert tuned_entries([default, row])[rows_key]["config"] == launch


@pytest.mark.skipif(INTERPRETER or not triton_support.HAS_TRITON, reason="compiles for sm_90 (not interpreted)")
@pytest.mark.parametrize("kernel", ["blocks", "diag", "tiles-prefetch", "i8k", "i8t"])
def test_block_scaled_kernels_compile_for_hopper(kernel):
    """The interpreter does not lower layouts or inline PTX: compile the issue-14 kernels (and tiles with
    the register prefetch) for sm_90 (no GPU needed) with the PTX decode of 4- and 8-bit codes, and
    check the dots run on tensor cores."""
    from fxforge.kernels.attention_bench import sass_summary

    config = dict(prefetch=True, num_stages=1) if kernel == "tiles-prefetch" else {}
    k_format = "bfp16_32" if kernel in ("i8k", "i8t") else "bfp12_32"
    try:
        summary = sass_summary(kernel.removesuffix("-prefetch"), k_format, "bfp16_32", **config)
    except (ImportError, FileNotFoundError) as exc:  # a triton build without the NVIDIA backend's tools
        pytest.skip(f"no sm_90 toolchain in this triton: {exc}")
    assert summary["registers"] <= 255, summary
    assert summary.get("HGMMA", 0) + summary.get("HMMA", 0) + summary.get("IGMMA", 0) + summary.get("IMMA", 0), summary
    if kernel in ("i8k", "i8t"):  # q . k as int8 tensor-core dots, K's bytes staged by cp.async
        assert summary.get("IGMMA", 0) > 0 and summary.get("LDGSTS", 0) > 0, summary
    if kernel == "i8t":  # P . V too: no bf16 dot left
        assert summary.get("HGMMA", 0) + summary.get("HMMA", 0) == 0, summary


@needs_interpreter
def test_blocks_kernel_refuses_formats_it_cannot_run():
    q, cache, page_table, _, seq_lens = decode_inputs([5, 9], 3, 2, 64, "bfp14_32", "bfp14_32", torch.float32, 16, 0)
    for kernel in ("blocks", "diag"):
        with pytest.raises(ValueError, match=f"kernel='{kernel}' does not run K bfp14_32"):
            pa.paged_decode_attention(q, *cache, page_table, seq_lens, "bfp14_32", "bfp14_32", 0.125, kernel=kernel)
    with pytest.raises(ValueError, match="kernel='fast' must be one of"):
        pa.paged_decode_attention(q, *cache, page_table, seq_lens, "bfp14_32", "bfp14_32", 0.125, kernel="fast")
    with pytest.raises(ValueError, match="block_n=24"):
        pa.paged_decode_attention(q, *cache, page_table, seq_lens, "bfp14_32", "bfp14_32", 0.125, block_n=24)


# ----------------------------------------------------------------------------------------------
# Prefill (interpreter)
# ----------------------------------------------------------------------------------------------

# id: (k_format, v_format, g, Hkv, head_dim, q dtype, (cached, new) per sequence, page size, window)
PREFILL_CASES = {
    # fresh prompt, a second chunk over 50 cached tokens, a decode row, an empty sequence
    "fp32-g4-d64-chunked": ("float32", "float32", 4, 2, 64, torch.float32, [(0, 37), (50, 20), (99, 1), (30, 0)], 16,
                            0),
    "bfp12_32-g3-d64-chunked": ("bfp12_32", "bfp12_32", 3, 2, 64, torch.float32, [(40, 33), (0, 17), (16, 16)], 16, 0),
    "bf16-mha-d128": ("bfloat16", "bfloat16", 1, 2, 128, torch.bfloat16, [(0, 100), (17, 1)], 16, 0),
    "mxfp4_32-k_bfp16_32-g4-d128-bf16q": ("bfp16_32", "mxfp4_32", 4, 1, 128, torch.bfloat16, [(23, 41), (0, 5)], 16, 0),
    "bfp14_16-g3-d64-window": ("bfp14_16", "bfp14_16", 3, 1, 64, torch.float32, [(60, 40), (0, 30)], 8, 24),
}


@needs_interpreter
@pytest.mark.parametrize("case", list(PREFILL_CASES), ids=list(PREFILL_CASES))
def test_prefill_matches_reference(case, seed):
    k_format, v_format, g, hkv, d, q_dtype, chunks, page_size, window = PREFILL_CASES[case]
    q, cache, page_table, query_start, seq_lens = prefill_inputs(chunks, g, hkv, d, k_format, v_format, q_dtype,
                                                                 page_size, seed)
    expected = reference(q, cache, page_table, query_start, seq_lens, k_format, v_format, d**-0.5, window)
    out = pa.paged_prefill_attention(q, *cache, page_table, query_start, seq_lens, k_format, v_format, d**-0.5,
                                     window, block_m=32, block_n=32)
    assert_close(out, expected, q_dtype, f"prefill {case}", seed)


@needs_interpreter
@pytest.mark.parametrize("case", ["bfp12_32-g3-d64-chunked", "mxfp4_32-k_bfp16_32-g4-d128-bf16q"])
def test_prefill_over_pages_decoded_once_equals_decoding_in_the_loop(case, seed):
    """A packed cache read from a copy of the step's pages decoded once (decode_pages=True) gives the
    outputs of decoding each key tile in the loop (the dots see the same values; 4-bit codes sum their
    even and odd channels in two dots there, one here, so float32 sums may differ in the last bits),
    though the page table is padded with ids past the cache; the default takes the copy for long
    chunks and, past the copy's byte cap, reads the packed cache."""
    k_format, v_format, g, hkv, d, q_dtype, chunks, page_size, window = PREFILL_CASES[case]
    q, cache, page_table, query_start, seq_lens = prefill_inputs(chunks, g, hkv, d, k_format, v_format, q_dtype,
                                                                 page_size, seed)
    assert int(page_table.max()) >= cache[0].shape[0], "the table should name pages past the cache"
    k_fmt, v_fmt = parse_kv_format(k_format), parse_kv_format(v_format)
    run = functools.partial(pa.paged_prefill_attention, q, *cache, page_table, query_start, seq_lens, k_format,
                            v_format, d**-0.5, window, block_m=32, block_n=32)
    with mock.patch.object(pa, "dequantize", wraps=pa.dequantize) as decodes:
        in_loop = run(decode_pages=False)
        assert decodes.call_count == 0
        copied = run(decode_pages=True)
        assert decodes.call_count == (not k_fmt.is_dense) + (not v_fmt.is_dense)
    diff = (copied.float() - in_loop.float()).abs().max()
    assert diff <= 1e-5 * (1 + in_loop.float().abs().max()), f"{case}: max diff {diff}"
    expected = reference(q, cache, page_table, query_start, seq_lens, k_format, v_format, d**-0.5, window)
    assert_close(copied, expected, q_dtype, f"prefill over decoded pages {case}", seed)
    tokens_per_tile = 32 // g
    assert pa._prefill_decodes_pages_first(None, k_fmt, v_fmt, 4 * tokens_per_tile * 2, 2, tokens_per_tile)
    assert not pa._prefill_decodes_pages_first(None, k_fmt, v_fmt, 4 * tokens_per_tile * 2 - 1, 2, tokens_per_tile)
    dense = parse_kv_format("bfloat16")
    assert not pa._prefill_decodes_pages_first(True, dense, dense, 10**6, 1, tokens_per_tile)
    with mock.patch.object(pa, "_DECODE_PAGES_MAX_BYTES", 0):
        assert pa._decoded_pages(*cache, page_table, k_fmt, v_fmt, d, pa.tl.float32) is None
        assert torch.equal(run(decode_pages=True), in_loop)  # the cap sends it back to the loop


@needs_interpreter
def test_pre_rope_prefill_over_pages_decoded_once(seed):
    """Pre-RoPE BFP keys (rotated in float32 after decoding) give the same prefill outputs from the
    decoded copy as from the packed cache, bit for bit (8-bit V: one dot either way; a 4-bit V sums its
    even and odd channels in two dots in the loop, which may move the last bit, as the test above says)."""
    k_format, v_format, d = "bfp16_32", "bfp16_32", 64
    key_rope = random_key_rope(2, d, torch.Generator().manual_seed(seed))
    q, cache, page_table, query_start, seq_lens = prefill_inputs([(30, 21), (0, 17)], 2, 2, d, k_format, v_format,
                                                                 torch.bfloat16, 16, seed)
    outs = [pa.paged_prefill_attention(q, *cache, page_table, query_start, seq_lens, k_format, v_format, d**-0.5,
                                       key_rope=key_rope, block_m=32, block_n=32, decode_pages=flag)
            for flag in (False, True)]
    assert torch.equal(outs[0], outs[1]), f"max diff {(outs[0].float() - outs[1].float()).abs().max()}"


@needs_interpreter
def test_chunked_prefill_equals_whole_prompt(seed):
    """Prefilling a prompt in two chunks (the second reading the first from the cache) gives the same
    outputs as prefilling it at once, row for row."""
    fmt, n, split = "bfp16_32", 45, 29
    q, cache, page_table, _, seq_lens = prefill_inputs([(0, n)], 3, 1, 64, fmt, fmt, torch.float32, 16, seed)
    whole = pa.paged_prefill_attention(q, *cache, page_table, torch.tensor([0, n], dtype=torch.int32), seq_lens,
                                       fmt, fmt, 0.125)
    first = pa.paged_prefill_attention(q[:split], *cache, page_table, torch.tensor([0, split], dtype=torch.int32),
                                       torch.tensor([split], dtype=torch.int32), fmt, fmt, 0.125)
    second = pa.paged_prefill_attention(q[split:], *cache, page_table, torch.tensor([0, n - split], dtype=torch.int32),
                                        seq_lens, fmt, fmt, 0.125)
    assert_close(torch.cat([first, second]), whole, torch.float32, "chunked vs whole prefill", seed)


# ----------------------------------------------------------------------------------------------
# Pre-RoPE keys, rotated on read
# ----------------------------------------------------------------------------------------------


def random_key_rope(num_kv_heads, head_dim, gen):
    """key_rope table of a random key-RoPE layout (pairs in random slots, either way round) with
    random channel scales, for half-split RoPE with theta 10^4."""
    half = head_dim // 2
    perms = []
    for _ in range(num_kv_heads):
        slot_pair, swapped = torch.randperm(half, generator=gen), torch.rand(half, generator=gen) < 0.5
        lo = torch.where(swapped, slot_pair + half, slot_pair)
        perms.append(torch.cat([lo, (lo + half) % head_dim]))
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    scale = torch.rand(num_kv_heads, head_dim, generator=gen) + 0.5
    return key_rope_table(inv_freq, False, torch.stack(perms), num_kv_heads, head_dim, scale)


def rotated_reference(q, cache, page_table, query_start, seq_lens, k_format, v_format, scale, window, key_rope):
    """attention_ref over pre-RoPE keys. With bf16 queries the kernels' dots take the rotated keys in
    bf16 (they are not exact in bf16, unlike decoded BFP values), so the oracle rounds them the same
    way (to nearest on CUDA; the interpreter's cast truncates): rotated, rounded keys go into a
    float32 cache that attention_ref reads without rotation."""
    if q.dtype != torch.bfloat16:
        return attention_ref(q.float(), *cache, page_table, query_start, seq_lens, k_format, v_format, scale,
                             window, key_rope)
    k_data, k_scale, v_data, v_scale = cache
    page_size, head_dim = k_data.shape[1], q.shape[2]
    rotated = torch.zeros(*k_data.shape[:3], head_dim)
    for s, length in enumerate(seq_lens.tolist()):
        pages = page_table[s, : (length + page_size - 1) // page_size].long()
        keys = rotate_keys_ref(kv_read_ref(k_data, k_scale, pages, length, k_format, head_dim), torch.arange(length),
                               key_rope)
        keys = (keys.view(torch.int32) & -65536).view(torch.float32) if INTERPRETER else keys.bfloat16().float()
        rotated.view(-1, *rotated.shape[2:])[(pages[:, None] * page_size + torch.arange(page_size)).flatten()[:length]] = keys
    return attention_ref(q.float(), rotated, torch.empty(*k_data.shape[:3], 0, dtype=torch.uint8), v_data, v_scale,
                         page_table, query_start, seq_lens, "float32", v_format, scale, window)


def test_pre_rope_reference_is_attention_over_rotated_keys(seed):
    """attention_ref with key_rope equals attention_ref over a cache holding rope_ref of the scaled
    keys at their positions: rotation on read is the model's RoPE, at the right positions."""
    gen = torch.Generator().manual_seed(seed)
    fmt, d = "float32", 32
    q, cache, page_table, query_start, seq_lens = prefill_inputs([(20, 11), (0, 9)], 2, 2, d, fmt, fmt, torch.float32,
                                                                 8, seed)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    channel_scale = torch.rand(2, d, generator=gen) + 0.5
    key_rope = key_rope_table(inv_freq, False, None, 2, d, channel_scale)
    expected = attention_ref(q, *cache, page_table, query_start, seq_lens, fmt, fmt, 0.2, 0, key_rope)
    flat = cache[0].view(-1, 2, d)
    positions = torch.zeros(flat.shape[0], dtype=torch.int64)
    for s, length in enumerate(seq_lens.tolist()):
        slots = page_table[s, torch.arange(length) // 8].long() * 8 + torch.arange(length) % 8
        positions[slots] = torch.arange(length)
    post = rope_ref(flat * channel_scale, positions, inv_freq, False).view_as(cache[0])
    baseline = attention_ref(q, post, *cache[1:], page_table, query_start, seq_lens, fmt, fmt, 0.2, 0)
    assert_close(expected, baseline, torch.float32, "pre-RoPE reference", seed)
    plain = attention_ref(q, *cache, page_table, query_start, seq_lens, fmt, fmt, 0.2, 0)
    assert (plain - expected).abs().max() > 0.1, "key_rope changed nothing"


# id: (k_format, v_format, g, Hkv, head_dim, q dtype, prefill window)
PRE_ROPE_CASES = {
    "bfp12_32-g3-d64": ("bfp12_32", "bfp12_32", 3, 2, 64, torch.float32, 0),
    "bfp16_32-v_bf16-g4-d128-bf16q": ("bfp16_32", "bfloat16", 4, 1, 128, torch.bfloat16, 0),
    "bfp14_16-g2-d32-window": ("bfp14_16", "float32", 2, 2, 32, torch.float32, 12),
    "mxfp4_32-mha-d64-bf16q": ("mxfp4_32", "bfp16_32", 1, 2, 64, torch.bfloat16, 0),
    "float32-g3-d32": ("float32", "float32", 3, 1, 32, torch.float32, 0),
    "bfloat16-g2-d64-bf16q": ("bfloat16", "bfloat16", 2, 2, 64, torch.bfloat16, 0),
}


@needs_interpreter
@pytest.mark.parametrize("case", list(PRE_ROPE_CASES), ids=list(PRE_ROPE_CASES))
def test_pre_rope_keys_match_reference(case, seed):
    """Decode (one and three splits) and chunked prefill over a cache of pre-RoPE keys."""
    k_format, v_format, g, hkv, d, q_dtype, window = PRE_ROPE_CASES[case]
    key_rope = random_key_rope(hkv, d, torch.Generator().manual_seed(seed))
    q, cache, page_table, query_start, seq_lens = decode_inputs([17, 70, 1], g, hkv, d, k_format, v_format, q_dtype,
                                                                16, seed)
    expected = rotated_reference(q, cache, page_table, query_start, seq_lens, k_format, v_format, d**-0.5, 0,
                                 key_rope)
    for num_splits in (1, 3):
        out = pa.paged_decode_attention(q, *cache, page_table, seq_lens, k_format, v_format, d**-0.5,
                                        num_splits=num_splits, key_rope=key_rope)
        assert_close(out, expected, q_dtype, f"pre-RoPE decode {case} num_splits={num_splits}", seed)
    q, cache, page_table, query_start, seq_lens = prefill_inputs([(30, 21), (0, 17)], g, hkv, d, k_format, v_format,
                                                                 q_dtype, 16, seed)
    expected = rotated_reference(q, cache, page_table, query_start, seq_lens, k_format, v_format, d**-0.5, window,
                                 key_rope)
    out = pa.paged_prefill_attention(q, *cache, page_table, query_start, seq_lens, k_format, v_format, d**-0.5,
                                     window, key_rope=key_rope, block_m=32, block_n=32)
    assert_close(out, expected, q_dtype, f"pre-RoPE prefill {case}", seed)


@needs_interpreter
def test_pre_rope_keys_need_a_power_of_two_head_dim():
    q, cache, page_table, _, seq_lens = decode_inputs([5], 3, 1, 96, "bfp12_32", "bfp12_32", torch.float32, 16, 0)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        pa.paged_decode_attention(q, *cache, page_table, seq_lens, "bfp12_32", "bfp12_32", 0.1,
                                  key_rope=torch.zeros(1, 3, 48))


# ----------------------------------------------------------------------------------------------
# The inline-PTX decode (CUDA only), run here through a small emulator of the instructions it uses
# ----------------------------------------------------------------------------------------------


def _bf16_bits_to_f64(bits):
    return ((bits.astype(np.uint32) & 0xFFFF) << 16).view(np.float32).astype(np.float64)


def _round_bf16_bits(values):
    bits = torch.from_numpy(np.asarray(values, np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
    return bits.astype(np.uint32) & 0xFFFF


def run_ptx(text, operands):
    """Execute the PTX of the decode helpers on numpy uint32 arrays: lop3, shr, shl, xor, and, or, mov,
    prmt (default mode), fma.rn.{f32,bf16x2} (exact product and sum, one rounding), cvt.rn.bf16x2.f32."""
    regs = {f"${i}": np.asarray(v, np.uint32) for i, v in enumerate(operands)}
    val = lambda tok: regs[tok] if tok in regs else np.uint32(int(tok, 0))  # noqa: E731
    for line in text.strip().splitlines():
        line = line.strip().rstrip(";")
        if line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        a, b, c = ([val(t) for t in src] + [None, None])[:3]
        if op == "lop3.b32":
            lut = int(src[3], 0)
            out = np.zeros_like(a)
            for bit in range(32):
                idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
                out |= ((np.uint32(lut) >> idx) & 1) << np.uint32(bit)
        elif op == "shr.u32":
            out = a >> b
        elif op == "shl.b32":
            out = (a.astype(np.uint64) << np.uint64(b)).astype(np.uint32)
        elif op == "xor.b32":
            out = a ^ b
        elif op == "and.b32":
            out = a & b
        elif op == "or.b32":
            out = a | b
        elif op == "mov.b32":
            out = np.asarray(a, np.uint32)
        elif op == "prmt.b32":  # selector c: an immediate or a register (one per element)
            *pool, selector = np.broadcast_arrays(*[(x >> np.uint32(8 * i)) & 0xFF for x in (a, b) for i in range(4)],
                                                  np.asarray(c, np.uint32))
            pool = np.stack(pool)
            picks = [np.take_along_axis(pool, ((selector >> np.uint32(4 * i)) & 7)[None], 0)[0] for i in range(4)]
            out = sum(pick << np.uint32(8 * i) for i, pick in enumerate(picks)).astype(np.uint32)
        elif op == "fma.rn.f32":
            f = lambda x: np.asarray(x, np.uint32).view(np.float32).astype(np.float64)  # noqa: E731
            out = (f(a) * f(b) + f(c)).astype(np.float32).view(np.uint32)
        elif op == "fma.rn.bf16x2":
            half = lambda x, s: _bf16_bits_to_f64(x >> np.uint32(s))  # noqa: E731
            halves = [_round_bf16_bits(half(a, s) * half(b, s) + half(c, s)) for s in (0, 16)]
            out = halves[0] | (halves[1] << np.uint32(16))
        elif op == "cvt.rn.bf16x2.f32":  # a to the upper half, b to the lower half
            out = (_round_bf16_bits(a.view(np.float32)) << np.uint32(16)) | _round_bf16_bits(b.view(np.float32))
        else:
            raise AssertionError(f"run_ptx: no emulation for {op!r}")
        regs[dst] = np.asarray(out, np.uint32)
    return regs


def _packed_cases(seed):
    """Every byte value x a spread of scale bytes, with 4 bytes per instance; one scale per byte."""
    gen = np.random.default_rng(seed)
    exponents = np.array([0, 1, 2, 60, 100, 127, 128, 150, 200, 231])
    byte_values = np.arange(256, dtype=np.uint32)
    data = np.stack(np.meshgrid(byte_values, exponents, indexing="ij"), -1).reshape(-1, 2)
    gen.shuffle(data)
    data = data[: len(data) // 4 * 4].reshape(-1, 4, 2)
    return data[..., 0], data[..., 1]  # bytes [n, 4], scale byte of each [n, 4]


def _signed(codes, bits):
    return codes.astype(np.int64) - ((codes >> (bits - 1)) << bits)


def test_bfp4_ptx_decodes_exactly(seed):
    codes, exponent = _packed_cases(seed)
    scale = np.where(exponent > 0, 2.0 ** (exponent.astype(np.float64) - 127), 0.0)
    bias = _round_bf16_bits(-136.0 * scale)
    word = sum(codes[:, i] << np.uint32(8 * i) for i in range(4)).astype(np.uint32)
    mul = (exponent << 7) | (exponent << 23)
    regs = run_ptx(pa._BFP4_PTX, [0, 0, 0, 0, word, *mul.T, *(bias | (bias << 16)).T])
    got = np.stack([_bf16_bits_to_f64(regs[f"${r}"] >> np.uint32(s)) for r in (0, 1, 2, 3) for s in (0, 16)], 1)
    expected = np.concatenate([_signed(codes & 15, 4), _signed(codes >> 4, 4)], 1) * np.concatenate([scale, scale], 1)
    mismatch = got != expected
    assert not mismatch.any(), (f"4-bit PTX decode, seed {seed}: {int(mismatch.sum())} of {got.size} differ, "
                                f"max diff {np.abs(got - expected).max()}")


def _e2m1(codes):
    magnitude = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])[codes & 7]
    return np.where(codes & 8, -magnitude, magnitude)


def _ptx_values(regs, outputs=(0, 1, 2, 3)):
    """bf16 pairs of the output registers, low half first: [n, 2 * len(outputs)] float64."""
    return np.stack([_bf16_bits_to_f64(regs[f"${r}"] >> np.uint32(s)) for r in outputs for s in (0, 16)], 1)


def test_mxfp4_ptx_decodes_exactly(seed):
    """The E2M1 byte-permute decode (scaled, for the tiles kernel; unscaled, for the block-scaled ones)
    gives every code of every byte exactly, signs of zero included."""
    codes, exponent = _packed_cases(seed)
    scale = np.where(exponent > 0, 2.0 ** (exponent.astype(np.float64) - 127), 0.0)
    word = sum(codes[:, i] << np.uint32(8 * i) for i in range(4)).astype(np.uint32)
    mul = (exponent << 7) | (exponent << 23)
    pairs = np.concatenate([_e2m1(codes & 15), _e2m1(codes >> 4)], 1)
    for text, operands, expected in ((pa._MXFP4_PTX, [0, 0, 0, 0, word, *mul.T], pairs * np.tile(scale, 2)),
                                     (pa._MXFP4_CODES_PTX, [0, 0, 0, 0, word], pairs)):
        got = _ptx_values(run_ptx(text, operands))
        mismatch = (got != expected) | (np.signbit(got) != np.signbit(expected))
        assert not mismatch.any(), (f"MXFP4 PTX decode, seed {seed}: {int(mismatch.sum())} of {got.size} differ, "
                                    f"first at {np.argwhere(mismatch)[0].tolist()}")


def test_bfp4_codes_ptx_decodes_exactly(seed):
    codes, _ = _packed_cases(seed)
    word = sum(codes[:, i] << np.uint32(8 * i) for i in range(4)).astype(np.uint32)
    ones, bias = np.uint32(pa._BFP4_UNIT_MUL), np.uint32(pa._BFP4_UNIT_BIAS & 0xFFFFFFFF)  # as _block_codes passes
    got = _ptx_values(run_ptx(pa._BFP4_PTX, [0, 0, 0, 0, word, *[np.full_like(word, ones)] * 4,
                                             *[np.full_like(word, bias)] * 4]))
    expected = np.concatenate([_signed(codes & 15, 4), _signed(codes >> 4, 4)], 1)
    assert (got == expected).all(), f"unscaled 4-bit PTX decode, seed {seed}: {int((got != expected).sum())} differ"


def test_bfp8_ptx_decodes_exactly(seed):
    codes, exponent = _packed_cases(seed)
    scale = np.where(exponent > 0, 2.0 ** (exponent.astype(np.float64) - 127), 0.0)
    word = sum(codes[:, i] << np.uint32(8 * i) for i in range(4)).astype(np.uint32)
    bias = (-(2.0**23 + 128) * scale).astype(np.float32).view(np.uint32)
    regs = run_ptx(pa._BFP8_PTX, [0, 0, word, *(exponent << 23).astype(np.uint32).T, *bias.T])
    got = np.stack([_bf16_bits_to_f64(regs[f"${r}"] >> np.uint32(s)) for r in (0, 1) for s in (0, 16)], 1)
    expected = _signed(codes, 8) * scale
    mismatch = got != expected
    assert not mismatch.any(), (f"8-bit PTX decode, seed {seed}: {int(mismatch.sum())} of {got.size} differ, "
                                f"max diff {np.abs(got - expected).max()}")


# ----------------------------------------------------------------------------------------------
# Dispatch, validation
# ----------------------------------------------------------------------------------------------


@needs_interpreter
def test_attention_triton_dispatches_on_queries_per_sequence(seed, monkeypatch):
    fmt = "bfp12_32"
    calls = []
    for name in ("paged_decode_attention", "paged_prefill_attention"):
        real = getattr(pa, name)
        monkeypatch.setattr(pa, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    decode = decode_inputs([17, 5], 3, 1, 64, fmt, fmt, torch.float32, 16, seed)
    prefill = prefill_inputs([(3, 2), (4, 0)], 3, 1, 64, fmt, fmt, torch.float32, 16, seed)  # T == S, not decode
    for (q, cache, page_table, query_start, seq_lens), kind in ((decode, "decode"), (prefill, "prefill")):
        out = pa.attention_triton(q, *cache, page_table, query_start, seq_lens, fmt, fmt, 0.125, 0)
        assert calls[-1] == f"paged_{kind}_attention", calls
        expected = reference(q, cache, page_table, query_start, seq_lens, fmt, fmt, 0.125, 0)
        assert_close(out, expected, torch.float32, f"attention_triton {kind}", seed)


def test_auto_num_splits():
    assert pa.auto_num_splits(64, 8, 4096, 132) == 3  # 512 programs: three slices reach 8 per SM
    assert pa.auto_num_splits(1, 8, 4096, 132) == 16  # capped by 256 tokens per slice
    assert pa.auto_num_splits(1, 8, 100, 132) == 1  # short context: no split
    assert pa.auto_num_splits(1, 1, 10**7, 132) == 256  # capped at _MAX_SPLITS
    # DecodeConfig.min_split_tokens: 256 sequences x 3 KV heads at 300 tokens, 16 programs a SM wanted
    assert pa.auto_num_splits(256, 3, 300, 132, 16) == 1 and pa.auto_num_splits(256, 3, 300, 132, 16, 64) == 3
    assert pa.DecodeConfig().min_split_tokens == 256
    with pytest.raises(ValueError, match="min_split_tokens=0 must be an int >= 1"):
        pa.DecodeConfig(min_split_tokens=0)


@needs_interpreter
@pytest.mark.parametrize("mutation,words", [
    (lambda a: a.update(q=a["q"][:, :, :32]), "head_dim"),
    (lambda a: a.update(q=a["q"][:, :5]), "multiple of"),
    (lambda a: a.update(q=a["q"].to(torch.int32)), "dtype"),
    (lambda a: a.update(k_format="bfp16_32"), "k_data for format bfp16_32"),
    (lambda a: a.update(v_scale=a["v_scale"][..., :1]), "v_scale"),
    (lambda a: a.update(page_table=a["page_table"].float()), "page_table"),
    (lambda a: a.update(seq_lens=a["seq_lens"][:1], page_table=a["page_table"][:1]), "sequences"),
    (lambda a: a.update(sliding_window=-1), "sliding_window"),
    (lambda a: a.update(num_splits=0), "num_splits"),
    (lambda a: a.update(key_rope=torch.zeros(2, 3, 64)), "key_rope must be a contiguous float32"),
], ids=["head_dim", "heads", "q_dtype", "format", "scale_shape", "page_table_dtype", "batch", "window", "splits",
        "key_rope"])
def test_decode_rejects_bad_inputs(mutation, words):
    q, cache, page_table, _, seq_lens = decode_inputs([5, 9], 3, 2, 64, "bfp12_32", "bfp12_32", torch.float32, 16, 0)
    args = dict(q=q, k_data=cache[0], k_scale=cache[1], v_data=cache[2], v_scale=cache[3], page_table=page_table,
                seq_lens=seq_lens, k_format="bfp12_32", v_format="bfp12_32", scale=0.125, sliding_window=0,
                num_splits=None, key_rope=None)
    mutation(args)
    with pytest.raises(ValueError, match=words):
        pa.paged_decode_attention(**args)


@needs_interpreter
def test_prefill_rejects_bad_query_start():
    q, cache, page_table, query_start, seq_lens = prefill_inputs([(0, 5)], 1, 1, 64, "float32", "float32",
                                                                 torch.float32, 16, 0)
    with pytest.raises(ValueError, match="query_start"):
        pa.paged_prefill_attention(q, *cache, page_table, query_start[:1], seq_lens, "float32", "float32", 0.125)


@pytest.mark.skipif(INTERPRETER or not triton_support.HAS_TRITON or torch.cuda.is_available(),
                    reason="runs only where the interpreter tests were skipped in this process")
def test_interpreter_tests_in_a_fresh_process():
    """When an earlier import loaded triton without the interpreter (tests/conftest.py does), run this
    file's interpreter tests in a process that sets TRITON_INTERPRET=1 first."""
    run_interpreted(__file__, "-m", "not gpu", "-k", "not fresh_process and not compile_for_hopper")


# ----------------------------------------------------------------------------------------------
# CUDA: larger shapes, natively
# ----------------------------------------------------------------------------------------------

ALL_FORMATS = valid_format_names()
GPU_LENS = [1000, 4096, 1, 4095, 17, 2048, 1000, 3001]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCUDA:
    @pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
    @pytest.mark.parametrize("fmt", ALL_FORMATS)
    def test_decode_matches_reference(self, fmt, q_dtype, seed):
        q, cache, page_table, query_start, seq_lens = decode_inputs(GPU_LENS, 4, 8, 128, fmt, fmt, q_dtype, 16,
                                                                    seed, "cuda")
        expected = reference(q, cache, page_table, query_start, seq_lens, fmt, fmt, 128**-0.5, 0)
        for num_splits, prefetch in ((None, False), (1, False), (7, False), (None, True), (1, True)):
            out = pa.paged_decode_attention(q, *cache, page_table, seq_lens, fmt, fmt, 128**-0.5,
                                            num_splits=num_splits, kernel="tiles", prefetch=prefetch)
            assert_close(out, expected, q_dtype, f"cuda decode {fmt} num_splits={num_splits} prefetch={prefetch}",
                         seed)

    @pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
    @pytest.mark.parametrize("fmt,g,d", [("bfp12_32", 4, 128), ("bfp16_32", 3, 64), ("bfloat16", 7, 64),
                                         ("bfp14_16", 1, 128), ("mxfp4_32", 4, 128), ("float16", 4, 128)])
    def test_prefill_matches_reference(self, fmt, g, d, q_dtype, seed):
        chunks = [(0, 700), (1500, 300), (4095, 1), (999, 0), (60, 513)]
        q, cache, page_table, query_start, seq_lens = prefill_inputs(chunks, g, 2, d, fmt, fmt, q_dtype, 16,
                                                                     seed, "cuda")
        for window in (0, 256):
            expected = reference(q, cache, page_table, query_start, seq_lens, fmt, fmt, d**-0.5, window)
            for decode_pages in (False, True):  # packed tiles decoded in the loop / the step's pages decoded once
                out = pa.paged_prefill_attention(q, *cache, page_table, query_start, seq_lens, fmt, fmt, d**-0.5,
                                                 window, decode_pages=decode_pages)
                assert_close(out, expected, q_dtype,
                             f"cuda prefill {fmt} g={g} d={d} window={window} decode_pages={decode_pages}", seed)

    @pytest.mark.parametrize("fmt", ["bfp12_16", "bfp12_32", "bfp12_64", "bfp16_16", "bfp16_32", "bfp16_64",
                                     "mxfp4_32"])
    def test_inline_ptx_and_portable_decode_agree(self, fmt, seed, monkeypatch):
        """The inline-PTX decode (default for 4/8-bit BFP and MXFP4 with bf16 queries) and the portable Triton
        decode give the reference's numbers, in decode and in prefill."""
        q, cache, page_table, query_start, seq_lens = decode_inputs(GPU_LENS, 4, 8, 128, fmt, fmt, torch.bfloat16,
                                                                    16, seed, "cuda")
        expected = reference(q, cache, page_table, query_start, seq_lens, fmt, fmt, 128**-0.5, 0)
        chunks = [(0, 300), (1000, 77), (50, 1)]
        prefill = prefill_inputs(chunks, 4, 2, 128, fmt, fmt, torch.bfloat16, 16, seed, "cuda")
        prefill_expected = reference(*prefill, fmt, fmt, 128**-0.5, 0)
        for asm in (True, False):
            monkeypatch.setattr(pa, "_ASM_DECODE", asm)
            out = pa.paged_decode_attention(q, *cache, page_table, seq_lens, fmt, fmt, 128**-0.5)
            assert_close(out, expected, torch.bfloat16, f"cuda decode {fmt} asm={asm}", seed)
            q_p, cache_p, page_table_p, query_start_p, seq_lens_p = prefill
            out = pa.paged_prefill_attention(q_p, *cache_p, page_table_p, query_start_p, seq_lens_p, fmt, fmt,
                                             128**-0.5)
            assert_close(out, prefill_expected, torch.bfloat16, f"cuda prefill {fmt} asm={asm}", seed)

    @pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
    @pytest.mark.parametrize("fmt", ["bfp12_32", "bfp16_32", "mxfp4_32", "bfloat16"])
    def test_pre_rope_keys_match_reference(self, fmt, q_dtype, seed):
        """Pre-RoPE keys natively (the portable decode: the PTX one gives bf16, rotation needs float32)."""
        key_rope = random_key_rope(8, 128, torch.Generator().manual_seed(seed))
        on_cpu = lambda inputs: [[c.cpu() for c in t] if isinstance(t, list) else t.cpu() for t in inputs]  # noqa: E731
        q, cache, page_table, query_start, seq_lens = decode_inputs(GPU_LENS, 4, 8, 128, fmt, fmt, q_dtype, 16,
                                                                    seed, "cuda")
        expected = rotated_reference(*on_cpu([q, cache, page_table, query_start, seq_lens]), fmt, fmt, 128**-0.5, 0,
                                     key_rope)
        for num_splits in (None, 1):
            out = pa.paged_decode_attention(q, *cache, page_table, seq_lens, fmt, fmt, 128**-0.5,
                                            num_splits=num_splits, key_rope=key_rope.cuda())
            assert_close(out.cpu(), expected, q_dtype, f"cuda pre-RoPE decode {fmt} num_splits={num_splits}", seed)
        q, cache, page_table, query_start, seq_lens = prefill_inputs([(0, 700), (1500, 300), (60, 513)], 4, 8, 128,
                                                                     fmt, fmt, q_dtype, 16, seed, "cuda")
        expected = rotated_reference(*on_cpu([q, cache, page_table, query_start, seq_lens]), fmt, fmt, 128**-0.5, 0,
                                     key_rope)
        out = pa.paged_prefill_attention(q, *cache, page_table, query_start, seq_lens, fmt, fmt, 128**-0.5,
                                         key_rope=key_rope.cuda())
        assert_close(out.cpu(), expected, q_dtype, f"cuda pre-RoPE prefill {fmt}", seed)

    @pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
    @pytest.mark.parametrize("k_format,v_format", [("bfp12_32", "bfp12_32"), ("bfp16_32", "bfp16_32"),
                                                   ("mxfp4_32", "mxfp4_32"), ("bfp12_32", "bfp16_32"),
                                                   ("bfloat16", "bfloat16"), ("bfp12_64", "bfp16_16"),
                                                   ("bfp12_16", "bfp16_16")])
    def test_blocks_decode_matches_reference(self, k_format, v_format, q_dtype, seed, monkeypatch):
        """The "blocks", "diag" and "i8k" kernels natively (where they run the formats and the query
        dtype), with the inline-PTX and the portable decode, split or not, with and without the register
        prefetch ("i8k" has none), and against "tiles"."""
        q, cache, page_table, query_start, seq_lens = decode_inputs(GPU_LENS, 4, 8, 128, k_format, v_format, q_dtype,
                                                                    16, seed, "cuda")
        expected = reference(q, cache, page_table, query_start, seq_lens, k_format, v_format, 128**-0.5, 0)
        tiles = pa.paged_decode_attention(q, *cache, page_table, seq_lens, k_format, v_format, 128**-0.5,
                                          kernel="tiles")
        for kernel in ("blocks", "diag", "i8k", "i8t"):
            if not pa.decode_kernel_supports(kernel, pa.parse_kv_format(k_format), pa.parse_kv_format(v_format), 128,
                                             dtype=q_dtype):
                continue
            layout = channels_by_tokens_cache(cache) if kernel == "i8t" else cache
            for asm in (True, False):
                monkeypatch.setattr(pa, "_ASM_DECODE", asm)
                # (one warp a program: the tuned pick for i8k at some shapes)
                for num_splits, prefetch, block_n, warps in ((None, True, 64, None), (1, True, 128, None),
                                                             (7, False, 64, None), (None, False, 32, 1)):
                    out = pa.paged_decode_attention(q, *layout, page_table, seq_lens, k_format, v_format, 128**-0.5,
                                                    num_splits=num_splits, kernel=kernel, prefetch=prefetch,
                                                    block_n=block_n, num_warps=warps)
                    what = (f"cuda {kernel} decode {k_format}/{v_format} asm={asm} splits={num_splits} "
                            f"prefetch={prefetch} block_n={block_n} num_warps={warps}")
                    assert_close(out, expected, q_dtype, what, seed)
                    assert_close(out, tiles.double().to(q_dtype), q_dtype, what + " vs tiles", seed)

    @pytest.mark.parametrize("kernel", ["blocks", "diag", "i8k", "i8t"])
    def test_blocks_decode_in_a_cuda_graph(self, kernel, seed):
        fmt = "bfp12_32"
        q, cache, page_table, query_start, seq_lens = decode_inputs(GPU_LENS, 4, 8, 128, fmt, fmt, torch.bfloat16,
                                                                    16, seed, "cuda")
        static_lens = (seq_lens - 500).clamp(min=1)
        layout = channels_by_tokens_cache(cache) if kernel == "i8t" else cache

        def run():
            return pa.paged_decode_attention(q, *layout, page_table, static_lens, fmt, fmt, 0.1, kernel=kernel)

        run()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        static_lens.copy_(seq_lens)
        graph.replay()
        expected = reference(q, cache, page_table, query_start, seq_lens, fmt, fmt, 0.1, 0)
        assert_close(out, expected, torch.bfloat16, f"cuda graph replay ({kernel})", seed)

    def test_decode_in_a_cuda_graph(self, seed):
        """attention_triton captured once (decode batch, no host sync) and replayed after the
        sequences grew: matches the reference on the new lengths."""
        fmt = "bfp12_32"
        q, cache, page_table, query_start, seq_lens = decode_inputs(GPU_LENS, 4, 8, 128, fmt, fmt, torch.bfloat16,
                                                                    16, seed, "cuda")
        short = (seq_lens - 500).clamp(min=1)
        static_lens = short.clone()

        def run():
            return pa.attention_triton(q, *cache, page_table, query_start, static_lens, fmt, fmt, 0.1, 0)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        static_lens.copy_(seq_lens)
        graph.replay()
        expected = reference(q, cache, page_table, query_start, seq_lens, fmt, fmt, 0.1, 0)
        assert_close(out, expected, torch.bfloat16, "cuda graph replay", seed)
