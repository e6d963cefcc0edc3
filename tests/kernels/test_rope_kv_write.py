"""kernels/rope_kv_write.py: K's RoPE fused into the paged KV write, against the unfused pair.

The fused kernel must write exactly the bytes of the pair it replaces, rope_triton then
kv_write_triton, for every KV format (and, given the same rotated keys, exactly kv_write_pair_ref's
bytes); every other byte of the cache stays as it was. RoPE itself is checked against rope_ref
within rounding (tests/kernels/test_rope.py: Triton's cos/sin are not torch's to the last bit).
Runs under the interpreter on CPU and natively on CUDA (class TestCUDA); inputs are drawn fresh,
failures print the seed.
"""

import secrets

import pytest
import torch

from tests.kernels.checks import Spy
from tests.kernels.interpreter import fresh_process_test, interpreter_mark, is_interpreted
from tests.kernels import test_kv_write
from tests.kernels.test_kv_write import assert_same_bytes, kv_like, random_cache, scattered_slots

from fxforge.kernels import kv_cache, rope, rope_kv_write
from fxforge.kernels.kv_cache import kv_read_ref, kv_write_pair_ref
from fxforge.kernels.rope import rope_ref
from fxforge.kernels.rope_kv_write import rope_kv_write_ref

INTERPRETER = is_interpreted(rope_kv_write._rope_kv_write_kernel)
needs_interpreter = interpreter_mark(INTERPRETER)

