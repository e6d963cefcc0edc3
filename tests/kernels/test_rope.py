"""kernels/rope.py: the Triton RoPE kernel, with and without a KSort channel permutation.

The kernel runs under the interpreter on CPU and natively on CUDA (class TestCUDA), against
rope_ref. Inputs are drawn fresh on every run; failures print the seed.
"""

import functools
import secrets

import pytest
import torch

from tests.kernels import checks
from tests.kernels.interpreter import HAS_TRITON, fresh_process_test, interpreter_mark, is_interpreted

from fxforge.kernels import rope
from fxforge.kernels.rope import is_key_rope_layout, key_rope_table, rope_ref, rope_tables, rotate_keys_ref

INTERPRETER = is_interpreted(rope._rope_kernel)
needs_interpreter = interpreter_mark(INTERPRETER)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.float32: (1e-5, 1.3e-6), torch.bfloat16: (1e-5, 1.6e-2), torch.float16: (1e-5, 1e-3)}
SHAPES = {"t1_h1_d32": (1, 1, 32), "t7_h3_d64": (7, 3, 64), "t33_h9_d128": (33, 9, 128), "t5_h2_d80": (5, 2, 80)}


def cases(every_dtype: bool) -> list:
    """Shapes x layouts x permuted or not; every dtype for each, or (interpreter, slow) one dtype each
    in rotation so that each dtype still meets each layout and permutation."""
    out = []
    for i, (shape_id, shape) in enumerate(SHAPES.items()):
        for interleaved in (False, True):
            for permuted in (False, True):
                names = list(DTYPES) if every_dtype else [list(DTYPES)[(i + interleaved + 2 * permuted) % 3]]
                out += [pytest.param(shape, DTYPES[name], interleaved, permuted,
                                     id=f"{shape_id}-{name}-{'inter' if interleaved else 'half'}-"
                                        f"{'perm' if permuted else 'noperm'}") for name in names]
    return out


@pytest.fixture
def seed():
    return secrets.randbelow(2**31)


