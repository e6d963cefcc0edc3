"""kernels/lora.py: batched per-depth LoRA (shrink, then expand) in Triton against the float32 reference.

The kernels run under the interpreter on CPU and natively on CUDA (class TestCUDA). Inputs are drawn
fresh; failures print the seed.
"""

import functools
import secrets

import pytest
import torch

from tests.kernels import checks
from tests.kernels.interpreter import fresh_process_test, interpreter_mark, is_interpreted

from fxforge.kernels import lora
from fxforge.kernels.lora import lora_ref

INTERPRETER = is_interpreted(lora._lora_shrink_kernel)
needs_interpreter = interpreter_mark(INTERPRETER)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# float32: summation order; bf16/fp16: the result is rounded once, so one step of the dtype.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1.6e-2), torch.float16: (1e-3, 2e-3)}
# (rows per loop, input width, output width, rank): loops with no rows, one row, tiles that are not
# multiples of the blocks, ranks of 1 and past one rank block of the two-launch path.
SHAPES = {
    "one_row": ((1,), 24, 17, 1),
    "loops_7_0_9": ((7, 0, 9), 100, 96, 5),
    "loops_33_2": ((33, 2), 72, 130, 16),
    "loops_0_0_20_1": ((0, 0, 20, 1), 40, 65, 33),
    "rank_70": ((5, 18), 64, 48, 70),
}


def cases(every_dtype: bool) -> list:
    names = list(DTYPES)
    return [pytest.param(shape, DTYPES[name], id=f"{shape_id}-{name}")
            for i, (shape_id, shape) in enumerate(SHAPES.items()) for name in (names if every_dtype else [names[i % 3]])]


@pytest.fixture
def seed():
    return secrets.randbelow(2**31)


def inputs(shape, dtype, seed, device="cpu"):
    """x, base, lora_a, lora_b, loop_starts; the stack holds more slots than the loops use."""
    per_loop, width, out_width, rank = shape
    gen = torch.Generator().manual_seed(seed)
    rows, slots = sum(per_loop), 2 * len(per_loop) + 1
    x = torch.randn(rows, width, generator=gen)
    base = torch.randn(rows, out_width, generator=gen)
    lora_a = torch.randn(slots, rank, width, generator=gen) / width ** 0.5
    lora_b = torch.randn(slots, out_width, rank, generator=gen) / rank ** 0.5
    starts = torch.tensor([0] + torch.tensor(per_loop).cumsum(0).tolist(), dtype=torch.int32)
    return [t.to(dtype).to(device) for t in (x, base, lora_a, lora_b)] + [starts.to(device)]


assert_close = functools.partial(checks.assert_close, tolerance=TOLERANCE)


def check_against_reference(shape, dtype, seed, device, fused=None):
    x, base, lora_a, lora_b, starts = inputs(shape, dtype, seed, device)
    slot, stride = 1, 2  # loop j uses slot 1 + 2j
    expected = lora_ref(*(t.cpu() for t in (x, base, lora_a, lora_b, starts)), slot, stride)
    got = lora.lora_triton(x, base, lora_a, lora_b, starts, slot, stride, fused=fused)
    assert_close(got, expected, f"lora_triton (fused={fused})", seed)


PATHS = pytest.mark.parametrize("fused", [True, False], ids=["one_launch", "shrink_expand"])


# ----------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------


def test_reference_applies_each_loops_own_adapter(seed):
    """Row t of loop j gets base + B_s A_s x with s = slot + stride * j, and no other adapter."""
    x, base, lora_a, lora_b, starts = inputs(((3, 2, 4), 12, 10, 3), torch.float32, seed)
    out = lora_ref(x, base, lora_a, lora_b, starts, 1, 2)
    bounds = starts.tolist()
    for j in range(3):
        rows = slice(bounds[j], bounds[j + 1])
        s = 1 + 2 * j
        expected = base[rows] + x[rows] @ (lora_b[s] @ lora_a[s]).T
        torch.testing.assert_close(out[rows], expected, msg=f"loop {j}, seed {seed}")


def test_reference_without_segments_uses_one_slot(seed):
    x, base, lora_a, lora_b, _ = inputs(((5,), 12, 10, 3), torch.float32, seed)
    torch.testing.assert_close(lora_ref(x, base, lora_a, lora_b, None, 2, 0), base + x @ (lora_b[2] @ lora_a[2]).T)


def test_reference_rejects_bounds_that_do_not_cover_the_rows(seed):
    x, base, lora_a, lora_b, _ = inputs(((5,), 12, 10, 3), torch.float32, seed)
    with pytest.raises(ValueError, match="must rise from 0"):
        lora_ref(x, base, lora_a, lora_b, torch.tensor([0, 3], dtype=torch.int32), 0, 1)


