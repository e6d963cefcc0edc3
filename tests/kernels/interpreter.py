"""Run a kernel test file's Triton tests under the Triton interpreter, in a fresh process.

`triton.jit` reads TRITON_INTERPRET when a kernel is decorated, and tests/conftest.py imports
fxforge (hence triton) before any test module, so on a CPU machine each kernel test file re-runs
its Triton tests in a child process that sets TRITON_INTERPRET=1 before importing anything.
"""

import os

import pytest
import subprocess
import sys
from pathlib import Path


def run_interpreted(test_file: str, *selection: str) -> None:
    """pytest `test_file` with `selection` (-k/-m arguments) under the interpreter; assert all passed."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", *selection, "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=Path(test_file).resolve().parents[2], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"interpreter tests failed:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-2000:]


try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def is_interpreted(kernel) -> bool:
    """True when `kernel` was built by the Triton interpreter (this process set TRITON_INTERPRET=1 first)."""
    return HAS_TRITON and type(kernel).__name__ == "InterpretedFunction"


def interpreter_mark(active: bool):
    """Skip a Triton-on-CPU test unless this process interprets kernels; run_interpreted covers it then."""
    return pytest.mark.skipif(not active, reason="triton is missing or was imported before TRITON_INTERPRET=1 was "
                                                 "set (test_interpreted_kernels_in_a_fresh_process runs these tests)")


def fresh_process_test(test_file: str, *selection: str, interpreting: bool):
    """A test that re-runs `test_file`'s Triton tests under the interpreter in a child process; it is
    skipped where this process already interprets them (or runs them natively on CUDA)."""
    import torch

    @pytest.mark.skipif(interpreting or not HAS_TRITON or torch.cuda.is_available(),
                        reason="the interpreter tests run in this process (or natively on CUDA in TestCUDA)")
    def test_interpreted_kernels_in_a_fresh_process():
        run_interpreted(test_file, *selection)

    return test_interpreted_kernels_in_a_fresh_process
