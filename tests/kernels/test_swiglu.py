"""kernels/swiglu.py: silu(gate) * up in Triton against the float32 reference.

The kernel runs under the interpreter on CPU and natively on CUDA (class TestCUDA). Inputs are drawn
fresh; failures print the seed.
"""

import functools
import secrets

import pytest
import torch
import torch.nn.functional as F

from tests.kernels import checks
from tests.kernels.interpreter import fresh_process_test, interpreter_mark, is_interpreted

from fxforge.kernels import swiglu
from fxforge.kernels.swiglu import swiglu_ref

INTERPRETER = is_interpreted(swiglu._swiglu_kernel)
needs_interpreter = interpreter_mark(INTERPRETER)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# float32: exp differs by a few ulp between libraries; bf16/fp16: one step of the dtype.
TOLERANCE = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-5, 1.6e-2), torch.float16: (1e-5, 1e-3)}
SHAPES = {"one_value": (1, 1), "t7_i96": (7, 96), "t33_i1000": (33, 1000), "t1_i2049": (1, 2049), "t5_h3_129": (5, 3, 129)}


def cases(every_dtype: bool) -> list:
    names = list(DTYPES)
    return [pytest.param(shape, DTYPES[name], id=f"{shape_id}-{name}")
            for i, (shape_id, shape) in enumerate(SHAPES.items()) for name in (names if every_dtype else [names[i % 3]])]


@pytest.fixture
def seed():
    return secrets.randbelow(2**31)


def inputs(shape, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=gen) * 4).to(dtype)  # reaches silu's flat and linear parts
    up = torch.randn(shape, generator=gen).to(dtype)
    return gate.to(device), up.to(device)


assert_close = functools.partial(checks.assert_close, tolerance=TOLERANCE)


def check_against_reference(shape, dtype, seed, device):
    gate, up = inputs(shape, dtype, seed, device)
    assert_close(swiglu.swiglu_triton(gate, up), swiglu_ref(gate.cpu(), up.cpu()), "swiglu_triton", seed)


# ----------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------


def test_reference_equals_the_unfused_mlp_in_float32(seed):
    """Exact in float32: the lowering's logits must not move."""
    gate, up = inputs((33, 96), torch.float32, seed)
    assert torch.equal(swiglu_ref(gate, up), F.silu(gate) * up), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reference_rounds_once_in_half_precision(dtype, seed):
    """The fused result is the float32 product rounded once; the unfused graph (two roundings) stays
    within one step of it."""
    gate, up = inputs((33, 512), dtype, seed)
    fused = swiglu_ref(gate, up)
    assert torch.equal(fused, (F.silu(gate.float()) * up.float()).to(dtype))
    unfused = F.silu(gate) * up
    step = torch.finfo(dtype).eps * fused.float().abs() + 1e-6
    assert bool(((unfused.float() - fused.float()).abs() <= step).all()), f"seed {seed}"


# ----------------------------------------------------------------------------------------------
# The Triton kernel under the interpreter
# ----------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("shape, dtype", cases(every_dtype=False))
def test_triton_matches_reference(shape, dtype, seed):
    check_against_reference(shape, dtype, seed, "cpu")


@needs_interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered")  # exp(1e4) = inf on purpose
def test_triton_extreme_gates(seed):
    """silu saturates cleanly: -inf-like gates give 0, large gates give gate * up."""
    gate = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4])
    up = torch.full_like(gate, 2.0)
    assert_close(swiglu.swiglu_triton(gate, up), swiglu_ref(gate, up), "swiglu_triton extremes", seed)


@needs_interpreter
@pytest.mark.parametrize("gate, up, message", [
    (torch.zeros(4, 8), torch.zeros(4, 9), "one shape and dtype"),
    (torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.float16), "one shape and dtype"),
    (torch.zeros(8, 4).t(), torch.zeros(4, 8), "unit stride along the last dim"),
], ids=["shape", "dtype", "transposed"])
def test_triton_launcher_rejects_bad_inputs(gate, up, message):
    with pytest.raises(ValueError, match=message):
        swiglu.swiglu_triton(gate, up)


@needs_interpreter
@pytest.mark.parametrize("rows, width, dtype", [(1, 96, torch.float32), (7, 1000, torch.bfloat16),
                                                (33, 2049, torch.float16), (5, 3, torch.float32)],
                         ids=["t1_i96-fp32", "t7_i1000-bf16", "t33_i2049-fp16", "t5_i3-fp32"])
def test_triton_reads_the_column_slices_of_a_fused_gate_up(rows, width, dtype, seed):
    """gate and up as the two halves of a [T, 2I] GEMM output (passes/fuse_projections.py): rows strided,
    read where they are; and slices of two differently strided tensors."""
    gate, up = inputs((rows, 2 * width), dtype, seed)
    fused = torch.cat([gate[:, :width], up[:, width:]], dim=1)
    halves = fused[:, :width], fused[:, width:]
    assert rows == 1 or not halves[0].is_contiguous()
    assert_close(swiglu.swiglu_triton(*halves), swiglu_ref(*(h.contiguous() for h in halves)), "swiglu_triton sliced",
                 seed)
    wider = torch.cat([up, up], dim=1)[:, 3:3 + width]  # another row stride than gate's
    assert_close(swiglu.swiglu_triton(halves[0], wider), swiglu_ref(halves[0].contiguous(), wider.contiguous()),
                 "swiglu_triton mixed strides", seed)
    heads = fused.view(rows, 2, width)[:, :1]  # [T, 1, I]: 3-d, rows strided
    assert_close(swiglu.swiglu_triton(heads, heads), swiglu_ref(heads.contiguous(), heads.contiguous()),
                 "swiglu_triton 3-d strided", seed)


test_interpreted_kernels_in_a_fresh_process = fresh_process_test(__file__, "-k", "triton and not TestCUDA", interpreting=INTERPRETER)


# ----------------------------------------------------------------------------------------------
# Native on the GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCUDA:
    @pytest.mark.parametrize("shape, dtype", cases(every_dtype=True))
    def test_matches_reference(self, shape, dtype, seed):
        check_against_reference(shape, dtype, seed, "cuda")

    def test_large(self, seed):
        check_against_reference((4096, 14336), torch.bfloat16, seed, "cuda")

    def test_custom_op_uses_the_kernel(self, seed, monkeypatch):
        from fxforge.ir import ops

        spy = checks.Spy(swiglu.swiglu_triton)
        monkeypatch.setattr(swiglu, "swiglu_triton", spy)
        gate, up = inputs((7, 96), torch.bfloat16, seed, "cuda")
        assert_close(ops.SWIGLU(gate, up, ops.TRITON), swiglu_ref(gate.cpu(), up.cpu()), "fxforge::swiglu", seed)
        assert spy.calls == 1, "an op bound to 'triton' must run the kernel for CUDA tensors"
