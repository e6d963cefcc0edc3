"""What every kernel module needs from Triton, in one place: the optional import, `jit`, and whether
kernels run under the interpreter.

    from fxforge.kernels.triton_support import INTERPRETED, jit, tl, triton

On a CPU-only install without triton, `triton` and `tl` are None and `jit` returns the function
unchanged, so kernel modules still import and their torch references serve every call.

`triton.jit` reads TRITON_INTERPRET when it decorates a function, and triton's own library
functions are decorated when triton is first imported; so INTERPRETED (read here, at the first
import of triton through this module) says how every kernel of this process was built.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch references serve every call
    triton = None
    tl = None

HAS_TRITON = triton is not None
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


def jit(fn):
    """`triton.jit(fn)` where triton is installed, else `fn` itself (never launched then)."""
    return triton.jit(fn) if triton is not None else fn


def launches_on(device) -> bool:
    """True when Triton kernels run on `device` (a torch.device or its name): CUDA, or the CPU under the
    interpreter."""
    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    return HAS_TRITON and (kind == "cuda" or (INTERPRETED and kind == "cpu"))


def can_launch(tensor) -> bool:
    """True when a Triton kernel can run on `tensor`: a CUDA tensor, or a CPU one under the interpreter."""
    return launches_on(tensor.device)


def check_launchable(kernel: str, name: str, tensor, reference: str) -> None:
    """Raise ValueError naming `kernel`, the input `name` and the `reference` to use instead, unless
    a Triton kernel can run on `tensor` (see can_launch)."""
    if not HAS_TRITON:
        raise ValueError(f"{kernel} needs triton installed; use {reference} on CPU")
    if not can_launch(tensor):
        raise ValueError(f"{kernel} needs CUDA tensors (or CPU with TRITON_INTERPRET=1 set before importing "
                         f"fxforge), got {name} on {tensor.device}; use {reference}")


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), without needing triton installed."""
    return 1 << max(0, (n - 1).bit_length())


@jit
def round_to_bf16(x):
    """float32 -> bfloat16, round half to even, spelled out on the bits (torch's rule, NaN kept quiet):
    the interpreter's cast truncates, and this gives the hardware's result everywhere."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@jit
def dot_acc(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in float32. UPCAST (pass INTERPRETED and bf16 operands): the Triton interpreter
    multiplies bf16 bit patterns as integers, so there the operands are widened first (the same
    products; only the order of the sum may differ)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


__all__ = ["triton", "tl", "HAS_TRITON", "INTERPRETED", "jit", "launches_on", "can_launch", "check_launchable", "next_pow2", "round_to_bf16", "dot_acc"]
