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
    out, total = norm.add_rmsnorm_triton(x, residual, weight, eps)
    expected_total = add_rmsnorm_ref(x.cpu(), residual.cpu(), weight.cpu(), eps)[1]
    assert_close(out, rmsnorm_ref(total.cpu(), weight.cpu(), eps), "add_rmsnorm_triton norm of its sum", seed)
    if device == "cpu" and dtype == torch.bfloat16:  # the interpreter truncates float32 -> bfloat16
        assert_close(total, expected_total, "add_rmsnorm_triton sum", seed)
    else:  # one rounding of an exact sum: bit for bit
        mismatch = int((total.cpu() != expected_total).sum())
        assert mismatch == 0, f"add_rmsnorm_triton sum: shape {x_shape} {dtype}, seed {seed}: {mismatch} differ"


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
    with pytest.raises(ValueError, match="residual must match x"):
        norm.add_rmsnorm_triton(torch.zeros(4, 64), torch.zeros(4, 32), torch.ones(64), 1e-5)


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