# every format the cache supports as K, V in another one (dense <-> packed, block 16 <-> 32)
K_FORMATS = ["float32", "bfloat16", "bfp12_16", "bfp12_32", "bfp14_16", "bfp14_32", "bfp16_16", "bfp16_32", "mxfp4_32"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {"t1_h1_d32": (1, 1, 32), "t5_h3_d64": (5, 3, 64), "t3_h2_d96": (3, 2, 96)}
NAMES = ["fp32", "bf16", "fp16"]


def cases(every: bool) -> list:
    """Each K format with V in the format four places on; shapes, dtypes and the RoPE layout (half or
    interleaved pairs, KSort-permuted or not) in rotation, or (GPU) every shape and dtype."""
    out = []
    for f, k_format in enumerate(K_FORMATS):
        v_format = K_FORMATS[(f + 4) % len(K_FORMATS)]
        shapes = list(SHAPES.items()) if every else [list(SHAPES.items())[f % len(SHAPES)]]
        for s, (shape_id, shape) in enumerate(shapes):
            interleaved, permuted = bool(f % 2), bool((f // 2) % 2)
            for name in (NAMES if every else [NAMES[(f + s) % 3]]):
                layout = f"{'inter' if interleaved else 'half'}-{'perm' if permuted else 'noperm'}"
                out.append(pytest.param(shape, DTYPES[name], k_format, v_format, interleaved, permuted,
                                        id=f"{shape_id}-{name}-{layout}-k_{k_format}-v_{v_format}"))
    return out


@pytest.fixture
def seed():
    return secrets.randbelow(2**31)


def rope_inputs(shape, dtype, permuted, gen, device="cpu"):
    """(k, v, slots, positions, inv_freq, channel_perm) for `shape` [T, Hkv, D]."""
    tokens, heads, head_dim = shape
    k, v = kv_like(shape, dtype, gen), kv_like(shape, dtype, gen)
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    perm = torch.stack([torch.randperm(head_dim, generator=gen) for _ in range(heads)]) if permuted else None
    return [t.to(device) if t is not None else None
            for t in (k, v, scattered_slots(tokens, gen), positions, inv_freq, perm)]


def check_against_the_pair(shape, dtype, k_format, v_format, interleaved, permuted, seed, device, v_layout="rows"):
    gen = torch.Generator().manual_seed(seed)
    k, v, slots, positions, inv_freq, perm = rope_inputs(shape, dtype, permuted, gen, device)
    fused, untouched = random_cache(shape[1], shape[2], k_format, v_format, gen, device, v_layout)
    unfused, by_reference = [t.to(device) for t in untouched], [t.clone() for t in untouched]
    rope_kv_write.rope_kv_write_triton(k, v, *fused, slots, positions, inv_freq, interleaved, perm, k_format, v_format)
    k_rot = rope.rope_triton(k, positions, inv_freq, interleaved, perm)
    kv_cache.kv_write_triton(k_rot, v, *unfused, slots, k_format, v_format)
    kv_write_pair_ref(k_rot.cpu(), v.cpu(), *by_reference, slots.cpu(), k_format, v_format)
    for name, a, b, r in zip(("k_data", "k_scale", "v_data", "v_scale"), fused, unfused, by_reference):
        what = f"{name} ({k_format if name[0] == 'k' else v_format}, interleaved={interleaved}, permuted={permuted})"
        assert_same_bytes(a, b, f"{what} vs rope_triton + kv_write_triton", shape, seed)
        assert_same_bytes(a, r, f"{what} vs kv_write_pair_ref of the rotated keys", shape, seed)
    return fused, (k, positions, inv_freq, perm, slots)


# ----------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k_format, v_format", [("bfp12_32", "bfp16_16"), ("bfloat16", "mxfp4_32")])
def test_reference_is_rope_then_the_pair_write(k_format, v_format, seed):
    """rope_kv_write_ref stores what rope_ref then kv_write_pair_ref store, bit for bit, and touches no
    other byte."""
    gen = torch.Generator().manual_seed(seed)
    k, v, slots, positions, inv_freq, perm = rope_inputs((5, 3, 64), torch.bfloat16, True, gen)
    fused, expected = random_cache(3, 64, k_format, v_format, gen)
    rope_kv_write_ref(k, v, *fused, slots, positions, inv_freq, False, perm, k_format, v_format)
    kv_write_pair_ref(rope_ref(k, positions, inv_freq, False, perm), v, *expected, slots, k_format, v_format)
    for name, a, e in zip(("k_data", "k_scale", "v_data", "v_scale"), fused, expected):
        assert_same_bytes(a, e, f"rope_kv_write_ref {name}", k.shape, seed)


# ----------------------------------------------------------------------------------------------
# The Triton kernel under the interpreter
# ----------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("shape, dtype, k_format, v_format, interleaved, permuted", cases(every=False))
def test_triton_matches_the_unfused_pair(shape, dtype, k_format, v_format, interleaved, permuted, seed):
    check_against_the_pair(shape, dtype, k_format, v_format, interleaved, permuted, seed, "cpu")


@needs_interpreter
@pytest.mark.parametrize("k_format, v_format", [("bfp12_32", "bfp16_32"), ("bfloat16", "bfp12_16")])
def test_triton_writes_v_stored_channels_by_tokens(k_format, v_format, seed):
    """The fused write stores a packed V kept channels by tokens where the unfused write and the
    reference do (allocate_kv_pair(v_layout="channels"))."""
    check_against_the_pair((9, 3, 64), torch.float32, k_format, v_format, False, True, seed, "cpu", v_layout="channels")


@needs_interpreter
@pytest.mark.parametrize("interleaved, permuted", [(False, False), (True, True)], ids=["half", "inter-perm"])
def test_triton_keys_are_rope_ref_within_rounding(interleaved, permuted, seed):
    """In a float32 cache the stored keys are RoPE'd keys: rope_ref's within float32 rounding (relative to
    the head's largest key: a rotated pair may cancel to far below its inputs)."""
    shape = (4, 2, 64)
    fused, (k, positions, inv_freq, perm, slots) = check_against_the_pair(
        shape, torch.float32, "float32", "bfp12_32", interleaved, permuted, seed, "cpu")
    pages = torch.arange(fused[0].shape[0])
    stored = kv_read_ref(fused[0], fused[1], pages, fused[0].shape[0] * fused[0].shape[1], "float32", 64)[slots]
    expected = rope_ref(k, positions, inv_freq, interleaved, perm)
    bad = (stored - expected).abs() > 2e-6 * k.abs().amax(-1, keepdim=True)  # a few float32 steps
    assert not bad.any(), f"shape {shape}, seed {seed}: {int(bad.sum())} keys differ from rope_ref beyond rounding"


@needs_interpreter
@pytest.mark.parametrize("launch", [{"values_per_program": 128}, {"split_kv": True},
                                    {"values_per_program": 64, "split_kv": True, "num_warps": 1}],
                         ids=["2-heads", "split-kv", "1-head-split-kv-1-warp"])
def test_triton_grid_cuts_store_the_same_bytes(launch, seed, monkeypatch):
    """Fewer values per program than a token holds (heads over several programs, the last one partial),
    K and V in programs of their own, fewer warps: the bytes of the unfused pair and the reference."""
    monkeypatch.setattr(rope_kv_write, "WRITE_LAUNCH", {**rope_kv_write.WRITE_LAUNCH, **launch})
    check_against_the_pair((3, 3, 64), torch.float32, "bfp12_16", "bfloat16", False, True, seed, "cpu")
    check_against_the_pair((4, 3, 64), torch.bfloat16, "bfloat16", "bfp16_32", True, False, seed, "cpu")


@needs_interpreter
def test_triton_refuses_an_unknown_launch_key(seed, monkeypatch):
    gen = torch.Generator().manual_seed(seed)
    k, v, slots, positions, inv_freq, _ = rope_inputs((3, 2, 64), torch.float32, False, gen)
    cache, untouched = random_cache(2, 64, "bfp16_32", "bfp16_32", gen)
    with pytest.raises(ValueError, match=r"launch keys must be among \['num_warps', 'split_kv', "
                                         r"'values_per_program'\], got \['warps'\]"):
        rope_kv_write.rope_kv_write_triton(k, v, *cache, slots, positions, inv_freq, False, None, "bfp16_32",
                                           "bfp16_32", launch={"warps": 2})
    monkeypatch.setenv("FXFORGE_WRITE_LAUNCH", '{"split_kv": true, "blocks": 4}')
    with pytest.raises(ValueError, match=r"FXFORGE_WRITE_LAUNCH keys must be among .*, got \['blocks'\]"):
        rope_kv_write.rope_kv_write_triton(k, v, *cache, slots, positions, inv_freq, False, None, "bfp16_32",
                                           "bfp16_32")
    assert all(torch.equal(a, b) for a, b in zip(cache, untouched)), "a refused call wrote to the cache"
    monkeypatch.setenv("FXFORGE_WRITE_LAUNCH", "split_kv=1")
    with pytest.raises(ValueError, match=r"FXFORGE_WRITE_LAUNCH='split_kv=1' is not JSON"):
        rope_kv_write.rope_kv_write_triton(k, v, *cache, slots, positions, inv_freq, False, None, "bfp16_32",
                                           "bfp16_32")
    monkeypatch.setenv("FXFORGE_WRITE_LAUNCH", '{"split_kv": false, "num_warps": 1}')  # another cut, by env
    rope_kv_write.rope_kv_write_triton(k, v, *cache, slots, positions, inv_freq, False, None, "bfp16_32", "bfp16_32")
    assert not all(torch.equal(a, b) for a, b in zip(cache, untouched))


@needs_interpreter
@pytest.mark.parametrize("fmt", ["bfloat16", "bfp14_32"])
def test_triton_negative_slots_are_skipped(fmt, seed):
    """Padding tokens (slot -1) write nothing; the others land where the unfused pair puts them."""
    gen = torch.Generator().manual_seed(seed)
    k, v, _, positions, inv_freq, _ = rope_inputs((4, 2, 64), torch.float32, False, gen)
    slots = torch.tensor([9, -1, 30, -1])
    fused, expected = random_cache(2, 64, fmt, fmt, gen)
    rope_kv_write.rope_kv_write_triton(k, v, *fused, slots, positions, inv_freq, False, None, fmt, fmt)
    kv_cache.kv_write_triton(rope.rope_triton(k, positions, inv_freq, False), v, *expected, slots, fmt, fmt)
    for name, a, e in zip(("k_data", "k_scale", "v_data", "v_scale"), fused, expected):
        assert_same_bytes(a, e, f"{name} ({fmt}) with padding slots", k.shape, seed)


@needs_interpreter
def test_triton_validates_before_writing(seed):
    gen = torch.Generator().manual_seed(seed)
    k, v, slots, positions, inv_freq, _ = rope_inputs((3, 2, 64), torch.float32, False, gen)
    cache, untouched = random_cache(2, 64, "bfp12_32", "bfp16_32", gen)
    write = rope_kv_write.rope_kv_write_triton
    with pytest.raises(ValueError, match=r"rope_kv_write_triton: .*v_data for bfp12_32 must be a contiguous"):
        write(k, v, *cache, slots, positions, inv_freq, False, None, "bfp12_32", "bfp12_32")
    with pytest.raises(ValueError, match=r"rope_kv_write_triton: .*positions must be int32/int64 \[3\]"):
        write(k, v, *cache, slots, positions[:2], inv_freq, False, None, "bfp12_32", "bfp16_32")
    with pytest.raises(ValueError, match=r"rope_kv_write_triton: .*channel_perm must be \[H, D\]"):
        write(k, v, *cache, slots, positions, inv_freq, False, torch.zeros(3, 64, dtype=torch.long), "bfp12_32",
              "bfp16_32")
    assert all(torch.equal(a, b) for a, b in zip(cache, untouched)), "a rejected call wrote to the cache"


@needs_interpreter
def test_triton_op_runs_the_kernel(seed, monkeypatch):
    """fxforge::rope_kv_write bound to 'triton' runs the fused kernel where the interpreter runs it."""
    from fxforge.ir import ops

    spy = Spy(rope_kv_write.rope_kv_write_triton)
    monkeypatch.setattr(rope_kv_write, "rope_kv_write_triton", spy)
    gen = torch.Generator().manual_seed(seed)
    k, v, slots, positions, inv_freq, perm = rope_inputs((3, 2, 32), torch.float32, True, gen)
    fused, expected = random_cache(2, 32, "bfp16_32", "float32", gen)
    ops.ROPE_KV_WRITE(k, v, *fused, slots, positions, inv_freq, False, perm, "bfp16_32", "float32", ops.TRITON)
    assert spy.calls == 1, "an op bound to 'triton' must run the kernel where the interpreter runs it"
    k_rot = ops.ROPE(k, positions, inv_freq, False, perm, ops.TRITON)
    ops.KV_WRITE(k_rot, v, *expected, slots, "bfp16_32", "float32", ops.TRITON)
    for name, a, e in zip(("k_data", "k_scale", "v_data", "v_scale"), fused, expected):
        assert_same_bytes(a, e, f"fxforge::rope_kv_write {name}", k.shape, seed)


test_interpreted_kernels_in_a_fresh_process = fresh_process_test(__file__, "-k", "triton and not TestCUDA", interpreting=INTERPRETER)


# ----------------------------------------------------------------------------------------------
# Native on the GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCUDA:
    def test_v_stored_channels_by_tokens(self, seed, monkeypatch):
        monkeypatch.setattr(test_kv_write, "NUM_PAGES", 64)  # 300 tokens after up to 7: 39 pages of 8
        check_against_the_pair((300, 8, 128), torch.bfloat16, "bfp12_32", "bfp16_32", False, True, seed, "cuda",
                               v_layout="channels")

    @pytest.mark.parametrize("shape, dtype, k_format, v_format, interleaved, permuted", cases(every=True))
    def test_matches_the_unfused_pair(self, shape, dtype, k_format, v_format, interleaved, permuted, seed):
        check_against_the_pair(shape, dtype, k_format, v_format, interleaved, permuted, seed, "cuda")

    @pytest.mark.parametrize("k_format", ["bfloat16", "bfp12_32", "mxfp4_32"])
    def test_decode_and_prefill_sized_writes(self, k_format, seed, monkeypatch):
        monkeypatch.setattr(test_kv_write, "NUM_PAGES", 300)
        for shape in ((64, 8, 128), (2048, 8, 128)):
            check_against_the_pair(shape, torch.bfloat16, k_format, "bfp16_32", False, True, seed, "cuda")
