"""kernels/norm.py: RMSNorm (and the fused residual add) in Triton against the float32 reference.

The reference must equal the canonical RMSNorm module exactly; the kernel runs under the interpreter
on CPU and natively on CUDA (class TestCUDA). Inputs are drawn fresh; failures print the seed.
"""

import secrets

import pytest
import torch

from tests.kernels.checks import Spy
from tests.kernels.interpreter import fresh_process_test, interpreter_mark, is_interpreted

from fxforge.ir.modules import RMSNorm
from fxforge.kernels import norm
from fxforge.kernels.norm import add_rmsnorm_ref, rmsnorm_ref

INTERPRETER = is_interpreted(norm._rmsnorm_kernel)
needs_interpreter = interpreter_mark(INTERPRETER)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (atol, rtol): about two steps of the dtype, since the result is rounded twice (the normalised row to
# x's dtype, then the product with the weight) and float32 rsqrt/sum order may flip either rounding.
TOLERANCE = {torch.float32: (1e-5, 1.3e-6), torch.bfloat16: (1e-5, 1.6e-2), torch.float16: (1e-5, 2e-3)}
# x shape, weight shape: hidden norms (rows of N, N not a power of two) and per-head QK-norms
SHAPES = {
    "one_row_n64": ((1, 64), (64,)),
    "t7_n576": ((7, 576), (576,)),
    "t33_n4096": ((33, 4096), (4096,)),
    "qk_t7_h3_d64": ((7, 3, 64), (64,)),
    "qk_perhead_t33_h9_d128": ((33, 9, 128), (9, 128)),
    "qk_perhead_t1_h1_d32": ((1, 1, 32), (1, 32)),
}


def cases(every_dtype: bool) -> list:
    names = list(DTYPES)
    return [pytest.param(x_shape, w_shape, DTYPES[name], id=f"{shape_id}-{name}")
            for i, (shape_id, (x_shape, w_shape)) in enumerate(SHAPES.items())
            for name in (names if every_dtype else [names[i % 3]])]


@pytest.fixture
def seed():
    return secrets.randbelow(2**31)


def inputs(x_shape, w_shape, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(x_shape, generator=gen) * 3).to(dtype)
    weight = (1 + 0.3 * torch.randn(w_shape, generator=gen)).to(dtype)
    return x.to(device), weight.to(device)


def assert_close(actual, expected, what, seed, rounded_to=None):
    """The message names the shape, the mismatch count and the max diff. `rounded_to`: the dtype the
    values went through (the tolerance is one step of it)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: got {actual.dtype} {tuple(actual.shape)}, expected {expected.dtype} {tuple(expected.shape)}")
    atol, rtol = TOLERANCE[rounded_to or expected.dtype]
    a, e = actual.cpu().double(), expected.cpu().double()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol)
    if bad.any():
        pytest.fail(f"{what}: shape {tuple(expected.shape)} {expected.dtype}, seed {seed}: {int(bad.sum())} of "
                    f"{bad.numel()} differ beyond atol={atol} rtol={rtol}, max diff {(a - e).abs().max().item():.3g}")


def check_against_reference(x_shape, w_shape, dtype, seed, device, eps=1e-6):
    x, weight = inputs(x_shape, w_shape, dtype, seed, device)
    expected = rmsnorm_ref(x.cpu(), weight.cpu(), eps)
    assert_close(norm.rmsnorm_triton(x, weight, eps), expected, "rmsnorm_triton", seed)
    residual = inputs(x_shape, w_shape, dtype, seed + 1, device)[0]
    total, out = norm.add_rmsnorm_triton(x, residual, weight, eps)
    expected_total, expected_out = add_rmsnorm_ref(x.cpu(), residual.cpu(), weight.cpu(), eps)
    assert_same(total, expected_total, "add_rmsnorm_triton sum", seed)  # one rounding of an exact sum
    assert_close(out, expected_out, "add_rmsnorm_triton norm of its sum", seed)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}  # element size -> an integer dtype to compare bits


def assert_same(actual, expected, what, seed):
    """Bit for bit; the message names the shape, the mismatch count and the max diff."""
    a, e = actual.cpu().contiguous(), expected.cpu().contiguous()
    assert a.shape == e.shape and a.dtype == e.dtype, f"{what}: {a.dtype} {tuple(a.shape)} vs {e.dtype} {tuple(e.shape)}"
    bad = a.view(_BITS[a.element_size()]) != e.view(_BITS[e.element_size()])
    if bad.any():
        pytest.fail(f"{what}: shape {tuple(e.shape)} {e.dtype}, seed {seed}: {int(bad.sum())} of {bad.numel()} "
                    f"differ, max diff {(a.double() - e.double()).abs().max().item():.3g}")


# ----------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_shape, w_shape, dtype", cases(every_dtype=True))
def test_reference_equals_the_module(x_shape, w_shape, dtype, seed):
    """rmsnorm_ref is what ir.modules.RMSNorm computes, bit for bit (the lowering relies on it)."""
    x, weight = inputs(x_shape, w_shape, dtype, seed)
    module = RMSNorm(w_shape[-1], 1e-5).to(dtype)
    module.weight = torch.nn.Parameter(weight)
    with torch.no_grad():
        expected = module(x)
    actual = rmsnorm_ref(x, weight, 1e-5)
    assert torch.equal(actual, expected), f"shape {x_shape} {dtype}, seed {seed}: max diff {(actual - expected).abs().max()}"


def test_reference_normalises_to_unit_rms(seed):
    x, _ = inputs((5, 256), (256,), torch.float32, seed)
    rms = rmsnorm_ref(x, torch.ones(256), 0.0).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones(5), rtol=1e-5, atol=0)


# residual adds: x [T, N] the branch output, residual the stream (a bf16 branch may meet a float32 stream)
ADD_CASES = [
    pytest.param((1, 64), torch.bfloat16, torch.bfloat16, id="one_row_n64-bf16"),
    pytest.param((7, 576), torch.float32, torch.float32, id="t7_n576-fp32"),
    pytest.param((33, 96), torch.float16, torch.float16, id="t33_n96-fp16"),
    pytest.param((5, 3, 64), torch.bfloat16, torch.bfloat16, id="qk_t5_h3_d64-bf16"),
    pytest.param((9, 200), torch.bfloat16, torch.float32, id="t9_n200-bf16_on_fp32"),
]


def add_inputs(shape, dtype, residual_dtype, seed, device="cpu"):
    x, weight = inputs(shape, shape[-1:], dtype, seed, device)
    return x, inputs(shape, shape[-1:], residual_dtype, seed + 1, device)[0], weight


@pytest.mark.parametrize("shape, dtype, residual_dtype", ADD_CASES)
def test_add_reference_is_the_residual_add_then_the_module(shape, dtype, residual_dtype, seed):
    """add_rmsnorm_ref gives what the graph computed unfused, bit for bit: `residual + x` (torch's dtype
    promotion and rounding) and ir.modules.RMSNorm of that sum."""
    x, residual, weight = add_inputs(shape, dtype, residual_dtype, seed)
    module = RMSNorm(shape[-1], 1e-5).to(weight.dtype)
    module.weight = torch.nn.Parameter(weight)
    total, normed = add_rmsnorm_ref(x, residual, weight, 1e-5)
    expected = residual + x
    assert_same(total, expected, "add_rmsnorm_ref sum", seed)
    with torch.no_grad():
        assert_same(normed, module(expected), "add_rmsnorm_ref norm", seed)


# ----------------------------------------------------------------------------------------------
# The Triton kernel under the interpreter
# ----------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("x_shape, w_shape, dtype", cases(every_dtype=False))
def test_triton_matches_reference(x_shape, w_shape, dtype, seed):
    check_against_reference(x_shape, w_shape, dtype, seed, "cpu")


@needs_interpreter
def test_triton_mixed_dtypes_promote_like_torch(seed):
    """bf16 activations with a float32 weight give a float32 result, as weight * x.to(bf16) does."""
    x, _ = inputs((7, 3, 64), (3, 64), torch.bfloat16, seed)
    weight = 1 + 0.3 * torch.randn(3, 64)
    actual, expected = norm.rmsnorm_triton(x, weight, 1e-5), rmsnorm_ref(x, weight, 1e-5)
    assert_close(actual, expected, "rmsnorm_triton mixed", seed, rounded_to=torch.bfloat16)


@needs_interpreter
def test_triton_strided_rows(seed):
    """A slice of a wider tensor (row stride != N) is read in place."""
    wide, weight = inputs((9, 200), (96,), torch.float32, seed)
    x = wide[:, 50:146]
    assert not x.is_contiguous()
    assert_close(norm.rmsnorm_triton(x, weight, 1e-5), rmsnorm_ref(x, weight, 1e-5), "rmsnorm_triton strided", seed)


@needs_interpreter
@pytest.mark.parametrize("bad, message", [
    ({"weight": torch.ones(32)}, "weight \\(32,\\) must match the trailing dims"),
    ({"weight": torch.ones(2, 64)}, "weight \\(2, 64\\) must match"),
    ({"x": torch.zeros(4, 3, 64, dtype=torch.int64)}, "float32/bfloat16/float16"),
], ids=["wrong_n", "wrong_heads", "int_x"])
def test_triton_launcher_rejects_bad_inputs(bad, message):
    args = {"x": torch.zeros(4, 3, 64), "weight": torch.ones(3, 64), "eps": 1e-5, **bad}
    with pytest.raises(ValueError, match=message):
        norm.rmsnorm_triton(**args)
    with pytest.raises(ValueError, match="residual must be a float32/bfloat16/float16 tensor of x's shape"):
        norm.add_rmsnorm_triton(torch.zeros(4, 64), torch.zeros(4, 32), torch.ones(64), 1e-5)


@needs_interpreter
@pytest.mark.parametrize("shape, dtype, residual_dtype", ADD_CASES)
def test_triton_add_rmsnorm_equals_the_unfused_pair(shape, dtype, residual_dtype, seed):
    """Both outputs bit for bit those of torch's add followed by rmsnorm_triton of the sum (the pair the
    fusion replaces), and the norm within rounding of the float32 reference."""
    x, residual, weight = add_inputs(shape, dtype, residual_dtype, seed)
    total, normed = norm.add_rmsnorm_triton(x, residual, weight, 1e-5)
    expected_total = residual + x
    assert_same(total, expected_total, "add_rmsnorm_triton sum", seed)
    assert_same(normed, norm.rmsnorm_triton(expected_total, weight, 1e-5), "add_rmsnorm_triton norm", seed)
    assert_close(normed, add_rmsnorm_ref(x, residual, weight, 1e-5)[1], "add_rmsnorm_triton vs reference", seed,
                 rounded_to=expected_total.dtype)


@needs_interpreter
def test_triton_add_rmsnorm_reads_strided_rows_and_the_op_runs_it(seed, monkeypatch):
    """Slices of wider tensors are read in place; fxforge::add_rmsnorm bound to 'triton' runs the kernel."""
    from fxforge.ir import ops

    wide, residual, weight = add_inputs((6, 300), torch.float32, torch.float32, seed)
    x = wide[:, 100:196]
    residual, weight = residual[:, :96], weight[:96]
    spy = Spy(norm.add_rmsnorm_triton)
    monkeypatch.setattr(norm, "add_rmsnorm_triton", spy)
    total, normed = ops.ADD_RMSNORM(x, residual, weight, 1e-5, ops.TRITON)
    assert spy.calls == 1, "an op bound to 'triton' must run the kernel where the interpreter runs it"
    assert_same(total, residual + x, "fxforge::add_rmsnorm sum", seed)
    assert_same(normed, norm.rmsnorm_triton(residual + x, weight, 1e-5), "fxforge::add_rmsnorm norm", seed)


test_interpreted_kernels_in_a_fresh_process = fresh_process_test(__file__, "-k", "triton and not TestCUDA", interpreting=INTERPRETER)


# ----------------------------------------------------------------------------------------------
# Native on the GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCUDA:
    @pytest.mark.parametrize("x_shape, w_shape, dtype", cases(every_dtype=True))
    def test_matches_reference(self, x_shape, w_shape, dtype, seed):
        check_against_reference(x_shape, w_shape, dtype, seed, "cuda")

    @pytest.mark.parametrize("shape, dtype, residual_dtype", ADD_CASES)
    def test_add_rmsnorm_equals_the_unfused_pair(self, shape, dtype, residual_dtype, seed):
        x, residual, weight = add_inputs(shape, dtype, residual_dtype, seed, "cuda")
        total, normed = norm.add_rmsnorm_triton(x, residual, weight, 1e-5)
        assert_same(total, residual + x, "add_rmsnorm_triton sum", seed)
        assert_same(normed, norm.rmsnorm_triton(residual + x, weight, 1e-5), "add_rmsnorm_triton norm", seed)

    @pytest.mark.parametrize("n", [896, 8192, 16384], ids=["n896", "n8192", "n16384"])
    def test_wide_rows(self, n, seed):
        check_against_reference((300, n), (n,), torch.bfloat16, seed, "cuda")

    def test_custom_op_uses_the_kernel(self, seed, monkeypatch):
        from fxforge.ir import ops

        spy = Spy(norm.rmsnorm_triton)
        monkeypatch.setattr(norm, "rmsnorm_triton", spy)
        x, weight = inputs((7, 3, 64), (3, 64), torch.bfloat16, seed, "cuda")
        assert_close(ops.RMSNORM(x, weight, 1e-5, ops.TRITON), rmsnorm_ref(x.cpu(), weight.cpu(), 1e-5),
                     "fxforge::rmsnorm", seed)
        assert spy.calls == 1, "an op bound to 'triton' must run the kernel for CUDA tensors"