def inputs(shape, dtype, permuted, seed, max_position=4096, device="cpu"):
    tokens, heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    positions = torch.randint(0, max_position, (tokens,), generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    perm = torch.stack([torch.randperm(head_dim, generator=gen) for _ in range(heads)]) if permuted else None
    return [t.to(device) if t is not None else None for t in (x, positions, inv_freq, perm)]


assert_close = functools.partial(checks.assert_close, tolerance=TOLERANCE)


def check_against_reference(shape, dtype, interleaved, permuted, seed, device, max_position=4096):
    x, positions, inv_freq, perm = inputs(shape, dtype, permuted, seed, max_position, device)
    expected = rope_ref(x.cpu(), positions.cpu(), inv_freq.cpu(), interleaved, None if perm is None else perm.cpu())
    actual = rope.rope_triton(x, positions, inv_freq, interleaved, perm)
    assert_close(actual, expected, f"rope_triton interleaved={interleaved} permuted={permuted}", seed)


# ----------------------------------------------------------------------------------------------
# The permutation semantics (reference and table; no Triton needed)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
def test_reference_commutes_with_the_permutation(interleaved, seed):
    """rope_ref(x[..., perm], perm) == rope_ref(x)[..., perm]: pair partners follow their channels."""
    x, positions, inv_freq, perm = inputs((5, 3, 32), torch.float32, True, seed)
    permuted_in = x.gather(-1, perm.expand(5, -1, -1))
    expected = rope_ref(x, positions, inv_freq, interleaved).gather(-1, perm.expand(5, -1, -1))
    assert_close(rope_ref(permuted_in, positions, inv_freq, interleaved, perm), expected, "rope_ref", seed)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
def test_table_holds_each_channels_original_and_its_partner(interleaved, seed):
    """Low half: the original channel o; high half: the channel that holds o's pair partner."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(24, generator=gen) for _ in range(3)])
    table = rope_tables(perm, interleaved)
    assert table.dtype == torch.int32 and table.shape == perm.shape
    original, partner = (table & 0xFFFF).long(), (table >> 16).long()
    pair = perm ^ 1 if interleaved else (perm + 12) % 24
    assert torch.equal(original, perm), f"seed {seed}"
    assert torch.equal(perm.gather(1, partner), pair), f"seed {seed}: partners do not hold the pair partners"


def test_table_is_rebuilt_after_an_in_place_update():
    perm = torch.arange(16).repeat(2, 1)
    first = rope_tables(perm, True).clone()
    assert rope_tables(perm, True).data_ptr() == rope_tables(perm, True).data_ptr(), "the table is not cached"
    assert not torch.equal(rope_tables(perm, False), first), "the layout must be part of the cache key"
    perm[0] = perm[0].roll(1)  # in place: bumps the tensor's version
    again = rope_tables(perm, True)
    assert not torch.equal(first, again), "a cached table survived an in-place update of the permutation"
    assert torch.equal((again[0] & 0xFFFF).long(), perm[0])


def key_rope_layout(heads, head_dim, interleaved, gen):
    """A random key-RoPE layout [H, D]: pairs in random slots, each either way round."""
    half = head_dim // 2
    perms = []
    for _ in range(heads):
        slot_pair = torch.randperm(half, generator=gen)
        first, second = (2 * slot_pair, 2 * slot_pair + 1) if interleaved else (slot_pair, slot_pair + half)
        swapped = torch.rand(half, generator=gen) < 0.5
        perms.append(torch.cat([torch.where(swapped, second, first), torch.where(swapped, first, second)]))
    return torch.stack(perms)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
def test_rotated_keys_equal_rope_of_the_scaled_keys(interleaved, seed):
    """Keys stored pre-RoPE in a key-RoPE layout, divided by per-channel scales, rotate on read to
    exactly what rope_ref gives the scaled-back keys in that channel order."""
    gen = torch.Generator().manual_seed(seed)
    x, positions, inv_freq, _ = inputs((9, 3, 64), torch.float32, False, seed, max_position=131072)
    perm = key_rope_layout(3, 64, interleaved, gen)
    scale = torch.rand(3, 64, generator=gen) + 0.25
    table = key_rope_table(inv_freq, interleaved, perm, 3, 64, scale)
    assert table.shape == (3, 3, 32) and table.dtype == torch.float32
    expected = rope_ref(x * scale, positions, inv_freq, interleaved, perm)
    assert_close(rotate_keys_ref(x, positions, table), expected, "rotate_keys_ref", seed)


def test_key_rope_layouts():
    """The model's own order is a key-RoPE layout for half-split pairs only; other orders are refused."""
    assert is_key_rope_layout(None, False, 32) and not is_key_rope_layout(None, True, 32)
    mixed = torch.arange(32)[None].clone()
    mixed[0, :2] = torch.tensor([1, 0])  # channels 0 and 1 swap: slot 0 holds channels 1 and 16
    assert not is_key_rope_layout(mixed, False, 32)
    with pytest.raises(ValueError, match="channels j and j \\+ D/2"):
        key_rope_table(torch.ones(16), False, mixed, 1, 32)


@pytest.mark.skipif(INTERPRETER or not HAS_TRITON or torch.cuda.is_available(), reason="CPU tensors can run here")
def test_launcher_refuses_cpu_tensors_without_the_interpreter():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        rope.rope_triton(torch.zeros(4, 2, 32), torch.zeros(4, dtype=torch.int64), torch.ones(16), False, None)


@needs_interpreter
@pytest.mark.parametrize("bad, message", [
    ({"x": torch.zeros(4, 2, 15)}, "even D"),
    ({"positions": torch.zeros(3, dtype=torch.int64)}, "positions must be int32/int64 \\[4\\]"),
    ({"inv_freq": torch.ones(8)}, "inv_freq must be a float \\[16\\]"),
    ({"channel_perm": torch.zeros(3, 32, dtype=torch.int64)}, "channel_perm must be \\[H, D\\] = \\(2, 32\\)"),
    ({"x": torch.zeros(4, 2, 32, dtype=torch.int32)}, "float32/bfloat16/float16"),
], ids=["odd_dim", "positions", "inv_freq", "perm_shape", "int_x"])
def test_triton_launcher_rejects_bad_inputs(bad, message):
    args = {"x": torch.zeros(4, 2, 32), "positions": torch.zeros(4, dtype=torch.int64), "inv_freq": torch.ones(16),
            "interleaved": False, "channel_perm": None, **bad}
    with pytest.raises(ValueError, match=message):
        rope.rope_triton(**args)


# ----------------------------------------------------------------------------------------------
# The Triton kernel under the interpreter
# ----------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("shape, dtype, interleaved, permuted", cases(every_dtype=False))
def test_triton_matches_reference(shape, dtype, interleaved, permuted, seed):
    check_against_reference(shape, dtype, interleaved, permuted, seed, "cpu")


@needs_interpreter
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
def test_triton_large_positions_and_strided_heads(interleaved, seed):
    """Positions up to 131k (long-context angles) and an x that is a slice of a wider tensor."""
    x, positions, inv_freq, perm = inputs((9, 4, 64), torch.float32, True, seed, max_position=131072)
    wide = torch.randn(9, 6, 64)
    wide[:, 1:5] = x
    strided = wide[:, 1:5]
    assert not strided.is_contiguous()
    actual = rope.rope_triton(strided, positions, inv_freq, interleaved, perm)
    assert_close(actual, rope_ref(x, positions, inv_freq, interleaved, perm), "rope_triton strided", seed)


@needs_interpreter
def test_triton_permuted_equals_unpermuted_then_permuted(seed):
    """The KSort identity through the kernel: rotating permuted channels = permuting rotated ones."""
    x, positions, inv_freq, perm = inputs((7, 3, 64), torch.float32, True, seed)
    index = perm.expand(7, -1, -1)
    actual = rope.rope_triton(x.gather(-1, index).contiguous(), positions, inv_freq, False, perm)
    assert_close(actual, rope_ref(x, positions, inv_freq, False).gather(-1, index), "rope_triton permuted", seed)


test_interpreted_kernels_in_a_fresh_process = fresh_process_test(__file__, "-k", "triton and not TestCUDA", interpreting=INTERPRETER)


# ----------------------------------------------------------------------------------------------
# Native on the GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCUDA:
    @pytest.mark.parametrize("shape, dtype, interleaved, permuted", cases(every_dtype=True))
    def test_matches_reference(self, shape, dtype, interleaved, permuted, seed):
        check_against_reference(shape, dtype, interleaved, permuted, seed, "cuda")

    @pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
    def test_long_context_positions(self, interleaved, seed):
        check_against_reference((4096, 8, 128), torch.float32, interleaved, True, seed, "cuda", max_position=131072)

    def test_custom_op_uses_the_kernel(self, seed, monkeypatch):
        from fxforge.ir import ops

        spy = checks.Spy(rope.rope_triton)
        monkeypatch.setattr(rope, "rope_triton", spy)
        x, positions, inv_freq, perm = inputs((7, 3, 64), torch.bfloat16, True, seed, device="cuda")
        actual = ops.ROPE(x, positions, inv_freq, True, perm, ops.TRITON)
        assert spy.calls == 1, "an op bound to 'triton' must run the kernel for CUDA tensors"
        assert_close(actual, rope_ref(x.cpu(), positions.cpu(), inv_freq.cpu(), True, perm.cpu()), "fxforge::rope", seed)