# ----------------------------------------------------------------------------------------------
# The Triton kernels under the interpreter
# ----------------------------------------------------------------------------------------------


@needs_interpreter
@PATHS
@pytest.mark.parametrize("shape, dtype", cases(every_dtype=False))
def test_triton_matches_reference(shape, dtype, seed, fused):
    check_against_reference(shape, dtype, seed, "cpu", fused)


@needs_interpreter
@PATHS
def test_triton_without_segments(seed, fused):
    x, base, lora_a, lora_b, _ = inputs(((19,), 40, 33, 7), torch.float32, seed)
    assert_close(lora.lora_triton(x, base, lora_a, lora_b, None, 2, 0, fused=fused),
                 lora_ref(x, base, lora_a, lora_b, None, 2, 0), "lora_triton (one slot)", seed)


@needs_interpreter
def test_triton_strided_rows(seed):
    """x and base may be row slices of wider tensors (unit stride along the last dim)."""
    x, base, lora_a, lora_b, starts = inputs(((4, 3), 24, 20, 4), torch.float32, seed)
    wide_x, wide_base = torch.cat([x, x], dim=1)[:, :24], torch.cat([base, base], dim=1)[:, :20]
    assert_close(lora.lora_triton(wide_x, wide_base, lora_a, lora_b, starts, 0, 1),
                 lora_ref(x, base, lora_a, lora_b, starts, 0, 1), "lora_triton (strided)", seed)


@needs_interpreter
@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "lora_a": a["lora_a"][:, :, :-1].contiguous()}, "shapes disagree"),
    (lambda a: {**a, "x": a["x"].half()}, "share one float dtype"),
    (lambda a: {**a, "loop_starts": a["loop_starts"].long()}, "1-d int32"),
    (lambda a: {**a, "slot": 4}, "must index one"),
    (lambda a: {**a, "lora_b": a["lora_b"].transpose(1, 2).contiguous().transpose(1, 2)}, "contiguous"),
], ids=["shape", "dtype", "starts_dtype", "slot_range", "strided_b"])
def test_triton_launcher_rejects_bad_inputs(change, message):
    x, base, lora_a, lora_b, starts = inputs(((2, 3), 16, 8, 4), torch.float32, 0)  # 5 slots; loops use 2 + 2j
    args = change({"x": x, "base": base, "lora_a": lora_a, "lora_b": lora_b, "loop_starts": starts, "slot": 2,
                   "loop_stride": 2})
    with pytest.raises(ValueError, match=message):
        lora.lora_triton(**args)


test_interpreted_kernels_in_a_fresh_process = fresh_process_test(__file__, "-k", "triton and not TestCUDA", interpreting=INTERPRETER)


# ----------------------------------------------------------------------------------------------
# Native on the GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCUDA:
    @PATHS
    @pytest.mark.parametrize("shape, dtype", cases(every_dtype=True))
    def test_matches_reference(self, shape, dtype, seed, fused):
        check_against_reference(shape, dtype, seed, "cuda", fused)

    @PATHS
    def test_smollm2_decode_shape(self, seed, fused):
        """A depth-wise decode call of SmolLM2's gate projection: 256 rows over 3 loops, rank 32."""
        check_against_reference(((90, 100, 66), 576, 1536, 32), torch.bfloat16, seed, "cuda", fused)

    @PATHS
    def test_cuda_graph_replays_other_loop_splits(self, seed, fused):
        """The grid depends on shapes only: a graph captured with one split serves another."""
        x, base, lora_a, lora_b, starts = inputs(((8, 8, 8), 64, 96, 16), torch.bfloat16, seed, "cuda")
        lora.lora_triton(x, base, lora_a, lora_b, starts, 0, 1, fused=fused)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = lora.lora_triton(x, base, lora_a, lora_b, starts, 0, 1, fused=fused)
        starts.copy_(torch.tensor([0, 20, 20, 24], dtype=torch.int32))
        graph.replay()
        expected = lora_ref(*(t.cpu() for t in (x, base, lora_a, lora_b, starts)), 0, 1)
        assert_close(out, expected, "lora_triton (graph replay)", seed)

    def test_custom_op_uses_the_kernel(self, seed, monkeypatch):
        from fxforge.ir import ops

        spy = checks.Spy(lora.lora_triton)
        monkeypatch.setattr(lora, "lora_triton", spy)
        x, base, lora_a, lora_b, starts = inputs(((3, 4), 32, 48, 8), torch.bfloat16, seed, "cuda")
        got = ops.LORA(x, base, lora_a, lora_b, starts, 0, 1, ops.TRITON)
        assert_close(got, lora_ref(*(t.cpu() for t in (x, base, lora_a, lora_b, starts)), 0, 1), "fxforge::lora", seed)
        assert spy.calls == 1, "an op bound to 'triton' must run the kernel for CUDA tensors"
