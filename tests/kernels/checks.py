"""Comparison for kernel tests: the failure message names the shape, the mismatch count and the max diff."""

import pytest
import torch


class Spy:
    """Wraps a function and counts its calls (to prove which implementation an op dispatched to)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def assert_close(actual, expected, what, seed, tolerance: dict):
    """actual ~ expected within tolerance[expected.dtype] = (atol, rtol); same shape and dtype."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: got {actual.dtype} {tuple(actual.shape)}, expected {expected.dtype} {tuple(expected.shape)}")
    atol, rtol = tolerance[expected.dtype]
    a, e = actual.cpu().double(), expected.cpu().double()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol)
    if bad.any():
        pytest.fail(f"{what}: shape {tuple(expected.shape)} {expected.dtype}, seed {seed}: {int(bad.sum())} of "
                    f"{bad.numel()} differ beyond atol={atol} rtol={rtol}, max diff {(a - e).abs().max().item():.3g}")
